from django.urls import path

from . import budget_api, views

app_name = "metering"

urlpatterns = [
    path("spending/", views.spending, name="spending"),
    path("budgets/", views.budget_list, name="budgets"),
    path("budgets/alerts/", views.alert_list, name="alerts"),
    path("budgets/<int:pk>/", views.budget_detail, name="budget-detail"),
    path("pools/", views.pools, name="pools"),
    path("pools/users/<int:user_id>/", views.user_pools, name="user-pools"),
    path("settings/budgets/", views.budget_settings, name="settings-budgets"),
    path("settings/budgets/new/", views.budget_edit, name="budget-new"),
    path("settings/budgets/<int:pk>/", views.budget_edit, name="budget-edit"),
    path("settings/budgets/<int:pk>/delete/", views.budget_delete, name="budget-delete"),
    path("settings/webhooks/new/", views.webhook_edit, name="webhook-new"),
    path("settings/webhooks/<int:pk>/", views.webhook_edit, name="webhook-edit"),
    path("settings/webhooks/<int:pk>/rotate/", views.webhook_rotate, name="webhook-rotate"),
    path("settings/webhooks/<int:pk>/delete/", views.webhook_delete, name="webhook-delete"),
    path("settings/pools/", views.pool_settings, name="settings-pools"),
    path("settings/pools/new/", views.pool_edit, name="pool-new"),
    path("settings/pools/<int:pk>/", views.pool_edit, name="pool-edit"),
    path("settings/pools/<int:pk>/delete/", views.pool_delete, name="pool-delete"),
    path(
        "settings/pools/allocations/<int:pk>/delete/",
        views.allocation_delete,
        name="allocation-delete",
    ),
    path("api/v1/budgets/check", budget_api.budgets_check, name="api-budgets-check"),
]
