"""Adapters from peer formats to the core event dict (SPEC section 3).

Pure functions, no database: each turns one foreign record into the same dict the core
API takes in `{"events": [...]}`, and `ingest_batch` validates and stores it. Two formats:

- LiteLLM's `StandardLoggingPayload`, as its generic HTTP logging callback ("generic_api")
  sends it: `litellm_payload_to_event`.
- OpenTelemetry spans following the GenAI semantic conventions, as an OTLP exporter sends
  them: `otlp_spans_to_events`.

Neither copies prompts, responses or other message content: only counts, labels and a
small metadata dict (docs/integrations.md has the full mapping).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from urllib.parse import urlsplit

from django.core.exceptions import ValidationError
from django.core.validators import validate_email

from .models import Operation

# Metadata values are cut to this many characters, so the dict stays far below 4 KiB.
_META_VALUE_MAX = 200


class PayloadError(ValueError):
    """A foreign record that cannot be mapped; `field` names the offending input field."""

    def __init__(self, field: str, message: str, request_id: str | None = None):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.request_id = request_id


# --------------------------------------------------------------------------------------
# Shared helpers


def _text(value: Any) -> str:
    """A label value as a string ("" for None and empty containers)."""
    if value is None or isinstance(value, dict | list):
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip()


def _first(*values: Any) -> str:
    for value in values:
        text = _text(value)
        if text:
            return text
    return ""


def _as_count(value: Any, field: str) -> int:
    """A token count from an int, an integral float/Decimal or a digit string; None is 0."""
    if value is None or value == "":
        return 0
    if isinstance(value, bool):
        raise PayloadError(field, "Must be a whole number of tokens.")
    if isinstance(value, int):
        count = value
    elif isinstance(value, float | Decimal):
        if not math.isfinite(value) or value != int(value):
            raise PayloadError(field, f"Must be a whole number of tokens (got {value}).")
        count = int(value)
    elif isinstance(value, str) and value.strip().isdigit():
        count = int(value.strip())
    else:
        raise PayloadError(field, f"Must be a whole number of tokens (got {str(value)[:40]!r}).")
    if count < 0:
        raise PayloadError(field, "Must be 0 or more.")
    return count


def _consistent_counts(event: dict) -> None:
    """Make the totals include their parts, as SPEC section 3 requires.

    Both formats define `input_tokens` as including cache reads and writes, but a provider
    or an instrumentation that counts them separately would produce an event the core API
    rejects. Raise the total to the sum of its parts (never lower it): that keeps every
    reported token and counts the cached ones once.
    """
    parts = event["cached_input_tokens"] + event["cache_write_tokens"]
    event["input_tokens"] = max(event["input_tokens"], parts)
    event["output_tokens"] = max(event["output_tokens"], event["reasoning_tokens"])


def _rfc3339(seconds: float | Decimal, field: str) -> str:
    try:
        moment = datetime.fromtimestamp(float(seconds), UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise PayloadError(field, f"Not a valid epoch time: {seconds}.") from exc
    return moment.isoformat()


def _looks_like_email(value: str) -> bool:
    if "@" not in value or len(value) > 254:
        return False
    try:
        validate_email(value)
    except ValidationError:
        return False
    return True


def _compact(metadata: dict[str, Any]) -> dict[str, Any]:
    """Drop empty values and cut long strings, so metadata stays small."""
    kept: dict[str, Any] = {}
    for key, value in metadata.items():
        if value is None or value == "":
            continue
        if isinstance(value, str):
            value = value[:_META_VALUE_MAX]
        kept[key] = value
    return kept


# --------------------------------------------------------------------------------------
# LiteLLM


# LiteLLM call types (async variants are the same with an "a" in front) -> our operations.
_LITELLM_OPERATIONS = {
    "completion": Operation.CHAT,  # litellm.completion() is the chat completions API
    "responses": Operation.CHAT,
    "anthropic_messages": Operation.CHAT,
    "generate_content": Operation.CHAT,
    "text_completion": Operation.COMPLETION,
    "embedding": Operation.EMBEDDING,
    "rerank": Operation.RERANK,
    "image_generation": Operation.IMAGE,
    "image_edit": Operation.IMAGE,
    "image_variation": Operation.IMAGE,
    "transcription": Operation.AUDIO,
    "speech": Operation.AUDIO,
    "ocr": Operation.OCR,
}


def _litellm_operation(call_type: str) -> str:
    name = call_type.strip().lower()
    if name in _LITELLM_OPERATIONS:
        return _LITELLM_OPERATIONS[name]
    if name.startswith("a") and name[1:] in _LITELLM_OPERATIONS:
        return _LITELLM_OPERATIONS[name[1:]]
    return Operation.CHAT


def _number(value: Any, field: str) -> Decimal | None:
    """An epoch time or duration in seconds (number or numeric string), or None."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise PayloadError(field, "Must be a number of seconds.")
    try:
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    except (InvalidOperation, TypeError, ValueError) as exc:
        raise PayloadError(
            field, f"Must be a number of seconds (got {str(value)[:40]!r})."
        ) from exc
    if not number.is_finite():
        raise PayloadError(field, "Must be a finite number.")
    return number


