"""Gateway endpoints: LiteLLM's logging callback and OTLP/HTTP traces (SPEC section 3).

Both authenticate like the core API (`Authorization: Bearer <token>` with the ingest
scope), map every record with `metering.integrations`, and store through `ingest_batch`,
so idempotency, validation, unknown-label policy, pricing and roll-ups are the same.

- `POST /api/v1/integrations/litellm` answers exactly like `POST /api/v1/events`
  (200 / 207 / 422 with `{"accepted", "duplicates", "rejected"}`), rejected indexes being
  positions in the posted list of payloads.
- `POST /v1/traces` speaks OTLP/HTTP: the answer is an `ExportTraceServiceResponse` in the
  request's encoding (protobuf or JSON), 200 whenever the body could be decoded; spans
  that were rejected are counted in `partial_success`, spans that are not model calls are
  ignored and reported in `partial_success.error_message` and the `X-Usage-Ingest` header.
"""

import base64
import binascii
import json
import re
import zlib

from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from accounts.models import ApiToken, TokenScope

from .api import (
    api_error,
    authenticate_or_401,
    ingest_response,
    parse_json,
    rate_limited,
    read_body_limited,
)
from .ingest import IngestResult, Rejection, ingest_batch
from .integrations import PayloadError, litellm_payload_to_event, otlp_spans_to_events

LITELLM_SHAPE = (
    "Send what LiteLLM's generic_api callback sends: a JSON array of its logging payloads, "
    "NDJSON (one payload per line) or a single JSON object."
)
# google.rpc.Code values used in OTLP error bodies.
_RPC_INVALID_ARGUMENT = 3
_RPC_RESOURCE_EXHAUSTED = 8
_RPC_UNAUTHENTICATED = 16
# Rejections named in an OTLP error_message, at most.
_MESSAGE_REJECTIONS = 5


def _ingest_mapped(
    token: ApiToken, mapped: list[tuple[int, dict]], rejected: list[Rejection]
) -> IngestResult:
    """Store mapped events (position, event) in batches; rejections keep their positions."""
    total = IngestResult(rejected=list(rejected))
    step = settings.INGEST_MAX_EVENTS
    for start in range(0, len(mapped), step):
        chunk = mapped[start : start + step]
        result = ingest_batch(
            organization=token.organization, token=token, events=[event for _, event in chunk]
        )
        total.accepted += result.accepted
        total.duplicates += result.duplicates
        total.rejected.extend(
            Rejection(chunk[r.index][0], r.request_id, r.errors) for r in result.rejected
        )
    total.rejected.sort(key=lambda r: r.index)
    return total


def _authorized(request) -> ApiToken | HttpResponse:
    """The ingest token of the request, or the 401 / 429 answer to send instead."""
    token = authenticate_or_401(request, TokenScope.INGEST)
    if isinstance(token, JsonResponse):
        return token
    wait = rate_limited(token)
    if wait:
        response = api_error(429, "Too many requests for this token; retry later.")
        response["Retry-After"] = str(wait)
        return response
    return token


# --------------------------------------------------------------------------------------
# LiteLLM


def parse_litellm_body(body: bytes) -> list:
    """The payloads of a LiteLLM callback body; ValueError with a message if malformed."""
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise ValueError(f"The body is not UTF-8: {exc}") from exc
    if not text:
        raise ValueError(f"The body is empty. {LITELLM_SHAPE}")
    try:
        document = parse_json(text)
    except (ValueError, RecursionError) as whole_error:
        lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
        if len(lines) < 2:
            raise ValueError(f"Malformed JSON: {whole_error}") from whole_error
        payloads = []
        for number, line in lines:
            try:
                payloads.append(parse_json(line))
            except (ValueError, RecursionError) as exc:
                raise ValueError(f"Malformed NDJSON on line {number}: {exc}") from exc
        return payloads
    if isinstance(document, list):
        return document
    if isinstance(document, dict):
        return [document]
    raise ValueError(LITELLM_SHAPE)


