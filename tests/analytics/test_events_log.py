"""The events log: scope per persona, every sort x filter against plain Python over raw
events, keyset pages that hold while events arrive, page numbers, honest counts."""

from datetime import timedelta

import pytest

from analytics import eventlog
from analytics.eventlog import COLUMNS, format_amount
from tests.analytics.events_world import (
    amount,
    build_world,
    expected_ids,
    sees,
    walk_log,
)
from tests.factories import event_payload, ingest

PERSONAS = ["platform_admin", "org_admin", "team_lead", "project_admin", "member", "outsider"]

# The filters the page offers, alone and combined (each also runs with every sort).
FILTERS = [
    {},
    {"resource": "tokens"},
    {"resource": "storage", "io": "input"},
    {"pool": "surplus"},
    {"pool": "none"},
    {"io": "output", "amount_min": "50", "amount_max": "400"},
    {"amount_min": "1000"},
    {"io": "input", "amount_max": "300"},
    {"request_id": "alpha-01"},
    {"status": "failed"},
    {"model": "gpt-4o", "status": "ok"},
    {"session": "s-2", "pool": "allocated"},
]


@pytest.fixture
def world(personas):
    return build_world(personas)


def _flat(pages):
    return [pk for page in pages for pk in page]


@pytest.mark.parametrize("persona", PERSONAS)
def test_log_lists_exactly_the_viewers_events_newest_first(client, world, persona):
    client.force_login(world.personas.users[persona])

    pages = walk_log(client, {})

    assert _flat(pages) == expected_ids(world, persona, {})
    assert all(len(page) == eventlog.PAGE_SIZE for page in pages[:-1])
    assert len(pages[-1]) <= eventlog.PAGE_SIZE


def test_outsider_sees_nothing_of_alpha_in_the_page(client, world):
    client.force_login(world.personas.outsider)

    html = client.get("/events/").content.decode()

    assert "beta-000" in html
    assert "alpha-0" not in html
    assert "Alpha Corp" not in html


@pytest.mark.parametrize("direction", ["asc", "desc"])
@pytest.mark.parametrize("column", list(COLUMNS))
def test_every_sort_and_filter_returns_what_a_plain_query_returns(client, world, column, direction):
    client.force_login(world.personas.org_admin)
    for filters in FILTERS:
        params = {**filters, "sort": column, "dir": direction}

        got = _flat(walk_log(client, params))

        assert got == expected_ids(world, "org_admin", params), params


@pytest.mark.parametrize("column", ["time", "user", "amount", "cost", "session"])
def test_sorting_within_a_narrow_scope_stays_in_that_scope(client, world, column):
    client.force_login(world.personas.team_lead)
    for filters in ({}, {"io": "output", "amount_min": "1"}, {"status": "failed"}):
        params = {**filters, "sort": column, "dir": "asc"}

        assert _flat(walk_log(client, params)) == expected_ids(world, "team_lead", params)


@pytest.mark.parametrize("persona", ["team_lead", "project_admin", "member"])
@pytest.mark.parametrize(
    ("column", "direction"), [("time", "desc"), ("cost", "desc"), ("user", "asc")]
)
def test_a_partial_scope_pages_exactly_whether_read_whole_or_in_parts(
    world, persona, column, direction
):
    # On PostgreSQL a partial scope's log is read part by part (own events, own tokens,
    # the team or project) and merged; every way through the pages must still be exact.
    from django.http import QueryDict

    params = {"sort": column, "dir": direction}
    every = expected_ids(world, persona, params)
    flt = eventlog.log_filter(
        QueryDict(f"sort={column}&dir={direction}"), world.personas.users[persona]
    )
    ordering = eventlog.Ordering.parse(column, direction)
    parts = eventlog.log_parts(flt)

    def page(**kwargs):
        return eventlog.fetch_page(flt.qs, ordering, size=4, parts=parts, **kwargs)

    walked, current = [], page()
    while True:
        walked += [e.id for e in current.rows]
        if not current.has_next:
            break
        current = page(after=current.next_cursor, page=current.number + 1)
    third = page(page=3)
    back = page(before=third.previous_cursor, page=2)

    assert len(every) > 8
    assert walked == every
    assert [e.id for e in third.rows] == every[8:12]
    assert [e.id for e in back.rows] == every[4:8]


