from django.contrib import admin

from .models import Price, UsageEvent


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
