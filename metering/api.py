"""The ingestion API: POST /api/v1/events (SPEC section 3)."""

import json
import logging
import time
from decimal import Decimal

from django.conf import settings
from django.core.cache import cache
from django.http import JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from accounts.models import ApiToken, TokenScope
from accounts.tokens import bearer_secret, token_authenticate

from .ingest import ingest_batch

logger = logging.getLogger(__name__)


def api_error(status: int, message: str, **extra) -> JsonResponse:
    return JsonResponse({"error": message, **extra}, status=status)


def authenticate_or_401(request, scope: str) -> ApiToken | JsonResponse:
    token = token_authenticate(bearer_secret(request), scope=scope)
    if token is None:
        response = api_error(
            401,
            f"Send a valid, unrevoked API token with the '{scope}' scope as 'Authorization: Bearer <token>'.",
        )
        response["WWW-Authenticate"] = 'Bearer realm="usage"'
        return response
    return token


def rate_limited(token: ApiToken) -> int:
    """Seconds to wait if `token` is over its per-minute request budget, else 0."""
    limit = settings.INGEST_RATE_LIMIT_PER_MINUTE
    if limit <= 0:
        return 0
    window = int(time.time() // 60)
    key = f"ingest-rate:{token.id}:{window}"
    try:
        if cache.add(key, 1, timeout=70):
            return 0
        try:
            count = cache.incr(key)
        except ValueError:
            cache.set(key, 1, timeout=70)
            return 0
    except Exception:  # an unreachable cache must not stop ingestion
        logger.warning("rate limit cache unavailable; letting the request through", exc_info=True)
        return 0
    if count > limit:
        return 60 - int(time.time()) % 60 or 1
    return 0


def read_body_limited(request, limit: int) -> bytes | None:
    """The body, or None when it is larger than `limit` bytes (read no further)."""
    length = request.META.get("CONTENT_LENGTH")
    if length and length.isdigit() and int(length) > limit:
        return None
    body = request.read(limit + 1)
    return None if len(body) > limit else body


def parse_json(body: bytes):
    """JSON with exact decimals: numbers with a fraction become Decimal, not float."""
    return json.loads(body, parse_float=Decimal, parse_constant=_reject_constant)


def _reject_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def ingest_response(result) -> JsonResponse:
    body = result.as_dict()
    if not result.rejected:
        status = 200
    elif result.accepted or result.duplicates:
        status = 207
    else:
        status = 422
    return JsonResponse(body, status=status)


@csrf_exempt
@require_POST
def events_ingest(request):
    token = authenticate_or_401(request, TokenScope.INGEST)
    if isinstance(token, JsonResponse):
        return token
    wait = rate_limited(token)
    if wait:
        response = api_error(429, "Too many requests for this token; retry later.")
        response["Retry-After"] = str(wait)
        return response
    body = read_body_limited(request, settings.INGEST_MAX_BYTES)
    if body is None:
        return api_error(
            413, f"The body is larger than {settings.INGEST_MAX_BYTES} bytes; nothing was stored."
        )
    try:
        payload = parse_json(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return api_error(400, f"Malformed JSON: {exc}")
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        return api_error(400, 'The body must be a JSON object {"events": [ ... ]}.')
    events = payload["events"]
    if not events:
        return api_error(400, "Send 1 to 1000 events; the list is empty.")
    if len(events) > settings.INGEST_MAX_EVENTS:
        return api_error(
            413,
            f"At most {settings.INGEST_MAX_EVENTS} events per request (got {len(events)}); nothing was stored.",
        )
    result = ingest_batch(organization=token.organization, token=token, events=events)
    return ingest_response(result)
