"""Tenancy: organizations, their teams and projects, people, roles and API tokens."""

import zoneinfo
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser, BaseUserManager, PermissionsMixin
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import F, Value
from django.db.models.functions import Coalesce
from django.utils.timezone import now


def validate_timezone(value: str) -> None:
    if value not in zoneinfo.available_timezones():
        raise ValidationError(f"{value!r} is not an IANA time zone (e.g. Europe/Berlin).")


class DisplayUnit(models.TextChoices):
    USD = "usd", "US dollars"
    CREDITS = "credits", "Credits"


class Organization(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    timezone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    display_unit = models.CharField(
        max_length=10, choices=DisplayUnit.choices, default=DisplayUnit.USD
    )
    credits_per_usd = models.DecimalField(
        max_digits=18,
        decimal_places=6,
        default=Decimal("1"),
        validators=[MinValueValidator(Decimal("0.000001"))],
        help_text="How many credits one US dollar buys, when money is shown as credits.",
    )
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class Team(models.Model):
    organization = models.ForeignKey(Organization, on_delete=models.CASCADE, related_name="teams")
    slug = models.SlugField(max_length=64)
    name = models.CharField(max_length=200)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "slug"], name="team_slug_per_org")
        ]

    def __str__(self):
        return self.name


class Project(models.Model):
    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="projects"
    )
    slug = models.SlugField(max_length=64)
    name = models.CharField(max_length=200)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.UniqueConstraint(fields=["organization", "slug"], name="project_slug_per_org")
        ]

    def __str__(self):
        return self.name


class UserManager(BaseUserManager):
    use_in_migrations = True

    def create_user(self, email, password=None, **extra):
        if not email:
            raise ValueError("A user needs an email address.")
        user = self.model(email=self.normalize_email(email).lower(), **extra)
        if password:
            user.set_password(password)
        else:
            user.set_unusable_password()
        user.save(using=self._db)
        return user

    def create_superuser(self, email, password=None, **extra):
        extra.update(is_staff=True, is_superuser=True, is_platform_admin=True)
        return self.create_user(email, password, **extra)


class User(AbstractBaseUser, PermissionsMixin):
    """A person. Signs in with an email address; may belong to several organizations."""

    email = models.EmailField(unique=True)
    name = models.CharField(max_length=200, blank=True)
    timezone = models.CharField(
        max_length=64,
        blank=True,
        validators=[validate_timezone],
        help_text="Shown times and chart buckets use this zone; empty means the organization's.",
    )
    is_platform_admin = models.BooleanField(
        default=False, help_text="Sees every organization of this installation."
    )
    is_staff = models.BooleanField(default=False)
    is_active = models.BooleanField(default=True)
    date_joined = models.DateTimeField(default=now)

    objects = UserManager()

    USERNAME_FIELD = "email"
    EMAIL_FIELD = "email"

    class Meta:
        ordering = ["email"]

    def __str__(self):
        return self.name or self.email

    @property
    def display_name(self) -> str:
        return self.name or self.email.split("@")[0]


class Role(models.TextChoices):
    ORG_ADMIN = "org_admin", "Org admin"
    TEAM_LEAD = "team_lead", "Team lead"
    PROJECT_ADMIN = "project_admin", "Project admin"
    MEMBER = "member", "Member"


class Membership(models.Model):
    """A role a user holds in an organization.

    A team lead's membership names the team; a project admin's names the project. A member's
    may name a team and a project: their events default to those when the event names none.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="memberships"
    )
    user = models.ForeignKey(User, on_delete=models.CASCADE, related_name="memberships")
    role = models.CharField(max_length=20, choices=Role.choices, default=Role.MEMBER)
    team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.CASCADE)
    project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.CASCADE)
    created_at = models.DateTimeField(default=now)

    class Meta:
        ordering = ["organization", "user"]
        constraints = [
            # Coalesce: a NULL team/project must count as equal (portable nulls_distinct).
            models.UniqueConstraint(
                F("organization"),
                F("user"),
                F("role"),
                Coalesce("team", Value(0)),
                Coalesce("project", Value(0)),
                name="membership_unique",
            ),
        ]
        indexes = [models.Index(fields=["user", "organization"], name="membership_by_user")]

    def __str__(self):
        return f"{self.user} - {self.get_role_display()} in {self.organization}"

    def clean(self):
        if self.role == Role.TEAM_LEAD and not self.team_id:
            raise ValidationError({"team": "A team lead's membership must name the team."})
        if self.role == Role.PROJECT_ADMIN and not self.project_id:
            raise ValidationError(
                {"project": "A project admin's membership must name the project."}
            )
        for field in ("team", "project"):
            related = getattr(self, field)
            if related is not None and related.organization_id != self.organization_id:
                raise ValidationError({field: f"That {field} belongs to another organization."})


class TokenScope(models.TextChoices):
    INGEST = "ingest", "Send events"
    READ = "read", "Read usage"


class UnknownLabelPolicy(models.TextChoices):
    REJECT = "reject", "Reject the event"
    DEFAULTS = "defaults", "Use the token's default team and project"


class ApiTokenQuerySet(models.QuerySet):
    def active(self):
        return self.filter(revoked_at__isnull=True)


class ApiToken(models.Model):
    """A bearer secret for the APIs. Only a SHA-256 hash of the secret is stored.

    The secret is shown once, when it is created; its first characters (the prefix) stay
    visible so people can tell tokens apart.
    """

    organization = models.ForeignKey(
        Organization, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=200)
    owner = models.ForeignKey(
        User, null=True, blank=True, on_delete=models.SET_NULL, related_name="api_tokens"
    )
    service_account = models.CharField(max_length=200, blank=True)
    default_team = models.ForeignKey(Team, null=True, blank=True, on_delete=models.SET_NULL)
    default_project = models.ForeignKey(Project, null=True, blank=True, on_delete=models.SET_NULL)
    scopes = models.JSONField(default=list, help_text='Any of "ingest" and "read".')
    unknown_labels = models.CharField(
        max_length=10,
        choices=UnknownLabelPolicy.choices,
        default=UnknownLabelPolicy.REJECT,
        help_text="What to do with an event naming a team or project this org does not have.",
    )
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, unique=True, editable=False)
    created_at = models.DateTimeField(default=now)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    objects = ApiTokenQuerySet.as_manager()

    class Meta:
        ordering = ["organization", "name"]

    def __str__(self):
        return f"{self.name} ({self.prefix}…)"

    @property
    def is_active(self) -> bool:
        return self.revoked_at is None

    def has_scope(self, scope: str) -> bool:
        return scope in (self.scopes or [])
