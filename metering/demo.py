"""Deterministic demo data: organizations, people, tokens and realistic usage.

Events go through `ingest_batch`, the same path as the API, one batch per sending token.
"""

import math
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from zoneinfo import ZoneInfo

from django.contrib.auth.hashers import make_password
from django.db import transaction

from accounts.models import ApiToken, Membership, Organization, Project, Role, Team, User
from accounts.tokens import token_issue

from .budgets import budget_alerts_evaluate, budget_statuses
from .ingest import ingest_batch
from .models import NANOS_PER_USD, Budget, Pool

DEMO_PASSWORD = "demo"  # noqa: S105 - documented demo login
DEMO_LOGINS = {
    "admin@demo.test": "platform admin (every organization)",
    "orgadmin@demo.test": "org admin of Acme Corp",
    "lead@demo.test": "team lead of Acme's Platform team",
    "projectadmin@demo.test": "project admin of Acme's Support Bot project",
    "member@demo.test": "member of Acme (own events only)",
}


@dataclass
class OrgPlan:
    slug: str
    name: str
    timezone: str
    share: float
    teams: list[str]
    projects: list[str]
    users: int


ORGS = [
    OrgPlan(
        "acme",
        "Acme Corp",
        "Europe/Berlin",
        0.7,
        ["platform", "data-science", "support", "marketing", "legal", "mobile"],
        [
            "support-bot",
            "code-review",
            "search",
            "analytics",
            "docs-assistant",
            "fraud-detection",
            "sales-copilot",
            "onboarding",
        ],
        130,
    ),
    OrgPlan(
        "globex",
        "Globex",
        "America/New_York",
        0.2,
        ["research", "operations", "finance"],
        ["forecasting", "contract-review", "chatops", "reporting"],
        45,
    ),
    OrgPlan(
        "initech",
        "Initech",
        "Asia/Kolkata",
        0.1,
        ["engineering", "qa"],
        ["tps-reports", "test-generation", "ticket-triage"],
        25,
    ),
]

# (model, provider, operation, weight)
MODELS = [
    ("gpt-4o-mini", "openai", "chat", 18),
    ("gpt-4o", "openai", "chat", 9),
    ("gpt-4.1", "openai", "chat", 5),
    ("gpt-4.1-mini", "openai", "chat", 6),
    ("gpt-5", "openai", "chat", 4),
    ("gpt-5-mini", "openai", "chat", 5),
    ("o4-mini", "openai", "chat", 3),
    ("claude-sonnet-4-5", "anthropic", "chat", 10),
    ("claude-haiku-4-5", "anthropic", "chat", 5),
    ("claude-opus-4-1", "anthropic", "chat", 1.5),
    ("gemini-2.5-flash", "google", "chat", 5),
    ("gemini-2.5-pro", "google", "chat", 2),
    ("mistral-small-latest", "mistral", "chat", 2),
    ("codestral-latest", "mistral", "chat", 2),
    ("llama-3.3-70b-instruct", "together", "chat", 2),
    ("acme-finetune-v1", "azure", "chat", 0.6),  # deliberately missing from the catalog
    ("text-embedding-3-small", "openai", "embedding", 8),
    ("text-embedding-3-large", "openai", "embedding", 2),
    ("gemini-embedding-001", "google", "embedding", 1),
    ("rerank-2", "voyage", "rerank", 1.5),
    ("rerank-2-lite", "voyage", "rerank", 0.5),
]
ASSISTANTS = ["Code Helper", "HR Assistant", "Research Buddy", "Contract Reader", "Sales Coach"]
WORKFLOWS = ["invoice-extraction", "ticket-triage", "weekly-report", "lead-enrichment"]
CLIENTS = [("web", 40), ("ide", 25), ("cli", 10), ("agent", 10), ("api", 15)]
ENDPOINTS = {"chat": "/v1/chat/completions", "embedding": "/v1/embeddings", "rerank": "/v1/rerank"}
FAILURES = [(429, 0.02), (500, 0.005), (400, 0.003), (503, 0.002)]
FIRST = [
    "ada",
    "alan",
    "grace",
    "linus",
    "margaret",
    "ken",
    "barbara",
    "dennis",
    "frances",
    "john",
    "radia",
    "tim",
    "katherine",
    "edsger",
    "donald",
    "sophie",
    "yuki",
    "omar",
    "priya",
    "lars",
    "ines",
    "mateo",
    "chen",
    "amara",
]
LAST = [
    "lovelace",
    "turing",
    "hopper",
    "torvalds",
    "hamilton",
    "thompson",
    "liskov",
    "ritchie",
    "allen",
    "backus",
    "perlman",
    "berners",
    "johnson",
    "dijkstra",
    "knuth",
    "wilson",
    "tanaka",
    "haddad",
    "sharma",
    "nilsson",
    "garcia",
    "rossi",
    "wei",
    "okafor",
]


