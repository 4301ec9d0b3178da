import zoneinfo

from django.utils import timezone


def viewer_timezone_name(user) -> str:
    """The viewer's zone: their profile's, else their first organization's, else UTC."""
    if not getattr(user, "is_authenticated", False):
        return "UTC"
    if user.timezone:
        return user.timezone
    # Asked several times per request (middleware, filter, widgets): look it up once
    # per user object, which lives as long as the request.
    cached = getattr(user, "_org_timezone_name", None)
    if cached is None:
        membership = user.memberships.select_related("organization").order_by("id").first()
        cached = membership.organization.timezone if membership else "UTC"
        user._org_timezone_name = cached
    return cached


class ViewerTimezoneMiddleware:
    """Activate the viewer's time zone so templates show local times."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if getattr(request, "user", None) is not None and request.user.is_authenticated:
            try:
                timezone.activate(zoneinfo.ZoneInfo(viewer_timezone_name(request.user)))
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                timezone.deactivate()
        else:
            timezone.deactivate()
        return self.get_response(request)
