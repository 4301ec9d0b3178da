"""Settings forms for budgets, alert webhooks and pools (org admins only).

Every choice list is built from the organizations the person administers, and every
chosen object is checked against the chosen organization again in clean(): a forged POST
cannot attach a budget to another organization's team.
"""

from django import forms
from django.conf import settings
from django.core.exceptions import ValidationError

from accounts.models import ApiToken, Membership, Organization, Project, Team, User

from .models import AlertWebhook, Budget, BudgetSubject, PeriodKind, Pool, PoolAllocation
from .pools import pool_bases_total

SUBJECT_FIELDS = {
    BudgetSubject.USER: "user",
    BudgetSubject.TEAM: "team",
    BudgetSubject.PROJECT: "project",
    BudgetSubject.TOKEN: "api_token",
}
RULE_FIELDS = ["period", "week_start", "month_day", "every_n_days", "anchor"]


class DateInput(forms.DateInput):
    input_type = "date"


def _org_field(orgs) -> forms.ModelChoiceField:
    return forms.ModelChoiceField(queryset=orgs, empty_label=None, label="Organization")


def clean_period_rule(form: forms.ModelForm, cleaned: dict) -> None:
    """Shared checks of the period rule: every-N-days needs N and an anchor date."""
    if cleaned.get("period") == PeriodKind.EVERY_N_DAYS:
        if not cleaned.get("every_n_days"):
            form.add_error("every_n_days", "Say how many days a period lasts (1 to 366).")
        if not cleaned.get("anchor"):
            form.add_error("anchor", "Pick the date the first period starts on.")
    else:
        cleaned["every_n_days"] = None
        cleaned["anchor"] = None


class ThresholdsField(forms.CharField):
    """Percentages as "50, 80, 100": whole numbers from 1 to 1000, each once."""

    def to_python(self, value):
        value = super().to_python(value)
        if not value.strip():
            return []
        out = []
        for part in value.replace(";", ",").split(","):
            part = part.strip().rstrip("%").strip()
            if not part:
                continue
            if not part.isdigit() or not 1 <= int(part) <= 1000:
                raise ValidationError(
                    f"{part!r} is not a percentage: use whole numbers from 1 to 1000, e.g. 50, 80, 100."
                )
            out.append(int(part))
        if len(set(out)) != len(out):
            raise ValidationError("Each threshold may appear only once.")
        return sorted(out)

    def prepare_value(self, value):
        if isinstance(value, list):
            return ", ".join(str(v) for v in value)
        return value