@dataclass
class Sender:
    """A token and the people whose calls go through it."""

    token: ApiToken
    org: Organization
    users: list[User]
    weight: float
    preferred: dict[int, int] = field(default_factory=dict)


def _zipf_weights(n: int) -> list[float]:
    return [1 / (rank + 1) for rank in range(n)]


def _people(org_plan: OrgPlan, org: Organization, rng: random.Random, password: str) -> list[User]:
    emails = set()
    people = []
    while len(people) < org_plan.users:
        first, last = rng.choice(FIRST), rng.choice(LAST)
        email = f"{first}.{last}{len(people)}@{org_plan.slug}.example"
        if email in emails:
            continue
        emails.add(email)
        people.append(User(email=email, name=f"{first.title()} {last.title()}", password=password))
    User.objects.bulk_create(people, ignore_conflicts=True)
    return list(User.objects.filter(email__in=emails).order_by("email"))


@transaction.atomic
def demo_tenants(rng: random.Random) -> list[Sender]:
    """Create organizations, teams, projects, people, memberships and tokens."""
    password = make_password(DEMO_PASSWORD)
    admin, _ = User.objects.update_or_create(
        email="admin@demo.test",
        defaults={
            "name": "Platform Admin",
            "password": password,
            "is_platform_admin": True,
            "is_staff": True,
            "is_superuser": True,
        },
    )
    senders: list[Sender] = []
    for plan in ORGS:
        org = Organization.objects.create(slug=plan.slug, name=plan.name, timezone=plan.timezone)
        teams = [
            Team.objects.create(organization=org, slug=s, name=s.replace("-", " ").title())
            for s in plan.teams
        ]
        projects = [
            Project.objects.create(organization=org, slug=s, name=s.replace("-", " ").title())
            for s in plan.projects
        ]
        people = _people(plan, org, rng, password)
        if plan.slug == "acme":
            people = _acme_logins(org, teams, projects, password) + people
        team_of = {}
        memberships = []
        for i, person in enumerate(people):
            team = teams[i % len(teams)] if person.email != "orgadmin@demo.test" else None
            project = projects[(i * 7) % len(projects)]
            team_of[person.id] = (team, project)
            if not person.email.endswith("@demo.test"):
                memberships.append(
                    Membership(
                        organization=org, user=person, role=Role.MEMBER, team=team, project=project
                    )
                )
        Membership.objects.bulk_create(memberships)
        senders.extend(_tokens(org, teams, projects, people, team_of, rng, plan.share))
    Membership.objects.get_or_create(
        organization=Organization.objects.get(slug="acme"), user=admin, role=Role.MEMBER
    )
    return senders


def _acme_logins(org, teams, projects, password) -> list[User]:
    def login(email, name):
        user, _ = User.objects.update_or_create(
            email=email, defaults={"name": name, "password": password}
        )
        return user

    orgadmin = login("orgadmin@demo.test", "Olivia Orgadmin")
    lead = login("lead@demo.test", "Leo Lead")
    projectadmin = login("projectadmin@demo.test", "Pat Projectadmin")
    member = login("member@demo.test", "Mia Member")
    platform, support_bot = teams[0], projects[0]
    Membership.objects.create(organization=org, user=orgadmin, role=Role.ORG_ADMIN)
    Membership.objects.create(organization=org, user=lead, role=Role.TEAM_LEAD, team=platform)
    Membership.objects.create(organization=org, user=lead, role=Role.MEMBER, team=platform)
    Membership.objects.create(
        organization=org, user=projectadmin, role=Role.PROJECT_ADMIN, project=support_bot
    )
    Membership.objects.create(organization=org, user=projectadmin, role=Role.MEMBER, team=teams[2])
    Membership.objects.create(
        organization=org, user=member, role=Role.MEMBER, team=platform, project=projects[1]
    )
    return [orgadmin, lead, projectadmin, member]


