"""The global filter bar: period, organization, team, project, user, model, API token,
session, operation and status. The selection lives in the URL's query string.

`UsageFilter` is a django-filter FilterSet over the gated events queryset (the events
log filters raw rows with it); `selection()` turns the same choices into a
`queries.Selection` for the roll-up-backed widgets. Every option list is a callable of
the request that starts from the visibility gate, and a choice outside it makes the
whole filter invalid: the result is then empty, never the unfiltered set.
"""

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import django_filters
from django.db.models import Q
from django.utils import timezone

from accounts.middleware import viewer_timezone_name
from accounts.models import ApiToken, Organization
from metering.models import Operation, UsageEvent

from .queries import Selection
from .visibility import (
    viewer_scope,
    visible_events_in,
    visible_organizations,
    visible_projects,
    visible_teams,
    visible_tokens,
    visible_users,
)

PRESETS = {
    "1h": ("Last hour", timedelta(hours=1)),
    "6h": ("Last 6 hours", timedelta(hours=6)),
    "24h": ("Last 24 hours", timedelta(hours=24)),
    "7d": ("Last 7 days", timedelta(days=7)),
    "30d": ("Last 30 days", timedelta(days=30)),
    "90d": ("Last 90 days", timedelta(days=90)),
    "this_month": ("This month", None),
    "last_month": ("Last month", None),
    "custom": ("Custom range", None),
}
DEFAULT_PRESET = "7d"
STATUS_CHOICES = [("all", "All statuses"), ("ok", "Succeeded"), ("failed", "Failed")]
FILTER_PARAMS = (
    "period",
    "start",
    "end",
    "org",
    "team",
    "project",
    "user",
    "model",
    "token",
    "session",
    "operation",
    "status",
    "end_user",
)


@dataclass(frozen=True)
class Period:
    start: datetime  # UTC
    end: datetime  # UTC
    preset: str
    label: str
    tz: ZoneInfo


def _month_start(local: datetime) -> datetime:
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def resolve_period(preset: str, start_raw, end_raw, tz: ZoneInfo, now: datetime) -> Period:
    """Turn a preset or a custom range (naive local datetimes) into UTC instants."""
    now = now.replace(second=0, microsecond=0) + timedelta(minutes=1)  # include this minute
    local_now = now.astimezone(tz)
    if preset == "custom" and start_raw:
        start = start_raw.replace(tzinfo=tz) if start_raw.tzinfo is None else start_raw
        end = end_raw.replace(tzinfo=tz) if end_raw and end_raw.tzinfo is None else end_raw
        end = end or now
        label = f"{start:%Y-%m-%d %H:%M} – {end.astimezone(tz):%Y-%m-%d %H:%M}"
        return Period(start.astimezone(UTC), end.astimezone(UTC), preset, label, tz)
    if preset == "this_month":
        start = _month_start(local_now.replace(tzinfo=None)).replace(tzinfo=tz)
        return Period(start.astimezone(UTC), now, preset, "this month", tz)
    if preset == "last_month":
        this_start = _month_start(local_now.replace(tzinfo=None))
        prev = this_start - timedelta(days=1)
        start = prev.replace(day=1).replace(tzinfo=tz)
        end = this_start.replace(tzinfo=tz)
        label = f"{calendar.month_name[prev.month]} {prev.year}"
        return Period(start.astimezone(UTC), end.astimezone(UTC), preset, label, tz)
    if preset not in PRESETS or PRESETS[preset][1] is None:
        preset = DEFAULT_PRESET
    label, length = PRESETS[preset]
    return Period(now - length, now, preset, label.lower(), tz)


def _request_user(request):
    return request.user if request is not None else None


def _orgs(request):
    return visible_organizations(_request_user(request))


def _teams(request):
    return visible_teams(_request_user(request)).select_related("organization")


def _projects(request):
    return visible_projects(_request_user(request)).select_related("organization")


def _users(request):
    return visible_users(_request_user(request))


def _tokens(request):
    return visible_tokens(_request_user(request))


class _GatedOptions:
    """A model-choice filter whose gated option queryset is built only when the request
    names the filter: an absent choice validates against an empty queryset, with no
    read and no work of the gate (most requests name one or two of the five)."""

    def get_queryset(self, request):
        parent = getattr(self, "parent", None)
        data = getattr(parent, "data", None)
        name = getattr(self, "param_name", None)
        if data is not None and name and not data.get(name):
            related = parent.queryset.model._meta.get_field(self.field_name).related_model
            return related.objects.none()
        return super().get_queryset(request)