def _litellm_timestamp(value: Any) -> str:
    """`startTime` is epoch seconds (a float); tolerate an RFC 3339 string as well."""
    if value is None or value == "":
        raise PayloadError("startTime", "This field is required.")
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None:
            if parsed.tzinfo is None:  # LiteLLM's own datetimes are naive UTC
                parsed = parsed.replace(tzinfo=UTC)
            return parsed.astimezone(UTC).isoformat()
    return _rfc3339(_number(value, "startTime"), "startTime")


def _seconds(value: Any) -> Decimal | None:
    try:
        return _number(value, "seconds")
    except PayloadError:
        return None


def _litellm_latency_ms(payload: dict) -> int | None:
    """From endTime - startTime, else `response_time` (both in seconds)."""
    start, end = _seconds(payload.get("startTime")), _seconds(payload.get("endTime"))
    seconds = end - start if start is not None and end is not None else None
    if seconds is None or seconds < 0:
        seconds = _seconds(payload.get("response_time"))
    if seconds is None or seconds < 0:
        return None
    return int((seconds * 1000).to_integral_value())


def _litellm_status(payload: dict) -> int:
    if _text(payload.get("status")).lower() != "failure":
        return 200
    info = payload.get("error_information")
    code = _text(info.get("error_code")) if isinstance(info, dict) else ""
    if code.isdigit() and 400 <= int(code) <= 599:
        return int(code)
    return 500


