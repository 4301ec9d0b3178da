"""POST /api/v1/events: whole-request answers (SPEC section 3): 200/207/422/400/401/413/429."""

import json

import pytest

from accounts.models import ApiToken
from accounts.tokens import token_issue, token_revoke
from metering.models import LatencyHistogramHourly, OrgUsage15m, ScopeUsage15m, UsageEvent


def _nothing_stored() -> bool:
    return not (
        UsageEvent.objects.exists()
        or OrgUsage15m.objects.exists()
        or ScopeUsage15m.objects.exists()
        or LatencyHistogramHourly.objects.exists()
    )


def test_valid_batch_answers_200_with_counts(post_events, make_event):
    response = post_events([make_event() for _ in range(5)])

    assert response.status_code == 200
    assert response.json() == {"accepted": 5, "duplicates": 0, "rejected": []}
    assert UsageEvent.objects.count() == 5


def test_mixed_batch_answers_207_and_stores_the_valid_ones(post_events, make_event):
    events = [
        make_event(request_id="ok-1"),
        make_event(request_id="bad-1", model=None),
        make_event(request_id="ok-2"),
        make_event(request_id="bad-2", input_tokens="7"),
        make_event(request_id="ok-3"),
    ]

    response = post_events(events)

    assert response.status_code == 207
    body = response.json()
    assert (body["accepted"], body["duplicates"]) == (3, 0)
    assert [(r["index"], r["request_id"]) for r in body["rejected"]] == [
        (1, "bad-1"),
        (3, "bad-2"),
    ]
    assert set(UsageEvent.objects.values_list("request_id", flat=True)) == {"ok-1", "ok-2", "ok-3"}


def test_batch_of_only_bad_events_answers_422_and_stores_nothing(post_events, make_event):
    response = post_events([make_event(timestamp=None), make_event(model="")])

    assert response.status_code == 422
    body = response.json()
    assert (body["accepted"], body["duplicates"]) == (0, 0)
    assert [r["index"] for r in body["rejected"]] == [0, 1]
    assert _nothing_stored()


def test_duplicates_and_a_rejection_answer_207(post_events, make_event):
    event = make_event()
    post_events([event])

    response = post_events([event, make_event(model=None)])

    assert response.status_code == 207
    assert (response.json()["accepted"], response.json()["duplicates"]) == (0, 1)


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="malformed"),
        pytest.param(b"", id="empty body"),
        pytest.param(b'{"events": [{"a": NaN}]}', id="NaN"),
        pytest.param(b'{"events": [{"a": Infinity}]}', id="Infinity"),
        pytest.param(b"\xff\xfe\x00garbage", id="not UTF-8"),
        pytest.param(b'{"events": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", id="nested deep"),
        pytest.param(b"[]", id="a list"),
        pytest.param(b'"events"', id="a string"),
        pytest.param(b"{}", id="no events key"),
        pytest.param(b'{"events": {"request_id": "x"}}', id="events not a list"),
        pytest.param(b'{"events": null}', id="events null"),
        pytest.param(b'{"events": []}', id="empty list"),
    ],
)
def test_malformed_or_wrongly_shaped_body_answers_400(post_events, body):
    response = post_events(body=body)

    assert response.status_code == 400
    assert "error" in response.json()
    assert _nothing_stored()


def test_without_a_token_answers_401(post_events, make_event):
    response = post_events([make_event()], token=None)

    assert response.status_code == 401
    assert response["WWW-Authenticate"] == 'Bearer realm="usage"'
    assert _nothing_stored()


@pytest.mark.parametrize(
    "header",
    [
        "Bearer ud_00000000_notarealsecretnotarealsecretnotarealsecret",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "ud_nobearerword",
    ],
)
def test_a_bad_token_answers_401(client, service_token, make_event, header):
    response = client.post(
        "/api/v1/events",
        data={"events": [make_event()]},
        content_type="application/json",
        HTTP_AUTHORIZATION=header,
    )

    assert response.status_code == 401
    assert _nothing_stored()


