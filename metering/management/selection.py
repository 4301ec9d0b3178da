"""What the roll-up commands (check_aggregates, rebuild_aggregates) are asked to cover."""

from datetime import UTC, datetime, timedelta

from django.core.management.base import CommandError

from accounts.models import Organization


def organizations(slug: str | None):
    """Every organization, or the one with `slug` (CommandError when there is none)."""
    orgs = Organization.objects.order_by("id")
    if slug:
        orgs = orgs.filter(slug=slug)
        if not orgs.exists():
            raise CommandError(f"No organization with slug {slug!r}.")
    return orgs


def since_day(days: int | None) -> int | None:
    """The UTC day start `days` days ago (epoch seconds), or None for all time."""
    if not days:
        return None
    start = int((datetime.now(UTC) - timedelta(days=days)).timestamp())
    return start - start % 86400
