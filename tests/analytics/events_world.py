"""A small, varied world of usage events for the events log, details, user page and
export tests, and the plain-Python answers those pages must agree with.

Events go through `ingest_batch` (the one write path, which also keeps the roll-ups
exact). Alpha gets ~70 events spread over the personas' scopes, with every resource
type, pool category, status class, repeated values (ties) and identical timestamps;
beta gets a few of the outsider's.
"""

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from django.test import Client

from metering.models import UsageEvent
from tests.conftest import Personas
from tests.factories import event_payload, ingest

MODELS = ["gpt-4o", "gpt-4o-mini", "claude-sonnet-4", "text-embedding-3-small"]
ENDPOINTS = ["/v1/chat/completions", "/v1/embeddings", "/v1/files", "/v1/ocr", ""]
SESSIONS = ["s-1", "s-2", "s-3", ""]
MICRO = Decimal("0.000001")


@dataclass
class World:
    personas: Personas
    now: datetime

    def events(self) -> list[UsageEvent]:
        """Every stored event, as the test's plain source of truth."""
        return list(
            UsageEvent.objects.select_related("user", "team", "project", "api_token").order_by("id")
        )

    def visible_to(self, persona: str) -> list[UsageEvent]:
        return [e for e in self.events() if sees(self.personas, persona, e)]


def sees(p: Personas, persona: str, e: UsageEvent) -> bool:
    """SPEC section 2, written out plainly (independent of analytics.visibility)."""
    if persona == "platform_admin":
        return True
    if persona == "org_admin":
        return e.organization_id == p.org.id
    if persona == "team_lead":
        return e.team_id == p.platform_team.id or e.user_id == p.team_lead.id
    if persona == "project_admin":
        return e.project_id == p.chatbot_project.id or e.user_id == p.project_admin.id
    if persona == "member":
        return e.user_id == p.member.id or e.api_token_id == p.member_token.id
    if persona == "outsider":
        return e.user_id == p.outsider.id or e.api_token_id == p.outsider_token.id
    raise ValueError(persona)


def _event(rng: random.Random, i: int, when: datetime, **fields) -> dict:
    kind = rng.choice(["tokens"] * 6 + ["storage", "ocr"])
    model = rng.choice(MODELS)
    event = {
        "request_id": f"alpha-{i:03d}",
        "timestamp": when,
        "model": model,
        "provider": "openai" if model.startswith(("gpt", "text")) else "anthropic",
        "latency_ms": rng.choice([120, 450, 450, 800, 2300]),
        "status_code": rng.choice([200, 200, 200, 201, 429, 500]),
        "cost_usd": str(
            (Decimal(rng.choice([0, 12, 12, 350, 4100, 99000])) / 10**6).quantize(MICRO)
        ),
        "endpoint": rng.choice(ENDPOINTS),
        "session_id": rng.choice(SESSIONS),
        "pool_category": rng.choice(["allocated", "surplus", "hybrid", None]),
    }
    if kind == "tokens":
        inp = rng.choice([0, 40, 300, 1200, 1200, 9000])
        event.update(
            operation=rng.choice(["chat", "chat", "embedding", "completion"]),
            input_tokens=inp,
            cached_input_tokens=min(inp, rng.choice([0, 0, 32, 600])),
            output_tokens=rng.choice([0, 20, 60, 350, 350, 2000]),
        )
    else:
        event.update(
            operation=kind,
            resource_type=kind,
            input_tokens=0,
            output_tokens=0,
            quantity=rng.choice([1, 3, 1500, 250_000, 7_000_000])
            if kind == "storage"
            else rng.choice([1, 2, 12, 40]),
        )
    event.update(fields)
    return event


