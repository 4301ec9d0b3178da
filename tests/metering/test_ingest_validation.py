"""POST /api/v1/events: each bad input of SPEC section 3 is rejected on its own.

Every bad event is sent next to a good one: the answer is 207, names the bad event's
index, request_id and field with a message, stores the good one and nothing of the bad.
"""

from datetime import UTC, datetime, timedelta

import pytest
from django.db.models import Sum

from metering.models import OrgUsage15m, ScopeUsage15m, UsageEvent

LABELS = (
    "request_id",
    "model",
    "provider",
    "end_user",
    "team",
    "project",
    "session_id",
    "assistant",
    "workflow",
    "workflow_run_id",
    "client",
    "endpoint",
)


def _future(minutes: float) -> str:
    return (datetime.now(UTC) + timedelta(minutes=minutes)).isoformat()


# (case id, fields to override (None drops the key), field named in errors, message part)
BAD_EVENTS = [
    ("no request_id", {"request_id": None}, "request_id", "required"),
    ("empty request_id", {"request_id": ""}, "request_id", "required"),
    ("numeric request_id", {"request_id": 12345}, "request_id", "string"),
    ("no timestamp", {"timestamp": None}, "timestamp", "required"),
    ("naive timestamp", {"timestamp": "2026-01-15T10:00:00"}, "timestamp", "offset"),
    ("date-only timestamp", {"timestamp": "2026-01-15"}, "timestamp", "offset"),
    ("garbage timestamp", {"timestamp": "yesterday noon"}, "timestamp", "RFC 3339"),
    ("epoch timestamp", {"timestamp": 1767225600}, "timestamp", "RFC 3339"),
    # A callable is read when the test runs (collection may be minutes earlier).
    ("timestamp 10 min ahead", {"timestamp": lambda: _future(10)}, "timestamp", "future"),
    ("no model", {"model": None}, "model", "required"),
    ("string tokens", {"input_tokens": "1000"}, "input_tokens", "integer"),
    ("fractional tokens", {"output_tokens": 10.5}, "output_tokens", "integer"),
    ("float-looking tokens", {"output_tokens": 10.0}, "output_tokens", "integer"),
    ("boolean tokens", {"input_tokens": True}, "input_tokens", "integer"),
    ("negative tokens", {"input_tokens": -1}, "input_tokens", "0 or more"),
    ("negative cached", {"cached_input_tokens": -5}, "cached_input_tokens", "0 or more"),
    ("tokens over 2^53", {"output_tokens": 2**53 + 1}, "output_tokens", "at most"),
    (
        "2^53 tokens of a priced model",
        {"model": "gpt-4o", "input_tokens": 2**53, "output_tokens": 2**53},
        "cost_usd",
        "exceeds",
    ),
    ("reported cost over 1e9 USD", {"cost_usd": "1000000000.01"}, "cost_usd", "at most"),
    (
        "cached + writes > input",
        {"input_tokens": 100, "cached_input_tokens": 60, "cache_write_tokens": 41},
        "cached_input_tokens",
        "cannot exceed input_tokens",
    ),
    (
        "cached > input",
        {"input_tokens": 100, "cached_input_tokens": 101},
        "cached_input_tokens",
        "cannot exceed input_tokens",
    ),
    (
        "reasoning > output",
        {"output_tokens": 10, "reasoning_tokens": 11},
        "reasoning_tokens",
        "cannot exceed output_tokens",
    ),
    ("negative quantity", {"quantity": -3}, "quantity", "0 or more"),
    ("negative latency", {"latency_ms": -1}, "latency_ms", "0 or more"),
    ("string latency", {"latency_ms": "fast"}, "latency_ms", "milliseconds"),
    ("NUL in model", {"model": "gpt-4o\x00"}, "model", "NUL"),
    ("NUL in a label", {"session_id": "s\x001"}, "session_id", "NUL"),
    ("NUL in metadata", {"metadata": {"note": "a\x00b"}}, "metadata", "NUL"),
    ("NUL in a metadata key", {"metadata": {"k\x00": 1}}, "metadata", "NUL"),
    ("metadata over 4 KiB", {"metadata": {"blob": "x" * 4100}}, "metadata", "4096 bytes"),
    ("metadata not an object", {"metadata": ["a", "b"]}, "metadata", "object"),
    ("status 600", {"status_code": 600}, "status_code", "100 to 599"),
    ("status 99", {"status_code": 99}, "status_code", "100 to 599"),
    ("status as string", {"status_code": "200"}, "status_code", "100 to 599"),
    ("unknown operation", {"operation": "dance"}, "operation", "Must be one of"),
    ("unknown resource type", {"resource_type": "gpus"}, "resource_type", "Must be one of"),
    ("unknown pool category", {"pool_category": "spare"}, "pool_category", "Must be one of"),
    ("cost not a number", {"cost_usd": "twelve"}, "cost_usd", "decimal"),
    ("cost negative", {"cost_usd": "-0.01"}, "cost_usd", "0 or more"),
    ("cost NaN string", {"cost_usd": "NaN"}, "cost_usd", "finite"),
    ("cost boolean", {"cost_usd": True}, "cost_usd", "number"),
    ("cost object", {"cost_usd": {"usd": 1}}, "cost_usd", "number"),
    ("user not an email", {"user": "not-an-email"}, "user", "email"),
    ("user not a string", {"user": 42}, "user", "email"),
    ("unknown team", {"team": "no-such-team"}, "team", "'no-such-team'"),
    ("unknown project", {"project": "no-such-project"}, "project", "'no-such-project'"),
]
BAD_EVENTS += [
    (f"{name} over 200 chars", {name: "x" * 201}, name, "200 characters")
    for name in LABELS
    if name != "request_id"
]
BAD_EVENTS.append(("request_id over 200 chars", {"request_id": "r" * 201}, "request_id", "200"))