class GatedChoiceFilter(_GatedOptions, django_filters.ModelChoiceFilter):
    pass


class GatedMultipleChoiceFilter(_GatedOptions, django_filters.ModelMultipleChoiceFilter):
    """Filters on a column of the events table itself (no join), so no row can repeat:
    without django-filter's default DISTINCT, which would make every LIMIT wait for
    the whole selection to be read and sorted."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("distinct", False)
        super().__init__(*args, **kwargs)


class UsageFilter(django_filters.FilterSet):
    org = GatedChoiceFilter(
        field_name="organization",
        queryset=_orgs,
        label="Organization",
        empty_label="All organizations",
    )
    team = GatedMultipleChoiceFilter(field_name="team", queryset=_teams)
    project = GatedMultipleChoiceFilter(field_name="project", queryset=_projects)
    user = GatedMultipleChoiceFilter(field_name="user", queryset=_users)
    token = GatedMultipleChoiceFilter(field_name="api_token", queryset=_tokens, label="API token")
    model = django_filters.CharFilter(method="filter_models", label="Model")
    session = django_filters.CharFilter(method="filter_sessions", label="Chat session")
    end_user = django_filters.CharFilter(method="filter_end_users", label="End user")
    operation = django_filters.MultipleChoiceFilter(choices=Operation.choices)
    status = django_filters.ChoiceFilter(
        choices=STATUS_CHOICES, method="filter_status", empty_label=None
    )

    class Meta:
        model = UsageEvent
        fields = []

    def __init__(self, data=None, *args, request=None, **kwargs):
        data = data.copy() if data is not None else {}
        if request is not None and hasattr(data, "getlist"):
            users = data.getlist("user")
            if "me" in users and request.user.is_authenticated:
                data.setlist("user", [str(request.user.id) if u == "me" else u for u in users])
        super().__init__(data, *args, request=request, **kwargs)
        for name, filter_ in self.filters.items():
            filter_.param_name = name
        self.viewer = request.user
        self.viewer_tz = ZoneInfo(viewer_timezone_name(request.user))

    # -- raw events ---------------------------------------------------------------------

    def list_param(self, name: str) -> list[str]:
        if hasattr(self.data, "getlist"):
            values = []
            for raw in self.data.getlist(name):
                values.extend(v.strip() for v in raw.split(",") if v.strip())
            return values
        value = self.data.get(name)
        return [value] if value else []

    def filter_models(self, queryset, name, value):
        models = self.list_param("model")
        return queryset.filter(model__in=models) if models else queryset

    def filter_sessions(self, queryset, name, value):
        sessions = self.list_param("session")
        return queryset.filter(session_id__in=sessions) if sessions else queryset

    def filter_end_users(self, queryset, name, value):
        end_users = self.list_param("end_user")
        return queryset.filter(end_user__in=end_users) if end_users else queryset

    def filter_status(self, queryset, name, value):
        if value == "ok":
            return queryset.filter(status_code__lt=400)
        if value == "failed":
            return queryset.filter(status_code__gte=400)
        return queryset

    @property
    def qs(self):
        """Filtered events within the period; nothing at all when a choice is invalid."""
        if not hasattr(self, "_qs") and not (self.is_bound and not self.is_valid()):
            org = self.selected_org()
            if org is not None:
                # Within one organization the gate can say it in one indexable predicate
                # (the organization alone, for an org admin).
                self.queryset = visible_events_in(self.viewer, (org.id,))
        if not hasattr(self, "_qs"):
            if self.is_bound and not self.is_valid():
                self._qs = self.queryset.none()
            else:
                period = self.period
                self._qs = super().qs.filter(timestamp__gte=period.start, timestamp__lt=period.end)
        return self._qs

    # -- the period and the roll-up selection --------------------------------------------

    @property
    def period(self) -> Period:
        if not hasattr(self, "_period"):
            preset = self.data.get("period") or DEFAULT_PRESET
            start = _parse_local(self.data.get("start"))
            end = _parse_local(self.data.get("end"))
            if start and not self.data.get("period"):
                preset = "custom"
            if start and end and end <= start:
                start = end = None
                preset = DEFAULT_PRESET
            self._period = resolve_period(preset, start, end, self.viewer_tz, timezone.now())
        return self._period

    def selected_org(self) -> Organization | None:
        """The chosen organization, or the viewer's only one (looked up once)."""
        if not hasattr(self, "_selected_org"):
            self._selected_org = self._find_selected_org()
        return self._selected_org

    def _find_selected_org(self) -> Organization | None:
        if self.is_valid():
            org = self.form.cleaned_data.get("org")
            if org is not None:
                return org
        orgs = list(visible_organizations(self.viewer)[:2])
        if not viewer_scope(self.viewer).everything and len(orgs) == 1:
            return orgs[0]
        return None

    def selection(self) -> Selection | None:
        """The widgets' Selection, or None when the filter is invalid (show nothing)."""
        if self.is_bound and not self.is_valid():
            return None
        data = self.form.cleaned_data if self.is_bound else {}
        org = self.selected_org()
        period = self.period
        return Selection(
            scope=viewer_scope(self.viewer),
            start=period.start,
            end=period.end,
            org_ids=(org.id,) if org else (),
            team_ids=tuple(t.id for t in data.get("team") or ()),
            project_ids=tuple(p.id for p in data.get("project") or ()),
            user_ids=tuple(u.id for u in data.get("user") or ()),
            token_ids=tuple(t.id for t in data.get("token") or ()),
            models=tuple(self.list_param("model")),
            operations=tuple(data.get("operation") or ()),
            status=data.get("status") or "all",
            session_ids=tuple(self.list_param("session")),
            end_users=tuple(self.list_param("end_user")),
        )

    def chosen(self) -> dict:
        """What is selected, for chips and empty-state sentences."""
        if not self.is_bound or not self.is_valid():
            return {}
        data = self.form.cleaned_data
        return {
            "org": data.get("org"),
            "team": list(data.get("team") or ()),
            "project": list(data.get("project") or ()),
            "user": list(data.get("user") or ()),
            "token": list(data.get("token") or ()),
            "model": self.list_param("model"),
            "session": self.list_param("session"),
            "end_user": self.list_param("end_user"),
            "operation": list(data.get("operation") or ()),
            "status": data.get("status") or "all",
        }

    def describe(self) -> str:
        """'from Team Platform, model gpt-4o, in the last 24 hours'."""
        chosen = self.chosen()
        parts = []
        for key, label in (("team", "team"), ("project", "project"), ("user", "")):
            values = chosen.get(key) or []
            if values:
                names = ", ".join(str(v) for v in values[:3]) + ("…" if len(values) > 3 else "")
                parts.append(f"{label + ' ' if label else ''}{names}")
        if chosen.get("token"):
            parts.append("token " + ", ".join(t.name for t in chosen["token"][:2]))
        if chosen.get("model"):
            parts.append("model " + ", ".join(chosen["model"][:3]))
        if chosen.get("end_user"):
            parts.append("end user " + ", ".join(chosen["end_user"][:2]))
        if chosen.get("session"):
            parts.append("session " + ", ".join(chosen["session"][:2]))
        if chosen.get("operation"):
            parts.append(", ".join(chosen["operation"]) + " calls")
        if chosen.get("status") == "failed":
            parts.append("failed calls")
        elif chosen.get("status") == "ok":
            parts.append("successful calls")
        where = f" from {'; '.join(parts)}" if parts else ""
        org = chosen.get("org")
        if org:
            where += f" in {org.name}"
        period = self.period
        when = f"in the {period.label}" if period.label.startswith("last") else f"in {period.label}"
        if period.preset == "custom":
            when = f"between {period.label}"
        return f"{where} {when}".strip()


def _parse_local(value) -> datetime | None:
    if not value:
        return None
    for fmt in ("%Y-%m-%dT%H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return datetime.strptime(value, fmt)
        except ValueError:
            continue
    return None


def session_options(flt: UsageFilter, limit: int = 50) -> list[str]:
    """Recent chat sessions of the chosen users or teams, within the viewer's scope."""
    chosen = flt.chosen()
    if not (chosen.get("user") or chosen.get("team")):
        return []
    recent = flt.qs.exclude(session_id="").order_by("-timestamp")
    sessions = recent.values_list("session_id", flat=True)[: limit * 20]
    return list(dict.fromkeys(sessions))[:limit]


def token_label(token: ApiToken) -> str:
    return f"{token.name} ({token.prefix}…)"


def search_q(kind: str, term: str) -> Q:
    if kind == "user":
        return Q(email__icontains=term) | Q(name__icontains=term)
    if kind == "token":
        return (
            Q(name__icontains=term) | Q(prefix__icontains=term) | Q(service_account__icontains=term)
        )
    return Q(name__icontains=term) | Q(slug__icontains=term)