def build_world(personas: Personas, *, seed: int = 7) -> World:
    p = personas
    rng = random.Random(seed)
    now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
    who = [
        {"user": p.team_lead.email, "team": "platform"},
        {"user": p.org_admin.email, "project": "chatbot"},
        {"user": p.member.email},
        {"user": p.project_admin.email},
        {"team": "platform"},
        {"project": "chatbot"},
        {},
    ]
    alpha, via_member_token = [], []
    for i in range(64):
        # Every fourth event shares its timestamp with the one before (ties on time).
        minutes = (i - i % 4 // 3) * 37
        event = _event(rng, i, now - timedelta(minutes=minutes), **who[i % len(who)])
        alpha.append(event_payload(**event))
    for i in range(64, 70):
        event = _event(rng, i, now - timedelta(minutes=i * 29))
        via_member_token.append(event_payload(**event))
    ingest(p.org, alpha, token=p.service_token)
    ingest(p.org, via_member_token, token=p.member_token)
    beta = [
        event_payload(
            **_event(rng, i, now - timedelta(minutes=i * 41), user=p.outsider.email),
        )
        for i in range(8)
    ]
    for e in beta:
        e["request_id"] = e["request_id"].replace("alpha", "beta")
        e.pop("team", None)
        e.pop("project", None)
    ingest(p.other_org, beta, token=p.outsider_token)
    return World(personas=p, now=now)


# ---------------------------------------------------------------------------------------
# The plain answers


def amount(e: UsageEvent, io: str = "") -> int:
    if e.resource_type != "tokens":
        return e.quantity
    return {"input": e.input_tokens, "output": e.output_tokens}.get(
        io, e.input_tokens + e.output_tokens
    )


SORT_VALUE = {
    "time": lambda e, io: e.timestamp,
    "user": lambda e, io: e.user.email if e.user else "",
    "team": lambda e, io: e.team.name if e.team else "",
    "project": lambda e, io: e.project.name if e.project else "",
    "model": lambda e, io: e.model,
    "operation": lambda e, io: e.operation,
    "input": lambda e, io: e.input_tokens,
    "cached": lambda e, io: e.cached_input_tokens,
    "output": lambda e, io: e.output_tokens,
    "amount": amount,
    "resource": lambda e, io: e.resource_type,
    "pool": lambda e, io: e.pool_category,
    "latency": lambda e, io: e.latency_ms,
    "status": lambda e, io: e.status_code,
    "cost": lambda e, io: e.cost_nanos,
    "request_id": lambda e, io: e.request_id,
    "endpoint": lambda e, io: e.endpoint,
    "session": lambda e, io: e.session_id,
}


def matches(e: UsageEvent, params: dict) -> bool:
    """The log's filters, as plain Python over one event."""
    io = params.get("io", "")
    checks = {
        "resource": lambda v: e.resource_type == v,
        "pool": lambda v: e.pool_category == ("" if v == "none" else v),
        "request_id": lambda v: e.request_id.startswith(v),
        "amount_min": lambda v: amount(e, io) >= int(v),
        "amount_max": lambda v: amount(e, io) <= int(v),
        "status": lambda v: v == "all" or (e.status_code >= 400) == (v == "failed"),
        "model": lambda v: e.model == v,
        "session": lambda v: e.session_id == v,
        "operation": lambda v: e.operation == v,
        "user": lambda v: str(e.user_id) == v,
        "io": lambda v: True,
        "sort": lambda v: True,
        "dir": lambda v: True,
        "period": lambda v: True,
    }
    return all(checks[key](value) for key, value in params.items())


def expected_ids(world: World, persona: str, params: dict) -> list[int]:
    """Visible, matching events in the log's order (sort value, then id)."""
    column = params.get("sort", "time")
    descending = params.get("dir", "desc" if column in DESC_FIRST else "asc") == "desc"
    io = params.get("io", "")
    rows = [e for e in world.visible_to(persona) if matches(e, params)]
    rows.sort(key=lambda e: (SORT_VALUE[column](e, io), e.id), reverse=descending)
    return [e.id for e in rows]


DESC_FIRST = {"time", "input", "cached", "output", "amount", "latency", "status", "cost"}


def walk_log(client: Client, params: dict, *, limit: int = 50) -> list[list[int]]:
    """Every page of the log (HTMX partials, following the 'Older' links): ids per page."""
    pages = []
    response = client.get("/events/", params, HTTP_HX_REQUEST="true")
    while True:
        assert response.status_code == 200
        pages.append([r["event"].id for r in response.context["rows"]])
        next_url = response.context["pagination"]["next"]
        if not next_url or len(pages) >= limit:
            return pages
        response = client.get(next_url, HTTP_HX_REQUEST="true")
