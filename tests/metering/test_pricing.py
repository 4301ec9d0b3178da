"""Prices and cost (SPEC section 4): each token counted once, exact money, catalog dates."""

import json
from datetime import date
from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db.models import Sum

from metering.models import OrgUsage15m, Price, UsageEvent, nanos_to_usd
from metering.pricing import CATALOG_FILE, PriceBook, TokenCounts, cost_nanos, usd_to_nanos
from tests.factories import event_payload, ingest


def _stored(request_id: str) -> UsageEvent:
    return UsageEvent.objects.get(request_id=request_id)


def _send(org, **fields) -> UsageEvent:
    result = ingest(org, [event_payload(request_id="priced", **fields)])
    assert result.accepted == 1, result.as_dict()
    return _stored("priced")


def test_cached_tokens_are_counted_once(org):
    # gpt-4o from 2024-10-01: $2.50 input, $1.25 cached input, $10 output per 1M tokens.
    event = _send(
        org,
        model="gpt-4o",
        timestamp="2025-06-01T12:00:00Z",
        input_tokens=1000,
        cached_input_tokens=200,
        output_tokens=50,
    )

    # 800 x 2.50 + 200 x 1.25 + 50 x 10 = 2750 USD per 1M calls of this shape.
    assert event.cost_nanos == 2_750_000
    assert event.cost_usd == Decimal("0.002750000")
    assert event.cost_source == "catalog"
    # The peers' double count would bill the 200 cached tokens at both prices.
    double_counted = (1000 * Decimal("2.5") + 200 * Decimal("1.25") + 50 * 10) * 1000
    assert event.cost_nanos < double_counted


def test_cache_writes_are_priced_separately(org):
    # claude-sonnet-4-5: $3 input, $0.30 cache read, $3.75 cache write, $15 output per 1M.
    event = _send(
        org,
        model="claude-sonnet-4-5",
        provider="anthropic",
        timestamp="2025-10-10T08:00:00Z",
        input_tokens=10_000,
        cached_input_tokens=2_000,
        cache_write_tokens=3_000,
        output_tokens=500,
    )

    # 5000 x 3 + 2000 x 0.30 + 3000 x 3.75 + 500 x 15 = 34350 USD per 1M.
    assert event.cost_nanos == 34_350_000


def test_reasoning_tokens_are_part_of_output_and_not_billed_twice(org):
    plain = cost_nanos(
        Price(model="o4-mini", input_per_mtok=Decimal("1.1"), output_per_mtok=Decimal("4.4")),
        TokenCounts(input_tokens=100, output_tokens=1000),
    )

    event = _send(
        org,
        model="o4-mini",
        timestamp="2025-08-01T00:00:00Z",
        input_tokens=100,
        output_tokens=1000,
        reasoning_tokens=900,
    )

    assert event.cost_nanos == plain == 4_510_000


@pytest.mark.parametrize(
    ("day", "expected_nanos"),
    [
        # 2024-05-13 launch prices: $5 input (cached at the same price), $15 output.
        ("2024-06-01T00:00:00Z", 800 * 5000 + 200 * 5000 + 50 * 15000),
        ("2024-09-30T23:59:59Z", 800 * 5000 + 200 * 5000 + 50 * 15000),
        # From 2024-10-01: $2.50, cached $1.25, $10 output.
        ("2024-10-01T00:00:00Z", 800 * 2500 + 200 * 1250 + 50 * 10000),
        ("2026-01-01T00:00:00Z", 800 * 2500 + 200 * 1250 + 50 * 10000),
    ],
)
def test_the_price_in_force_at_the_events_date_applies(org, day, expected_nanos):
    event = _send(
        org,
        model="gpt-4o",
        timestamp=day,
        input_tokens=1000,
        cached_input_tokens=200,
        output_tokens=50,
    )

    assert event.cost_nanos == expected_nanos


def test_an_event_before_the_first_price_is_unpriced(org):
    event = _send(org, model="gpt-4o", timestamp="2024-01-01T00:00:00Z")

    assert (event.cost_nanos, event.cost_source) == (0, "unpriced")


