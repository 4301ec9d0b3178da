"""Usage events, the price catalog, and the roll-up tables that count the events.

Money is stored as integer nano-dollars (1e-9 USD): exact on SQLite and PostgreSQL alike,
and fine enough for the cheapest embedding call (micro-dollars round those to zero).

Every event and roll-up table keys on the organization first (SPEC section 8), so that
the tables can later be distributed by organization.
"""

from decimal import Decimal

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce

from accounts.models import ApiToken, Organization, Project, Team, User

NANOS_PER_USD = 1_000_000_000
BUCKET_SECONDS = 15 * 60  # roll-up grain: 15 minutes aligns with every UTC offset in use
HOUR_SECONDS = 3600
DAY_SECONDS = 86400


def nanos_to_usd(nanos: int | None) -> Decimal:
    return (Decimal(nanos or 0) / NANOS_PER_USD).quantize(Decimal("0.000000001"))


class Operation(models.TextChoices):
    CHAT = "chat"
    COMPLETION = "completion"
    EMBEDDING = "embedding"
    RERANK = "rerank"
    IMAGE = "image"
    AUDIO = "audio"
    OCR = "ocr"
    STORAGE = "storage"


# Calls whose latency is reported as "completion" latency on the dashboard.
COMPLETION_OPERATIONS = (Operation.CHAT, Operation.COMPLETION)


class ResourceType(models.TextChoices):
    TOKENS = "tokens"
    STORAGE = "storage", "Storage (bytes)"
    OCR = "ocr", "OCR (pages)"


class PoolCategory(models.TextChoices):
    ALLOCATED = "allocated"
    SURPLUS = "surplus"
    HYBRID = "hybrid"


class CostSource(models.TextChoices):
    REPORTED = "reported", "Sent with the event"
    CATALOG = "catalog", "Price catalog"
    UNPRICED = "unpriced", "No price known"


class UsageEventQuerySet(models.QuerySet):
    def in_period(self, start, end):
        """Events with start <= timestamp < end."""
        return self.filter(timestamp__gte=start, timestamp__lt=end)

    def failed(self):
        return self.filter(status_code__gte=400)

    def succeeded(self):
        return self.filter(status_code__lt=400)


# The columns of the events log's "amount" (tokens for token events, else the quantity).
AMOUNT_COLUMNS = ["resource_type", "input_tokens", "output_tokens", "quantity"]
# What a latency histogram counts of an event.
LATENCY_COLUMNS = ["operation", "latency_ms"]
# The columns of the visibility predicate (analytics.visibility.scope_parts).
SCOPE_COLUMNS = ["user_id", "team_id", "project_id", "api_token_id"]