def _cost_text(value: Any) -> str | None:
    """LiteLLM's `response_cost` as a plain decimal string (every digit kept), or None.

    Anything that is not a number is passed on as is, for the core validation to reject.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, float | int | Decimal):
        number = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
        return format(number, "f") if number.is_finite() else str(value)
    return str(value)


def _host(url: str) -> str:
    """The host of an API base URL (never its path or query, which may carry secrets)."""
    try:
        return urlsplit(url).hostname or ""
    except ValueError:
        return ""


def _strip_provider(model: str, provider: str) -> str:
    """`openai/gpt-4o` -> `gpt-4o` when the prefix is the call's provider.

    LiteLLM names models `<provider>/<model>` in its configuration; the price catalog
    names them without the prefix, so keeping it would leave the event unpriced when the
    gateway sent no cost. Other slashes (e.g. `meta-llama/Llama-3-8B`) are kept.
    """
    if provider and model.lower().startswith(provider.lower() + "/"):
        return model[len(provider) + 1 :]
    return model


def litellm_payload_to_event(payload: dict) -> dict:
    """Map one LiteLLM `StandardLoggingPayload` onto a core event dict.

    Raises PayloadError when the payload is not an object or its times cannot be read.
    Fields the core API validates (labels, counts, slugs) are passed through for it to
    judge, so the answer names the same problems as for a direct call.
    """
    if not isinstance(payload, dict):
        raise PayloadError("payload", "Each payload must be a JSON object.")
    meta = payload.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    usage = meta.get("usage_object")
    usage = usage if isinstance(usage, dict) else {}
    prompt_details = usage.get("prompt_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    completion_details = usage.get("completion_tokens_details")
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    params = payload.get("model_parameters")
    params = params if isinstance(params, dict) else {}
    hidden = payload.get("hidden_params")
    hidden = hidden if isinstance(hidden, dict) else {}

    request_id = _text(payload.get("litellm_call_id"))
    if not request_id:
        raise PayloadError("litellm_call_id", "This field is required (the idempotency key).")
    provider = _text(payload.get("custom_llm_provider"))
    model = _strip_provider(_first(payload.get("model"), payload.get("model_group")), provider)

    cached = usage.get("cache_read_input_tokens")
    if prompt_details.get("cached_tokens") is not None:
        cached = prompt_details.get("cached_tokens")
    event: dict[str, Any] = {
        "request_id": request_id,
        "timestamp": _litellm_timestamp(payload.get("startTime")),
        "model": model,
        "provider": provider,
        "operation": _litellm_operation(_text(payload.get("call_type"))),
        "input_tokens": _as_count(payload.get("prompt_tokens"), "prompt_tokens"),
        "cached_input_tokens": _as_count(cached, "cached_tokens"),
        "cache_write_tokens": _as_count(
            usage.get("cache_creation_input_tokens"), "cache_creation_input_tokens"
        ),
        "output_tokens": _as_count(payload.get("completion_tokens"), "completion_tokens"),
        "reasoning_tokens": _as_count(
            completion_details.get("reasoning_tokens"), "reasoning_tokens"
        ),
        "status_code": _litellm_status(payload),
    }
    _consistent_counts(event)
    latency = _litellm_latency_ms(payload)
    if latency is not None:
        event["latency_ms"] = latency
    cost = _cost_text(payload.get("response_cost"))
    if cost is not None:
        event["cost_usd"] = cost

    # The platform user is an email: LiteLLM's user email, else its user id when that is
    # one. Anything else stays in metadata (a bad label must not lose the usage).
    key_email = _text(meta.get("user_api_key_user_email"))
    user_id = _text(meta.get("user_api_key_user_id"))
    user_email = next((v for v in (key_email, user_id) if _looks_like_email(v)), "")
    labels = {
        "team": _first(meta.get("user_api_key_team_alias"), meta.get("user_api_key_team_id")),
        "project": _first(
            meta.get("user_api_key_project_alias"), meta.get("user_api_key_project_id")
        ),
        "user": user_email,
        "end_user": _first(
            payload.get("end_user"), meta.get("user_api_key_end_user_id"), params.get("user")
        ),
        "session_id": _first(payload.get("session_id"), payload.get("trace_id")),
        "endpoint": _text(meta.get("user_api_key_request_route")),
    }
    event.update({key: value for key, value in labels.items() if value})

    cache_hit = payload.get("cache_hit")
    metadata = {
        "source": "litellm",
        "response_id": _text(payload.get("id")),
        "call_type": _text(payload.get("call_type")),
        "model_group": _text(payload.get("model_group")),
        "api_base_host": _host(_first(payload.get("api_base"), hidden.get("api_base"))),
        "cache_hit": cache_hit if isinstance(cache_hit, bool) else None,
        "litellm_user_id": user_id if user_id != user_email else "",
        "litellm_user_email": key_email if key_email != user_email else "",
        "key_alias": _text(meta.get("user_api_key_alias")),
    }
    if event["status_code"] >= 400:
        info = payload.get("error_information")
        if isinstance(info, dict):
            metadata["error_class"] = _text(info.get("error_class"))
    event["metadata"] = _compact(metadata)
    return event


# --------------------------------------------------------------------------------------
# OpenTelemetry GenAI spans

# gen_ai.operation.name -> our operations. Agent and tool spans (invoke_agent, create_agent,
# execute_tool) are not model calls: when an instrumentation puts a model and summed usage
# on them, counting them would count their child model calls twice, so they are ignored.
_OTEL_OPERATIONS = {
    "chat": Operation.CHAT,
    "generate_content": Operation.CHAT,
    "text_completion": Operation.COMPLETION,
    "completion": Operation.COMPLETION,
    "embeddings": Operation.EMBEDDING,
    "embedding": Operation.EMBEDDING,
    "rerank": Operation.RERANK,
    "image_generation": Operation.IMAGE,
    "generate_image": Operation.IMAGE,
    "audio": Operation.AUDIO,
    "transcription": Operation.AUDIO,
    "speech": Operation.AUDIO,
}
_OTEL_NOT_MODEL_CALLS = {"invoke_agent", "create_agent", "execute_tool"}

# Well-known gen_ai.provider.name values -> the provider names the price catalog uses.
_OTEL_PROVIDERS = {
    "aws.bedrock": "bedrock",
    "azure.ai.openai": "azure",
    "azure.ai.inference": "azure",
    "gcp.gemini": "google",
    "gcp.vertex_ai": "google",
    "gcp.gen_ai": "google",
    "x_ai": "xai",
    "mistral_ai": "mistral",
}

_STATUS_CODE_ERROR = 2  # opentelemetry.proto.trace.v1.Status.STATUS_CODE_ERROR


def _any_value(value) -> Any:
    """An OTLP AnyValue as a plain Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind)