def test_organizations_override_wins_over_the_catalog(org, other_org):
    Price.objects.create(
        organization=org,
        model="gpt-4o",
        effective_from=date(2020, 1, 1),
        input_per_mtok=Decimal("1"),
        output_per_mtok=Decimal("2"),
    )
    ours = _send(
        org,
        model="gpt-4o",
        timestamp="2025-06-01T00:00:00Z",
        input_tokens=1000,
        cached_input_tokens=200,
        output_tokens=50,
    )
    ingest(
        other_org,
        [
            event_payload(
                request_id="theirs",
                model="gpt-4o",
                timestamp="2025-06-01T00:00:00Z",
                input_tokens=1000,
                cached_input_tokens=200,
                output_tokens=50,
            )
        ],
    )

    # No cached price in the override: cached input is billed at its input price.
    assert ours.cost_nanos == (800 * 1 + 200 * 1 + 50 * 2) * 1000
    assert _stored("theirs").cost_nanos == 2_750_000


def test_override_takes_effect_from_its_own_date(org):
    Price.objects.create(
        organization=org,
        model="gpt-4o",
        effective_from=date(2025, 7, 1),
        input_per_mtok=Decimal("1"),
        output_per_mtok=Decimal("1"),
    )
    before = ingest(
        org,
        [event_payload(request_id="june", model="gpt-4o", timestamp="2025-06-30T23:00:00Z")],
    )
    after = ingest(
        org,
        [event_payload(request_id="july", model="gpt-4o", timestamp="2025-07-01T00:00:00Z")],
    )

    assert before.accepted == after.accepted == 1
    assert _stored("june").cost_nanos == 1000 * 2500 + 100 * 10000  # the catalog
    assert _stored("july").cost_nanos == 1100 * 1000  # the override


def test_an_unknown_model_is_priced_zero_and_flagged(org):
    event = _send(org, model="acme-finetune-v1", input_tokens=5000, output_tokens=500)

    assert (event.cost_nanos, event.cost_source) == (0, "unpriced")
    assert OrgUsage15m.objects.aggregate(n=Sum("unpriced_requests"))["n"] == 1


def test_a_reported_cost_wins_over_the_catalog_and_keeps_its_digits(org):
    ingest(
        org,
        [
            event_payload(request_id="str", model="gpt-4o", cost_usd="0.000000123"),
            event_payload(request_id="num", model="gpt-4o", cost_usd=Decimal("0.000000123")),
            event_payload(request_id="big", model="gpt-4o", cost_usd="123456.123456789"),
            event_payload(request_id="unknown-model", model="homegrown", cost_usd="0.5"),
        ],
    )

    assert _stored("str").cost_nanos == 123
    assert _stored("num").cost_nanos == 123
    assert _stored("big").cost_nanos == 123_456_123_456_789
    assert _stored("big").cost_usd == Decimal("123456.123456789")
    assert {e.cost_source for e in UsageEvent.objects.all()} == {"reported"}
    assert OrgUsage15m.objects.aggregate(n=Sum("unpriced_requests"))["n"] == 0


def test_a_cost_sent_as_a_json_number_is_exact(post_events, make_event):
    post_events(
        body='{"events": [{"request_id": "n1", "timestamp": "2026-01-01T00:00:00Z",'
        ' "model": "gpt-4o", "cost_usd": 0.1}, {"request_id": "n2",'
        ' "timestamp": "2026-01-01T00:00:00Z", "model": "gpt-4o", "cost_usd": 0.2}]}'
    )

    total = UsageEvent.objects.aggregate(n=Sum("cost_nanos"))["n"]

    assert total == 300_000_000
    assert nanos_to_usd(total) == Decimal("0.3")


def test_a_cheap_embedding_call_does_not_round_to_zero(org):
    # text-embedding-3-small: $0.02 per 1M tokens; 7 tokens cost 0.00000014 USD.
    event = _send(
        org,
        model="text-embedding-3-small",
        operation="embedding",
        input_tokens=7,
        output_tokens=0,
    )

    assert event.cost_nanos == 140


def test_non_token_resources_are_priced_per_unit(org):
    event = _send(
        org,
        model="mistral-ocr-latest",
        provider="mistral",
        operation="ocr",
        resource_type="ocr",
        quantity=250,
        input_tokens=0,
        output_tokens=0,
    )

    assert event.cost_nanos == 250 * 1_000_000  # $0.001 per page


def test_sums_of_costs_are_exact(org):
    events = [
        event_payload(model="text-embedding-3-small", input_tokens=7, output_tokens=0)
        for _ in range(1000)
    ]
    ingest(org, events)

    assert OrgUsage15m.objects.aggregate(n=Sum("cost_nanos"))["n"] == 140_000
    assert nanos_to_usd(140_000) == Decimal("0.000140000")


