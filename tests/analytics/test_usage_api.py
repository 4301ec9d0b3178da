"""GET /api/v1/usage (SPEC section 3): OpenAI-shaped buckets, through the visibility gate."""

import base64
import itertools
import json
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from django.db.models import Q
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from accounts.tokens import token_issue
from metering.models import UsageEvent, nanos_to_usd
from tests.conftest import bearer
from tests.factories import event_payload, ingest

URL = "/api/v1/usage"
T0 = datetime(2026, 9, 7, 0, 0, tzinfo=UTC)  # a Monday
RESULT_KEYS = {
    "object",
    "num_model_requests",
    "failed_requests",
    "input_tokens",
    "input_cached_tokens",
    "output_tokens",
    "cost_usd",
    "latency_ms_avg",
}


def epoch(dt: datetime) -> int:
    return int(dt.timestamp())


@pytest.fixture
def usage(personas):
    """A week of alpha usage (and some of beta's) on fixed dates, every field varied."""
    alpha = [
        event_payload(
            request_id="a1",
            timestamp=T0 + timedelta(hours=9, minutes=7),
            model="gpt-4o",
            input_tokens=1000,
            cached_input_tokens=200,
            output_tokens=50,
            latency_ms=400,
            user=personas.member.email,
            end_user="cust-1",
        ),
        event_payload(
            request_id="a2",
            timestamp=T0 + timedelta(hours=9, minutes=40),
            model="gpt-4o-mini",
            input_tokens=500,
            output_tokens=20,
            latency_ms=600,
            status_code=500,
            user=personas.team_lead.email,
            team="platform",
            project="chatbot",
        ),
        event_payload(
            request_id="a3",
            timestamp=T0 + timedelta(days=1, hours=23, minutes=59, seconds=59),
            model="text-embedding-3-small",
            operation="embedding",
            input_tokens=7,
            output_tokens=0,
            latency_ms=30,
            team="research",
        ),
        event_payload(
            request_id="a4",
            timestamp=T0 + timedelta(days=3, hours=12),
            model="claude-sonnet-4-5",
            provider="anthropic",
            input_tokens=10_000,
            cached_input_tokens=2_000,
            cache_write_tokens=3_000,
            output_tokens=500,
            latency_ms=2000,
            user=personas.project_admin.email,
            project="chatbot",
        ),
        event_payload(
            request_id="a5",
            timestamp=T0 + timedelta(days=6, hours=23),
            model="gpt-4o",
            cost_usd="0.000000123",
            input_tokens=1,
            output_tokens=1,
            latency_ms=100,
        ),
    ]
    ingest(personas.org, alpha, token=personas.service_token)
    ingest(
        personas.org,
        [
            event_payload(
                request_id="m1",
                timestamp=T0 + timedelta(days=2, hours=5),
                model="gpt-4o-mini",
                input_tokens=300,
                output_tokens=30,
                latency_ms=250,
            )
        ],
        token=personas.member_token,
    )
    ingest(
        personas.other_org,
        [
            event_payload(
                request_id="b1",
                timestamp=T0 + timedelta(hours=10),
                model="gpt-4o",
                input_tokens=99_999,
                output_tokens=9_999,
            )
        ],
        token=personas.outsider_token,
    )
    assert UsageEvent.objects.count() == 7
    return personas


def get(client, auth=None, **params):
    headers = bearer(auth) if auth is not None else {}
    return client.get(URL, params, **headers)


def week(**params) -> dict:
    return {"start_time": epoch(T0), "end_time": epoch(T0 + timedelta(days=7)), **params}


def all_results(page: dict) -> list[dict]:
    return [r for bucket in page["data"] for r in bucket["results"]]


# ---------------------------------------------------------------------------------------
# Shape


