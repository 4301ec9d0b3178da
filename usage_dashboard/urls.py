from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from accounts import views as account_views
from analytics import api as usage_api
from analytics import event_views
from analytics import views as analytics_views
from metering import api as ingest_api
from metering import integrations_api

urlpatterns = [
    path("", account_views.home, name="home"),
    path(
        "login/",
        auth_views.LoginView.as_view(
            template_name="accounts/login.html", redirect_authenticated_user=True
        ),
        name="login",
    ),
    path("logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("profile/", account_views.profile, name="profile"),
    path("dashboard/", analytics_views.dashboard, name="dashboard"),
    path("dashboard/widgets/<slug:name>/", analytics_views.widget, name="dashboard-widget"),
    path(
        "dashboard/options/<slug:kind>/", analytics_views.filter_options, name="dashboard-options"
    ),
    path("events/", event_views.events, name="events"),
    path("events/export.csv", event_views.events_export, name="events-export"),
    path(
        "events/exports/<uuid:export_id>/", event_views.export_status, name="events-export-status"
    ),
    path(
        "events/exports/<uuid:export_id>/download/",
        event_views.export_download,
        name="events-export-download",
    ),
    path("events/<int:event_id>/", event_views.event_detail, name="event-detail"),
    path("users/<int:user_id>/", event_views.user_detail, name="user-detail"),
    path("api/v1/events", ingest_api.events_ingest, name="api-events"),
    path("api/v1/usage", usage_api.usage, name="api-usage"),
    path("api/v1/integrations/litellm", integrations_api.litellm_ingest, name="api-litellm"),
    path("v1/traces", integrations_api.otlp_traces, name="otlp-traces"),
    path("", include("metering.urls")),
    path("admin/", admin.site.urls),
]