def test_usd_to_nanos_rounds_half_to_even():
    assert usd_to_nanos(Decimal("0.0000000005")) == 0
    assert usd_to_nanos(Decimal("0.0000000015")) == 2
    assert usd_to_nanos(Decimal("1")) == 1_000_000_000


def test_provider_picks_its_own_price_when_there_is_one(org):
    Price.objects.create(
        model="gpt-4o",
        provider="azure",
        effective_from=date(2024, 1, 1),
        input_per_mtok=Decimal("3"),
        output_per_mtok=Decimal("12"),
    )
    book = PriceBook(org.id, {"gpt-4o"})

    azure = book.price_for("gpt-4o", "azure", date(2025, 1, 1))
    openai = book.price_for("gpt-4o", "openai", date(2025, 1, 1))
    unnamed = book.price_for("gpt-4o", "", date(2025, 1, 1))

    assert azure.input_per_mtok == 3
    assert openai.input_per_mtok == Decimal("2.5")
    assert unnamed is not None


# ---------------------------------------------------------------------------------------
# The catalog


def test_catalog_is_loaded_at_migrate_with_at_least_25_models(db):
    catalog = Price.objects.filter(organization=None)
    models = set(catalog.values_list("model", flat=True))
    providers = set(catalog.values_list("provider", flat=True))
    operations = set(catalog.values_list("operation", flat=True))

    assert len(models) >= 25
    assert {"openai", "anthropic", "google", "mistral"} <= providers
    assert {"chat", "embedding", "rerank"} <= operations
    assert any(m.startswith("llama") for m in models)  # Meta's models through their hosts
    assert catalog.filter(model="gpt-4o").count() == 2


def test_catalog_file_matches_the_database(db):
    entries = json.loads(CATALOG_FILE.read_text())["prices"]

    assert Price.objects.filter(organization=None).count() == len(entries)
    for entry in entries:
        price = Price.objects.get(
            organization=None,
            model=entry["model"],
            provider=entry.get("provider", ""),
            effective_from=entry["effective_from"],
        )
        assert price.input_per_mtok == Decimal(entry["input_per_mtok"])
        assert price.output_per_mtok == Decimal(entry["output_per_mtok"])


def test_load_prices_command_restores_the_catalog(db):
    expected = Price.objects.filter(organization=None).count()
    Price.objects.all().delete()
    out = StringIO()

    call_command("load_prices", stdout=out)

    assert Price.objects.filter(organization=None).count() == expected
    assert f"{expected} new, 0 updated" in out.getvalue()


def test_load_prices_command_updates_in_place_and_keeps_overrides(org):
    Price.objects.filter(model="gpt-4o-mini").update(input_per_mtok=Decimal("99"))
    Price.objects.create(
        organization=org, model="gpt-4o-mini", effective_from=date(2020, 1, 1), input_per_mtok=1
    )
    out = StringIO()

    call_command("load_prices", stdout=out)

    assert "0 new" in out.getvalue()
    assert Price.objects.get(organization=None, model="gpt-4o-mini").input_per_mtok == Decimal(
        "0.15"
    )
    assert Price.objects.filter(organization=org).count() == 1


def test_load_prices_command_reads_another_file(db, tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(
        json.dumps(
            {
                "prices": [
                    {
                        "model": "in-house-7b",
                        "provider": "self",
                        "effective_from": "2025-01-01",
                        "input_per_mtok": "0.01",
                        "output_per_mtok": "0.02",
                    }
                ]
            }
        )
    )

    call_command("load_prices", str(path), stdout=StringIO())

    assert Price.objects.get(model="in-house-7b").output_per_mtok == Decimal("0.02")


@pytest.mark.parametrize(
    "content", ['{"prices": [{"model": "x"}]}', '{"no": "prices"}', "not json at all"]
)
def test_load_prices_command_refuses_a_bad_file(db, tmp_path, content):
    path = tmp_path / "bad.json"
    path.write_text(content)

    with pytest.raises(CommandError, match="not a valid price catalog"):
        call_command("load_prices", str(path), stdout=StringIO())


def test_load_prices_command_refuses_a_missing_file(db, tmp_path):
    with pytest.raises(CommandError, match="No such file"):
        call_command("load_prices", str(tmp_path / "missing.json"), stdout=StringIO())
