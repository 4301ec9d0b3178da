from django.contrib import admin

from .models import AlertWebhook, Budget, BudgetAlert, Pool, PoolAllocation, Price, UsageEvent


@admin.register(Price)
class PriceAdmin(admin.ModelAdmin):
    list_display = (
        "model",
        "provider",
        "organization",
        "effective_from",
        "input_per_mtok",
        "output_per_mtok",
    )
    list_filter = ("provider", "organization")
    search_fields = ("model",)


@admin.register(UsageEvent)
class UsageEventAdmin(admin.ModelAdmin):
    """Read-only: events change only through ingestion, so the roll-ups stay exact."""

    list_display = ("request_id", "organization", "timestamp", "model", "status_code", "user")
    list_filter = ("organization", "operation")
    search_fields = ("request_id",)
    show_full_result_count = False  # no COUNT(*) over millions of rows per page view
    list_select_related = ("organization", "user")

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


@admin.register(Budget)
class BudgetAdmin(admin.ModelAdmin):
    """Budgets are edited in Settings (validation and a recomputed reset); the admin lists
    them for platform admins."""

    list_display = ("__str__", "organization", "subject", "amount_usd", "is_active")
    list_filter = ("organization", "subject", "is_active")
    search_fields = ("name",)


@admin.register(BudgetAlert)
class BudgetAlertAdmin(admin.ModelAdmin):
    list_display = ("budget", "threshold", "period_start", "state", "attempts", "delivered_at")
    list_filter = ("state", "organization")
    readonly_fields = [f.name for f in BudgetAlert._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(AlertWebhook)
class AlertWebhookAdmin(admin.ModelAdmin):
    list_display = ("url", "organization", "is_active", "created_at")
    list_filter = ("organization", "is_active")
    exclude = ("secret",)


@admin.register(Pool)
class PoolAdmin(admin.ModelAdmin):
    list_display = ("__str__", "organization", "resource_type", "limit", "base_allocation")
    list_filter = ("organization", "resource_type")


@admin.register(PoolAllocation)
class PoolAllocationAdmin(admin.ModelAdmin):
    list_display = ("pool", "user", "base_allocation")
    list_filter = ("organization",)
    search_fields = ("user__email",)
