import zoneinfo

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.shortcuts import redirect, render

from analytics.visibility import viewer_scope, visible_organizations

from .middleware import viewer_timezone_name
from .models import Membership, Team, User


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


class ProfileForm(forms.ModelForm):
    timezone = forms.ChoiceField(
        required=False,
        help_text="Times and chart buckets use this zone. Empty: your organization's.",
    )

    class Meta:
        model = User
        fields = ["name", "timezone"]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        zones = sorted(zoneinfo.available_timezones())
        self.fields["timezone"].choices = [("", "Organization default"), *((z, z) for z in zones)]


@login_required
def profile(request):
    """The viewer's own settings: display name and time zone."""
    form = ProfileForm(request.POST or None, instance=request.user)
    if request.method == "POST" and form.is_valid():
        form.save()
        messages.success(
            request, "Profile saved. Times now show in " + viewer_timezone_name(request.user) + "."
        )
        return redirect("profile")
    return render(
        request,
        "accounts/profile.html",
        {"form": form, "timezone_name": viewer_timezone_name(request.user)},
    )
