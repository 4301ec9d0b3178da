"""GET /api/v1/usage: usage buckets shaped like OpenAI's organization usage API."""

import base64
import json
from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.http import require_GET

from accounts.models import ApiToken, Project, Team, TokenScope, User
from accounts.tokens import bearer_secret, token_authenticate
from metering.models import nanos_to_usd

from .queries import WIDTHS, Bucketing, Selection, grouped_totals
from .visibility import Scope, organization_scope, viewer_scope

GROUP_COLUMNS = {
    "model": "model",
    "user_id": "user_id",
    "team_id": "team_id",
    "project_id": "project_id",
    "api_key_id": "api_token_id",
    "operation": "operation",
    "end_user": "end_user",
}
DEFAULT_LIMIT = {"1m": 60, "1h": 24, "1d": 7}
MAX_LIMIT = {"1m": 1440, "1h": 744, "1d": 366}
LATEST_TIME = 32503680000  # 3000-01-01: far enough, and local calendars still work
NO_MATCH = (-1,)


class BadRequest(Exception):
    pass


def _error(status: int, message: str) -> JsonResponse:
    return JsonResponse(
        {"error": {"message": message, "type": "invalid_request_error"}}, status=status
    )


def api_reader(request) -> tuple[Scope, tuple[int, ...]] | None:
    """(scope, forced org ids) of the caller: a signed-in person, or a read-scope token.

    A token reads what its owner may see, within the token's organization; a token with
    no owner reads its whole organization.
    """
    secret = bearer_secret(request)
    if secret:
        token = token_authenticate(secret, scope=TokenScope.READ)
        if token is None:
            return None
        if token.owner is None:
            return organization_scope(token.organization_id), (token.organization_id,)
        return viewer_scope(token.owner), (token.organization_id,)
    if request.user.is_authenticated:
        return viewer_scope(request.user), ()
    return None


def _multi(request, name: str) -> list[str]:
    values = []
    for raw in request.GET.getlist(name) + request.GET.getlist(f"{name}[]"):
        values.extend(v.strip() for v in raw.split(",") if v.strip())
    return values


def _ids(values: list[str], lookup) -> tuple[int, ...]:
    if not values:
        return ()
    numeric = {int(v) for v in values if v.isdigit()}
    named = [v for v in values if not v.isdigit()]
    ids = numeric | set(lookup(named)) if named else numeric
    return tuple(sorted(ids)) or NO_MATCH


def _int_param(request, name: str, default: int | None = None) -> int | None:
    raw = request.GET.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise BadRequest(f"{name} must be an integer, got {raw!r}.") from None


def _cursor_decode(raw: str) -> int:
    try:
        return int(json.loads(base64.urlsafe_b64decode(raw.encode()).decode())["s"])
    except (ValueError, KeyError, TypeError):
        raise BadRequest("page is not a cursor this API returned.") from None


def _cursor_encode(start: int) -> str:
    return base64.urlsafe_b64encode(json.dumps({"s": start}).encode()).decode()


def _labels(column: str, ids: set) -> dict:
    ids = {i for i in ids if i}
    if not ids:
        return {}
    if column == "user_id":
        return dict(User.objects.filter(id__in=ids).values_list("id", "email"))
    if column == "team_id":
        return dict(Team.objects.filter(id__in=ids).values_list("id", "slug"))
    if column == "project_id":
        return dict(Project.objects.filter(id__in=ids).values_list("id", "slug"))
    if column == "api_token_id":
        return dict(ApiToken.objects.filter(id__in=ids).values_list("id", "prefix"))
    return {}


@require_GET
def usage(request):
    reader = api_reader(request)
    if reader is None:
        return _error(401, "Sign in, or send an API token with the 'read' scope as a Bearer token.")
    scope, forced_orgs = reader
    try:
        return JsonResponse(_usage_page(request, scope, forced_orgs))
    except BadRequest as exc:
        return _error(400, str(exc))