def _tokens(org, teams, projects, people, team_of, rng, share) -> list[Sender]:
    senders = []
    weights = _zipf_weights(len(people))
    # Personal tokens: roughly the heavier third of the people use their own key.
    for i, person in enumerate(people[: max(3, len(people) // 3)]):
        team, project = team_of[person.id]
        token = token_issue(
            organization=org,
            name=f"{person.display_name}'s key",
            owner=person,
            scopes=["ingest", "read"],
            default_team=team,
            default_project=project,
        ).token
        weight = weights[i] * share * 0.6
        if person.email == "member@demo.test":
            weight = max(weight, 0.01)
        senders.append(Sender(token=token, org=org, users=[person], weight=weight))
    # One gateway per team, a service account, calls from the whole team.
    for team in teams:
        members = [p for p in people if team_of[p.id][0] == team]
        if not members:
            continue
        owner = members[0]
        token = token_issue(
            organization=org,
            name=f"{team.name} gateway",
            owner=owner,
            service_account=f"svc-{team.slug}-gateway",
            scopes=["ingest"],
            default_team=team,
        ).token
        senders.append(Sender(token=token, org=org, users=members, weight=share * 0.4 / len(teams)))
    for sender in senders:
        for user in sender.users:
            sender.preferred[user.id] = rng.randrange(len(MODELS))
    return senders


class _Clock:
    """Samples timestamps with a daily and weekly rhythm and 50 % growth over the period."""

    def __init__(self, rng: random.Random, end: datetime, days: int, tz: ZoneInfo):
        self.rng, self.end, self.days, self.tz = rng, end, days, tz
        self.start = end - timedelta(days=days)
        hours = days * 24
        weights = []
        for h in range(hours):
            t = self.start + timedelta(hours=h)
            local = t.astimezone(tz)
            daily = 0.25 + math.exp(-((local.hour - 14) ** 2) / 18)
            weekly = 0.45 if local.weekday() >= 5 else 1.0
            growth = 1 + 0.5 * h / hours
            weights.append(daily * weekly * growth)
        total = sum(weights)
        self.cumulative = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cumulative.append(acc)

    def sample(self) -> datetime:
        from bisect import bisect_left

        hour = min(bisect_left(self.cumulative, self.rng.random()), len(self.cumulative) - 1)
        t = self.start + timedelta(hours=hour, seconds=self.rng.random() * 3600)
        return min(t, self.end - timedelta(seconds=1))


def _event(rng, sender: Sender, clock: _Clock, index: int, seed: int, sessions: dict) -> dict:
    user = (
        rng.choices(sender.users, weights=_zipf_weights(len(sender.users)))[0]
        if len(sender.users) > 1
        else sender.users[0]
    )
    model_index = (
        sender.preferred[user.id]
        if rng.random() < 0.7
        else rng.choices(range(len(MODELS)), weights=[m[3] for m in MODELS])[0]
    )
    model, provider, operation, _ = MODELS[model_index]
    timestamp = clock.sample()
    event = {
        "request_id": str(uuid.UUID(int=rng.getrandbits(128) ^ (seed << 64) ^ index)),
        "timestamp": timestamp.isoformat(),
        "model": model,
        "provider": provider,
        "operation": operation,
        "user": user.email,
        "client": rng.choices([c for c, _ in CLIENTS], weights=[w for _, w in CLIENTS])[0],
        "endpoint": ENDPOINTS[operation],
    }
    if operation == "chat":
        input_tokens = int(rng.lognormvariate(7.0, 1.0)) + 20
        cached = int(input_tokens * rng.choice([0, 0, 0.3, 0.5, 0.8])) if input_tokens > 1024 else 0
        cache_write = (
            int((input_tokens - cached) * 0.2)
            if provider == "anthropic" and rng.random() < 0.3
            else 0
        )
        output = int(rng.lognormvariate(5.5, 0.9)) + 1
        reasoning = int(output * 0.6) if model in {"o4-mini", "gpt-5", "gpt-5-mini"} else 0
        latency = int(250 + output * rng.uniform(8, 25) + rng.expovariate(1 / 300))
        key = (sender.token.id, user.id)
        session = sessions.get(key)
        if session is None or rng.random() < 0.12:
            session = f"sess-{uuid.UUID(int=rng.getrandbits(128)).hex[:12]}"
            sessions[key] = session
        event.update(
            input_tokens=input_tokens,
            cached_input_tokens=cached,
            cache_write_tokens=cache_write,
            output_tokens=output,
            reasoning_tokens=reasoning,
            session_id=session,
        )
    elif operation == "embedding":
        input_tokens = int(rng.lognormvariate(6.0, 0.8)) + 5
        latency = int(40 + input_tokens * 0.05 + rng.expovariate(1 / 40))
        event.update(input_tokens=input_tokens)
    else:
        input_tokens = int(rng.lognormvariate(7.5, 0.6)) + 50
        latency = int(120 + rng.expovariate(1 / 150))
        event.update(input_tokens=input_tokens)
    event["latency_ms"] = latency
    roll = rng.random()
    for status, p in FAILURES:
        if roll < p:
            event["status_code"] = status
            event["output_tokens"] = 0
            event["reasoning_tokens"] = 0
            break
        roll -= p
    if operation == "chat" and rng.random() < 0.2:
        event["assistant"] = ASSISTANTS[user.id % len(ASSISTANTS)]
    if rng.random() < 0.08:
        workflow = WORKFLOWS[(user.id + index) % len(WORKFLOWS)]
        event["workflow"] = workflow
        event["workflow_run_id"] = f"run-{rng.getrandbits(40):x}"
        event["workflow_status"] = "failed" if event.get("status_code", 200) >= 400 else "succeeded"
        event["client"] = "agent"
    if event["client"] == "api":
        event["end_user"] = f"customer-{rng.randrange(1, 400)}"
    return event


def seed_demo(
    *,
    events: int,
    days: int,
    seed: int,
    now: datetime | None = None,
    progress: Callable[[int, int, float], None] | None = None,
) -> dict:
    """Create the demo installation with `events` usage events over the last `days` days."""
    rng = random.Random(seed)
    end = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    senders = demo_tenants(rng)
    demo_pools()
    clocks = {s.org.id: _Clock(rng, end, days, ZoneInfo(s.org.timezone)) for s in senders}
    weights = [s.weight for s in senders]
    sessions: dict = {}
    started = time.monotonic()
    done = accepted = 0
    index = 0
    while done < events:
        sender = rng.choices(senders, weights=weights)[0]
        size = min(events - done, rng.randint(200, 1000))
        batch = []
        for _ in range(size):
            batch.append(_event(rng, sender, clocks[sender.org.id], index, seed, sessions))
            index += 1
        result = ingest_batch(organization=sender.org, token=sender.token, events=batch, now=end)
        accepted += result.accepted
        done += size
        if progress:
            progress(done, events, time.monotonic() - started)
    demo_budgets(now=end)
    return {"events": done, "accepted": accepted, "seconds": time.monotonic() - started}


def demo_reset() -> None:
    """Remove the demo organizations and demo people (their events go with them)."""
    Organization.objects.filter(slug__in=[o.slug for o in ORGS]).delete()
    User.objects.filter(email__endswith="@demo.test").delete()
    for plan in ORGS:
        User.objects.filter(email__endswith=f"@{plan.slug}.example").delete()


# ---------------------------------------------------------------------------------------
# Budgets and pools


def demo_pools() -> None:
    """A monthly tokens pool for Acme, before the events, so they are categorised."""
    acme = Organization.objects.get(slug="acme")
    Pool.objects.create(
        organization=acme,
        resource_type="tokens",
        period="monthly",
        limit=400_000_000,
        base_allocation=1_000_000,
    )


def _amount_for(spent_nanos: int, share: Decimal, minimum: Decimal) -> Decimal:
    """An amount of which `spent_nanos` is about `share` (so the demo shows each state)."""
    spent = Decimal(spent_nanos) / NANOS_PER_USD
    return max(minimum, (spent / share).quantize(Decimal("0.01"), rounding=ROUND_CEILING))


def demo_budgets(*, now: datetime) -> None:
    """Budgets in every state, sized from the seeded spend, and their alert history
    (recorded as not sent: the demo people have no real mailboxes)."""
    acme = Organization.objects.get(slug="acme")
    member = User.objects.get(email="member@demo.test")
    lead = User.objects.get(email="lead@demo.test")
    platform = Team.objects.get(organization=acme, slug="platform")
    support_bot = Project.objects.get(organization=acme, slug="support-bot")
    lead_key = ApiToken.objects.filter(organization=acme, owner=lead, service_account="").first()
    plans = [
        # (subject, fields, period rule, share of the amount already spent, minimum)
        (
            "user",
            {"user": member, "name": "Mia's monthly budget"},
            {"period": "monthly"},
            "0.62",
            "5",
        ),
        ("team", {"team": platform}, {"period": "weekly", "week_start": 0}, "0.85", "5"),
        ("project", {"project": support_bot}, {"period": "weekly", "week_start": 0}, "1.1", "1"),
        ("org", {}, {"period": "monthly"}, "0.4", "100"),
    ]
    if lead_key is not None:
        anchor = now.astimezone(ZoneInfo(acme.timezone)).date() - timedelta(days=9)
        plans.append(
            (
                "token",
                {"api_token": lead_key},
                {"period": "every_n_days", "every_n_days": 14, "anchor": anchor},
                "0.8",
                "5",
            )
        )
    for subject, target, rule, share, minimum in plans:
        budget = Budget(organization=acme, subject=subject, amount_usd=Decimal(1), **target, **rule)
        status = budget_statuses([budget], now)[0]
        budget.amount_usd = _amount_for(status.spent_nanos, Decimal(share), Decimal(minimum))
        budget.save()
        budget_alerts_evaluate(budget=budget, now=now, deliver=False)
    globex = Organization.objects.get(slug="globex")
    budget = Budget(organization=globex, subject="org", amount_usd=Decimal(1), period="monthly")
    spent = budget_statuses([budget], now)[0].spent_nanos
    budget.amount_usd = _amount_for(spent, Decimal("0.3"), Decimal("50"))
    budget.save()
