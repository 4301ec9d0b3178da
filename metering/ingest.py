"""Ingestion: validate a batch of events, store the new ones, count them in every roll-up.

`ingest_batch` is the one write path for usage events: the HTTP API, the file importer,
the gateway adapters and the demo seeder all call it. Everything a batch writes (events
and roll-up increments) commits in one transaction, so an accepted event is already in
every total, and a failure leaves nothing half-stored.
"""

import json
import logging
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from functools import lru_cache, partial
from typing import Any

from django.conf import settings
from django.contrib.auth.hashers import make_password
from django.core.cache import cache
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import connection, transaction
from django.utils import timezone

from accounts.models import (
    ApiToken,
    Membership,
    Organization,
    Project,
    Role,
    Team,
    UnknownLabelPolicy,
    User,
)

from .aggregates import FACT_FIELDS, rollup_sql, rollups_add, spend_sql
from .budgets import budgets_after_ingest, enqueue_safely
from .models import (
    NANOS_PER_USD,
    CostSource,
    Operation,
    PoolCategory,
    ResourceType,
    RollupPending,
    UsageEvent,
)
from .pools import pools_categorise
from .pricing import PriceBook, TokenCounts, cost_nanos, usd_to_nanos

log = logging.getLogger(__name__)

MAX_TOKENS = 2**53
MAX_LABEL = 200
MAX_METADATA_BYTES = 4096
FUTURE_TOLERANCE = timedelta(minutes=5)
MAX_LATENCY_MS = 2**31 - 1
MAX_COST_USD = Decimal("1000000000")

TOKEN_FIELDS = (
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
)
LABEL_FIELDS = (
    "provider",
    "end_user",
    "session_id",
    "assistant",
    "workflow",
    "workflow_run_id",
    "workflow_status",
    "client",
    "endpoint",
)
# Columns written for every event, in this order.
EVENT_COLUMNS = (
    "organization_id",
    "request_id",
    "timestamp",
    "model",
    "operation",
    *TOKEN_FIELDS,
    "resource_type",
    "quantity",
    "latency_ms",
    "status_code",
    "cost_nanos",
    "cost_source",
    "user_id",
    "team_id",
    "project_id",
    "api_token_id",
    *LABEL_FIELDS,
    "pool_category",
    "metadata",
    "ingested_at",
)


@dataclass
class CleanEvent:
    """One validated event, with slugs and email still unresolved."""

    index: int
    request_id: str
    timestamp: datetime
    model: str
    operation: str = Operation.CHAT
    input_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    resource_type: str = ResourceType.TOKENS
    quantity: int = 0
    latency_ms: int = 0
    status_code: int = 200
    cost_usd: Decimal | None = None
    user_email: str = ""
    team_slug: str = ""
    project_slug: str = ""
    pool_category: str = ""
    metadata: dict | None = None
    labels: dict[str, str] = field(default_factory=dict)
    # Resolved before insert.
    user_id: int | None = None
    team_id: int | None = None
    project_id: int | None = None
    cost_nanos: int = 0
    cost_source: str = CostSource.CATALOG


@dataclass
class Rejection:
    index: int
    request_id: str | None
    errors: dict[str, list[str]]

    def as_dict(self) -> dict:
        return {"index": self.index, "request_id": self.request_id, "errors": self.errors}


@dataclass
class IngestResult:
    accepted: int = 0
    duplicates: int = 0
    rejected: list[Rejection] = field(default_factory=list)
    accepted_events: list[CleanEvent] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": [r.as_dict() for r in self.rejected],
        }


class _Errors(dict):
    def add(self, name: str, message: str) -> None:
        self.setdefault(name, []).append(message)


def _json_default(value: Any):
    """Numbers with a fraction arrive as Decimal (exact cost_usd); metadata stores floats."""
    if isinstance(value, Decimal):
        number = float(value)
        return number if math.isfinite(number) else str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    return False