def _stored_totals(org) -> dict:
    return {
        "events": UsageEvent.objects.filter(organization=org).count(),
        "org_rollup": OrgUsage15m.objects.filter(organization=org).aggregate(n=Sum("requests"))[
            "n"
        ],
        "scope_rollup": ScopeUsage15m.objects.filter(organization=org).aggregate(n=Sum("requests"))[
            "n"
        ],
    }


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [pytest.param(o, f, m, id=case) for case, o, f, m in BAD_EVENTS],
)
def test_bad_event_gets_its_field_message_and_stores_nothing(
    org, post_events, make_event, overrides, field, message
):
    good = make_event(request_id="good-1")
    bad = make_event(request_id="bad-1")
    bad.update({k: v() if callable(v) else v for k, v in overrides.items()})
    bad = {k: v for k, v in bad.items() if v is not None}

    response = post_events([good, bad])

    assert response.status_code == 207, response.content
    body = response.json()
    assert body["accepted"] == 1
    assert body["duplicates"] == 0
    [rejection] = body["rejected"]
    assert rejection["index"] == 1
    raw_id = bad.get("request_id")
    assert rejection["request_id"] == (raw_id if isinstance(raw_id, str) else None)
    assert field in rejection["errors"], rejection
    assert any(message in text for text in rejection["errors"][field]), rejection
    assert list(UsageEvent.objects.values_list("request_id", flat=True)) == ["good-1"]
    assert _stored_totals(org) == {"events": 1, "org_rollup": 1, "scope_rollup": 1}


def test_every_problem_of_one_event_is_reported_at_once(post_events, make_event):
    bad = make_event(timestamp=None, model="m" * 201, input_tokens=-1, status_code=700)

    response = post_events([bad])

    assert response.status_code == 422
    errors = response.json()["rejected"][0]["errors"]
    assert set(errors) >= {"timestamp", "model", "input_tokens", "status_code"}


def test_an_event_that_is_not_an_object_is_rejected_alone(post_events, make_event):
    response = post_events([make_event(), "just a string", 42, None])

    assert response.status_code == 207
    rejected = response.json()["rejected"]
    assert [r["index"] for r in rejected] == [1, 2, 3]
    assert all(r["errors"] == {"event": ["Each event must be a JSON object."]} for r in rejected)
    assert all(r["request_id"] is None for r in rejected)
    assert UsageEvent.objects.count() == 1


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"input_tokens": 2**53, "model": "unpriced-model"}, id="2^53 tokens"),
        pytest.param(
            {"input_tokens": 100, "cached_input_tokens": 60, "cache_write_tokens": 40},
            id="cached + writes == input",
        ),
        pytest.param({"output_tokens": 10, "reasoning_tokens": 10}, id="reasoning == output"),
        pytest.param({label: "x" * 200 for label in LABELS if label not in ("team", "project")}),
        pytest.param({"metadata": {"blob": "x" * 4000}}, id="metadata just under 4 KiB"),
        pytest.param({"timestamp": _future(4)}, id="4 minutes ahead"),
        pytest.param({"timestamp": "2019-06-01T00:00:00Z"}, id="years-old backfill"),
        pytest.param({"timestamp": "2026-01-15T10:00:00+05:45"}, id="non-UTC offset"),
        pytest.param({"status_code": 100}, id="status 100"),
        pytest.param({"status_code": 599}, id="status 599"),
        pytest.param({"cost_usd": "0"}, id="free call"),
        pytest.param({"cost_usd": 12.5}, id="cost as JSON number"),
        pytest.param({"latency_ms": 812.4}, id="fractional latency"),
        pytest.param({"operation": "embedding", "output_tokens": 0}, id="embedding"),
        pytest.param(
            {"operation": "storage", "resource_type": "storage", "quantity": 10**12},
            id="storage bytes",
        ),
        pytest.param({"metadata": {"temperature": 0.7, "tags": ["a"]}}, id="metadata floats"),
        pytest.param({"user": "New.Person@Example.TEST"}, id="email in capitals"),
    ],
)
def test_edge_values_inside_the_limits_are_accepted(post_events, make_event, overrides):
    response = post_events([make_event(**overrides)])

    assert response.status_code == 200, response.json()
    assert response.json() == {"accepted": 1, "duplicates": 0, "rejected": []}
    assert UsageEvent.objects.count() == 1