@csrf_exempt
@require_POST
def litellm_ingest(request):
    token = _authorized(request)
    if isinstance(token, HttpResponse):
        return token
    # LiteLLM's payloads carry prompts and responses we drop right away; its default batch
    # (512 payloads) easily passes 5 MiB, and a refused batch is never resent.
    body = read_body_limited(request, settings.INTEGRATION_MAX_BYTES)
    if body is None:
        return api_error(
            413,
            f"The body is larger than {settings.INTEGRATION_MAX_BYTES} bytes; nothing was stored. "
            "Lower LiteLLM's batch size (DEFAULT_BATCH_SIZE).",
        )
    try:
        payloads = parse_litellm_body(body)
    except ValueError as exc:
        return api_error(400, str(exc))
    if not payloads:
        return api_error(400, "Send 1 to 1000 payloads; the list is empty.")
    if len(payloads) > settings.INGEST_MAX_EVENTS:
        return api_error(
            413,
            f"At most {settings.INGEST_MAX_EVENTS} payloads per request (got {len(payloads)}); "
            "nothing was stored.",
        )
    mapped: list[tuple[int, dict]] = []
    rejected: list[Rejection] = []
    for index, payload in enumerate(payloads):
        try:
            mapped.append((index, litellm_payload_to_event(payload)))
        except PayloadError as exc:
            call_id = payload.get("litellm_call_id") if isinstance(payload, dict) else None
            rejected.append(
                Rejection(
                    index, call_id if isinstance(call_id, str) else None, {exc.field: [exc.message]}
                )
            )
    return ingest_response(_ingest_mapped(token, mapped, rejected))


# --------------------------------------------------------------------------------------
# OTLP/HTTP traces

_PROTOBUF = "application/x-protobuf"
_JSON = "application/json"
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_ID_KEYS = ("traceId", "trace_id", "spanId", "span_id", "parentSpanId", "parent_span_id")


def _otlp_encoding(request) -> str | None:
    content_type = request.content_type.lower()
    if content_type in (_PROTOBUF, "application/protobuf"):
        return _PROTOBUF
    if content_type == _JSON:
        return _JSON
    return None


def _otlp_answer(message, encoding: str, status: int = 200) -> HttpResponse:
    if encoding == _JSON:
        body = json_format.MessageToJson(message, indent=None)
    else:
        body = message.SerializeToString()
    return HttpResponse(body, status=status, content_type=encoding)


def _otlp_error(status: int, code: int, message: str, encoding: str) -> HttpResponse:
    """An OTLP failure: a google.rpc.Status body in the request's encoding."""
    return _otlp_answer(status_pb2.Status(code=code, message=message), encoding, status)


def _gunzip(body: bytes, limit: int) -> bytes | None:
    """Decompress a gzip body; None when it inflates past `limit` bytes."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = inflater.decompress(body, limit + 1)
    if len(data) > limit or inflater.unconsumed_tail:
        return None
    if not inflater.eof:
        raise ValueError("The gzip body is truncated.")
    return data


def _hex_ids_to_base64(node: dict) -> None:
    """OTLP JSON writes trace and span ids in hex; protobuf's JSON parser expects base64."""
    for key in _ID_KEYS:
        value = node.get(key)
        if isinstance(value, str) and _HEX.fullmatch(value):
            node[key] = base64.b64encode(bytes.fromhex(value)).decode()


def _dicts(node: dict, *keys: str) -> list[dict]:
    for key in keys:
        value = node.get(key)
        if isinstance(value, list):
            return [item for item in value if isinstance(item, dict)]
    return []