def _label(raw: dict, name: str, errors: _Errors, *, required: bool = False) -> str:
    value = raw.get(name)
    if value is None or value == "":
        if required:
            errors.add(name, "This field is required.")
        return ""
    if not isinstance(value, str):
        errors.add(name, "Must be a string.")
        return ""
    if len(value) > MAX_LABEL:
        errors.add(name, f"At most {MAX_LABEL} characters (got {len(value)}).")
    if "\x00" in value:
        errors.add(name, "NUL characters are not allowed.")
    return value


def _count(raw: dict, name: str, errors: _Errors, *, maximum: int = MAX_TOKENS) -> int:
    value = raw.get(name)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        if (
            isinstance(value, Decimal)
            and value == value.to_integral_value()
            and not str(value).count(".")
        ):
            value = int(value)
        else:
            errors.add(name, "Must be a JSON integer.")
            return 0
    if value < 0:
        errors.add(name, "Must be 0 or more.")
        return 0
    if value > maximum:
        errors.add(name, f"Must be at most {maximum}.")
        return 0
    return value


def _timestamp(raw: dict, errors: _Errors, now: datetime) -> datetime | None:
    value = raw.get("timestamp")
    if value is None or value == "":
        errors.add("timestamp", "This field is required.")
        return None
    if not isinstance(value, str):
        errors.add("timestamp", "Must be an RFC 3339 string, e.g. 2026-01-31T12:00:00Z.")
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        errors.add("timestamp", f"Not an RFC 3339 date-time: {value[:60]!r}.")
        return None
    if parsed.tzinfo is None:
        errors.add("timestamp", "Must include a UTC offset, e.g. Z or +02:00.")
        return None
    parsed = parsed.astimezone(UTC)
    if parsed > now + FUTURE_TOLERANCE:
        errors.add("timestamp", "Is more than 5 minutes in the future.")
        return None
    return parsed


def _cost(raw: dict, errors: _Errors) -> Decimal | None:
    value = raw.get("cost_usd")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        errors.add("cost_usd", "Must be a number or a decimal string.")
        return None
    try:
        cost = Decimal(value) if not isinstance(value, float) else Decimal(repr(value))
    except InvalidOperation:
        errors.add("cost_usd", f"Not a decimal number: {str(value)[:60]!r}.")
        return None
    if not cost.is_finite():
        errors.add("cost_usd", "Must be a finite number.")
        return None
    if cost < 0:
        errors.add("cost_usd", "Must be 0 or more.")
        return None
    if cost > MAX_COST_USD:
        errors.add("cost_usd", f"Must be at most {MAX_COST_USD}.")
        return None
    return cost


def _latency(raw: dict, errors: _Errors) -> int:
    value = raw.get("latency_ms")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        errors.add("latency_ms", "Must be a number of milliseconds.")
        return 0
    if isinstance(value, float) and not math.isfinite(value):
        errors.add("latency_ms", "Must be a finite number.")
        return 0
    if value < 0:
        errors.add("latency_ms", "Must be 0 or more.")
        return 0
    if value > MAX_LATENCY_MS:
        errors.add("latency_ms", f"Must be at most {MAX_LATENCY_MS}.")
        return 0
    return int(Decimal(value).to_integral_value())


@lru_cache(maxsize=32)
def _choice_values(choices) -> frozenset[str]:
    return frozenset(choices.values)  # a TextChoices class builds its list on every access


def _choice(raw: dict, name: str, choices, default: str, errors: _Errors) -> str:
    value = raw.get(name)
    if value is None or value == "":
        return default
    if not isinstance(value, str) or value not in _choice_values(choices):
        errors.add(name, f"Must be one of: {', '.join(choices.values)}.")
        return default
    return value


@lru_cache(maxsize=4096)
def _is_email(value: str) -> bool:
    """Django's email validation, remembered: a batch names the same people again."""
    try:
        validate_email(value)
    except ValidationError:
        return False
    return True