@pytest.mark.parametrize("persona", ["team_lead", "project_admin", "member"])
def test_a_bounded_count_in_parts_counts_each_event_once(world, persona):
    # Own events sent with an own token are in two parts: the union counts them once,
    # exactly up to the cap and "more than the cap" beyond it.
    from django.http import QueryDict

    flt = eventlog.log_filter(QueryDict("amount_min=1"), world.personas.users[persona])
    every = len(expected_ids(world, persona, {"amount_min": "1"}))
    parts = eventlog.log_parts(flt)

    assert every > 3
    assert eventlog.bounded_count(flt.qs, every, parts) == every
    assert eventlog.bounded_count(flt.qs, every + 5, parts) == every
    assert eventlog.bounded_count(flt.qs, every - 2, parts) > every - 2
    assert eventlog.count_events(flt, cap=every - 2).kind == "at_least"


@pytest.mark.parametrize("persona", ["team_lead", "project_admin", "member"])
@pytest.mark.parametrize(("column", "direction"), [("time", "desc"), ("user", "asc")])
def test_a_numbered_page_read_with_its_count_is_the_page_and_count_read_apart(
    world, persona, column, direction, monkeypatch
):
    # On PostgreSQL a partial scope's page past the first and its bounded count come from
    # one read of each part: under and over the cap, and past the last page.
    from django.http import QueryDict

    query = f"sort={column}&dir={direction}&amount_min=1"
    flt = eventlog.log_filter(QueryDict(query), world.personas.users[persona])
    ordering = eventlog.Ordering.parse(column, direction)
    every = expected_ids(world, persona, {"sort": column, "dir": direction, "amount_min": "1"})
    size = 4
    last = -(-len(every) // size)
    assert last >= 3
    for cap in (len(every) + 5, len(every), len(every) - 2):
        monkeypatch.setattr(eventlog, "COUNT_CAP", cap)
        apart = eventlog.count_events(flt)
        for number in (2, last, last + 3):
            count, page = eventlog.log_page(flt, ordering, page=number, size=size)

            shown = min(number, last) if apart.exact else number
            assert count == apart, (cap, number)
            assert page.number == shown
            assert [e.id for e in page.rows] == every[(shown - 1) * size : shown * size]
            assert page.has_next == (shown < last)
    assert apart.kind == "at_least"
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as seen:
        eventlog.log_page(flt, ordering, page=2, size=size)
    together = [q["sql"] for q in seen.captured_queries if "MATERIALIZED" in q["sql"]]
    counts = [q["sql"] for q in seen.captured_queries if "COUNT(*)" in q["sql"].upper()]
    if connection.vendor == "postgresql":  # parts: the page and its count in one statement
        assert len(together) == 1 and counts == together
    else:
        assert together == [] and len(counts) == 1


def test_partial_scopes_are_read_in_parts_on_postgresql(world):
    from django.db import connection
    from django.http import QueryDict

    member = eventlog.log_filter(QueryDict(""), world.personas.member)
    admin = eventlog.log_filter(QueryDict(""), world.personas.org_admin)

    if connection.vendor != "postgresql":
        assert eventlog.log_parts(member) is None  # SQLite: one query
    else:
        assert len(eventlog.log_parts(member)) >= 2  # own events and own tokens
    assert eventlog.log_parts(admin) is None  # one organization: one indexed predicate


def test_a_column_header_is_a_sort_link_that_keeps_the_filters(client, world):
    client.force_login(world.personas.org_admin)

    response = client.get("/events/", {"resource": "tokens", "model": "gpt-4o"})
    headers = {h["key"]: h for h in response.context["headers"]}
    html = response.content.decode()

    cost = headers["cost"]["href"]
    assert "sort=cost" in cost and "dir=desc" in cost
    assert "resource=tokens" in cost and "model=gpt-4o" in cost
    assert f'hx-get="{cost.replace("&", "&amp;")}"' in html
    assert headers["time"]["aria_sort"] == "descending"
    assert "dir=asc" in headers["time"]["href"]  # the active column flips


def test_page_numbers_jump_straight_to_a_page(client, world):
    client.force_login(world.personas.org_admin)
    params = {"sort": "cost", "dir": "asc"}
    every = expected_ids(world, "org_admin", params)

    response = client.get("/events/", {**params, "page": 3}, HTTP_HX_REQUEST="true")

    assert [r["event"].id for r in response.context["rows"]] == every[50:75]
    assert response.context["page"].number == 3
    assert response.context["pagination"]["last"] == -(-len(every) // 25)


def test_a_page_past_the_end_shows_the_last_page(client, world):
    client.force_login(world.personas.org_admin)
    every = expected_ids(world, "org_admin", {})
    last = -(-len(every) // 25)

    response = client.get("/events/", {"page": 999}, HTTP_HX_REQUEST="true")

    assert response.context["page"].number == last
    assert [r["event"].id for r in response.context["rows"]] == every[(last - 1) * 25 :]


def test_newer_goes_back_a_page_and_to_the_top(client, world):
    client.force_login(world.personas.org_admin)
    every = expected_ids(world, "org_admin", {"sort": "latency", "dir": "desc"})
    third = client.get(
        "/events/", {"sort": "latency", "dir": "desc", "page": 3}, HTTP_HX_REQUEST="true"
    )

    second = client.get(third.context["pagination"]["previous"], HTTP_HX_REQUEST="true")
    first = client.get(second.context["pagination"]["previous"], HTTP_HX_REQUEST="true")

    assert [r["event"].id for r in second.context["rows"]] == every[25:50]
    assert second.context["page"].number == 2
    assert [r["event"].id for r in first.context["rows"]] == every[:25]
    assert first.context["page"].number == 1
    assert not first.context["pagination"]["previous"]


@pytest.mark.parametrize(("sort", "direction"), [("time", "desc"), ("cost", "asc")])
def test_next_page_continues_without_gap_or_repeat_while_events_arrive(
    client, world, sort, direction
):
    p = world.personas
    client.force_login(p.org_admin)
    params = {"sort": sort, "dir": direction}
    before = expected_ids(world, "org_admin", params)
    seen: list[int] = []
    response = client.get("/events/", params, HTTP_HX_REQUEST="true")
    arrivals = 0
    while True:
        seen += [r["event"].id for r in response.context["rows"]]
        next_url = response.context["pagination"]["next"]
        if not next_url:
            break
        # New events land between two clicks: newest ones, and ones anywhere in cost.
        batch = [
            event_payload(
                request_id=f"late-{arrivals}-{i}",
                timestamp=world.now + timedelta(minutes=1 + i),
                cost_usd=["0.000001", "0.5", "0.004100"][i],
            )
            for i in range(3)
        ]
        ingest(p.org, batch, token=p.service_token)
        arrivals += 1
        response = client.get(next_url, HTTP_HX_REQUEST="true")

    assert arrivals >= 2
    assert len(seen) == len(set(seen)), "a row was shown twice"
    assert set(before) <= set(seen), "a row that existed all along was skipped"
    original = [pk for pk in seen if pk in set(before)]
    assert original == before  # and in the same order


def test_an_unreadable_cursor_starts_from_the_first_page(client, world):
    client.force_login(world.personas.org_admin)
    every = expected_ids(world, "org_admin", {})

    for cursor in ("garbage", "eyJ4IjoxfQ", ""):
        response = client.get("/events/", {"after": cursor}, HTTP_HX_REQUEST="true")
        assert [r["event"].id for r in response.context["rows"]] == every[:25]


def test_a_cursor_from_another_sort_is_ignored(client, world):
    client.force_login(world.personas.org_admin)
    by_time = client.get("/events/", HTTP_HX_REQUEST="true")
    cursor = by_time.context["page"].next_cursor

    response = client.get(
        "/events/", {"sort": "cost", "dir": "asc", "after": cursor}, HTTP_HX_REQUEST="true"
    )

    first = expected_ids(world, "org_admin", {"sort": "cost", "dir": "asc"})[:25]
    assert [r["event"].id for r in response.context["rows"]] == first


def test_count_is_exact_under_the_cap(client, world):
    client.force_login(world.personas.member)

    count = client.get("/events/").context["count"]

    assert count.kind == "exact"
    assert count.value == len(expected_ids(world, "member", {}))


def test_count_above_the_cap_comes_from_the_rollups(client, world, monkeypatch):
    monkeypatch.setattr(eventlog, "COUNT_CAP", 10)
    client.force_login(world.personas.org_admin)

    response = client.get("/events/", {"model": "gpt-4o"})
    count = response.context["count"]

    assert count.kind == "estimate"
    assert count.value == len(expected_ids(world, "org_admin", {"model": "gpt-4o"}))
    assert "about" in response.content.decode()


def test_count_above_the_cap_with_a_raw_only_filter_says_more_than(client, world, monkeypatch):
    monkeypatch.setattr(eventlog, "COUNT_CAP", 10)
    client.force_login(world.personas.org_admin)

    response = client.get("/events/", {"resource": "tokens"})

    assert response.context["count"].kind == "at_least"
    assert "more than 10 events" in response.content.decode()
    # The pages still work without a total.
    assert _flat(walk_log(client, {"resource": "tokens"})) == expected_ids(
        world, "org_admin", {"resource": "tokens"}
    )


def test_about_rounds_large_numbers_honestly():
    assert eventlog.about(1_234_567) == "1.2 million"
    assert eventlog.about(45_678) == "46,000"
    assert eventlog.about(10_001) == "10,000"
    assert eventlog.about(987) == "987"


def test_a_choice_outside_the_scope_shows_nothing(client, world):
    client.force_login(world.personas.org_admin)

    response = client.get("/events/", {"team": world.personas.secret_team.id})

    assert response.context["rows"] == []
    assert "Nothing to show for this filter" in response.content.decode()


def test_an_invalid_extra_filter_shows_nothing(client, world):
    client.force_login(world.personas.org_admin)

    response = client.get("/events/", {"resource": "gold"})

    assert response.context["rows"] == []
    assert response.context["invalid"]


def test_htmx_requests_get_only_the_log_with_the_sort_state_out_of_band(client, world):
    client.force_login(world.personas.org_admin)

    full = client.get("/events/", {"sort": "cost"}).content.decode()
    part = client.get("/events/", {"sort": "cost"}, HTTP_HX_REQUEST="true").content.decode()

    assert 'id="filters"' in full and 'name="amount_min"' in full and 'name="pool"' in full
    assert 'id="filters"' not in part
    assert part.lstrip().startswith('<section id="event-log"')
    assert 'id="log-state" hx-swap-oob="true"' in part
    assert 'name="sort" value="cost"' in part
    assert 'hx-push-url="true"' in part


def test_history_restore_gets_the_whole_page(client, world):
    client.force_login(world.personas.org_admin)

    html = client.get(
        "/events/", HTTP_HX_REQUEST="true", HTTP_HX_HISTORY_RESTORE_REQUEST="true"
    ).content.decode()

    assert 'id="filters"' in html


def test_rows_link_to_details_and_to_the_users_page(client, world):
    p = world.personas
    client.force_login(p.org_admin)

    response = client.get("/events/", {"user": p.member.id})
    row = response.context["rows"][0]
    html = response.content.decode()

    assert row["detail_url"].startswith(f"/events/{row['event'].id}/")
    assert row["user_url"].startswith(f"/users/{p.member.id}/")
    assert f'href="{row["user_url"]}"' in html
    assert 'hx-target="#event-detail"' in html


def test_amounts_are_formatted_by_resource_type(client, world):
    client.force_login(world.personas.org_admin)

    rows = client.get("/events/", {"sort": "amount", "dir": "desc"}).context["rows"]
    by_type = {}
    for r in rows:
        by_type.setdefault(r["event"].resource_type, r)

    assert by_type["tokens"]["amount"].endswith("tokens")
    assert format_amount(7_000_000, "storage") == "7.0 MB"
    assert format_amount(1500, "storage") == "1.5 KB"
    assert format_amount(999, "storage") == "999 B"
    assert format_amount(1, "ocr") == "1 page"
    assert format_amount(12, "ocr") == "12 pages"
    for r in rows:
        assert r["amount_value"] == amount(r["event"])


def test_anonymous_visitors_are_sent_to_login(client, world):
    response = client.get("/events/")

    assert response.status_code == 302
    assert response["Location"].startswith("/login/")


def test_the_world_covers_every_scope(world):
    # Guard: each persona sees something, and no two see the same set.
    p = world.personas
    events = world.events()
    seen = {name: frozenset(e.id for e in events if sees(p, name, e)) for name in PERSONAS}
    assert all(seen.values())
    assert len(set(seen.values())) == len(PERSONAS)
    assert {e.resource_type for e in events} == {"tokens", "storage", "ocr"}
    assert {e.pool_category for e in events} == {"allocated", "surplus", "hybrid", ""}


def test_each_filter_of_the_sort_loop_narrows_to_some_but_not_all(world):
    everything = len(expected_ids(world, "org_admin", {}))
    for filters in FILTERS[1:]:
        assert 0 < len(expected_ids(world, "org_admin", filters)) < everything, filters
    assert everything > 2 * eventlog.PAGE_SIZE  # at least three pages