def parse_otlp_json(body: bytes) -> ExportTraceServiceRequest:
    """An OTLP/JSON body (hex ids, lowerCamelCase keys); ValueError if malformed."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ValueError(f"Malformed JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ValueError('The body must be an OTLP JSON object {"resourceSpans": [ ... ]}.')
    for resource_spans in _dicts(document, "resourceSpans", "resource_spans"):
        for scope_spans in _dicts(resource_spans, "scopeSpans", "scope_spans"):
            for span in _dicts(scope_spans, "spans"):
                _hex_ids_to_base64(span)
                for link in _dicts(span, "links"):
                    _hex_ids_to_base64(link)
    request = ExportTraceServiceRequest()
    try:
        json_format.ParseDict(document, request, ignore_unknown_fields=True)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as exc:
        raise ValueError(f"Not an OTLP ExportTraceServiceRequest: {exc}") from exc
    return request


def parse_otlp_protobuf(body: bytes) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    try:
        request.ParseFromString(body)
    except (DecodeError, RecursionError) as exc:
        raise ValueError(f"Not an OTLP ExportTraceServiceRequest in protobuf: {exc}") from exc
    return request


def _describe(rejection: Rejection) -> str:
    problems = "; ".join(
        f"{field}: {' '.join(messages)}" for field, messages in rejection.errors.items()
    )
    return f"span {rejection.request_id or '?'}: {problems}"


def _partial_message(result: IngestResult, ignored: int) -> str:
    parts = []
    if result.rejected:
        shown = "; ".join(_describe(r) for r in result.rejected[:_MESSAGE_REJECTIONS])
        more = len(result.rejected) - _MESSAGE_REJECTIONS
        parts.append(
            f"{len(result.rejected)} span(s) rejected: {shown}"
            + (f"; and {more} more" if more > 0 else "")
            + "."
        )
    if ignored:
        parts.append(f"{ignored} span(s) without gen_ai.* model attributes ignored.")
    return " ".join(parts)


@csrf_exempt
@require_POST
def otlp_traces(request):
    encoding = _otlp_encoding(request)
    if encoding is None:
        return _otlp_error(
            415,
            _RPC_INVALID_ARGUMENT,
            f"Send OTLP traces as {_PROTOBUF} or {_JSON} (got {request.content_type or 'none'}).",
            _JSON,
        )
    token = _authorized(request)
    if isinstance(token, HttpResponse):
        if token.status_code == 401:
            response = _otlp_error(
                401,
                _RPC_UNAUTHENTICATED,
                "Send a valid API token with the 'ingest' scope: "
                'OTEL_EXPORTER_OTLP_HEADERS="Authorization=Bearer <token>".',
                encoding,
            )
            response["WWW-Authenticate"] = token["WWW-Authenticate"]
            return response
        return token
    limit = settings.INGEST_MAX_BYTES
    too_large = f"The body is larger than {limit} bytes; nothing was stored."
    body = read_body_limited(request, limit)
    if body is None:
        return _otlp_error(413, _RPC_RESOURCE_EXHAUSTED, too_large, encoding)
    content_encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if content_encoding == "gzip":
        try:
            body = _gunzip(body, limit)
        except (zlib.error, ValueError) as exc:
            return _otlp_error(400, _RPC_INVALID_ARGUMENT, f"Bad gzip body: {exc}", encoding)
        if body is None:
            return _otlp_error(413, _RPC_RESOURCE_EXHAUSTED, too_large, encoding)
    elif content_encoding not in ("", "identity"):
        return _otlp_error(
            415,
            _RPC_INVALID_ARGUMENT,
            f"Unsupported Content-Encoding {content_encoding!r}.",
            encoding,
        )
    try:
        export = parse_otlp_json(body) if encoding == _JSON else parse_otlp_protobuf(body)
    except (ValueError, binascii.Error) as exc:
        return _otlp_error(400, _RPC_INVALID_ARGUMENT, str(exc), encoding)

    events, ignored = otlp_spans_to_events(export)
    mapped: list[tuple[int, dict]] = []
    rejected: list[Rejection] = []
    for index, event in enumerate(events):
        if isinstance(event, PayloadError):
            rejected.append(Rejection(index, event.request_id, {event.field: [event.message]}))
        else:
            mapped.append((index, event))
    result = _ingest_mapped(token, mapped, rejected)

    answer = ExportTraceServiceResponse()
    message = _partial_message(result, ignored)
    if message:
        answer.partial_success.rejected_spans = len(result.rejected)
        answer.partial_success.error_message = message
    response = _otlp_answer(answer, encoding)
    response["X-Usage-Ingest"] = json.dumps(
        {
            "accepted": result.accepted,
            "duplicates": result.duplicates,
            "rejected": len(result.rejected),
            "ignored": ignored,
        }
    )
    return response