def validate_event(raw: Any, index: int, now: datetime) -> CleanEvent | Rejection:
    """Check one event against SPEC section 3; field-level messages on failure."""
    if not isinstance(raw, dict):
        return Rejection(index, None, {"event": ["Each event must be a JSON object."]})
    errors = _Errors()
    request_id = _label(raw, "request_id", errors, required=True)
    timestamp = _timestamp(raw, errors, now)
    model = _label(raw, "model", errors, required=True)
    counts = {name: _count(raw, name, errors) for name in TOKEN_FIELDS}
    if (
        "input_tokens" not in errors
        and counts["cached_input_tokens"] + counts["cache_write_tokens"] > counts["input_tokens"]
    ):
        errors.add(
            "cached_input_tokens",
            "cached_input_tokens + cache_write_tokens cannot exceed input_tokens "
            "(input_tokens includes cache reads and writes).",
        )
    if counts["reasoning_tokens"] > counts["output_tokens"]:
        errors.add(
            "reasoning_tokens",
            "reasoning_tokens cannot exceed output_tokens (output_tokens includes reasoning).",
        )
    status = raw.get("status_code", 200)
    if status is None:
        status = 200
    if isinstance(status, bool) or not isinstance(status, int) or not 100 <= status <= 599:
        errors.add("status_code", "Must be an integer HTTP status from 100 to 599.")
        status = 200
    user_email = raw.get("user") or ""
    if user_email:
        if not isinstance(user_email, str) or len(user_email) > 254:
            errors.add("user", "Must be an email address.")
            user_email = ""
        else:
            user_email = user_email.strip().lower()
            if not _is_email(user_email):
                errors.add("user", f"Not a valid email address: {user_email[:60]!r}.")
    metadata = raw.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            errors.add("metadata", "Must be a JSON object.")
            metadata = None
        elif _has_nul(metadata):
            errors.add("metadata", "NUL characters are not allowed.")
        elif len(json.dumps(metadata, default=_json_default).encode()) > MAX_METADATA_BYTES:
            errors.add("metadata", f"Must be at most {MAX_METADATA_BYTES} bytes as JSON.")
    event = CleanEvent(
        index=index,
        request_id=request_id,
        timestamp=timestamp,
        model=model,
        operation=_choice(raw, "operation", Operation, Operation.CHAT, errors),
        resource_type=_choice(raw, "resource_type", ResourceType, ResourceType.TOKENS, errors),
        quantity=_count(raw, "quantity", errors),
        latency_ms=_latency(raw, errors),
        status_code=status,
        cost_usd=_cost(raw, errors),
        user_email=user_email,
        team_slug=_label(raw, "team", errors),
        project_slug=_label(raw, "project", errors),
        pool_category=_choice(raw, "pool_category", PoolCategory, "", errors),
        metadata=metadata,
        labels={name: _label(raw, name, errors) for name in LABEL_FIELDS},
        **counts,
    )
    if errors:
        return Rejection(index, request_id or _raw_request_id(raw), dict(errors))
    return event


def _raw_request_id(raw: dict) -> str | None:
    value = raw.get("request_id")
    return value if isinstance(value, str) else None


def _resolve_slugs(model_cls, organization: Organization, slugs: set[str]) -> dict[str, int]:
    if not slugs:
        return {}
    rows = model_cls.objects.filter(organization=organization, slug__in=slugs)
    return dict(rows.values_list("slug", "id"))


def _resolve_users(organization: Organization, emails: set[str]) -> dict[str, int]:
    """Map emails to user ids; unknown people become members of the organization."""
    if not emails:
        return {}
    ids = dict(User.objects.filter(email__in=emails).values_list("email", "id"))
    for email in sorted(emails - ids.keys()):
        user, _ = User.objects.get_or_create(
            email=email, defaults={"password": make_password(None)}
        )
        ids[email] = user.id
    members = set(
        Membership.objects.filter(organization=organization, user_id__in=ids.values()).values_list(
            "user_id", flat=True
        )
    )
    missing = [uid for uid in ids.values() if uid not in members]
    if missing:
        Membership.objects.bulk_create(
            [
                Membership(organization=organization, user_id=uid, role=Role.MEMBER)
                for uid in missing
            ],
            ignore_conflicts=True,
        )
    return ids