class UsageEvent(models.Model):
    """One model call (or metered resource use), as sent to the ingestion API."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    request_id = models.CharField(max_length=200)
    timestamp = models.DateTimeField()
    model = models.CharField(max_length=200)
    provider = models.CharField(max_length=200, blank=True)
    operation = models.CharField(max_length=20, choices=Operation.choices, default=Operation.CHAT)
    input_tokens = models.PositiveBigIntegerField(default=0)
    cached_input_tokens = models.PositiveBigIntegerField(default=0)
    cache_write_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    reasoning_tokens = models.PositiveBigIntegerField(default=0)
    resource_type = models.CharField(
        max_length=10, choices=ResourceType.choices, default=ResourceType.TOKENS
    )
    quantity = models.PositiveBigIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(default=0)
    status_code = models.PositiveSmallIntegerField(default=200)
    cost_nanos = models.BigIntegerField(default=0)
    cost_source = models.CharField(max_length=10, choices=CostSource.choices)
    user = models.ForeignKey(User, null=True, blank=True, on_delete=models.SET_NULL, db_index=False)
    end_user = models.CharField(max_length=200, blank=True)
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.SET_NULL, db_index=False)
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.SET_NULL, db_index=False
    )
    api_token = models.ForeignKey(
        ApiToken, null=True, blank=True, on_delete=models.SET_NULL, db_index=False
    )
    session_id = models.CharField(max_length=200, blank=True)
    assistant = models.CharField(max_length=200, blank=True)
    workflow = models.CharField(max_length=200, blank=True)
    workflow_run_id = models.CharField(max_length=200, blank=True)
    workflow_status = models.CharField(max_length=200, blank=True)
    client = models.CharField(max_length=200, blank=True)
    endpoint = models.CharField(max_length=200, blank=True)
    pool_category = models.CharField(max_length=10, choices=PoolCategory.choices, blank=True)
    metadata = models.JSONField(null=True, blank=True)
    ingested_at = models.DateTimeField(auto_now_add=True)

    objects = UsageEventQuerySet.as_manager()

    class Meta:
        constraints = [
            # The idempotency key: a retried event conflicts here and is counted as duplicate.
            models.UniqueConstraint(
                fields=["organization", "request_id"], name="event_request_id_per_org"
            ),
        ]
        indexes = [
            # Events log pages (newest first, keyset on (timestamp, id)), the raw edges of
            # roll-up queries, and short ranges that are read raw.
            models.Index(fields=["organization", "timestamp", "id"], name="event_org_time"),
            # The parts of a partial scope (own events, own tokens, a team, a project), each
            # in the log's (timestamp, id) order: the log reads a member's or a team lead's
            # page part by part and merges (eventlog.log_parts), instead of sorting every
            # event of the scope; with the time column they also serve raw reads of a range.
            # They carry the log's amount (AMOUNT_COLUMNS) and the other columns of the
            # scope's predicate (which each part's read repeats), so a part's page and
            # count are read from the index alone, an amount filter included; and the
            # operation and latency, so the raw latency counts of a partial scope (a
            # chart's edges, the pieces moved to local days) are too.
            *(
                models.Index(
                    fields=["organization", column, "timestamp", "id"],
                    name=f"event_org_{short}_time_id",
                    include=[
                        *AMOUNT_COLUMNS,
                        *LATENCY_COLUMNS,
                        *(c for c in SCOPE_COLUMNS if c != f"{column}_id"),
                    ],
                )
                for column, short in (
                    ("user", "user"),
                    ("team", "team"),
                    ("project", "project"),
                    ("api_token", "token"),
                )
            ),
            # The log sorted by cost (the most asked-for sort after time): a whole
            # organization's, and a member's own events and tokens', in (cost, id) order
            # (with the time, so the period is checked in the index).
            models.Index(fields=["organization", "cost_nanos", "id"], name="event_org_cost"),
            models.Index(
                fields=["organization", "user", "cost_nanos", "id"],
                name="event_org_user_cost",
                include=["timestamp", *(c for c in SCOPE_COLUMNS if c != "user_id")],
            ),
            models.Index(
                fields=["organization", "api_token", "cost_nanos", "id"],
                name="event_org_token_cost",
                include=["timestamp", *(c for c in SCOPE_COLUMNS if c != "api_token_id")],
            ),
            # A model filter read raw (latency percentiles of a scope the model histogram
            # cannot answer: a project admin's, say): the model's events of the range with
            # what a percentile and the scope's predicate need, from the index alone.
            models.Index(
                fields=["organization", "model", "timestamp", "id"],
                name="event_org_model_time_id",
                include=["operation", "latency_ms", "status_code", *SCOPE_COLUMNS],
            ),
            # A team and a model together, read raw (a project admin's or a member's
            # latency percentiles under a team + model filter): the team's events of that
            # model alone, a few per cent of either the team's or the model's.
            models.Index(
                fields=["organization", "team", "model", "timestamp"],
                name="event_org_team_model_time",
                include=[
                    "operation",
                    "latency_ms",
                    "status_code",
                    *(c for c in SCOPE_COLUMNS if c != "team_id"),
                ],
            ),
            # The chat-session filter; most events of batch callers carry no session.
            models.Index(
                fields=["organization", "session_id", "timestamp"],
                name="event_org_session",
                condition=~Q(session_id=""),
            ),
        ]

    def __str__(self):
        return f"{self.request_id} ({self.model})"

    @property
    def cost_usd(self) -> Decimal:
        return nanos_to_usd(self.cost_nanos)

    @property
    def failed(self) -> bool:
        return self.status_code >= 400

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class Price(models.Model):
    """Prices of one model from a date on. organization=None is the shipped catalog."""

    organization = models.ForeignKey(
        Organization,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        help_text="Empty for the default catalog; set for an organization's override.",
    )
    model = models.CharField(max_length=200)
    provider = models.CharField(max_length=200, blank=True)
    operation = models.CharField(max_length=20, choices=Operation.choices, default=Operation.CHAT)
    effective_from = models.DateField()
    input_per_mtok = models.DecimalField(max_digits=20, decimal_places=10, default=0)
    cached_input_per_mtok = models.DecimalField(
        max_digits=20,
        decimal_places=10,
        null=True,
        blank=True,
        help_text="Empty: cached input is billed at the input price.",
    )
    cache_write_per_mtok = models.DecimalField(
        max_digits=20,
        decimal_places=10,
        null=True,
        blank=True,
        help_text="Empty: cache writes are billed at the input price.",
    )
    output_per_mtok = models.DecimalField(max_digits=20, decimal_places=10, default=0)
    per_unit = models.DecimalField(
        max_digits=20,
        decimal_places=12,
        default=0,
        help_text="Price per unit for non-token resources (per byte of storage, per OCR page).",
    )

    class Meta:
        ordering = ["model", "-effective_from"]
        constraints = [
            models.UniqueConstraint(
                Coalesce("organization", Value(0)),
                F("model"),
                F("provider"),
                F("effective_from"),
                name="price_unique",
            )
        ]

    def __str__(self):
        return f"{self.model} from {self.effective_from}"


class RollupMeasures(models.Model):
    """Additive measures shared by every roll-up. Each one is a plain sum (or max)."""

    requests = models.BigIntegerField(default=0)
    input_tokens = models.BigIntegerField(default=0)
    cached_input_tokens = models.BigIntegerField(default=0)
    cache_write_tokens = models.BigIntegerField(default=0)
    output_tokens = models.BigIntegerField(default=0)
    reasoning_tokens = models.BigIntegerField(default=0)
    quantity = models.BigIntegerField(default=0)
    cost_nanos = models.BigIntegerField(default=0)
    latency_ms_sum = models.BigIntegerField(default=0)
    latency_ms_max = models.BigIntegerField(default=0)
    unpriced_requests = models.BigIntegerField(default=0)

    class Meta:
        abstract = True


class OrgUsageRollup(RollupMeasures):
    """Narrow roll-up keys: organization x time bucket x model x operation x status."""

    pk = models.CompositePrimaryKey("organization", "bucket", "model", "operation", "status_code")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()
    model = models.CharField(max_length=200)
    operation = models.CharField(max_length=20)
    status_code = models.PositiveSmallIntegerField()

    class Meta:
        abstract = True


class OrgUsage15m(OrgUsageRollup):  # noqa: DJ008
    """Narrow roll-up: organization x 15 minutes x model x operation x status.

    Serves org-wide widgets (no team/project/user/token filter) for any time zone,
    including +05:30 and +05:45, because every local hour and day boundary in use falls on
    a 15-minute mark. bucket = UTC epoch seconds of the bucket's start.
    """

    class Meta:
        db_table = "metering_org_usage_15m"


class OrgUsageHourly(OrgUsageRollup):  # noqa: DJ008
    """The narrow roll-up by UTC hour: local hours and days in whole-hour zones."""

    class Meta:
        db_table = "metering_org_usage_hourly"


class OrgUsageDaily(OrgUsageRollup):  # noqa: DJ008
    """The narrow roll-up by UTC day: the whole days inside any range, and UTC-day charts."""

    class Meta:
        db_table = "metering_org_usage_daily"


class ScopeUsageRollup(RollupMeasures):
    """Wide roll-up keys: adds team, project, user, API token, assistant and workflow.

    Read only when a filter or the viewer's scope needs one of those dimensions; the
    filter then narrows it through the per-dimension indexes. Missing ids are 0 and
    missing labels '' (key columns cannot be NULL).
    """

    pk = models.CompositePrimaryKey(
        "organization",
        "bucket",
        "team_id",
        "project_id",
        "user_id",
        "api_token_id",
        "model",
        "operation",
        "status_code",
        "assistant",
        "workflow",
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()
    team_id = models.BigIntegerField()
    project_id = models.BigIntegerField()
    user_id = models.BigIntegerField()
    api_token_id = models.BigIntegerField()
    model = models.CharField(max_length=200)
    operation = models.CharField(max_length=20)
    status_code = models.PositiveSmallIntegerField()
    assistant = models.CharField(max_length=200)
    workflow = models.CharField(max_length=200)

    class Meta:
        abstract = True


class ScopeUsage15m(ScopeUsageRollup):  # noqa: DJ008
    """The wide roll-up by 15 minutes (every zone's local hours and days)."""

    class Meta:
        db_table = "metering_scope_usage_15m"
        indexes = [
            # One index per scope dimension: a team lead's, project admin's or member's
            # query (and a team/project/user/token filter) reads only its own rows.
            models.Index(fields=["organization", "team_id", "bucket"], name="scope15_team"),
            models.Index(fields=["organization", "project_id", "bucket"], name="scope15_project"),
            models.Index(fields=["organization", "user_id", "bucket"], name="scope15_user"),
            models.Index(fields=["organization", "api_token_id", "bucket"], name="scope15_token"),
        ]


class ScopeUsageDaily(ScopeUsageRollup):  # noqa: DJ008
    """The wide roll-up by UTC day (about 4x fewer rows): whole days inside a range."""

    class Meta:
        db_table = "metering_scope_usage_daily"
        indexes = [
            models.Index(fields=["organization", "team_id", "bucket"], name="scoped_team"),
            # A team + model filter: that model's rows of the team, not all of the team's.
            models.Index(
                fields=["organization", "team_id", "model", "bucket"], name="scoped_team_model"
            ),
            models.Index(fields=["organization", "project_id", "bucket"], name="scoped_project"),
            models.Index(fields=["organization", "user_id", "bucket"], name="scoped_user"),
            models.Index(fields=["organization", "api_token_id", "bucket"], name="scoped_token"),
        ]


class OrgPeopleRollup(RollupMeasures):
    """Who used it, for whole organizations: organization x time bucket x user x API
    token, with failed requests counted (there is no status column to tell them).

    Serves, for viewers who see whole organizations and when no model, operation, status
    or scope filter is chosen, what the narrow roll-up cannot without the wide one's
    every-dimension rows: active users (distinct count), the top users and the ranked
    API tokens. People work with few tokens, so a day holds about as many rows as active
    people (the labels are counted apart, in OrgLabelRollup: together they were five times
    the rows). Missing ids are 0.
    """

    pk = models.CompositePrimaryKey("organization", "bucket", "user_id", "api_token_id")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()
    user_id = models.BigIntegerField()
    api_token_id = models.BigIntegerField()
    failed_requests = models.BigIntegerField(default=0)

    class Meta:
        abstract = True


class OrgPeopleHourly(OrgPeopleRollup):  # noqa: DJ008
    """The people roll-up by UTC hour: the partial days at the edges of a range."""

    class Meta:
        db_table = "metering_org_people_hourly"


class OrgPeopleDaily(OrgPeopleRollup):  # noqa: DJ008
    """The people roll-up by UTC day: the whole days inside a range."""

    class Meta:
        db_table = "metering_org_people_daily"


class OrgLabelRollup(models.Model):
    """Which assistants and workflows were used, for whole organizations: organization x
    time bucket x assistant x workflow, with the requests. Serves the active assistants
    and workflows (distinct counts) in a few rows a day. Missing labels are ''."""

    pk = models.CompositePrimaryKey("organization", "bucket", "assistant", "workflow")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()
    assistant = models.CharField(max_length=200)
    workflow = models.CharField(max_length=200)
    requests = models.BigIntegerField(default=0)

    class Meta:
        abstract = True


class OrgLabelHourly(OrgLabelRollup):  # noqa: DJ008
    """The label roll-up by UTC hour: the partial days at the edges of a range."""

    class Meta:
        db_table = "metering_org_label_hourly"


class OrgLabelDaily(OrgLabelRollup):  # noqa: DJ008
    """The label roll-up by UTC day: the whole days inside a range."""

    class Meta:
        db_table = "metering_org_label_daily"


class ScopeKeyDaily(models.Model):  # noqa: DJ008
    """Which (team, project, user, API token) combinations sent events on a UTC day, and
    how many: the columns of the visibility predicate and nothing else.

    Serves the filter bar's option lists for partial scopes (the teams, projects, people
    and tokens a team lead, project admin or member has seen usage of) in a few thousand
    rows, where the wide roll-up holds a row per model, status, assistant and workflow
    as well. Missing ids are 0.
    """

    pk = models.CompositePrimaryKey(
        "organization", "bucket", "team_id", "project_id", "user_id", "api_token_id"
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()  # UTC day start, epoch seconds
    team_id = models.BigIntegerField()
    project_id = models.BigIntegerField()
    user_id = models.BigIntegerField()
    api_token_id = models.BigIntegerField()
    requests = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_scope_key_daily"


class ScopeActorDaily(RollupMeasures):  # noqa: DJ008
    """Who used it inside a partial scope, by UTC day: organization x day x team x
    project x user x API token x operation x assistant x workflow, with failed requests
    counted (there is no status column to tell them).

    Serves partial scopes (a team lead, a project admin, a member) and team / project /
    user / token filters whenever no model or status filter is chosen and no model is
    asked for: their metrics, series and latency averages (by operation), top users,
    ranked tokens, and active users, assistants and workflows (distinct counts). It has
    every column of the visibility predicate, so it is read behind the gate like the wide
    roll-up, which also splits every row by model and status: a quarter of its rows
    (134k against 520k for the large demo organization over 90 days). The partial days
    at a range's edges come from the wide 15-minute roll-up. Missing ids are 0 and
    missing labels ''.
    """

    pk = models.CompositePrimaryKey(
        "organization",
        "bucket",
        "team_id",
        "project_id",
        "user_id",
        "api_token_id",
        "operation",
        "assistant",
        "workflow",
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()  # UTC day start, epoch seconds
    team_id = models.BigIntegerField()
    project_id = models.BigIntegerField()
    user_id = models.BigIntegerField()
    api_token_id = models.BigIntegerField()
    operation = models.CharField(max_length=20)
    assistant = models.CharField(max_length=200)
    workflow = models.CharField(max_length=200)
    failed_requests = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_scope_actor_daily"
        indexes = [
            models.Index(fields=["organization", "team_id", "bucket"], name="scopeactor_team"),
            models.Index(
                fields=["organization", "project_id", "bucket"], name="scopeactor_project"
            ),
            models.Index(fields=["organization", "user_id", "bucket"], name="scopeactor_user"),
            models.Index(
                fields=["organization", "api_token_id", "bucket"], name="scopeactor_token"
            ),
        ]


class RollupPending(models.Model):  # noqa: DJ008
    """Events stored and not yet counted in the roll-ups (PostgreSQL ingestion).

    Ingestion answers once an event, its row here and its budget spend are committed;
    `aggregates.rollups_fold` counts the events listed here in every roll-up and deletes
    their rows, in one transaction. A worker folds right after each batch, and every
    read of the roll-ups folds what is still listed first (`visibility.viewer_scope`),
    so what a reader sees is exact whether or not a worker runs. No foreign key: an
    event removed before its fold is skipped.
    """

    pk = models.CompositePrimaryKey("organization", "event_id")
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, db_constraint=False, db_index=False
    )
    event_id = models.BigIntegerField()

    class Meta:
        db_table = "metering_rollup_pending"


class LatencyHistogramOrg(models.Model):
    """Counts of events per log-spaced latency bucket, per organization, time bucket and
    operation. p95 is read from here for org-wide views: the buckets grow by
    LATENCY_GAMMA, so the estimate is within about 2 % of the exact value."""

    pk = models.CompositePrimaryKey("organization", "bucket", "operation", "latency_bucket")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()
    operation = models.CharField(max_length=20)
    latency_bucket = models.SmallIntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        abstract = True


class LatencyHistogramHourly(LatencyHistogramOrg):  # noqa: DJ008
    """The org-wide latency histogram by UTC hour."""

    class Meta:
        db_table = "metering_latency_hist_hourly"


class LatencyHistogramDaily(LatencyHistogramOrg):  # noqa: DJ008
    """The org-wide latency histogram by UTC day: the whole days of a range (about 25x
    fewer rows than by hour), and UTC-day charts."""

    class Meta:
        db_table = "metering_latency_hist_daily"


class LatencyHistogramScopeDaily(models.Model):  # noqa: DJ008
    """The latency histogram per organization, UTC day, team, project, token, user and
    operation: every column of the visibility predicate, so any scope reads its own rows.

    It serves p95 for team leads, project admins and members and for team, project, user
    and token filters, whose exact answer would otherwise sort every event of the scope.
    Users mostly work within one team and project, so the user column adds few rows
    (292k instead of 258k for 1M demo events). Missing ids are 0.
    """

    pk = models.CompositePrimaryKey(
        "organization",
        "bucket",
        "team_id",
        "project_id",
        "api_token_id",
        "user_id",
        "operation",
        "latency_bucket",
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()  # UTC day start, epoch seconds
    team_id = models.BigIntegerField()
    project_id = models.BigIntegerField()
    api_token_id = models.BigIntegerField()
    user_id = models.BigIntegerField()
    operation = models.CharField(max_length=20)
    latency_bucket = models.SmallIntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_latency_hist_scope_daily"
        indexes = [
            models.Index(fields=["organization", "team_id", "bucket"], name="lathist_team"),
            models.Index(fields=["organization", "project_id", "bucket"], name="lathist_project"),
            models.Index(fields=["organization", "api_token_id", "bucket"], name="lathist_token"),
            models.Index(fields=["organization", "user_id", "bucket"], name="lathist_user"),
        ]


class LatencyHistogramModelDaily(models.Model):  # noqa: DJ008
    """The latency histogram per organization, UTC day, team, model and operation.

    It serves p95 under a model filter (alone, or with a team filter whose teams the
    viewer sees whole: an org admin, or a team lead on their own team), which the other
    histograms cannot tell apart and raw events answer by sorting every call of the model.
    Missing team ids are 0.
    """

    pk = models.CompositePrimaryKey(
        "organization", "bucket", "team_id", "model", "operation", "latency_bucket"
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    bucket = models.BigIntegerField()  # UTC day start, epoch seconds
    team_id = models.BigIntegerField()
    model = models.CharField(max_length=200)
    operation = models.CharField(max_length=20)
    latency_bucket = models.SmallIntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_latency_hist_model_daily"
        # Every read names a model (the family serves model filters): its rows of the
        # range, not every row of the organization's range.
        indexes = [
            models.Index(fields=["organization", "model", "bucket"], name="lathist_model"),
        ]


class HistogramPart(models.TextChoices):
    """Which column of the visibility predicate a part histogram row counts by."""

    TEAM = "team", "Team"
    PROJECT = "project", "Project"
    USER = "user", "User"
    TOKEN = "token", "API token"


class LatencyHistogramPartDaily(models.Model):  # noqa: DJ008
    """The latency histogram per organization, part of a scope (one team, project, user
    or API token), UTC day and operation: each event counts once under each of its
    team, project, user and token.

    A partial scope (a team lead: their team, own events, own tokens) is the union of such
    parts. Its histogram is the parts' histograms combined by inclusion-exclusion, the
    overlaps (events of the team sent with an own token) read from the scope histogram,
    where they are small: a team's 90 days are about 30k rows here against 210k there.
    Keyed by part first, so one part's days are one index range.
    """

    pk = models.CompositePrimaryKey(
        "organization", "part", "part_id", "bucket", "operation", "latency_bucket"
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    part = models.CharField(max_length=8, choices=HistogramPart.choices)
    part_id = models.BigIntegerField()
    bucket = models.BigIntegerField()  # UTC day start, epoch seconds
    operation = models.CharField(max_length=20)
    latency_bucket = models.SmallIntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_latency_hist_part_daily"


# ---------------------------------------------------------------------------------------
# Viewer roll-ups: each partial scope counted on its own


class ViewerLinkKind(models.TextChoices):
    """What a viewer sees besides their own events (see ViewerLink)."""

    TEAM = "team", "Team they lead"
    PROJECT = "project", "Project they administer"
    TOKEN = "token", "API token they own"
    # Not a part: the viewer's rows are being recounted (no scope has it, so no reader
    # takes them meanwhile; no event matches it).
    REBUILDING = "rebuild", "Rows being recounted"


class ViewerCalendar(models.Model):  # noqa: DJ008
    """An organization whose viewer roll-ups are kept, and the zone of their days.

    Present once `metering.viewers.build_organization` began counting the stored events of
    the organization into them (day by day, each day in its own short transaction), and
    `ready` when it finished; from the start every fold, ingest, bulk load and day
    rebuild keeps them. Their days are local calendar days in `timezone` (the
    organization's when built), so a chart of local days in that zone reads whole rows
    and moves no pieces.
    """

    organization = models.OneToOneField(
        Organization, on_delete=models.CASCADE, primary_key=True, related_name="+"
    )
    timezone = models.CharField(max_length=64)
    ready = models.BooleanField(default=False)

    class Meta:
        db_table = "metering_viewer_calendar"


class ViewerLink(models.Model):  # noqa: DJ008
    """One part of a viewer's partial scope in an organization besides their own events:
    a team they lead, a project they administer or an API token they own.

    The viewer roll-ups count an event once for each viewer who sees it: its sender, and
    every viewer linked to its team, project or token. The links are those the rows were
    counted with; a reader uses the rows only while the links equal the viewer's scope
    (`metering.viewers.viewer_rows_ready`), else a rebuild is due and the shared
    roll-ups answer.
    """

    pk = models.CompositePrimaryKey("organization", "kind", "part_id", "viewer_id")
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="+", db_index=False
    )
    kind = models.CharField(max_length=8, choices=ViewerLinkKind.choices)
    part_id = models.BigIntegerField()
    viewer_id = models.BigIntegerField()

    class Meta:
        db_table = "metering_viewer_link"
        indexes = [models.Index(fields=["organization", "viewer_id"], name="viewerlink_viewer")]


class ViewerUsageDaily(RollupMeasures):  # noqa: DJ008
    """One viewer's partial scope (own events, teams they lead, projects they administer,
    tokens they own) by organization, local day, model, operation and status.

    Serves a team lead, project admin or member with no team / project / user / token
    filter what the org roll-up serves an org admin (metrics, series, models, top models):
    a project admin's 90 days are a few thousand rows, where the shared roll-ups hold
    the union of their parts in hundreds of thousands. bucket = UTC epoch of the local
    midnight (ViewerCalendar's zone) that starts the day.
    """

    pk = models.CompositePrimaryKey(
        "organization", "viewer_id", "bucket", "model", "operation", "status_code"
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    viewer_id = models.BigIntegerField()
    bucket = models.BigIntegerField()
    model = models.CharField(max_length=200)
    operation = models.CharField(max_length=20)
    status_code = models.PositiveSmallIntegerField()

    class Meta:
        db_table = "metering_viewer_usage_daily"


class ViewerUsageHourly(RollupMeasures):  # noqa: DJ008
    """ViewerUsageDaily by UTC hour: the partial days at the edges of a range (a month's
    metrics have four), in hours instead of the wide 15-minute roll-up's union of parts."""

    pk = models.CompositePrimaryKey(
        "organization", "viewer_id", "bucket", "model", "operation", "status_code"
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    viewer_id = models.BigIntegerField()
    bucket = models.BigIntegerField()  # UTC hour start, epoch seconds
    model = models.CharField(max_length=200)
    operation = models.CharField(max_length=20)
    status_code = models.PositiveSmallIntegerField()

    class Meta:
        db_table = "metering_viewer_usage_hourly"


class ViewerActorDaily(RollupMeasures):  # noqa: DJ008
    """Who used one viewer's partial scope, by organization and local day: user, API
    token, assistant and workflow, with failed requests counted (no status column).

    Serves a partial scope's active users, assistants and workflows (distinct counts),
    top users and ranked tokens, as OrgPeopleDaily and OrgLabelDaily do for whole organizations. Missing
    ids are 0 and missing labels ''.
    """

    pk = models.CompositePrimaryKey(
        "organization", "viewer_id", "bucket", "user_id", "api_token_id", "assistant", "workflow"
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    viewer_id = models.BigIntegerField()
    bucket = models.BigIntegerField()
    user_id = models.BigIntegerField()
    api_token_id = models.BigIntegerField()
    assistant = models.CharField(max_length=200)
    workflow = models.CharField(max_length=200)
    failed_requests = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_viewer_actor_daily"


class ViewerActorHourly(RollupMeasures):  # noqa: DJ008
    """ViewerActorDaily by UTC hour: the partial days at the edges of a range."""

    pk = models.CompositePrimaryKey(
        "organization", "viewer_id", "bucket", "user_id", "api_token_id", "assistant", "workflow"
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    viewer_id = models.BigIntegerField()
    bucket = models.BigIntegerField()  # UTC hour start, epoch seconds
    user_id = models.BigIntegerField()
    api_token_id = models.BigIntegerField()
    assistant = models.CharField(max_length=200)
    workflow = models.CharField(max_length=200)
    failed_requests = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_viewer_actor_hourly"


class ViewerHistogramDaily(models.Model):  # noqa: DJ008
    """One viewer's partial scope's latency histogram by organization, local day and
    operation: their p95 in one index range, where the part histograms add and subtract
    the parts' and overlaps' rows."""

    pk = models.CompositePrimaryKey(
        "organization", "viewer_id", "bucket", "operation", "latency_bucket"
    )
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    viewer_id = models.BigIntegerField()
    bucket = models.BigIntegerField()
    operation = models.CharField(max_length=20)
    latency_bucket = models.SmallIntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_viewer_hist_daily"


# ---------------------------------------------------------------------------------------
# Budgets, spend alerts and resource pools (SPEC section 5)


class PeriodKind(models.TextChoices):
    DAILY = "daily", "Daily"
    WEEKLY = "weekly", "Weekly"
    MONTHLY = "monthly", "Monthly"
    EVERY_N_DAYS = "every_n_days", "Every N days"


class Weekday(models.IntegerChoices):
    MONDAY = 0
    TUESDAY = 1
    WEDNESDAY = 2
    THURSDAY = 3
    FRIDAY = 4
    SATURDAY = 5
    SUNDAY = 6


class PeriodRule(models.Model):
    """How a budget or pool splits time into periods, in its organization's time zone.

    Periods always start at a local midnight, so every boundary falls on a 15-minute mark
    of UTC and the 15-minute counters below sum to a period exactly. budgets.period_at()
    does the calendar arithmetic.
    """

    period = models.CharField(max_length=16, choices=PeriodKind.choices, default="monthly")
    week_start = models.PositiveSmallIntegerField(
        choices=Weekday.choices,
        default=Weekday.MONDAY,
        help_text="Weekly periods start on this day.",
    )
    month_day = models.PositiveSmallIntegerField(
        default=1,
        validators=[MinValueValidator(1), MaxValueValidator(31)],
        help_text="Monthly periods start on this day of the month (the last day in shorter months).",
    )
    every_n_days = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1), MaxValueValidator(366)],
        help_text="Length in days of an every-N-days period.",
    )
    anchor = models.DateField(
        null=True, blank=True, help_text="An every-N-days period starts on this date."
    )

    class Meta:
        abstract = True


class BudgetSubject(models.TextChoices):
    """What a budget (and a spend counter row) is about."""

    ORGANIZATION = "org", "Organization"
    TEAM = "team", "Team"
    PROJECT = "project", "Project"
    USER = "user", "User"
    TOKEN = "token", "API token"


DEFAULT_THRESHOLDS = [50, 80, 100]


def default_thresholds() -> list[int]:
    return list(DEFAULT_THRESHOLDS)


class Budget(PeriodRule):
    """An amount of USD one subject may spend per period.

    Spend is never stored on the budget: it is summed from BudgetSpend15m over the
    current period's bounds, so changing the period or the amount takes effect at once
    and spend already made in the new period stays counted.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="budgets", db_index=False
    )
    subject = models.CharField(max_length=8, choices=BudgetSubject.choices)
    user = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets"
    )
    team = models.ForeignKey(
        Team, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets"
    )
    project = models.ForeignKey(
        Project, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets"
    )
    api_token = models.ForeignKey(
        ApiToken, null=True, blank=True, on_delete=models.CASCADE, related_name="budgets"
    )
    name = models.CharField(max_length=200, blank=True)
    amount_usd = models.DecimalField(
        max_digits=16, decimal_places=4, validators=[MinValueValidator(Decimal("0.0001"))]
    )
    thresholds = models.JSONField(
        default=default_thresholds, help_text="Percentages of the amount that send an alert."
    )
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    changed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the amount or the period rule last changed."
    )
    created_by = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        ordering = ["organization", "subject", "id"]
        constraints = [
            # Exactly the column that `subject` names is set (none for the organization).
            models.CheckConstraint(
                condition=(
                    Q(
                        subject="org",
                        user__isnull=True,
                        team__isnull=True,
                        project__isnull=True,
                        api_token__isnull=True,
                    )
                    | Q(
                        subject="user",
                        user__isnull=False,
                        team__isnull=True,
                        project__isnull=True,
                        api_token__isnull=True,
                    )
                    | Q(
                        subject="team",
                        user__isnull=True,
                        team__isnull=False,
                        project__isnull=True,
                        api_token__isnull=True,
                    )
                    | Q(
                        subject="project",
                        user__isnull=True,
                        team__isnull=True,
                        project__isnull=False,
                        api_token__isnull=True,
                    )
                    | Q(
                        subject="token",
                        user__isnull=True,
                        team__isnull=True,
                        project__isnull=True,
                        api_token__isnull=False,
                    )
                ),
                name="budget_subject_column",
            ),
        ]
        indexes = [
            # Ingestion and the check API load an organization's active budgets.
            models.Index(fields=["organization", "is_active"], name="budget_org_active"),
        ]

    def __str__(self):
        return self.name or f"{self.get_subject_display()} budget"

    @property
    def subject_id(self) -> int:
        """The id the spend counter keys this budget's subject by."""
        return {
            BudgetSubject.ORGANIZATION: self.organization_id,
            BudgetSubject.USER: self.user_id,
            BudgetSubject.TEAM: self.team_id,
            BudgetSubject.PROJECT: self.project_id,
            BudgetSubject.TOKEN: self.api_token_id,
        }[self.subject]

    @property
    def limit_nanos(self) -> int:
        return int(self.amount_usd * NANOS_PER_USD)


class BudgetSpend15m(models.Model):  # noqa: DJ008
    """Spend (cost) per budget subject per 15 minutes, counted at ingest.

    One row per (subject, id, bucket) with any cost; every event adds to its
    organization, user, team, project and token rows. A budget's spend is one indexed
    range sum here (a month is at most 2,976 rows), whatever the budget's period rule,
    so the check API stays cheap and a budget created or changed today sees all spend
    already made in its period.
    """

    pk = models.CompositePrimaryKey("organization", "subject", "subject_id", "bucket")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    subject = models.CharField(max_length=8, choices=BudgetSubject.choices)
    subject_id = models.BigIntegerField()
    bucket = models.BigIntegerField()  # UTC epoch seconds of the bucket's start
    cost_nanos = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_budget_spend_15m"
        # PostgreSQL also gets a covering index (organization, subject, subject_id,
        # bucket) INCLUDE (cost_nanos), created by migration 0002 with SQL: budget checks
        # then sum one subject's range with an index-only scan (the heap rows of one
        # subject are scattered, one page per row). SQLite has no INCLUDE (and its rowid
        # lookups are cheap), so the model does not declare it.


class AlertWebhook(models.Model):
    """An HTTPS endpoint that receives every budget alert of its organization as JSON,
    signed with HMAC-SHA256 of `secret` (see budgets.webhook_signature)."""

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="alert_webhooks"
    )
    url = models.URLField(max_length=500)
    description = models.CharField(max_length=200, blank=True)
    secret = models.CharField(max_length=100, editable=False)
    is_active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["organization", "id"]

    def __str__(self):
        return self.description or self.url


class AlertState(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed"
    SKIPPED = "skipped", "Not sent"


class BudgetAlert(models.Model):
    """One threshold crossed in one period of one budget: exists at most once.

    The unique constraint is what makes an alert go out exactly once per threshold and
    period, however many ingest transactions and task retries see the crossing: each
    inserts if absent, and only the inserter delivers. Delivery state is per channel
    (email_sent_at, webhooks_done), so a retry never repeats a channel that succeeded.
    """

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    budget = models.ForeignKey(Budget, on_delete=models.CASCADE, related_name="alerts")
    period_start = models.DateTimeField()
    period_end = models.DateTimeField()
    threshold = models.PositiveSmallIntegerField()
    spent_nanos = models.BigIntegerField()
    limit_nanos = models.BigIntegerField()
    created_at = models.DateTimeField(auto_now_add=True)
    state = models.CharField(max_length=10, choices=AlertState.choices, default="pending")
    attempts = models.PositiveSmallIntegerField(default=0)
    claimed_until = models.DateTimeField(null=True, blank=True)
    email_recipients = models.JSONField(default=list, blank=True)
    email_sent_at = models.DateTimeField(null=True, blank=True)
    webhooks_done = models.JSONField(default=list, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    last_error = models.TextField(blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "budget", "period_start", "threshold"],
                name="budget_alert_once_per_period",
            ),
        ]
        indexes = [
            # The sweep re-sends alerts whose delivery has not finished.
            models.Index(
                fields=["state", "created_at"],
                name="budget_alert_pending",
                condition=Q(state="pending"),
            ),
        ]

    def __str__(self):
        return f"{self.budget} reached {self.threshold} %"


class Pool(PeriodRule):
    """An organization's limit on one resource type per period, with a base per user.

    Consumption within a user's base is `allocated`; beyond it, it draws on the surplus
    (the limit minus every base allocation) and is `surplus`; an event that crosses the
    line is `hybrid`. Amounts are tokens (input + output), bytes or OCR pages.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="pools", db_index=False
    )
    resource_type = models.CharField(max_length=10, choices=ResourceType.choices)
    limit = models.PositiveBigIntegerField(help_text="The organization's total per period.")
    base_allocation = models.PositiveBigIntegerField(
        help_text="Each user's base per period (override it per user below)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    changed_at = models.DateTimeField(
        null=True, blank=True, help_text="When the limit, a base or the period rule changed."
    )

    class Meta:
        ordering = ["organization", "resource_type"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "resource_type"], name="pool_per_org_resource"
            )
        ]

    def __str__(self):
        return f"{self.get_resource_type_display()} pool"


class PoolAllocation(models.Model):
    """A user's own base allocation in a pool, instead of the pool's default."""

    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE, related_name="allocations")
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="pool_allocations")
    base_allocation = models.PositiveBigIntegerField()

    class Meta:
        ordering = ["pool", "user"]
        constraints = [
            models.UniqueConstraint(
                fields=["organization", "pool", "user"], name="pool_allocation_per_user"
            )
        ]

    def __str__(self):
        return f"{self.user} in {self.pool}"


class PoolCounter(models.Model):  # noqa: DJ008
    """What one user used of one pool in one period: the row ingestion locks.

    Ingestion locks these rows (in key order) before it categorises events, so two
    concurrent batches for the same user cannot both take the last of an allocation.
    user_id 0 counts events without a user (they have no base: always surplus).
    """

    pk = models.CompositePrimaryKey("organization", "pool", "user_id", "period_start")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    pool = models.ForeignKey(Pool, on_delete=models.CASCADE)
    user_id = models.BigIntegerField()
    period_start = models.BigIntegerField()  # UTC epoch seconds
    allocated_used = models.BigIntegerField(default=0)
    surplus_used = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_pool_counter"


class PoolUsage15m(models.Model):  # noqa: DJ008
    """Consumption per resource type, user and 15 minutes, split by pool category.

    Feeds the pools page (surplus fluctuation and consumption charts) and seeds a
    PoolCounter when a period's row is first needed. `unpooled` is consumption while
    the organization had no pool for the resource type.
    """

    pk = models.CompositePrimaryKey("organization", "resource_type", "bucket", "user_id")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, db_index=False)
    resource_type = models.CharField(max_length=10)
    bucket = models.BigIntegerField()
    user_id = models.BigIntegerField()
    allocated = models.BigIntegerField(default=0)
    surplus = models.BigIntegerField(default=0)
    unpooled = models.BigIntegerField(default=0)
    events = models.BigIntegerField(default=0)
    hybrid_events = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_pool_usage_15m"
        indexes = [
            # One user's consumption (user pages, seeding a PoolCounter).
            models.Index(
                fields=["organization", "resource_type", "user_id", "bucket"],
                name="pool15_user",
            ),
        ]
