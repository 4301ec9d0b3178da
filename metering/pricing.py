"""The price catalog: load the shipped data file, look up the price in force, compute cost."""

import json
from bisect import bisect_right
from dataclasses import dataclass
from datetime import date
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path

from django.db import transaction

from .models import NANOS_PER_USD, Price

CATALOG_FILE = Path(__file__).resolve().parent / "data" / "prices.json"
_PER_MTOK_TO_NANOS = Decimal(NANOS_PER_USD) / Decimal(1_000_000)
_PRICE_FIELDS = (
    "input_per_mtok",
    "cached_input_per_mtok",
    "cache_write_per_mtok",
    "output_per_mtok",
    "per_unit",
)


def usd_to_nanos(value: Decimal) -> int:
    return int((value * NANOS_PER_USD).to_integral_value(rounding=ROUND_HALF_EVEN))


@transaction.atomic
def catalog_load(path: Path = CATALOG_FILE) -> tuple[int, int]:
    """Upsert the default catalog from `path`. Returns (created, updated)."""
    data = json.loads(Path(path).read_text())
    created = updated = 0
    for entry in data["prices"]:
        values = {"operation": entry.get("operation", "chat")}
        for field in _PRICE_FIELDS:
            raw = entry.get(field)
            values[field] = Decimal(raw) if raw is not None else None
        for field in ("input_per_mtok", "output_per_mtok", "per_unit"):
            values[field] = values[field] or Decimal(0)
        _, was_created = Price.objects.update_or_create(
            organization=None,
            model=entry["model"],
            provider=entry.get("provider", ""),
            effective_from=date.fromisoformat(entry["effective_from"]),
            defaults=values,
        )
        created += was_created
        updated += not was_created
    return created, updated


def load_default_catalog_after_migrate(sender, **kwargs):
    catalog_load()


@dataclass(frozen=True)
class TokenCounts:
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    quantity: int = 0


def cost_nanos(price: Price, counts: TokenCounts) -> int:
    """Cost of one event in nano-dollars, each token counted once (SPEC section 4).

    Cached reads and cache writes are part of input_tokens; they are billed at their own
    prices and taken out of the plain-input count, never billed twice.
    """
    cached_price = price.cached_input_per_mtok
    write_price = price.cache_write_per_mtok
    if cached_price is None:
        cached_price = price.input_per_mtok
    if write_price is None:
        write_price = price.input_per_mtok
    plain_input = counts.input_tokens - counts.cached_input_tokens - counts.cache_write_tokens
    usd_per_mtok_total = (
        plain_input * price.input_per_mtok
        + counts.cached_input_tokens * cached_price
        + counts.cache_write_tokens * write_price
        + counts.output_tokens * price.output_per_mtok
    )
    total = (
        usd_per_mtok_total * _PER_MTOK_TO_NANOS + counts.quantity * price.per_unit * NANOS_PER_USD
    )
    return int(Decimal(total).to_integral_value(rounding=ROUND_HALF_EVEN))


class PriceBook:
    """The prices for one organization and a set of models, read in one query.

    An organization's override wins over the catalog; among a source's prices, the one with
    the latest effective_from on or before the event's date is in force. A provider given
    with the event picks that provider's price when there is one.
    """

    def __init__(self, organization_id: int, models: set[str]):
        self._by_key: dict[tuple[int, str, str], tuple[list[date], list[Price]]] = {}
        rows = Price.objects.filter(model__in=models).filter(
            organization_id__in=[organization_id]
        ) | Price.objects.filter(model__in=models, organization__isnull=True)
        grouped: dict[tuple[int, str, str], list[Price]] = {}
        for price in rows.order_by("effective_from"):
            source = 0 if price.organization_id else 1
            for provider in {price.provider, "*"}:
                grouped.setdefault((source, price.model, provider), []).append(price)
        for key, prices in grouped.items():
            self._by_key[key] = ([p.effective_from for p in prices], prices)

    def price_for(self, model: str, provider: str, on: date) -> Price | None:
        for source in (0, 1):
            for prov in (provider, "*") if provider else ("*",):
                found = self._by_key.get((source, model, prov))
                if not found:
                    continue
                dates, prices = found
                index = bisect_right(dates, on) - 1
                if index >= 0:
                    return prices[index]
        return None
