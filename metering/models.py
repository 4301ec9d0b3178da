"""Usage events, the price catalog, and the roll-up tables that count the events.

Money is stored as integer nano-dollars (1e-9 USD): exact on SQLite and PostgreSQL alike,
and fine enough for the cheapest embedding call (micro-dollars round those to zero).

Every event and roll-up table keys on the organization first (SPEC section 8), so that
the tables can later be distributed by organization.
"""

from decimal import Decimal

from django.db import models
from django.db.models import F, Q, Value
from django.db.models.functions import Coalesce

from accounts.models import ApiToken, Organization, Project, Team, User

NANOS_PER_USD = 1_000_000_000
BUCKET_SECONDS = 15 * 60  # roll-up grain: 15 minutes aligns with every UTC offset in use
HOUR_SECONDS = 3600


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
            # A member's own events and the user detail page.
            models.Index(fields=["organization", "user", "timestamp"], name="event_org_user_time"),
            # Events sent through tokens a member owns (part of the member's scope).
            models.Index(
                fields=["organization", "api_token", "timestamp"], name="event_org_token_time"
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


class OrgUsage15m(RollupMeasures):  # noqa: DJ008
    """Narrow roll-up: organization x 15 minutes x model x operation x status.

    Serves org-wide widgets (no team/project/user/token filter) for any time zone,
    including +05:30 and +05:45, because every local hour and day boundary in use falls on
    a 15-minute mark. bucket = UTC epoch seconds of the bucket's start.
    """

    pk = models.CompositePrimaryKey("organization", "bucket", "model", "operation", "status_code")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE)
    bucket = models.BigIntegerField()
    model = models.CharField(max_length=200)
    operation = models.CharField(max_length=20)
    status_code = models.PositiveSmallIntegerField()

    class Meta:
        db_table = "metering_org_usage_15m"


class ScopeUsage15m(RollupMeasures):  # noqa: DJ008
    """Wide roll-up: adds team, project, user, API token, assistant and workflow.

    Read only when a filter or the viewer's scope needs one of those dimensions; the
    filter then narrows it through the per-dimension indexes below. Missing ids are 0 and
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
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE)
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
        db_table = "metering_scope_usage_15m"
        indexes = [
            # One index per scope dimension: a team lead's, project admin's or member's
            # query (and a team/project/user/token filter) reads only its own rows.
            models.Index(fields=["organization", "team_id", "bucket"], name="scope15_team"),
            models.Index(fields=["organization", "project_id", "bucket"], name="scope15_project"),
            models.Index(fields=["organization", "user_id", "bucket"], name="scope15_user"),
            models.Index(fields=["organization", "api_token_id", "bucket"], name="scope15_token"),
        ]


class LatencyHistogramHourly(models.Model):  # noqa: DJ008
    """Counts of events per log-spaced latency bucket, per organization, hour and operation.

    p95 is read from here for org-wide views: the buckets grow by LATENCY_GAMMA, so the
    estimate is within about 2 % of the exact value.
    """

    pk = models.CompositePrimaryKey("organization", "bucket", "operation", "latency_bucket")
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE)
    bucket = models.BigIntegerField()
    operation = models.CharField(max_length=20)
    latency_bucket = models.SmallIntegerField()
    count = models.BigIntegerField(default=0)

    class Meta:
        db_table = "metering_latency_hist_hourly"