def test_answer_has_exactly_the_openai_shape(client, usage):
    response = get(client, usage.service_token, **week())

    assert response.status_code == 200
    page = response.json()
    assert set(page) == {"object", "data", "has_more", "next_page"}
    assert page["object"] == "page"
    assert (page["has_more"], page["next_page"]) == (False, None)
    assert len(page["data"]) == 7
    for i, bucket in enumerate(page["data"]):
        assert set(bucket) == {"object", "start_time", "end_time", "results"}
        assert bucket["object"] == "bucket"
        assert bucket["start_time"] == epoch(T0 + timedelta(days=i))
        assert bucket["end_time"] == epoch(T0 + timedelta(days=i + 1))
        for result in bucket["results"]:
            assert set(result) == RESULT_KEYS
            assert result["object"] == "usage.result"
            assert isinstance(result["cost_usd"], str)
            assert isinstance(result["num_model_requests"], int)


def test_buckets_hold_the_right_sums_and_empty_buckets_have_no_results(client, usage):
    page = get(client, usage.service_token, **week()).json()
    by_day = [bucket["results"] for bucket in page["data"]]

    assert [len(results) for results in by_day] == [1, 1, 1, 1, 0, 0, 1]
    first = by_day[0][0]
    assert first == {
        "object": "usage.result",
        "num_model_requests": 2,
        "failed_requests": 1,
        "input_tokens": 1500,
        "input_cached_tokens": 200,
        "output_tokens": 70,
        "cost_usd": str(
            nanos_to_usd(
                UsageEvent.objects.get(request_id="a1").cost_nanos
                + UsageEvent.objects.get(request_id="a2").cost_nanos
            )
        ),
        "latency_ms_avg": 500.0,
    }
    assert by_day[0][0]["cost_usd"] == "0.002837000"  # 0.00275 (gpt-4o) + 0.000087 (mini)
    assert by_day[6][0]["cost_usd"] == "0.000000123"


def test_cost_is_a_decimal_string_that_sums_exactly(client, usage):
    page = get(client, usage.service_token, **week()).json()

    total = sum(Decimal(r["cost_usd"]) for r in all_results(page))

    alpha = UsageEvent.objects.filter(organization=usage.org)
    assert total == nanos_to_usd(sum(e.cost_nanos for e in alpha))


def test_the_first_and_last_buckets_are_clipped_to_the_range(client, usage):
    start = epoch(T0 + timedelta(hours=9, minutes=30))
    end = epoch(T0 + timedelta(days=1, hours=3))

    page = get(client, usage.service_token, start_time=start, end_time=end).json()

    assert [(b["start_time"], b["end_time"]) for b in page["data"]] == [
        (start, epoch(T0 + timedelta(days=1))),
        (epoch(T0 + timedelta(days=1)), end),
    ]
    assert [r["num_model_requests"] for r in all_results(page)] == [1]  # a2 only


def test_default_end_time_is_now(client, personas):
    ingest(personas.org, [event_payload(request_id="now-ish")], token=personas.service_token)
    start = epoch(datetime.now(UTC) - timedelta(days=2))

    page = get(client, personas.service_token, start_time=start).json()

    assert sum(r["num_model_requests"] for r in all_results(page)) == 1
    assert page["data"][-1]["end_time"] <= epoch(datetime.now(UTC)) + 1


# ---------------------------------------------------------------------------------------
# Pagination