def _membership_defaults(organization: Organization, user_ids: set[int]) -> dict[int, tuple]:
    """Each user's default (team_id, project_id) from their memberships in the org."""
    defaults: dict[int, tuple] = {}
    rows = Membership.objects.filter(organization=organization, user_id__in=user_ids).order_by("id")
    for user_id, team_id, project_id in rows.values_list("user_id", "team_id", "project_id"):
        team, project = defaults.get(user_id, (None, None))
        defaults[user_id] = (team or team_id, project or project_id)
    return defaults


def _resolve(
    events: list[CleanEvent], organization: Organization, token: ApiToken | None
) -> list[Rejection]:
    """Turn slugs and emails into ids and price each event. Returns new rejections."""
    teams = _resolve_slugs(Team, organization, {e.team_slug for e in events if e.team_slug})
    projects = _resolve_slugs(
        Project, organization, {e.project_slug for e in events if e.project_slug}
    )
    lenient = token is not None and token.unknown_labels == UnknownLabelPolicy.DEFAULTS
    book = PriceBook(organization.id, {e.model for e in events if e.cost_usd is None})
    rejections = []
    for event in events:
        errors = _Errors()
        _price(event, book)
        if event.cost_nanos > MAX_COST_USD * NANOS_PER_USD:
            errors.add(
                "cost_usd",
                f"The cost from the price catalog exceeds {MAX_COST_USD} USD; "
                "check the token counts.",
            )
        if event.team_slug:
            event.team_id = teams.get(event.team_slug)
            if event.team_id is None and not lenient:
                errors.add("team", f"Unknown team {event.team_slug!r} in this organization.")
        if event.project_slug:
            event.project_id = projects.get(event.project_slug)
            if event.project_id is None and not lenient:
                errors.add(
                    "project", f"Unknown project {event.project_slug!r} in this organization."
                )
        if errors:
            rejections.append(Rejection(event.index, event.request_id, dict(errors)))
    rejected = {r.index for r in rejections}
    events[:] = [e for e in events if e.index not in rejected]

    users = _resolve_users(organization, {e.user_email for e in events if e.user_email})
    user_ids = set(users.values())
    if token is not None and token.owner_id:
        user_ids.add(token.owner_id)  # events without a user are attributed to the owner
    member_defaults = _membership_defaults(organization, user_ids)
    for event in events:
        event.user_id = users.get(event.user_email) if event.user_email else None
        if (
            event.user_id is None
            and token is not None
            and token.owner_id
            and not token.service_account
        ):
            event.user_id = token.owner_id
        fallback_team, fallback_project = member_defaults.get(event.user_id, (None, None))
        if event.team_id is None:
            event.team_id = (token.default_team_id if token else None) or fallback_team
        if event.project_id is None:
            event.project_id = (token.default_project_id if token else None) or fallback_project
    return rejections


def _price(event: CleanEvent, book: PriceBook) -> None:
    if event.cost_usd is not None:
        event.cost_nanos = usd_to_nanos(event.cost_usd)
        event.cost_source = CostSource.REPORTED
        return
    price = book.price_for(event.model, event.labels["provider"], event.timestamp.date())
    if price is None:
        event.cost_nanos = 0
        event.cost_source = CostSource.UNPRICED
        return
    event.cost_nanos = cost_nanos(
        price,
        TokenCounts(
            input_tokens=event.input_tokens,
            cached_input_tokens=event.cached_input_tokens,
            cache_write_tokens=event.cache_write_tokens,
            output_tokens=event.output_tokens,
            quantity=event.quantity,
        ),
    )
    event.cost_source = CostSource.CATALOG