class BudgetForm(forms.ModelForm):
    thresholds = ThresholdsField(
        required=False,
        initial="50, 80, 100",
        help_text="Percent of the amount at which an alert goes out, once per period each. Empty: no alerts.",
    )

    class Meta:
        model = Budget
        fields = [
            "organization",
            "subject",
            "user",
            "team",
            "project",
            "api_token",
            "name",
            "amount_usd",
            *RULE_FIELDS,
            "thresholds",
            "is_active",
        ]
        labels = {
            "subject": "Budget for",
            "api_token": "API token",
            "amount_usd": "Amount (USD per period)",
            "anchor": "First period starts on",
            "every_n_days": "Period length (days)",
            "month_day": "Starts on day of the month",
            "week_start": "Starts on",
            "is_active": "Active (a paused budget is neither checked nor shown to its owner)",
        }
        widgets = {"anchor": DateInput}

    def __init__(self, *args, orgs, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["organization"] = _org_field(orgs)
        org_ids = orgs.values("id")
        member_ids = Membership.objects.filter(organization__in=org_ids).values("user_id")
        self.fields["user"].queryset = User.objects.filter(id__in=member_ids).order_by("email")
        self.fields["user"].label_from_instance = lambda u: u.email
        self.fields["team"].queryset = Team.objects.filter(organization__in=org_ids)
        self.fields["project"].queryset = Project.objects.filter(organization__in=org_ids)
        self.fields["api_token"].queryset = ApiToken.objects.active().filter(
            organization__in=org_ids
        )
        self.fields["name"].help_text = "Optional; shown instead of the subject's name."

    def clean(self):
        cleaned = super().clean()
        org: Organization | None = cleaned.get("organization")
        subject = cleaned.get("subject")
        for kind, field in SUBJECT_FIELDS.items():
            target = cleaned.get(field)
            if subject != kind:
                cleaned[field] = None
                continue
            if target is None:
                self.add_error(
                    field, f"Choose the {BudgetSubject(kind).label.lower()} this budget is for."
                )
                continue
            if org is not None and not _belongs(target, org):
                self.add_error(
                    field, f"That {BudgetSubject(kind).label.lower()} is not in {org.name}."
                )
        clean_period_rule(self, cleaned)
        return cleaned


def _belongs(target, org: Organization) -> bool:
    if isinstance(target, User):
        return Membership.objects.filter(organization=org, user=target).exists()
    return target.organization_id == org.id


class AlertWebhookForm(forms.ModelForm):
    class Meta:
        model = AlertWebhook
        fields = ["organization", "url", "description", "is_active"]
        labels = {"url": "Endpoint URL"}

    def __init__(self, *args, orgs, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["organization"] = _org_field(orgs)

    def clean_url(self):
        url = self.cleaned_data["url"]
        if not settings.BUDGET_WEBHOOK_ALLOW_PRIVATE and not url.startswith("https://"):
            raise ValidationError("Use an https:// URL: alerts carry spend figures.")
        return url


class PoolForm(forms.ModelForm):
    class Meta:
        model = Pool
        fields = ["organization", "resource_type", "limit", "base_allocation", *RULE_FIELDS]
        labels = {
            "limit": "Organization limit per period",
            "base_allocation": "Base allocation per user per period",
            "anchor": "First period starts on",
            "every_n_days": "Period length (days)",
            "month_day": "Starts on day of the month",
            "week_start": "Starts on",
        }
        help_texts = {
            "resource_type": "Tokens count input + output; storage counts bytes; OCR counts pages.",
        }
        widgets = {"anchor": DateInput}

    def __init__(self, *args, orgs, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["organization"] = _org_field(orgs)

    def clean(self):
        cleaned = super().clean()
        clean_period_rule(self, cleaned)
        org, resource = cleaned.get("organization"), cleaned.get("resource_type")
        if org and resource:
            clash = Pool.objects.filter(organization=org, resource_type=resource)
            if self.instance.pk:
                clash = clash.exclude(pk=self.instance.pk)
            if clash.exists():
                self.add_error(
                    "resource_type", f"{org.name} already has a {resource} pool; edit that one."
                )
        limit, base = cleaned.get("limit"), cleaned.get("base_allocation")
        if org and limit is not None and base is not None:
            probe = Pool(organization=org, limit=limit, base_allocation=base)
            if self.instance.pk:
                probe.pk = self.instance.pk
            total = _bases_total(probe)
            if total > limit:
                self.add_error(
                    "base_allocation",
                    f"The base allocations add up to {total:,} (members x base, overrides "
                    f"included), more than the limit of {limit:,}: lower the base or raise the limit.",
                )
        return cleaned


def _bases_total(pool: Pool) -> int:
    if pool.pk:
        return pool_bases_total(pool)
    members = Membership.objects.filter(organization=pool.organization).values("user_id").distinct()
    return members.count() * pool.base_allocation


class PoolAllocationForm(forms.ModelForm):
    class Meta:
        model = PoolAllocation
        fields = ["user", "base_allocation"]
        labels = {"base_allocation": "Base allocation per period"}

    def __init__(self, *args, pool: Pool, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool = pool
        members = Membership.objects.filter(organization_id=pool.organization_id).values("user_id")
        self.fields["user"].queryset = User.objects.filter(id__in=members).order_by("email")
        self.fields["user"].label_from_instance = lambda u: u.email

    def clean(self):
        cleaned = super().clean()
        user, base = cleaned.get("user"), cleaned.get("base_allocation")
        if user is None or base is None:
            return cleaned
        clash = PoolAllocation.objects.filter(pool=self.pool, user=user)
        if self.instance.pk:
            clash = clash.exclude(pk=self.instance.pk)
        if clash.exists():
            self.add_error("user", "This user already has an override; edit it instead.")
            return cleaned
        current = self.pool.allocations.filter(user=user).values_list("base_allocation", flat=True)
        old = next(iter(current), self.pool.base_allocation)
        total = pool_bases_total(self.pool) - old + base
        if total > self.pool.limit:
            self.add_error(
                "base_allocation",
                f"With this override the base allocations add up to {total:,}, more than the "
                f"pool's limit of {self.pool.limit:,}.",
            )
        return cleaned