def _attributes(key_values) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def _http_status(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 100 <= value <= 599:
        return value
    return None


def _otel_status(span, attrs: dict) -> int:
    if span.status.code != _STATUS_CODE_ERROR:
        return 200
    for key in ("http.response.status_code", "http.status_code", "error.type"):
        status = _http_status(attrs.get(key))
        if status is not None and status >= 400:
            return status
    return 500


def span_model(attrs: dict) -> str:
    """The model a GenAI span reports: the response's, else the request's; "" if none."""
    return _first(attrs.get("gen_ai.response.model"), attrs.get("gen_ai.request.model"))


def otlp_span_to_event(span, resource_attrs: dict) -> dict | None:
    """Map one OTLP span onto a core event dict; None when it is not a model call.

    The model and operation must be on the span itself; every other attribute may also
    come from the resource (span attributes win), e.g. `usage.team` for a whole service.
    """
    span_attrs = _attributes(span.attributes)
    model = span_model(span_attrs)
    operation_name = _text(span_attrs.get("gen_ai.operation.name")).lower()
    if not model or operation_name in _OTEL_NOT_MODEL_CALLS:
        return None
    if len(span.trace_id) != 16 or len(span.span_id) != 8:
        raise PayloadError("traceId", "A span needs a 16-byte trace id and an 8-byte span id.")
    if not span.start_time_unix_nano:
        raise PayloadError("startTimeUnixNano", "This field is required.")
    attrs = {**resource_attrs, **span_attrs}
    provider = _first(attrs.get("gen_ai.provider.name"), attrs.get("gen_ai.system")).lower()
    event: dict[str, Any] = {
        "request_id": span_reference(span),
        "timestamp": _rfc3339(Decimal(span.start_time_unix_nano) / 10**9, "startTimeUnixNano"),
        "model": model,
        "provider": _OTEL_PROVIDERS.get(provider, provider),
        "operation": _OTEL_OPERATIONS.get(operation_name, Operation.CHAT),
        "input_tokens": _as_count(
            attrs.get("gen_ai.usage.input_tokens", attrs.get("gen_ai.usage.prompt_tokens")),
            "gen_ai.usage.input_tokens",
        ),
        "cached_input_tokens": _as_count(
            attrs.get("gen_ai.usage.cache_read.input_tokens"),
            "gen_ai.usage.cache_read.input_tokens",
        ),
        "cache_write_tokens": _as_count(
            attrs.get("gen_ai.usage.cache_creation.input_tokens"),
            "gen_ai.usage.cache_creation.input_tokens",
        ),
        "output_tokens": _as_count(
            attrs.get("gen_ai.usage.output_tokens", attrs.get("gen_ai.usage.completion_tokens")),
            "gen_ai.usage.output_tokens",
        ),
        "reasoning_tokens": _as_count(
            attrs.get("gen_ai.usage.reasoning.output_tokens"),
            "gen_ai.usage.reasoning.output_tokens",
        ),
        "status_code": _otel_status(span, attrs),
    }
    _consistent_counts(event)
    if span.end_time_unix_nano >= span.start_time_unix_nano:
        nanos = span.end_time_unix_nano - span.start_time_unix_nano
        event["latency_ms"] = (nanos + 500_000) // 1_000_000
    labels = {
        "user": _text(attrs.get("user.email")),
        "end_user": _text(attrs.get("enduser.id")),
        "team": _text(attrs.get("usage.team")),
        "project": _text(attrs.get("usage.project")),
        "session_id": _first(attrs.get("session.id"), attrs.get("gen_ai.conversation.id")),
        "assistant": _text(attrs.get("gen_ai.agent.name")),
    }
    event.update({key: value for key, value in labels.items() if value})
    event["metadata"] = _compact(
        {
            "source": "otel",
            "service": _text(attrs.get("service.name")),
            "span": span.name,
            "operation": operation_name,
            "response_id": _text(attrs.get("gen_ai.response.id")),
            "server": _text(attrs.get("server.address")),
            "error_type": _text(attrs.get("error.type")),
        }
    )
    return event


def span_reference(span) -> str:
    """How a span is named in answers: its request id."""
    return f"{span.trace_id.hex()}-{span.span_id.hex()}"


def otlp_spans_to_events(request) -> tuple[list[dict | PayloadError], int]:
    """Map every span of an `ExportTraceServiceRequest`.

    Returns (events, ignored_count): one entry per GenAI span, in order, either its event
    dict or the PayloadError saying why it could not be mapped; spans that carry no
    `gen_ai.*` model (and agent/tool spans) are skipped and counted as ignored.
    """
    events: list[dict | PayloadError] = []
    ignored = 0
    for resource_spans in request.resource_spans:
        resource_attrs = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                try:
                    event = otlp_span_to_event(span, resource_attrs)
                except PayloadError as exc:
                    exc.request_id = span_reference(span)
                    events.append(exc)
                    continue
                if event is None:
                    ignored += 1
                else:
                    events.append(event)
    return events, ignored