@pytest.mark.parametrize(("width", "limit"), [("1d", 3), ("1h", 24), ("1d", 1)])
def test_pages_continue_without_gap_or_overlap(client, usage, width, limit):
    params = week(bucket_width=width, limit=limit)
    buckets = []
    pages = 0
    while True:
        page = get(client, usage.service_token, **params).json()
        pages += 1
        assert len(page["data"]) <= limit
        buckets += page["data"]
        if not page["has_more"]:
            assert page["next_page"] is None
            break
        params["page"] = page["next_page"]

    step = 86400 if width == "1d" else 3600
    assert pages == -(-7 * 86400 // step // limit)
    assert buckets[0]["start_time"] == epoch(T0)
    assert buckets[-1]["end_time"] == epoch(T0 + timedelta(days=7))
    for before, after in itertools.pairwise(buckets):
        assert before["end_time"] == after["start_time"]
    assert sum(r["num_model_requests"] for b in buckets for r in b["results"]) == 6


@pytest.mark.parametrize(("width", "default"), [("1m", 60), ("1h", 24), ("1d", 7)])
def test_default_limit_depends_on_the_bucket_width(client, usage, width, default):
    params = {
        "start_time": epoch(T0),
        "end_time": epoch(T0 + timedelta(days=30)),
        "bucket_width": width,
    }

    page = get(client, usage.service_token, **params).json()

    assert len(page["data"]) == default
    assert page["has_more"] is True


def test_a_cursor_from_another_range_is_refused(client, usage):
    first = get(client, usage.service_token, **week(limit=2)).json()

    response = get(
        client,
        usage.service_token,
        start_time=epoch(T0 + timedelta(days=5)),
        end_time=epoch(T0 + timedelta(days=7)),
        page=first["next_page"],
    )

    assert response.status_code == 400


# ---------------------------------------------------------------------------------------
# Grouping and filters


@pytest.mark.parametrize(
    ("group_by", "expected"),
    [
        (
            "model",
            {"gpt-4o": 2, "gpt-4o-mini": 2, "text-embedding-3-small": 1, "claude-sonnet-4-5": 1},
        ),
        (
            "user_id",
            {
                "member@example.test": 2,
                "lead@example.test": 1,
                "projectadmin@example.test": 1,
                None: 2,
            },
        ),
        ("team_id", {"platform": 1, "research": 3, None: 2}),
        ("project_id", {"chatbot": 2, "search": 2, None: 2}),
        ("operation", {"chat": 5, "embedding": 1}),
        ("end_user", {"cust-1": 1, None: 5}),
    ],
)
def test_group_by_each_dimension(client, usage, group_by, expected):
    page = get(client, usage.service_token, **week(group_by=group_by)).json()

    counts: dict = defaultdict(int)
    for result in all_results(page):
        assert set(result) == RESULT_KEYS | {group_by}
        counts[result[group_by]] += result["num_model_requests"]
    assert dict(counts) == expected


def test_group_by_api_key_names_the_token_by_its_prefix(client, usage):
    page = get(client, usage.service_token, **week(group_by="api_key_id")).json()

    counts: dict = defaultdict(int)
    for result in all_results(page):
        counts[result["api_key_id"]] += result["num_model_requests"]
    assert dict(counts) == {usage.service_token.prefix: 5, usage.member_token.prefix: 1}


def test_group_by_several_dimensions_at_once(client, usage):
    page = get(client, usage.service_token, **week(group_by="model,operation")).json()

    keys = {(r["model"], r["operation"]) for r in all_results(page)}
    assert ("text-embedding-3-small", "embedding") in keys
    assert all(set(r) == RESULT_KEYS | {"model", "operation"} for r in all_results(page))


def test_one_group_per_value_even_when_the_range_is_not_aligned(client, usage):
    """A missing team is one group, whether it came from a roll-up or a raw edge."""
    page = get(
        client,
        usage.service_token,
        start_time=epoch(T0) + 7,
        end_time=epoch(T0 + timedelta(days=7)) - 7,
        group_by="team_id",
        bucket_width="1d",
        limit=7,
    ).json()

    for bucket in page["data"]:
        values = [r["team_id"] for r in bucket["results"]]
        assert len(values) == len(set(values))


@pytest.mark.parametrize(
    ("params", "expected_ids"),
    [
        ({"models": "gpt-4o"}, {"a1", "a5"}),
        ({"models": "gpt-4o,text-embedding-3-small"}, {"a1", "a3", "a5"}),
        ({"models": ["gpt-4o", "claude-sonnet-4-5"]}, {"a1", "a4", "a5"}),
        ({"user_ids": "member@example.test"}, {"a1", "m1"}),
        ({"team_ids": "platform"}, {"a2"}),
        ({"team_ids": "research,platform"}, {"a2", "a3", "a1", "m1"}),
        ({"project_ids": "chatbot"}, {"a2", "a4"}),
        ({"models": "no-such-model"}, set()),
        ({"team_ids": "no-such-team"}, set()),
        ({"team_ids": "secret-team"}, set()),  # beta's team: nothing, not an error
    ],
)
def test_filters_narrow_the_results(client, usage, params, expected_ids):
    page = get(client, usage.service_token, **week(**params)).json()

    expected = UsageEvent.objects.filter(request_id__in=expected_ids)
    assert sum(r["num_model_requests"] for r in all_results(page)) == expected.count()
    assert sum(r["input_tokens"] for r in all_results(page)) == sum(
        e.input_tokens for e in expected
    )


def test_filters_take_ids_as_well_as_names(client, usage):
    by_name = get(client, usage.service_token, **week(user_ids=usage.member.email)).json()
    by_id = get(client, usage.service_token, **week(user_ids=str(usage.member.id))).json()
    by_key = get(client, usage.service_token, **week(api_key_ids=usage.member_token.prefix)).json()
    by_key_id = get(client, usage.service_token, **week(api_key_ids=usage.member_token.id)).json()
    by_team = get(client, usage.service_token, **week(team_ids=usage.platform_team.id)).json()

    assert by_name == by_id
    assert by_key == by_key_id
    assert sum(r["num_model_requests"] for r in all_results(by_key)) == 1
    assert sum(r["num_model_requests"] for r in all_results(by_team)) == 1


# ---------------------------------------------------------------------------------------
# Time zones and bucket widths


@pytest.mark.parametrize(
    ("tz", "utc_time_of_local_midnight"),
    [("Asia/Kolkata", (18, 30)), ("Asia/Kathmandu", (18, 15)), ("America/New_York", (4, 0))],
)
def test_day_buckets_start_at_local_midnight(client, usage, tz, utc_time_of_local_midnight):
    page = get(client, usage.service_token, **week(tz=tz, limit=10)).json()

    starts = [b["start_time"] for b in page["data"]]
    assert starts[0] == epoch(T0)  # the range's start, clipped
    for start in starts[1:]:
        local = datetime.fromtimestamp(start, ZoneInfo(tz))
        assert (local.hour, local.minute) == (0, 0)
        assert (
            datetime.fromtimestamp(start, UTC).hour,
            datetime.fromtimestamp(start, UTC).minute,
        ) == utc_time_of_local_midnight
    assert len(page["data"]) == 8


def test_kolkata_day_buckets_hold_events_by_local_date(client, usage):
    # a3 at 2026-09-08 23:59:59 UTC is 2026-09-09 05:29:59 in Kolkata.
    page = get(
        client, usage.service_token, **week(tz="Asia/Kolkata", models="text-embedding-3-small")
    ).json()

    [bucket] = [b for b in page["data"] if b["results"]]
    assert datetime.fromtimestamp(bucket["start_time"], ZoneInfo("Asia/Kolkata")).date() == (
        datetime(2026, 9, 9).date()
    )


def test_hour_buckets(client, usage):
    page = get(
        client,
        usage.service_token,
        start_time=epoch(T0 + timedelta(hours=8)),
        end_time=epoch(T0 + timedelta(hours=11)),
        bucket_width="1h",
    ).json()

    assert [len(b["results"]) for b in page["data"]] == [0, 1, 0]
    assert page["data"][1]["results"][0]["num_model_requests"] == 2


def test_minute_buckets(client, usage):
    page = get(
        client,
        usage.service_token,
        start_time=epoch(T0 + timedelta(hours=9)),
        end_time=epoch(T0 + timedelta(hours=10)),
        bucket_width="1m",
    ).json()

    assert len(page["data"]) == 60
    assert page["has_more"] is False
    busy = {
        datetime.fromtimestamp(b["start_time"], UTC).minute: b["results"][0]["num_model_requests"]
        for b in page["data"]
        if b["results"]
    }
    assert busy == {7: 1, 40: 1}


def test_hour_buckets_in_kathmandu_start_at_a_quarter_past(client, usage):
    page = get(
        client,
        usage.service_token,
        start_time=epoch(T0 + timedelta(hours=6)),
        end_time=epoch(T0 + timedelta(hours=12)),
        bucket_width="1h",
        tz="Asia/Kathmandu",
    ).json()

    assert {datetime.fromtimestamp(b["start_time"], UTC).minute for b in page["data"][1:]} == {15}


# ---------------------------------------------------------------------------------------
# Who may read what


def test_session_user_reads_through_the_visibility_gate(client, usage):
    client.force_login(usage.member)

    page = get(client, **week(group_by="user_id")).json()

    totals: dict = defaultdict(int)
    for result in all_results(page):
        totals[result["user_id"]] += result["num_model_requests"]
    assert dict(totals) == {"member@example.test": 2}  # a1 (own) and m1 (own token)


@pytest.mark.parametrize(
    ("persona", "expected_ids"),
    [
        ("platform_admin", {"a1", "a2", "a3", "a4", "a5", "m1", "b1"}),
        ("org_admin", {"a1", "a2", "a3", "a4", "a5", "m1"}),
        ("team_lead", {"a2"}),
        ("project_admin", {"a2", "a4"}),
        ("member", {"a1", "m1"}),
        ("outsider", {"b1"}),
    ],
)
def test_each_persona_reads_its_scope_by_session(client, usage, persona, expected_ids):
    client.force_login(usage.users[persona])

    page = get(client, **week()).json()

    assert sum(r["num_model_requests"] for r in all_results(page)) == len(expected_ids)
    expected_input = sum(
        e.input_tokens for e in UsageEvent.objects.filter(request_id__in=expected_ids)
    )
    assert sum(r["input_tokens"] for r in all_results(page)) == expected_input


def test_a_token_without_owner_reads_its_whole_organization(client, usage):
    page = get(client, usage.service_token, **week()).json()

    assert sum(r["num_model_requests"] for r in all_results(page)) == 6


def test_a_token_with_an_owner_reads_what_the_owner_may_see(client, usage):
    page = get(client, usage.member_token, **week()).json()

    assert sum(r["num_model_requests"] for r in all_results(page)) == 2


def test_an_org_admins_token_reads_only_the_tokens_organization(client, usage):
    usage.platform_admin.memberships.create(organization=usage.org, role="member")
    issued = token_issue(
        organization=usage.org, name="admin's", owner=usage.platform_admin, scopes=["read"]
    )

    page = get(client, issued.secret, **week()).json()

    assert sum(r["num_model_requests"] for r in all_results(page)) == 6  # not beta's b1


def test_outsiders_token_reads_nothing_of_the_other_organization(client, usage):
    page = get(client, usage.outsider_token, **week(team_ids="platform")).json()

    assert all_results(page) == []


def test_without_authentication_answers_401(client, usage):
    response = get(client, **week())

    assert response.status_code == 401
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("scopes", [["ingest"]])
def test_a_token_without_the_read_scope_answers_401(client, usage, scopes):
    issued = token_issue(organization=usage.org, name="writer", scopes=scopes)

    assert get(client, issued.secret, **week()).status_code == 401


def test_a_bad_token_answers_401_even_with_a_session(client, usage):
    client.force_login(usage.org_admin)

    assert get(client, "ud_nope_nope", **week()).status_code == 401


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"start_time": "yesterday"},
        {"start_time": 100, "end_time": 100},
        {"start_time": 200, "end_time": 100},
        {"start_time": 100, "end_time": "later"},
        {"start_time": 100, "bucket_width": "2h"},
        {"start_time": 100, "bucket_width": "1w"},
        {"start_time": 100, "group_by": "color"},
        {"start_time": 100, "group_by": "model,color"},
        {"start_time": 100, "tz": "Mars/Olympus_Mons"},
        {"start_time": 100, "tz": "../../etc/passwd"},
        {"start_time": 100, "limit": 0},
        {"start_time": 100, "limit": -1},
        {"start_time": 100, "limit": "many"},
        {"start_time": 100, "limit": 367},
        {"start_time": 100, "bucket_width": "1h", "limit": 745},
        {"start_time": 100, "bucket_width": "1m", "limit": 1441},
        {"start_time": 100, "page": "not-a-cursor"},
        {"start_time": 100, "page": base64.urlsafe_b64encode(b'{"x": 1}').decode()},
        {"start_time": 100, "page": base64.urlsafe_b64encode(json.dumps({"s": 5}).encode())},
        {"start_time": 10**15},
        {"start_time": -(10**15), "end_time": 100},
    ],
)
def test_bad_parameters_answer_400(client, usage, params):
    response = get(client, usage.service_token, **params)

    assert response.status_code == 400, response.content
    assert response.json()["error"]["message"]


