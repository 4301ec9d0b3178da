"""GET /api/v1/budgets/check: may this call go ahead? For gateways, before each model call.

Authentication: `Authorization: Bearer <api token>` with the **read** scope (the answer
shows spend, which is reading usage). The token answers within what it may read, like
GET /api/v1/usage: a token with no owner (an organization's gateway token) sees every
budget of its organization; a token with an owner sees the budgets its owner may see.
Subjects and budgets outside that answer 404 / are not listed.

Parameters (at least one): `user` (email), `api_key_id` (token id or prefix), `team`,
`project` (slug or id). The organization's budgets always apply; a user without `team`
or `project` brings their default team and project (as ingestion would attribute the
call). Answer:

    {"allowed": true,
     "budgets": [{"budget_id": 3, "scope": {"type": "user", "id": 7, "name": "a@b.c"},
                  "period": "monthly", "limit_usd": "50.0000", "spent_usd": "12.3400",
                  "remaining_usd": "37.6600", "resets_at": "2026-12-01T00:00:00+01:00"}]}

`allowed` is false when any listed budget is used up (spent >= limit). Amounts are
decimal strings (exact). Cost: one indexed range sum over BudgetSpend15m for all the
budgets; who the token is, who the call counts against and which budgets apply are
remembered for CHECK_CACHE_SECONDS (metering.check_cache: any change to them is seen by
the next call), else looked up in four queries.
"""

from django.db.models import CharField, Q
from django.db.models.functions import Coalesce
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from accounts.models import ApiToken, Membership, Project, Team, TokenScope
from accounts.tokens import bearer_secret, token_authenticate
from analytics.visibility import Scope, organization_scope, viewer_scope

from .budgets import (
    BudgetStatus,
    CallSubjects,
    budgets_spend,
    budgets_visible_q,
    zone_of,
)
from .check_cache import CheckConfig, config_get, config_key, config_set
from .models import Budget, nanos_to_usd

# Only what the answer needs: a lean query (the check runs before every model call).
BUDGET_FIELDS = (
    "id",
    "organization_id",
    "subject",
    "user_id",
    "team_id",
    "project_id",
    "api_token_id",
    "amount_usd",
    "period",
    "week_start",
    "month_day",
    "every_n_days",
    "anchor",
)