def test_a_token_sent_without_the_bearer_word_answers_401(client, service_token, make_event):
    response = client.post(
        "/api/v1/events",
        data={"events": [make_event()]},
        content_type="application/json",
        HTTP_AUTHORIZATION=service_token.secret,
    )

    assert response.status_code == 401


def test_a_revoked_token_answers_401(post_events, make_event, service_token):
    token_revoke(token=service_token)

    response = post_events([make_event()])

    assert response.status_code == 401
    assert _nothing_stored()


def test_a_token_without_the_ingest_scope_answers_401(post_events, make_event, org):
    reader = token_issue(organization=org, name="reader", scopes=["read"])

    response = post_events([make_event()], token=reader.secret)

    assert response.status_code == 401
    assert "'ingest'" in response.json()["error"]
    assert _nothing_stored()


def test_get_is_not_allowed(client, service_token):
    response = client.get("/api/v1/events", HTTP_AUTHORIZATION=f"Bearer {service_token.secret}")

    assert response.status_code == 405


def test_more_than_1000_events_answer_413_and_store_nothing(post_events, make_event):
    response = post_events([make_event() for _ in range(1001)])

    assert response.status_code == 413
    assert "1000" in response.json()["error"]
    assert _nothing_stored()


def test_exactly_1000_events_are_accepted(post_events, make_event):
    response = post_events([make_event() for _ in range(1000)])

    assert response.status_code == 200
    assert response.json()["accepted"] == 1000


def test_a_body_over_5_mib_answers_413_and_stores_nothing(post_events, make_event):
    events = [make_event(metadata={"pad": "x" * 3000}) for _ in range(900)]
    body = json.dumps({"events": events, "padding": "y" * (5 * 1024 * 1024)})

    response = post_events(body=body)

    assert response.status_code == 413
    assert _nothing_stored()


def test_a_body_just_under_5_mib_is_read(post_events, make_event):
    events = [make_event(metadata={"pad": "x" * 4000}) for _ in range(1000)]
    body = json.dumps({"events": events})
    body += " " * (5 * 1024 * 1024 - len(body))

    response = post_events(body=body)

    assert response.status_code == 200
    assert response.json()["accepted"] == 1000


def test_over_the_rate_limit_answers_429_with_retry_after(
    settings, post_events, make_event, member_token
):
    settings.INGEST_RATE_LIMIT_PER_MINUTE = 3
    answers = [post_events([make_event()]).status_code for _ in range(3)]

    limited = post_events([make_event(request_id="over-limit")])

    assert answers == [200, 200, 200]
    assert limited.status_code == 429
    assert 1 <= int(limited["Retry-After"]) <= 60
    assert not UsageEvent.objects.filter(request_id="over-limit").exists()
    # The limit is per token: another token still gets through.
    assert post_events([make_event()], token=member_token).status_code == 200


def test_rate_limit_zero_means_unlimited(settings, post_events, make_event):
    settings.INGEST_RATE_LIMIT_PER_MINUTE = 0

    answers = {post_events([make_event()]).status_code for _ in range(5)}

    assert answers == {200}


def test_each_event_records_the_token_that_sent_it(post_events, make_event, member_token):
    post_events([make_event(request_id="via-member")], token=member_token)

    assert UsageEvent.objects.get(request_id="via-member").api_token_id == member_token.id
    assert ApiToken.objects.get(id=member_token.id).last_used_at is not None


def test_accepted_events_are_counted_in_every_rollup_at_once(post_events, make_event):
    events = [make_event(input_tokens=100 + i, output_tokens=i) for i in range(10)]

    assert post_events(events).status_code == 200

    for model in (OrgUsage15m, ScopeUsage15m):
        rows = model.objects.all()
        assert sum(r.requests for r in rows) == 10
        assert sum(r.input_tokens for r in rows) == sum(100 + i for i in range(10))
        assert sum(r.output_tokens for r in rows) == sum(range(10))
    assert sum(r.count for r in LatencyHistogramHourly.objects.all()) == 10
