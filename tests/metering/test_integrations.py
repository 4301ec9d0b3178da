"""Gateway integrations (issue 7): LiteLLM's generic_api callback and OTLP/HTTP GenAI spans.

The end-to-end tests drive the real clients against a running server (`live_server`):
litellm's own `GenericAPILogger` (offline: mock responses, local cost map) and the
OpenTelemetry SDK's OTLP/HTTP exporter. The rest post bodies with Django's test client.
"""

import asyncio
import base64
import gzip
import importlib
import json
import time
import uuid
from decimal import Decimal

import pytest
import requests
from django.db import connection
from django.db.models import Sum
from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from accounts.models import Organization, Project, Team, UnknownLabelPolicy
from accounts.tokens import token_issue
from metering.integrations import litellm_payload_to_event, otlp_spans_to_events
from metering.integrations_api import parse_otlp_json
from metering.models import CostSource, OrgUsage15m, UsageEvent
from metering.pricing import usd_to_nanos

LITELLM_URL = "/api/v1/integrations/litellm"
OTLP_URL = "/v1/traces"


# --------------------------------------------------------------------------------------
# Fixtures: a small world of our own (no dependency on tests/conftest.py fixtures)


class World:
    def __init__(self):
        self.org = Organization.objects.create(slug="acme", name="Acme")
        self.research = Team.objects.create(organization=self.org, slug="research", name="R")
        self.platform = Team.objects.create(organization=self.org, slug="platform", name="P")
        self.chatbot = Project.objects.create(organization=self.org, slug="chatbot", name="C")
        issued = token_issue(organization=self.org, name="gateway", scopes=["ingest", "read"])
        self.token, self.secret = issued.token, issued.secret

    @property
    def auth(self) -> dict:
        return {"Authorization": f"Bearer {self.secret}"}


@pytest.fixture
def world(db):
    return World()


@pytest.fixture
def post(client, world):
    """POST a body with the world's token (or `token=None` for none)."""

    def _post(url, body, content_type="application/json", token=..., **headers):
        if token is ...:
            token = world.secret
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if not isinstance(body, bytes | str):
            body = json.dumps(body)
        return client.post(url, data=body, content_type=content_type, headers=headers)

    return _post


def litellm_payload(**overrides) -> dict:
    """A LiteLLM StandardLoggingPayload as its generic_api callback sends it (trimmed)."""
    payload = {
        "id": "chatcmpl-abc",
        "litellm_call_id": str(uuid.uuid4()),
        "trace_id": "trace-1",
        "session_id": "",
        "call_type": "acompletion",
        "cache_hit": None,
        "status": "success",
        "custom_llm_provider": "openai",
        "startTime": time.time() - 60,
        "endTime": time.time() - 59.25,
        "response_time": 0.75,
        "model": "gpt-4o-mini",
        "metadata": {
            "user_api_key_team_alias": "research",
            "user_api_key_user_id": None,
            "usage_object": {
                "prompt_tokens": 1200,
                "completion_tokens": 50,
                "prompt_tokens_details": {"cached_tokens": 1000},
                "cache_creation_input_tokens": 100,
            },
        },
        "response_cost": 0.000135,
        "prompt_tokens": 1200,
        "completion_tokens": 50,
        "total_tokens": 1250,
        "end_user": None,
        "api_base": "https://api.openai.com/v1?key=secret",
        "messages": [{"role": "user", "content": "the secret prompt"}],
        "response": {"choices": [{"message": {"content": "the secret answer"}}]},
        "model_parameters": {"user": "customer-42", "temperature": 0.2},
    }
    payload.update(overrides)
    return payload


# --------------------------------------------------------------------------------------
# LiteLLM, end to end with the real package