def _error(status: int, message: str) -> JsonResponse:
    response = JsonResponse({"error": {"message": message}}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="usage"'
    return response


class NotFound(Exception):
    pass


def _reader(token: ApiToken) -> Scope:
    # The check reads the budget spend counters, which ingestion keeps itself: no fold.
    if token.owner is None:
        return organization_scope(token.organization_id, fold=False)
    return viewer_scope(token.owner, fold=False)


def _by_slug_or_id(model, organization_id: int, raw: str) -> int:
    q = Q(slug=raw) | Q(pk=int(raw)) if raw.isdigit() else Q(slug=raw)
    found = model.objects.filter(q, organization_id=organization_id).values_list("pk", flat=True)
    value = next(iter(found), None)
    if value is None:
        raise NotFound
    return value


def _subjects(request, token: ApiToken) -> CallSubjects:
    """Who the call would count against, attributed as ingestion would attribute it:
    the named user (else the named token's owner, unless it is a service account); the
    named team/project, else the named token's default, else the user's membership's."""
    org_id = token.organization_id
    email = request.GET.get("user", "").strip().lower()
    team_raw = request.GET.get("team", "").strip()
    project_raw = request.GET.get("project", "").strip()
    key_raw = request.GET.get("api_key_id", "").strip()
    key = {}
    if key_raw:
        q = Q(pk=int(key_raw)) if key_raw.isdigit() else Q(prefix=key_raw)
        key = ApiToken.objects.filter(q, organization_id=org_id).values(*KEY_FIELDS).first()
        if key is None:
            raise NotFound
    user_id, defaults = None, (None, None)
    if email:
        user_id, defaults = _member(org_id, Q(user__email=email))
    elif key and key["owner_id"] and not key["service_account"]:
        user_id, defaults = _member(org_id, Q(user_id=key["owner_id"]))
    team_id = (
        _by_slug_or_id(Team, org_id, team_raw)
        if team_raw
        else key.get("default_team_id") or defaults[0]
    )
    project_id = (
        _by_slug_or_id(Project, org_id, project_raw)
        if project_raw
        else key.get("default_project_id") or defaults[1]
    )
    return CallSubjects(
        organization_id=org_id,
        user_id=user_id,
        team_ids=(team_id,) if team_id else (),
        project_ids=(project_id,) if project_id else (),
        token_id=key.get("pk"),
    )


KEY_FIELDS = ("pk", "owner_id", "service_account", "default_team_id", "default_project_id")


def _member(org_id: int, who: Q) -> tuple[int, tuple]:
    """(user id, (default team, default project)) of a member of the organization."""
    rows = Membership.objects.filter(who, organization_id=org_id).order_by("id")
    memberships = list(rows.values_list("user_id", "team_id", "project_id"))
    if not memberships:
        raise NotFound
    team = project = None
    for _, team_id, project_id in memberships:
        team, project = team or team_id, project or project_id
    return memberships[0][0], (team, project)


def _visible_subject(scope: Scope, subjects: CallSubjects, explicit: dict) -> bool:
    """The reader may name only subjects whose usage it may read."""
    if scope.everything or subjects.organization_id in scope.org_ids:
        return True
    if explicit["user"] and subjects.user_id != scope.user_id:
        return False
    if explicit["team"] and not set(subjects.team_ids) <= scope.team_ids:
        return False
    if explicit["project"] and not set(subjects.project_ids) <= scope.project_ids:
        return False
    return not (explicit["api_key_id"] and subjects.token_id not in scope.token_ids)


def _budget_json(status: BudgetStatus) -> dict:
    budget = status.budget
    tz = zone_of(budget.organization)
    return {
        "budget_id": budget.id,
        "scope": {"type": budget.subject, "id": budget.subject_id, "name": budget.subject_name},
        "period": budget.period,
        "limit_usd": f"{budget.amount_usd:f}",
        "spent_usd": f"{nanos_to_usd(status.spent_nanos):f}",
        "remaining_usd": f"{nanos_to_usd(status.remaining_nanos):f}",
        "resets_at": status.period.end.astimezone(tz).isoformat(),
    }


def _check_config(request, secret: str) -> CheckConfig | JsonResponse:
    """Everything the answer needs but the spend, or the error answer."""
    token = token_authenticate(secret, scope=TokenScope.READ)
    if token is None:
        return _error(
            401, "Send an API token with the 'read' scope as 'Authorization: Bearer <token>'."
        )
    explicit = {
        name: bool(request.GET.get(name, "").strip())
        for name in ("user", "team", "project", "api_key_id")
    }
    if not any(explicit.values()):
        return _error(
            400, "Name who would make the call: user=EMAIL, api_key_id=, team= or project=."
        )
    try:
        subjects = _subjects(request, token)
    except NotFound:
        return _error(404, "No such user, token, team or project in this organization.")
    scope = _reader(token)
    if not _visible_subject(scope, subjects, explicit):
        return _error(404, "No such user, token, team or project in this organization.")
    budgets = list(
        Budget.objects.filter(subjects.q(), budgets_visible_q(scope))
        .only(*BUDGET_FIELDS)
        .annotate(
            subject_name=Coalesce(
                "user__email",
                "team__name",
                "project__name",
                "api_token__name",
                "organization__name",
                output_field=CharField(),
            )
        )
        .order_by("subject", "id")
    )
    for budget in budgets:
        budget.organization = token.organization  # every budget here is the token's org's
    return CheckConfig(token=token, budgets=tuple(budgets))


@require_GET
def budgets_check(request):
    # Who, which budgets: remembered between calls (check_cache); the spend: read now.
    secret = bearer_secret(request)
    key = config_key(secret, request.META.get("QUERY_STRING", ""))
    config = config_get(key)
    if config is None:
        config = _check_config(request, secret)
        if isinstance(config, JsonResponse):
            return config
        config_set(key, config)
    budgets = list(config.budgets)
    now = timezone.now()
    spend = budgets_spend(budgets, now)
    statuses = [BudgetStatus(b, spend[b.id][0], spend[b.id][1], now) for b in budgets]
    return JsonResponse(
        {
            "allowed": all(s.spent_nanos < s.limit_nanos for s in statuses),
            "budgets": [_budget_json(s) for s in statuses],
        }
    )
