from django.contrib.auth.decorators import login_required
from django.shortcuts import render

from analytics.visibility import viewer_scope, visible_organizations

from .middleware import viewer_timezone_name
from .models import Membership, Team


@login_required
def home(request):
    """Who you are and what you can see."""
    scope = viewer_scope(request.user)
    memberships = (
        Membership.objects.filter(user=request.user)
        .select_related("organization", "team", "project")
        .order_by("organization__name", "role")
    )
    context = {
        "scope": scope,
        "memberships": memberships,
        "organizations": visible_organizations(request.user),
        "led_teams": Team.objects.filter(id__in=scope.team_ids),
        "timezone_name": viewer_timezone_name(request.user),
        "owned_tokens": request.user.api_tokens.select_related("organization").order_by("name"),
    }
    return render(request, "accounts/home.html", context)