def _row(event: CleanEvent, organization_id: int, token_id: int | None, now: datetime) -> tuple:
    return (
        organization_id,
        event.request_id,
        event.timestamp,
        event.model,
        event.operation,
        event.input_tokens,
        event.cached_input_tokens,
        event.cache_write_tokens,
        event.output_tokens,
        event.reasoning_tokens,
        event.resource_type,
        event.quantity,
        event.latency_ms,
        event.status_code,
        event.cost_nanos,
        event.cost_source,
        event.user_id,
        event.team_id,
        event.project_id,
        token_id,
        *(event.labels[name] for name in LABEL_FIELDS),
        event.pool_category,
        json.dumps(event.metadata, default=_json_default) if event.metadata is not None else None,
        now,
    )


# Rows per INSERT statement: stays under SQLite's 32,766 and PostgreSQL's 65,535 parameters.
_INSERT_CHUNK = 500


# PostgreSQL: a batch is COPYed into this temporary table of the connection (psycopg
# writes COPY rows in C; sending them as column arrays cost more than the inserts).
INGEST_STAGING = "ingest_staging"


def insert_and_count_sql(*, deferred: bool = False) -> str:
    """PostgreSQL: insert the batch staged in INGEST_STAGING (in request_id order) and
    count the rows really inserted in the budget spend counters and every roll-up, or,
    `deferred`, list them for the roll-ups' fold (RollupPending, see
    aggregates.rollups_fold) instead; returns their request ids."""
    quote = connection.ops.quote_name
    table = quote(UsageEvent._meta.db_table)
    columns = ", ".join(quote(c) for c in EVENT_COLUMNS)
    facts = ", ".join(quote(c) for c in FACT_FIELDS)
    if deferred:
        pending = quote(RollupPending._meta.db_table)
        counts = [
            f"INSERT INTO {pending} (organization_id, event_id) "
            "SELECT organization_id, id FROM ins ORDER BY id",
            spend_sql("ins"),
        ]
    else:
        counts = rollup_sql("ins")
    counted = ", ".join(f"r{i} AS ({sql})" for i, sql in enumerate(counts))
    return (
        f"WITH ins AS (INSERT INTO {table} ({columns}) SELECT {columns} "
        f"FROM {INGEST_STAGING} ORDER BY request_id "
        f"ON CONFLICT (organization_id, request_id) DO NOTHING "
        f"RETURNING id, request_id, {facts}), {counted} "
        "SELECT request_id FROM ins"
    )