def test_a_long_range_of_minute_buckets_answers_quickly(client, usage):
    # Only the page's buckets are built, not the 29 million of 1970 to now.
    page = get(client, usage.service_token, start_time=0, bucket_width="1m", limit=5).json()

    assert len(page["data"]) == 5
    assert page["has_more"] is True


# ---------------------------------------------------------------------------------------
# The law: the API's totals equal sums over the raw events


MODELS = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4-5", "text-embedding-3-small", "homegrown"]
ZONES = ["UTC", "Europe/Berlin", "Asia/Kolkata", "Asia/Kathmandu", "America/New_York"]
P_START = datetime(2026, 10, 23, 0, 0, tzinfo=UTC)  # spans Berlin's DST change of Oct 25
P_SECONDS = 4 * 86400

events_strategy = st.lists(
    st.fixed_dictionaries(
        {
            "offset": st.integers(0, P_SECONDS - 1),
            "model": st.sampled_from(MODELS),
            "user": st.sampled_from(
                [None, "member@example.test", "lead@example.test", "someone@example.test"]
            ),
            "team": st.sampled_from([None, "platform", "research"]),
            "project": st.sampled_from([None, "chatbot", "search"]),
            "status_code": st.sampled_from([200, 200, 201, 400, 429, 500]),
            "input_tokens": st.integers(0, 50_000),
            "cached_share": st.integers(0, 100),
            "output_tokens": st.integers(0, 5_000),
            "latency_ms": st.integers(0, 60_000),
            "via_member_token": st.booleans(),
        }
    ),
    min_size=0,
    max_size=40,
)