def test_metadata_numbers_with_a_fraction_are_kept(post_events, make_event):
    response = post_events(
        body='{"events": [{"request_id": "m1", "timestamp": "2026-01-01T00:00:00Z",'
        ' "model": "x", "metadata": {"temperature": 0.7, "big": 1e400, "n": 2}}]}'
    )

    assert response.status_code == 200, response.json()
    assert UsageEvent.objects.get(request_id="m1").metadata == {
        "temperature": 0.7,
        "big": "1E+400",
        "n": 2,
    }


def test_user_email_is_stored_in_lower_case(post_events, make_event):
    post_events([make_event(request_id="u1", user="New.Person@Example.TEST")])

    assert UsageEvent.objects.get(request_id="u1").user.email == "new.person@example.test"


def test_timestamps_are_stored_in_utc(post_events, make_event):
    post_events([make_event(request_id="r1", timestamp="2026-01-15T10:00:00+05:45")])

    stored = UsageEvent.objects.get(request_id="r1").timestamp

    assert stored == datetime(2026, 1, 15, 4, 15, tzinfo=UTC)


def test_accepted_event_keeps_every_field(org, post_events, make_event, personas):
    event = make_event(
        request_id="full-1",
        timestamp="2026-02-03T04:05:06.789+00:00",
        model="gpt-4o",
        provider="openai",
        operation="chat",
        input_tokens=1200,
        cached_input_tokens=200,
        cache_write_tokens=100,
        output_tokens=300,
        reasoning_tokens=50,
        latency_ms=1234,
        status_code=429,
        cost_usd="0.0123456789",
        user="member@example.test",
        end_user="customer-7",
        team="platform",
        project="chatbot",
        session_id="sess-1",
        assistant="Code Helper",
        workflow="triage",
        workflow_run_id="run-9",
        workflow_status="failed",
        client="ide",
        endpoint="/v1/chat/completions",
        pool_category="surplus",
        metadata={"trace": "abc", "n": 3},
    )

    assert post_events([event]).status_code == 200

    stored = UsageEvent.objects.get(request_id="full-1")
    assert stored.organization == org
    assert stored.timestamp == datetime(2026, 2, 3, 4, 5, 6, 789000, tzinfo=UTC)
    assert (stored.input_tokens, stored.cached_input_tokens, stored.cache_write_tokens) == (
        1200,
        200,
        100,
    )
    assert (stored.output_tokens, stored.reasoning_tokens) == (300, 50)
    assert (stored.latency_ms, stored.status_code, stored.failed) == (1234, 429, True)
    assert stored.cost_nanos == 12_345_679  # half-even rounding at the nano-dollar
    assert stored.cost_source == "reported"
    assert stored.user == personas.member
    assert (stored.team, stored.project) == (personas.platform_team, personas.chatbot_project)
    assert stored.api_token == personas.service_token
    assert (stored.end_user, stored.session_id, stored.assistant) == (
        "customer-7",
        "sess-1",
        "Code Helper",
    )
    assert (stored.workflow, stored.workflow_run_id, stored.workflow_status) == (
        "triage",
        "run-9",
        "failed",
    )
    assert (stored.client, stored.endpoint, stored.pool_category) == (
        "ide",
        "/v1/chat/completions",
        "surplus",
    )
    assert stored.metadata == {"trace": "abc", "n": 3}


def test_defaults_fill_optional_fields(post_events, make_event):
    post_events([{"request_id": "min-1", "timestamp": _future(0), "model": "gpt-4o-mini"}])

    stored = UsageEvent.objects.get(request_id="min-1")

    assert (stored.operation, stored.resource_type, stored.status_code) == ("chat", "tokens", 200)
    assert (stored.input_tokens, stored.output_tokens, stored.latency_ms) == (0, 0, 0)
    assert stored.metadata is None