@pytest.fixture(scope="module")
def litellm():
    """The real litellm package, offline: its bundled model cost map, no remote fetch."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # read at import time
        patch.setenv("LITELLM_TELEMETRY", "False")
        module = importlib.import_module("litellm")
    return module


# A provider answer with prompt caching: 1200 prompt tokens of which 1000 read from the
# cache and 100 written to it, 50 completion tokens of which 20 reasoning.
CACHED_COMPLETION = {
    "id": "chatcmpl-mock-1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-4o-mini",
    "choices": [
        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi"}}
    ],
    "usage": {
        "prompt_tokens": 1200,
        "completion_tokens": 50,
        "total_tokens": 1250,
        "prompt_tokens_details": {"cached_tokens": 1000},
        "completion_tokens_details": {"reasoning_tokens": 20},
        "cache_creation_input_tokens": 100,
    },
}


def _stored_count() -> int:
    """Count stored events from a worker thread (the event loop may not touch the DB)."""
    try:
        return UsageEvent.objects.count()
    finally:
        connection.close()


async def _until(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for litellm's logging callbacks")
        await asyncio.sleep(0.05)


@pytest.mark.django_db(transaction=True)
def test_litellm_generic_api_logger_end_to_end(live_server, world, litellm):
    from litellm.integrations.generic_api.generic_api_callback import GenericAPILogger
    from litellm.litellm_core_utils.logging_worker import GLOBAL_LOGGING_WORKER
    from litellm.litellm_core_utils.safe_json_dumps import safe_dumps

    endpoint = live_server.url + LITELLM_URL
    messages = [{"role": "user", "content": "the secret prompt"}]
    saved = {
        name: list(getattr(litellm, name))
        for name in (
            "callbacks",
            "success_callback",
            "failure_callback",
            "_async_success_callback",
            "_async_failure_callback",
        )
    }

    async def scenario():
        # The logger starts its periodic flush task, so it is built inside the loop.
        logger = GenericAPILogger(
            endpoint=endpoint, headers=world.auth, flush_interval=3600, batch_size=100
        )
        litellm.callbacks = [logger]
        try:
            await litellm.acompletion(
                model="gpt-4o-mini",
                messages=messages,
                user="customer-42",
                metadata={
                    "user_api_key_team_alias": "research",
                    "user_api_key_user_email": "ann@example.com",
                },
                mock_response=CACHED_COMPLETION,
            )
            await litellm.aembedding(
                model="text-embedding-3-small", input=["a", "b"], mock_response=[0.1, 0.2]
            )
            with pytest.raises(litellm.RateLimitError):
                await litellm.acompletion(
                    model="gpt-4o-mini", messages=messages, mock_response="litellm.RateLimitError"
                )
            with pytest.raises(litellm.InternalServerError):
                await litellm.acompletion(
                    model="gpt-4o-mini", messages=messages, mock_response=Exception("boom")
                )
            await GLOBAL_LOGGING_WORKER.flush()
            await _until(lambda: len(logger.log_queue) >= 4)
            batch = list(logger.log_queue)
            await logger.flush_queue()  # the explicit flush: one POST of the whole batch
            assert logger.log_queue == []
            first = await asyncio.to_thread(_stored_count)
            # LiteLLM retries and repeats: the very same batch again.
            logger.log_queue.extend(batch)
            await logger.flush_queue()
            again = await asyncio.to_thread(_stored_count)
            return batch, first, again
        finally:
            await GLOBAL_LOGGING_WORKER.stop()
            for name, value in saved.items():
                setattr(litellm, name, value)

    batch, first, again = asyncio.run(scenario())

    assert len(batch) == 4
    assert (first, again) == (4, 4)
    rollup = OrgUsage15m.objects.aggregate(
        requests=Sum("requests"), cached=Sum("cached_input_tokens")
    )
    assert rollup == {"requests": 4, "cached": 1000}  # counted once in the aggregates too
    by_id = {p["litellm_call_id"]: p for p in batch}
    events = {e.request_id: e for e in UsageEvent.objects.select_related("team", "user")}
    assert set(events) == set(by_id)

    chat = next(e for e in events.values() if e.status_code == 200 and e.operation == "chat")
    assert (chat.model, chat.provider) == ("gpt-4o-mini", "openai")
    assert (chat.input_tokens, chat.cached_input_tokens, chat.cache_write_tokens) == (
        1200,
        1000,
        100,
    )
    assert (chat.output_tokens, chat.reasoning_tokens) == (50, 20)
    assert chat.cost_source == CostSource.REPORTED
    gateway_cost = Decimal(str(by_id[chat.request_id]["response_cost"]))
    assert gateway_cost > 0
    assert chat.cost_nanos == usd_to_nanos(gateway_cost)
    assert chat.end_user == "customer-42"
    assert chat.team == world.research
    assert chat.user.email == "ann@example.com"
    assert chat.api_token_id == world.token.id
    assert chat.session_id == by_id[chat.request_id]["trace_id"]
    assert chat.metadata["response_id"] == "chatcmpl-mock-1"
    assert "secret" not in json.dumps(chat.metadata)

    embedding = next(e for e in events.values() if e.operation == "embedding")
    assert embedding.model == "text-embedding-3-small"
    assert embedding.input_tokens == by_id[embedding.request_id]["prompt_tokens"] > 0
    assert embedding.output_tokens == 0
    assert embedding.cost_nanos == usd_to_nanos(
        Decimal(str(by_id[embedding.request_id]["response_cost"]))
    )

    assert sorted(e.status_code for e in events.values()) == [200, 200, 429, 500]
    assert UsageEvent.objects.failed().count() == 2
    for failed in UsageEvent.objects.failed():
        assert failed.cost_nanos == 0
        assert failed.metadata["error_class"] in {"RateLimitError", "InternalServerError"}

    # The same batch posted straight to the endpoint: all duplicates, nothing new.
    response = requests.post(endpoint, data=safe_dumps(batch), headers=world.auth, timeout=30)
    assert response.status_code == 200
    assert response.json() == {"accepted": 0, "duplicates": 4, "rejected": []}
    assert UsageEvent.objects.count() == 4


# --------------------------------------------------------------------------------------
# OpenTelemetry, end to end with the real SDK and OTLP/HTTP exporter


def _otel_provider(world, live_server, responses, **exporter_options):
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    session = requests.Session()
    session.hooks["response"].append(lambda response, *args, **kwargs: responses.append(response))
    if not exporter_options.pop("from_environment", False):
        exporter_options.update(endpoint=live_server.url + OTLP_URL, headers=world.auth)
    exporter = OTLPSpanExporter(session=session, **exporter_options)
    provider = TracerProvider(
        resource=Resource.create({"service.name": "support-bot", "usage.project": "chatbot"})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    finished = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(finished))
    return provider, exporter, finished


def _genai_spans(tracer):
    from opentelemetry.trace import SpanKind, Status, StatusCode

    with tracer.start_as_current_span("invoke_agent support", kind=SpanKind.INTERNAL) as agent:
        agent.set_attribute("gen_ai.operation.name", "invoke_agent")
        agent.set_attribute("gen_ai.request.model", "gpt-4o")  # an agent span: not a call
        with tracer.start_as_current_span("chat gpt-4o", kind=SpanKind.CLIENT) as chat:
            chat.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "openai",
                    "gen_ai.request.model": "gpt-4o",
                    "gen_ai.response.model": "gpt-4o-2024-08-06",
                    "gen_ai.usage.input_tokens": 900,
                    "gen_ai.usage.cache_read.input_tokens": 600,
                    "gen_ai.usage.cache_creation.input_tokens": 200,
                    "gen_ai.usage.output_tokens": 120,
                    "gen_ai.conversation.id": "conv-7",
                    "user.email": "Bob@Example.com",
                    "enduser.id": "customer-9",
                    "usage.team": "research",
                }
            )
            time.sleep(0.02)
        with tracer.start_as_current_span("embeddings", kind=SpanKind.CLIENT) as emb:
            emb.set_attributes(
                {
                    "gen_ai.operation.name": "embeddings",
                    "gen_ai.system": "openai",  # the older attribute name
                    "gen_ai.request.model": "text-embedding-3-small",
                    "gen_ai.usage.input_tokens": 64,
                    "session.id": "sess-1",
                }
            )
        with tracer.start_as_current_span("chat claude", kind=SpanKind.CLIENT) as failed:
            failed.set_attributes(
                {
                    "gen_ai.operation.name": "chat",
                    "gen_ai.provider.name": "anthropic",
                    "gen_ai.request.model": "claude-sonnet-4",
                    "error.type": "429",
                }
            )
            failed.set_status(Status(StatusCode.ERROR, "rate limited"))
        with tracer.start_as_current_span("GET /healthz", kind=SpanKind.SERVER) as other:
            other.set_attribute("http.response.status_code", 200)


@pytest.mark.django_db(transaction=True)
def test_otel_sdk_exports_genai_spans_over_otlp_http(live_server, world):
    responses: list = []
    provider, exporter, finished = _otel_provider(world, live_server, responses)
    _genai_spans(provider.get_tracer("tests.integrations"))
    assert provider.force_flush(timeout_millis=30_000)

    assert [r.status_code for r in responses] == [200]
    answer = ExportTraceServiceResponse.FromString(responses[0].content)
    assert responses[0].headers["Content-Type"] == "application/x-protobuf"
    assert answer.partial_success.rejected_spans == 0
    assert "2 span(s) without gen_ai.* model attributes ignored" in (
        answer.partial_success.error_message
    )
    assert json.loads(responses[0].headers["X-Usage-Ingest"]) == {
        "accepted": 3,
        "duplicates": 0,
        "rejected": 0,
        "ignored": 2,
    }

    spans = {s.name: s for s in finished.get_finished_spans()}
    events = {e.request_id: e for e in UsageEvent.objects.select_related("team", "project", "user")}
    assert len(events) == 3

    def event_of(name):
        context = spans[name].get_span_context()
        return events[f"{context.trace_id:032x}-{context.span_id:016x}"]

    chat = event_of("chat gpt-4o")
    assert (chat.model, chat.provider, chat.operation) == ("gpt-4o-2024-08-06", "openai", "chat")
    assert (chat.input_tokens, chat.cached_input_tokens, chat.cache_write_tokens) == (
        900,
        600,
        200,
    )
    assert chat.output_tokens == 120
    assert chat.status_code == 200
    assert chat.latency_ms >= 20
    assert chat.user.email == "bob@example.com"
    assert (chat.end_user, chat.session_id) == ("customer-9", "conv-7")
    assert (chat.team, chat.project) == (world.research, world.chatbot)
    assert chat.metadata["service"] == "support-bot"
    assert chat.timestamp.timestamp() == pytest.approx(spans["chat gpt-4o"].start_time / 1e9)

    embedding = event_of("embeddings")
    assert (embedding.operation, embedding.provider, embedding.input_tokens) == (
        "embedding",
        "openai",
        64,
    )
    assert embedding.session_id == "sess-1"
    assert embedding.cost_source == CostSource.CATALOG
    assert embedding.cost_nanos > 0  # priced by the catalog: OTel spans carry no cost

    failed = event_of("chat claude")
    assert (failed.model, failed.status_code) == ("claude-sonnet-4", 429)

    # The exporter sends the same spans again (a retry): nothing new is stored.
    from opentelemetry.sdk.trace.export import SpanExportResult

    assert exporter.export(finished.get_finished_spans()) == SpanExportResult.SUCCESS
    assert json.loads(responses[-1].headers["X-Usage-Ingest"])["duplicates"] == 3
    assert UsageEvent.objects.count() == 3
    provider.shutdown()


@pytest.mark.django_db(transaction=True)
def test_otel_sdk_configured_by_the_documented_environment(live_server, world, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", live_server.url + OTLP_URL)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization=Bearer%20{world.secret}")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")
    responses: list = []
    provider, _, _ = _otel_provider(world, live_server, responses, from_environment=True)
    with provider.get_tracer("t").start_as_current_span("chat") as span:
        span.set_attributes({"gen_ai.request.model": "gpt-4o-mini", "gen_ai.usage.input_tokens": 5})
    assert provider.force_flush(timeout_millis=30_000)
    provider.shutdown()

    assert [r.status_code for r in responses] == [200]
    assert responses[0].request.headers["Content-Encoding"] == "gzip"
    event = UsageEvent.objects.get()
    assert (event.input_tokens, event.project) == (5, world.chatbot)


# --------------------------------------------------------------------------------------
# OTLP JSON encoding


TRACE_ID = "5b8efff798038103d269b633813fc60c"


def otlp_json(*spans, resource_attributes=None) -> dict:
    now = time.time_ns()
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": resource_attributes or []},
                "scopeSpans": [
                    {
                        "scope": {"name": "my.instrumentation"},
                        "spans": [
                            {
                                "traceId": TRACE_ID,
                                "spanId": f"{index + 1:016x}",
                                "parentSpanId": "",
                                "name": "chat",
                                "kind": 3,
                                "startTimeUnixNano": str(now - 2_000_000_000),
                                "endTimeUnixNano": str(now - 1_500_000_000),
                                "status": {},
                                **span,
                            }
                            for index, span in enumerate(spans)
                        ],
                    }
                ],
            }
        ]
    }


def attr(key, value) -> dict:
    if isinstance(value, bool):
        return {"key": key, "value": {"boolValue": value}}
    if isinstance(value, int):
        return {"key": key, "value": {"intValue": str(value)}}  # int64 as a JSON string
    return {"key": key, "value": {"stringValue": value}}


def test_otlp_json_with_hex_ids_is_stored(post, world):
    body = otlp_json(
        {
            "attributes": [
                attr("gen_ai.operation.name", "chat"),
                attr("gen_ai.request.model", "gpt-4o-mini"),
                attr("gen_ai.usage.input_tokens", 300),
                attr("gen_ai.usage.output_tokens", 40),
            ]
        },
        {
            "attributes": [
                attr("gen_ai.operation.name", "text_completion"),
                attr("gen_ai.request.model", "gpt-4o-mini"),
                attr("http.response.status_code", 503),
            ],
            "status": {"code": 2, "message": "upstream down"},
            "links": [{"traceId": TRACE_ID, "spanId": "00000000000000aa"}],
        },
        {"attributes": [attr("db.system", "postgresql")]},
        resource_attributes=[attr("usage.team", "platform"), attr("service.name", "api")],
    )

    response = post(OTLP_URL, body)

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    answer = response.json()
    assert answer["partialSuccess"]["errorMessage"].startswith("1 span(s) without gen_ai")
    assert "rejectedSpans" not in answer["partialSuccess"]  # 0 is left out in OTLP JSON
    events = {e.request_id: e for e in UsageEvent.objects.select_related("team")}
    assert set(events) == {f"{TRACE_ID}-0000000000000001", f"{TRACE_ID}-0000000000000002"}
    chat, completion = (
        events[f"{TRACE_ID}-0000000000000001"],
        events[f"{TRACE_ID}-0000000000000002"],
    )
    assert (chat.input_tokens, chat.output_tokens, chat.latency_ms) == (300, 40, 500)
    assert chat.team == world.platform
    assert chat.cost_source == CostSource.CATALOG and chat.cost_nanos > 0
    assert (completion.operation, completion.status_code) == ("completion", 503)


def test_otlp_json_partial_success_names_rejected_spans(post, world):
    body = otlp_json(
        {"attributes": [attr("gen_ai.request.model", "gpt-4o"), attr("usage.team", "nope")]},
        {"attributes": [attr("gen_ai.request.model", "gpt-4o")]},
    )

    response = post(OTLP_URL, body)

    assert response.status_code == 200
    partial = response.json()["partialSuccess"]
    assert partial["rejectedSpans"] == "1"  # int64 in OTLP JSON is a string
    assert f"span {TRACE_ID}-0000000000000001: team: Unknown team 'nope'" in partial["errorMessage"]
    assert UsageEvent.objects.count() == 1


def test_otlp_json_parses_to_the_request_the_sdk_would_send():
    body = otlp_json({"attributes": [attr("gen_ai.request.model", "m")]})
    request = parse_otlp_json(json.dumps(body).encode())
    span = request.resource_spans[0].scope_spans[0].spans[0]
    assert span.trace_id.hex() == TRACE_ID
    assert span.span_id.hex() == "0000000000000001"
    events, ignored = otlp_spans_to_events(request)
    assert ignored == 0
    assert events[0]["request_id"] == f"{TRACE_ID}-0000000000000001"


# --------------------------------------------------------------------------------------
# LiteLLM endpoint: body shapes, labels, errors


def test_litellm_json_array_ndjson_and_single_object(post, world):
    array = [
        litellm_payload(),
        litellm_payload(call_type="aembedding", model="text-embedding-3-small"),
    ]
    ndjson = "\n".join(json.dumps(litellm_payload()) for _ in range(2)) + "\n"

    assert post(LITELLM_URL, array).json() == {"accepted": 2, "duplicates": 0, "rejected": []}
    assert post(LITELLM_URL, ndjson, content_type="application/x-ndjson").status_code == 200
    assert post(LITELLM_URL, litellm_payload()).json()["accepted"] == 1
    assert UsageEvent.objects.count() == 5
    stored = UsageEvent.objects.first()
    assert "secret" not in json.dumps(stored.metadata)
    assert stored.metadata["api_base_host"] == "api.openai.com"


def test_litellm_rejections_refer_to_payload_positions(post, world):
    payloads = [
        litellm_payload(),
        litellm_payload(litellm_call_id=None),
        "not an object",
        litellm_payload(metadata={"user_api_key_team_alias": "unknown-team"}),
    ]

    response = post(LITELLM_URL, payloads)

    assert response.status_code == 207
    body = response.json()
    assert (body["accepted"], body["duplicates"]) == (1, 0)
    assert [r["index"] for r in body["rejected"]] == [1, 2, 3]
    assert "litellm_call_id" in body["rejected"][0]["errors"]
    assert body["rejected"][2]["errors"] == {
        "team": ["Unknown team 'unknown-team' in this organization."]
    }


def test_litellm_unknown_team_is_rejected_unless_the_token_uses_defaults(post, world):
    payload = litellm_payload(metadata={"user_api_key_team_alias": "unknown-team"})
    response = post(LITELLM_URL, [payload])
    assert response.status_code == 422
    assert UsageEvent.objects.count() == 0

    world.token.unknown_labels = UnknownLabelPolicy.DEFAULTS
    world.token.default_team = world.platform
    world.token.save()
    response = post(LITELLM_URL, [payload])

    assert response.status_code == 200
    assert UsageEvent.objects.get().team == world.platform


def test_litellm_payload_without_cost_is_priced_by_the_catalog(post, world):
    post(LITELLM_URL, [litellm_payload(response_cost=None)])
    event = UsageEvent.objects.get()
    assert event.cost_source == CostSource.CATALOG
    assert event.cost_nanos > 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty"),
        (b"{not json", "Malformed JSON"),
        (b"42", "JSON array"),
        (b'{"a": 1}\n{oops}\n', "line 2"),
        (b"\xff\xfe", "UTF-8"),
        (b"[]", "empty"),
    ],
)
def test_litellm_malformed_body_answers_400_and_stores_nothing(post, world, body, message):
    response = post(LITELLM_URL, body)
    assert response.status_code == 400
    assert message in response.json()["error"]
    assert not UsageEvent.objects.exists()


def test_litellm_more_than_1000_payloads_answer_413(post, world):
    response = post(LITELLM_URL, [{"litellm_call_id": str(i)} for i in range(1001)])
    assert response.status_code == 413
    assert not UsageEvent.objects.exists()


@pytest.mark.parametrize("url", [LITELLM_URL, OTLP_URL])
def test_without_a_token_answers_401(post, world, url):
    response = post(url, litellm_payload() if url == LITELLM_URL else otlp_json(), token=None)
    assert response.status_code == 401
    assert not UsageEvent.objects.exists()


def test_a_read_only_token_cannot_send_spans(post, world):
    reader = token_issue(organization=world.org, name="reader", scopes=["read"]).secret
    response = post(OTLP_URL, otlp_json(), token=reader)
    assert response.status_code == 401


# --------------------------------------------------------------------------------------
# OTLP endpoint: errors


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\xff\xff\xff", "application/x-protobuf"),
        (b"{not json", "application/json"),
        (b"[1, 2]", "application/json"),
        (json.dumps({"resourceSpans": "nope"}).encode(), "application/json"),
    ],
)
def test_otlp_malformed_body_answers_400_with_a_status(post, world, body, content_type):
    response = post(OTLP_URL, body, content_type=content_type)

    assert response.status_code == 400
    assert response["Content-Type"] == content_type
    if content_type == "application/json":
        status = json_format.Parse(response.content, status_pb2.Status())
    else:
        status = status_pb2.Status.FromString(response.content)
    assert status.code == 3
    assert status.message
    assert not UsageEvent.objects.exists()


def test_otlp_unsupported_content_type_answers_415(post, world):
    assert post(OTLP_URL, "x", content_type="text/plain").status_code == 415


def test_otlp_gzip_bomb_answers_413(post, world, settings):
    settings.INGEST_MAX_BYTES = 10_000
    response = post(
        OTLP_URL,
        gzip.compress(b"\x00" * 100_000),
        content_type="application/x-protobuf",
        **{"Content-Encoding": "gzip"},
    )
    assert response.status_code == 413


# --------------------------------------------------------------------------------------
# The pure mappings


@pytest.mark.parametrize(
    ("call_type", "operation"),
    [
        ("completion", "chat"),
        ("acompletion", "chat"),
        ("text_completion", "completion"),
        ("atext_completion", "completion"),
        ("embedding", "embedding"),
        ("aembedding", "embedding"),
        ("arerank", "rerank"),
        ("image_generation", "image"),
        ("atranscription", "audio"),
        ("speech", "audio"),
        ("something_new", "chat"),
    ],
)
def test_litellm_call_types_map_to_operations(call_type, operation):
    assert litellm_payload_to_event(litellm_payload(call_type=call_type))["operation"] == operation


def test_litellm_mapping_fields():
    payload = litellm_payload(
        model="openai/gpt-4o-mini",
        startTime=1_767_225_600.25,
        endTime=1_767_225_601.5,
        end_user="",
        session_id="",
        trace_id="trace-9",
        response_cost=2e-07,
    )
    payload["metadata"].update(
        {
            "user_api_key_user_id": "carol@example.com",
            "user_api_key_project_alias": "chatbot",
            "user_api_key_request_route": "/v1/chat/completions",
            "usage_object": {
                "prompt_tokens": 10,
                "cache_read_input_tokens": 4,
                "completion_tokens_details": {"reasoning_tokens": 3},
            },
        }
    )

    event = litellm_payload_to_event(payload)

    assert event["model"] == "gpt-4o-mini"  # the provider prefix is the provider's
    assert event["timestamp"] == "2026-01-01T00:00:00.250000+00:00"
    assert event["latency_ms"] == 1250
    assert event["cost_usd"] == "0.0000002"
    assert (event["team"], event["project"], event["user"]) == (
        "research",
        "chatbot",
        "carol@example.com",
    )
    assert (event["end_user"], event["session_id"]) == ("customer-42", "trace-9")
    assert event["endpoint"] == "/v1/chat/completions"
    assert event["cached_input_tokens"] == 4
    assert len(json.dumps(event["metadata"])) < 4096


def test_litellm_failure_status_codes():
    def status(info):
        return litellm_payload_to_event(litellm_payload(status="failure", error_information=info))[
            "status_code"
        ]

    assert status({"error_code": "429"}) == 429
    assert status({"error_code": "timeout"}) == 500
    assert status(None) == 500


def test_litellm_user_id_that_is_not_an_email_stays_in_metadata():
    payload = litellm_payload()
    payload["metadata"]["user_api_key_user_id"] = "user-123"
    event = litellm_payload_to_event(payload)
    assert "user" not in event
    assert event["metadata"]["litellm_user_id"] == "user-123"


def test_inconsistent_cache_counts_are_repaired_not_rejected():
    payload = litellm_payload(prompt_tokens=100)
    payload["metadata"]["usage_object"] = {
        "prompt_tokens_details": {"cached_tokens": 80},
        "cache_creation_input_tokens": 50,
    }
    event = litellm_payload_to_event(payload)
    assert (event["input_tokens"], event["cached_input_tokens"], event["cache_write_tokens"]) == (
        130,
        80,
        50,
    )


def test_otlp_span_ids_are_checked():
    body = otlp_json({"attributes": [attr("gen_ai.request.model", "m")]})
    body["resourceSpans"][0]["scopeSpans"][0]["spans"][0]["spanId"] = base64.b64encode(
        b"\x01\x02"
    ).decode()
    events, _ = otlp_spans_to_events(parse_otlp_json(json.dumps(body).encode()))
    assert events[0].field == "traceId"


def test_litellm_bad_user_email_is_kept_in_metadata_not_rejected():
    payload = litellm_payload()
    payload["metadata"]["user_api_key_user_email"] = "not-an-email"
    event = litellm_payload_to_event(payload)
    assert "user" not in event
    assert event["metadata"]["litellm_user_email"] == "not-an-email"


def test_a_model_on_the_resource_does_not_make_every_span_a_model_call():
    body = otlp_json(
        {"attributes": [attr("http.route", "/chat")]},
        resource_attributes=[attr("gen_ai.request.model", "gpt-4o"), attr("usage.team", "x")],
    )
    events, ignored = otlp_spans_to_events(parse_otlp_json(json.dumps(body).encode()))
    assert (events, ignored) == ([], 1)


def test_otlp_requests_larger_than_one_batch_are_stored_in_batches(post, world, settings):
    settings.INGEST_MAX_EVENTS = 2
    spans = [{"attributes": [attr("gen_ai.request.model", "gpt-4o")]} for _ in range(4)]
    spans.append({"attributes": [attr("gen_ai.request.model", "gpt-4o"), attr("usage.team", "x")]})

    response = post(OTLP_URL, otlp_json(*spans))

    assert response.status_code == 200
    assert json.loads(response["X-Usage-Ingest"]) == {
        "accepted": 4,
        "duplicates": 0,
        "rejected": 1,
        "ignored": 0,
    }
    assert (
        f"span {TRACE_ID}-0000000000000005: team"
        in response.json()["partialSuccess"]["errorMessage"]
    )


def test_litellm_batch_over_the_core_limit_is_accepted_up_to_its_own(post, world, settings):
    """LiteLLM's default batch passes the core API's 5 MiB; prompts are dropped anyway."""
    settings.INGEST_MAX_BYTES = 1_000
    settings.INTEGRATION_MAX_BYTES = 200_000
    payload = litellm_payload()
    payload["messages"] = [{"role": "user", "content": "x" * 50_000}]
    response = post(LITELLM_URL, [payload])
    assert response.status_code == 200, response.content
    settings.INTEGRATION_MAX_BYTES = 10_000
    assert post(LITELLM_URL, [payload]).status_code == 413