@st.composite
def queries(draw):
    width = draw(st.sampled_from(["1m", "1h", "1d"]))
    span = {"1m": 5 * 3600, "1h": 3 * 86400, "1d": P_SECONDS + 86400}[width]
    start = draw(st.integers(-86400, P_SECONDS))
    length = draw(st.integers(1, span))
    return {
        "reader": draw(st.sampled_from(["service", "org_admin", "member", "team_lead"])),
        "start": epoch(P_START) + start,
        "end": epoch(P_START) + start + length,
        "width": width,
        "tz": draw(st.sampled_from(ZONES)),
        "models": draw(st.lists(st.sampled_from(MODELS), max_size=2, unique=True)),
        "teams": draw(st.lists(st.sampled_from(["platform", "research"]), max_size=1)),
        "projects": draw(st.lists(st.sampled_from(["chatbot", "search"]), max_size=1)),
        "users": draw(st.lists(st.sampled_from(["member@example.test"]), max_size=1)),
        "group_by": draw(
            st.lists(
                st.sampled_from(["model", "user_id", "team_id", "project_id", "api_key_id"]),
                max_size=2,
                unique=True,
            )
        ),
        # Small pages too, but never more than ~15 pages per query.
        "limit": draw(
            st.sampled_from(
                {"1m": [None, 120, 1440], "1h": [None, 5, 100], "1d": [None, 1, 2]}[width]
            )
        ),
    }