def _usage_page(request, scope: Scope, forced_orgs: tuple[int, ...]) -> dict:
    width_name = request.GET.get("bucket_width", "1d")
    if width_name not in WIDTHS:
        raise BadRequest("bucket_width must be one of 1m, 1h, 1d.")
    start = _int_param(request, "start_time")
    if start is None:
        raise BadRequest("start_time (Unix seconds) is required.")
    end = _int_param(request, "end_time", int(timezone.now().timestamp()))
    if end <= start:
        raise BadRequest("end_time must be after start_time.")
    if start < 0 or end > LATEST_TIME:
        raise BadRequest(f"start_time and end_time must be Unix seconds from 0 to {LATEST_TIME}.")
    try:
        tz = ZoneInfo(request.GET.get("tz") or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        raise BadRequest(f"tz must be an IANA time zone, got {request.GET.get('tz')!r}.") from None
    limit = _int_param(request, "limit", DEFAULT_LIMIT[width_name])
    if not 1 <= limit <= MAX_LIMIT[width_name]:
        raise BadRequest(f"limit must be 1 to {MAX_LIMIT[width_name]} for {width_name} buckets.")
    group_by = _multi(request, "group_by")
    unknown = [g for g in group_by if g not in GROUP_COLUMNS]
    if unknown:
        raise BadRequest(f"Cannot group by {', '.join(unknown)}; use {', '.join(GROUP_COLUMNS)}.")
    dims = tuple(dict.fromkeys(GROUP_COLUMNS[g] for g in group_by))

    bucketing = Bucketing(WIDTHS[width_name], tz)
    page_start = start
    if request.GET.get("page"):
        page_start = _cursor_decode(request.GET["page"])
        if not start <= page_start < end:
            raise BadRequest("page does not belong to this start_time/end_time.")
    keys = bucketing.keys(page_start, end, limit + 1)
    page_keys = keys[:limit]
    has_more = len(keys) > limit
    page_end = keys[limit] if has_more else end

    sel = Selection(
        scope=scope,
        start=datetime.fromtimestamp(page_start, UTC),
        end=datetime.fromtimestamp(page_end, UTC),
        org_ids=forced_orgs,
        models=tuple(_multi(request, "models")),
        user_ids=_ids(
            _multi(request, "user_ids"),
            lambda v: User.objects.filter(email__in=[e.lower() for e in v]).values_list(
                "id", flat=True
            ),
        ),
        team_ids=_ids(
            _multi(request, "team_ids"),
            lambda v: Team.objects.filter(slug__in=v).values_list("id", flat=True),
        ),
        project_ids=_ids(
            _multi(request, "project_ids"),
            lambda v: Project.objects.filter(slug__in=v).values_list("id", flat=True),
        ),
        token_ids=_ids(
            _multi(request, "api_key_ids"),
            lambda v: ApiToken.objects.filter(prefix__in=v).values_list("id", flat=True),
        ),
    )
    grouped = grouped_totals(sel, dims, bucketing)
    labels = {d: _labels(d, {key[1 + i] for key in grouped.rows}) for i, d in enumerate(dims)}
    by_bucket: dict[int, list] = {}
    for key, totals in grouped.rows.items():
        result = {
            "object": "usage.result",
            "num_model_requests": totals.requests,
            "failed_requests": totals.failed_requests,
            "input_tokens": totals.input_tokens,
            "input_cached_tokens": totals.cached_input_tokens,
            "output_tokens": totals.output_tokens,
            "cost_usd": f"{nanos_to_usd(totals.cost_nanos):f}",  # never 1.23E-7
            "latency_ms_avg": round(totals.latency_ms_avg, 3) if totals.requests else None,
        }
        for name in group_by:
            column = GROUP_COLUMNS[name]
            value = key[1 + dims.index(column)]
            if labels.get(column):
                value = labels[column].get(value, value)
            result[name] = value if value not in (0, "") else None
        by_bucket.setdefault(key[0], []).append(result)

    data = []
    for i, key in enumerate(page_keys):
        bucket_end = page_keys[i + 1] if i + 1 < len(page_keys) else page_end
        results = by_bucket.get(key, [])
        results.sort(key=lambda r: -r["num_model_requests"])
        data.append(
            {
                "object": "bucket",
                "start_time": max(key, page_start),
                "end_time": min(bucket_end, end),
                "results": results,
            }
        )
    return {
        "object": "page",
        "data": data,
        "has_more": has_more,
        "next_page": _cursor_encode(page_end) if has_more else None,
    }
