from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import path

from accounts import views as account_views
from analytics import api as usage_api
from analytics import views as analytics_views
from metering import api as ingest_api

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
    path("dashboard/", analytics_views.dashboard, name="dashboard"),
    path("dashboard/widgets/<slug:name>/", analytics_views.widget, name="dashboard-widget"),
    path(
        "dashboard/options/<slug:kind>/", analytics_views.filter_options, name="dashboard-options"
    ),
    path("api/v1/events", ingest_api.events_ingest, name="api-events"),
    path("api/v1/usage", usage_api.usage, name="api-usage"),
    path("admin/", admin.site.urls),
]