def _expected(personas, q) -> dict:
    qs = UsageEvent.objects.filter(
        organization=personas.org,
        timestamp__gte=datetime.fromtimestamp(q["start"], UTC),
        timestamp__lt=datetime.fromtimestamp(q["end"], UTC),
    )
    if q["reader"] == "member":
        qs = qs.filter(Q(user=personas.member) | Q(api_token=personas.member_token))
    elif q["reader"] == "team_lead":
        qs = qs.filter(Q(user=personas.team_lead) | Q(team=personas.platform_team))
    if q["models"]:
        qs = qs.filter(model__in=q["models"])
    if q["teams"]:
        qs = qs.filter(team__slug__in=q["teams"])
    if q["projects"]:
        qs = qs.filter(project__slug__in=q["projects"])
    if q["users"]:
        qs = qs.filter(user__email__in=q["users"])
    rows = list(qs)
    return {
        "num_model_requests": len(rows),
        "failed_requests": sum(e.status_code >= 400 for e in rows),
        "input_tokens": sum(e.input_tokens for e in rows),
        "input_cached_tokens": sum(e.cached_input_tokens for e in rows),
        "output_tokens": sum(e.output_tokens for e in rows),
        "cost_usd": nanos_to_usd(sum(e.cost_nanos for e in rows)),
    }