def _stage(cursor, rows: list[tuple]) -> None:
    """The batch into this connection's staging table, emptied first (TRUNCATE: inside
    an outer transaction, as in tests, ON COMMIT would not have emptied it)."""
    quote = connection.ops.quote_name
    columns = ", ".join(quote(c) for c in EVENT_COLUMNS)
    cursor.execute(
        f"CREATE TEMP TABLE IF NOT EXISTS {INGEST_STAGING} AS SELECT {columns} "
        f"FROM {quote(UsageEvent._meta.db_table)} WITH NO DATA"
    )
    cursor.execute(f"TRUNCATE {INGEST_STAGING}")
    with cursor.cursor.copy(f"COPY {INGEST_STAGING} ({columns}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _insert_new(rows: list[tuple], deferred: bool) -> tuple[set[str], bool]:
    """INSERT ... ON CONFLICT DO NOTHING; returns (the request ids that were new, whether
    the budget spend counters, and the roll-ups or their pending list, were updated for
    them in the same statement)."""
    table = UsageEvent._meta.db_table
    quote = connection.ops.quote_name
    columns = ", ".join(quote(c) for c in EVENT_COLUMNS)
    placeholders = "(" + ", ".join(["%s"] * len(EVENT_COLUMNS)) + ")"
    conflict = " ON CONFLICT (organization_id, request_id) DO NOTHING RETURNING request_id"
    inserted: set[str] = set()
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            # The batch COPYed into a staging table, then one statement: the events in
            # request_id order, and the spend counters and every roll-up (or, deferred,
            # the pending list) from the rows that insert really returned (one
            # data-modifying WITH query per table, keys in order). No roll-up rows
            # built or sent from Python.
            _stage(cursor, rows)
            cursor.execute(insert_and_count_sql(deferred=deferred))
            inserted.update(r[0] for r in cursor.fetchall())
            return inserted, True
        for start in range(0, len(rows), _INSERT_CHUNK):
            chunk = rows[start : start + _INSERT_CHUNK]
            sql = (
                f"INSERT INTO {quote(table)} ({columns}) VALUES "
                + ", ".join([placeholders] * len(chunk))
                + conflict
            )
            params = [_adapt(value) for row in chunk for value in row]
            cursor.execute(sql, params)
            inserted.update(r[0] for r in cursor.fetchall())
    return inserted, False


def _fold_soon(organization_id: int) -> None:
    """After commit: a worker folds the batch into the roll-ups (in-process, right here,
    with eager tasks). If the broker is down, the next read folds it.

    With a worker, the first batch of an organization in ROLLUPS_FOLD_WAIT_SECONDS
    schedules one fold a little after that window closes, and the batches inside the
    window schedule nothing: every batch committed in the window is then folded by that
    one task (its statement starts after they committed), and each roll-up row is
    upserted once per window instead of once per batch.
    """
    from .tasks import rollups_fold

    wait = settings.ROLLUPS_FOLD_WAIT_SECONDS
    if wait <= 0 or rollups_fold.app.conf.task_always_eager:
        enqueue_safely(rollups_fold, organization_id)
        return
    try:
        first = cache.add(f"rollups-fold:{organization_id}", 1, timeout=wait)
    except Exception:  # the cache is down: schedule a fold for every batch
        log.warning("cache unavailable; folding without a window", exc_info=True)
        first = True
    if first:
        enqueue_safely(rollups_fold, organization_id, countdown=wait + 0.5)


def _adapt(value):
    if isinstance(value, datetime):
        return connection.ops.adapt_datetimefield_value(value)
    return value


def ingest_batch(
    *,
    organization: Organization,
    events: list[Any],
    token: ApiToken | None = None,
    now: datetime | None = None,
) -> IngestResult:
    """Validate, store and count a batch of events for `organization`.

    Valid events are stored even when others in the batch are not. An event whose
    (organization, request_id) is already stored changes nothing and counts as duplicate.
    Events are inserted in request_id order and roll-up rows upserted in key order, so
    concurrent batches take row locks in the same order and cannot deadlock.
    """
    now = now or timezone.now()
    result = IngestResult()
    clean: dict[str, CleanEvent] = {}
    for index, raw in enumerate(events):
        checked = validate_event(raw, index, now)
        if isinstance(checked, Rejection):
            result.rejected.append(checked)
        elif checked.request_id in clean:
            result.duplicates += 1  # repeated inside the batch: the first one wins
        else:
            clean[checked.request_id] = checked
    candidates = [clean[key] for key in sorted(clean)]
    if candidates:
        with transaction.atomic():
            result.rejected.extend(_resolve(candidates, organization, token))
            token_id = token.id if token else None
            rows = [_row(e, organization.id, token_id, now) for e in candidates]
            deferred = settings.ROLLUPS_DEFERRED and connection.vendor == "postgresql"
            inserted, counted = _insert_new(rows, deferred) if rows else (set(), True)
            new_events = [e for e in candidates if e.request_id in inserted]
            pools_categorise(organization=organization, events=new_events)
            if not counted:
                rollups_add(organization.id, token_id, new_events)
            elif deferred and new_events:
                transaction.on_commit(partial(_fold_soon, organization.id))
            budgets_after_ingest(
                organization=organization,
                token_id=token_id,
                events=new_events,
                spend_counted=counted,
            )
        result.accepted = len(new_events)
        result.duplicates += len(candidates) - len(new_events)
        result.accepted_events = new_events
    result.rejected.sort(key=lambda r: r.index)
    return result