def _answered(client, personas, q) -> dict:
    params = {
        "start_time": q["start"],
        "end_time": q["end"],
        "bucket_width": q["width"],
        "tz": q["tz"],
        "models": ",".join(q["models"]),
        "team_ids": ",".join(q["teams"]),
        "project_ids": ",".join(q["projects"]),
        "user_ids": ",".join(q["users"]),
        "group_by": ",".join(q["group_by"]),
    }
    if q["limit"]:
        params["limit"] = q["limit"]
    params = {k: v for k, v in params.items() if v != ""}
    auth = None
    client.logout()
    if q["reader"] == "service":
        auth = personas.service_token
    else:
        client.force_login(personas.users[q["reader"]])
    sums: dict = dict.fromkeys(
        (
            "num_model_requests",
            "failed_requests",
            "input_tokens",
            "input_cached_tokens",
            "output_tokens",
        ),
        0,
    )
    sums["cost_usd"] = Decimal(0)
    previous_end = q["start"]
    while True:
        response = get(client, auth, **params)
        assert response.status_code == 200, response.content
        page = response.json()
        for bucket in page["data"]:
            assert bucket["start_time"] == previous_end  # no gap, no overlap
            previous_end = bucket["end_time"]
            for result in bucket["results"]:
                for key in sums:
                    sums[key] += Decimal(result[key]) if key == "cost_usd" else result[key]
        if not page["has_more"]:
            break
        params["page"] = page["next_page"]
    assert previous_end == q["end"]
    return sums


def _random_event(rng: random.Random) -> dict:
    """Fields of one event, drawn like `events_strategy` draws them."""
    return {
        "offset": rng.randrange(P_SECONDS),
        "model": rng.choice(MODELS),
        "user": rng.choice([None, "member@example.test", "lead@example.test"]),
        "team": rng.choice([None, "platform", "research"]),
        "project": rng.choice([None, "chatbot", "search"]),
        "status_code": rng.choice([200, 200, 500]),
        "input_tokens": rng.randint(0, 9000),
        "cached_share": rng.randint(0, 100),
        "output_tokens": rng.randint(0, 900),
        "latency_ms": rng.randint(0, 9000),
        "via_member_token": rng.random() < 0.2,
    }


def test_usage_api_totals_equal_sums_over_raw_events(client, personas):
    """Random events, then random readers, filters, ranges, widths and zones."""
    counter = iter(range(10**9))
    non_empty = []

    def send(events: list[dict]) -> None:
        by_token = defaultdict(list)
        for e in events:
            token = personas.member_token if e["via_member_token"] else personas.service_token
            by_token[token].append(
                event_payload(
                    request_id=f"h-{next(counter)}",
                    timestamp=P_START + timedelta(seconds=e["offset"]),
                    model=e["model"],
                    user=e["user"],
                    team=e["team"],
                    project=e["project"],
                    status_code=e["status_code"],
                    input_tokens=e["input_tokens"],
                    cached_input_tokens=e["input_tokens"] * e["cached_share"] // 100,
                    output_tokens=e["output_tokens"],
                    latency_ms=e["latency_ms"],
                )
            )
        for token, payloads in by_token.items():
            for n in range(0, len(payloads), 1000):
                assert not ingest(personas.org, payloads[n : n + 1000], token=token).rejected

    # A base of events, so that narrow filters still meet some; each example adds its own.
    rng = random.Random(3)
    send([_random_event(rng) for _ in range(1500)])

    @hypothesis_settings(
        max_examples=30,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run: the "enough non-empty" guard holds
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(events=events_strategy, q=queries())
    def check(events, q):
        send(events)
        expected = _expected(personas, q)
        assert _answered(client, personas, q) == expected
        non_empty.append(expected["num_model_requests"] > 0)

    check()
    assert sum(non_empty) >= 5, "too few examples had events in range to mean anything"
