"""Settings, read from the environment only.

With nothing set, the project runs as the embedded demo: SQLite in ./data, tasks run
in-process, DEBUG on. USAGE_ENV=production turns on the production checks; DATABASE_URL
and REDIS_URL switch to PostgreSQL and Redis.
"""

import sys
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from django.utils.csp import CSP

from .env import database_from_url, env_bool, env_int, env_list, env_str

if sys.version_info < (3, 12):  # noqa: UP036 - a clear message instead of a SyntaxError later
    raise ImproperlyConfigured("This project needs Python 3.12 or newer.")

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(env_str("DATA_DIR", str(BASE_DIR / "data")))

USAGE_ENV = env_str("USAGE_ENV", "development").strip().lower()
if USAGE_ENV not in {"development", "production"}:
    raise ImproperlyConfigured(f"USAGE_ENV must be development or production, got {USAGE_ENV!r}")
PRODUCTION = USAGE_ENV == "production"

DEBUG = env_bool("DEBUG", not PRODUCTION)

_DEV_SECRET = "dev-only-insecure-key-never-use-in-production"  # noqa: S105
SECRET_KEY = env_str("SECRET_KEY", "" if PRODUCTION else _DEV_SECRET)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", [] if PRODUCTION else ["127.0.0.1", "localhost", "[::1]"])
if PRODUCTION:
    if len(SECRET_KEY) < 50 or SECRET_KEY == _DEV_SECRET:
        raise ImproperlyConfigured(
            "USAGE_ENV=production needs SECRET_KEY set to a random string of 50+ characters"
        )
    if not ALLOWED_HOSTS:
        raise ImproperlyConfigured("USAGE_ENV=production needs ALLOWED_HOSTS (comma-separated)")
    if DEBUG:
        raise ImproperlyConfigured("DEBUG must be off when USAGE_ENV=production")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "whitenoise.runserver_nostatic",
    "django.contrib.staticfiles",
    "django.contrib.humanize",
    "django_htmx",
    "django_filters",
    "accounts",
    "metering",
    "analytics",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django.middleware.csp.ContentSecurityPolicyMiddleware",
    "django_htmx.middleware.HtmxMiddleware",
    "accounts.middleware.ViewerTimezoneMiddleware",
]

ROOT_URLCONF = "usage_dashboard.urls"
WSGI_APPLICATION = "usage_dashboard.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "django.template.context_processors.csp",
            ],
        },
    },
]

DATABASE_URL = env_str("DATABASE_URL")
if DATABASE_URL:
    DATABASES = {"default": database_from_url(DATABASE_URL)}
else:
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    DATABASES = {
        "default": {
            "ENGINE": "django.db.backends.sqlite3",
            "NAME": DATA_DIR / "usage.sqlite3",
            "OPTIONS": {
                # One writer at a time: take the write lock when the transaction starts,
                # so concurrent ingests queue instead of failing with "database is locked".
                "transaction_mode": "IMMEDIATE",
                "timeout": 30,
                "init_command": (
                    "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA busy_timeout=30000;"
                ),
            },
        }
    }
    # The events' covering indexes (columns carried for index-only reads) are a
    # PostgreSQL matter; SQLite builds the same indexes without them, as intended.
    SILENCED_SYSTEM_CHECKS = ["models.W040"]
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_USER_MODEL = "accounts.User"
AUTH_PASSWORD_VALIDATORS = (
    [
        {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
        {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
        {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    ]
    if PRODUCTION
    else []
)
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "dashboard"
LOGOUT_REDIRECT_URL = "login"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
# collectstatic's target, served by WhiteNoise in production; in development the finders
# serve files straight from their sources.
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(BASE_DIR / "staticfiles"))) if PRODUCTION else None
STATICFILES_DIRS = [BASE_DIR / "static"]
STATICFILES_FINDERS = [
    "django.contrib.staticfiles.finders.FileSystemFinder",
    "django.contrib.staticfiles.finders.AppDirectoriesFinder",
    # plotly.js straight from the installed plotly package (no CDN, nothing vendored).
    "analytics.staticfiles.PlotlyFinder",
]
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {
        "BACKEND": (
            "whitenoise.storage.CompressedManifestStaticFilesStorage"
            if PRODUCTION
            else "django.contrib.staticfiles.storage.StaticFilesStorage"
        )
    },
}

REDIS_URL = env_str("REDIS_URL")
if REDIS_URL:
    CACHES = {
        "default": {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": REDIS_URL}
    }
    CELERY_BROKER_URL = REDIS_URL
    CELERY_TASK_ALWAYS_EAGER = False
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
    CELERY_BROKER_URL = "memory://"
    # Embedded mode: tasks run in-process, right away.
    CELERY_TASK_ALWAYS_EAGER = True
CELERY_TASK_EAGER_PROPAGATES = True
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_BEAT_SCHEDULE: dict = {
    # Budget alerts that a lost broker message missed, and deliveries never finished.
    "budgets-sweep": {
        "task": "metering.budgets_sweep",
        "schedule": env_int("BUDGETS_SWEEP_SECONDS", 300),
    },
    # Events listed for the roll-ups whose fold message was lost (readers fold them too).
    "rollups-fold": {
        "task": "metering.rollups_fold",
        "schedule": env_int("ROLLUPS_FOLD_SECONDS", 60),
    },
}

# Email (Django 6.1 mailers). SMTP in production, the console in the demo.
_EMAIL_BACKEND = env_str(
    "EMAIL_BACKEND",
    "django.core.mail.backends.smtp.EmailBackend"
    if PRODUCTION
    else "django.core.mail.backends.console.EmailBackend",
)
_EMAIL_OPTIONS: dict = {}
if _EMAIL_BACKEND.endswith("smtp.EmailBackend"):
    _EMAIL_OPTIONS = {
        "host": env_str("EMAIL_HOST", "localhost"),
        "port": env_int("EMAIL_PORT", 25),
        "username": env_str("EMAIL_HOST_USER"),
        "password": env_str("EMAIL_HOST_PASSWORD"),
        "use_tls": env_bool("EMAIL_USE_TLS", False),
    }
MAILERS = {"default": {"BACKEND": _EMAIL_BACKEND, "OPTIONS": _EMAIL_OPTIONS}}
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "usage-dashboard@localhost")

# Budget alerts (metering/budgets.py): links in emails and webhooks start with SITE_URL;
# webhooks to private addresses are refused in production (SSRF).
SITE_URL = env_str("SITE_URL", "http://127.0.0.1:8000")
BUDGET_WEBHOOK_TIMEOUT = env_int("BUDGET_WEBHOOK_TIMEOUT", 5)
BUDGET_WEBHOOK_ALLOW_PRIVATE = env_bool("BUDGET_WEBHOOK_ALLOW_PRIVATE", not PRODUCTION)
BUDGET_ALERT_MAX_ATTEMPTS = env_int("BUDGET_ALERT_MAX_ATTEMPTS", 8)
BUDGET_ALERT_RETRY_SECONDS = env_int("BUDGET_ALERT_RETRY_SECONDS", 30)  # doubles per retry

# Ingestion API limits (SPEC section 3).
INGEST_MAX_EVENTS = 1000
INGEST_MAX_BYTES = 5 * 1024 * 1024
# Gateway logging payloads (LiteLLM) carry prompts and responses that are dropped at once.
INTEGRATION_MAX_BYTES = env_int("INTEGRATION_MAX_BYTES", 32 * 1024 * 1024)
# Django must let the body through so the views can answer 413 themselves.
DATA_UPLOAD_MAX_MEMORY_SIZE = max(INGEST_MAX_BYTES, INTEGRATION_MAX_BYTES) + 1024 * 1024
INGEST_RATE_LIMIT_PER_MINUTE = env_int("INGEST_RATE_LIMIT_PER_MINUTE", 1200)
# PostgreSQL with a worker: ingestion lists new events for the roll-ups and answers; the
# worker folds them right after (readers fold what is left first, so reads stay exact).
# Off (embedded mode, or no worker): the roll-ups are counted in the ingest transaction.
ROLLUPS_DEFERRED = env_bool("ROLLUPS_DEFERRED", bool(REDIS_URL))
# A worker folds an organization's new events at most once per this many seconds.
ROLLUPS_FOLD_WAIT_SECONDS = env_int("ROLLUPS_FOLD_WAIT_SECONDS", 1)
# The metrics bar's two periods (this one and the one before) are read side by side, the
# previous one on a second database connection of the same process (PostgreSQL only;
# one after the other inside a transaction, where a second connection would not see it).
# 0 reads them one after the other, as a single core or a saturated server would want.
DASHBOARD_PARALLEL_READS = env_bool("DASHBOARD_PARALLEL_READS", True)
# The budget check API remembers who a token is and which budgets apply for this long
# (any change to them is seen at once, metering.check_cache); 0 turns that off.
CHECK_CACHE_SECONDS = env_int("CHECK_CACHE_SECONDS", 30)

# Events log CSV exports: above this many rows an export runs as a background task and
# is written under EXPORTS_DIR (kept a day) instead of streaming in the request.
EXPORT_ASYNC_THRESHOLD = env_int("EXPORT_ASYNC_THRESHOLD", 100_000)
EXPORTS_DIR = DATA_DIR / "exports"

# Content Security Policy from day one. Plotly writes style attributes, hence
# 'unsafe-inline' for styles only; scripts come from our own static files.
SECURE_CSP = {
    "default-src": [CSP.SELF],
    "script-src": [CSP.SELF],
    "style-src": [CSP.SELF, CSP.UNSAFE_INLINE],
    "img-src": [CSP.SELF, "data:", "blob:"],
    "font-src": [CSP.SELF, "data:"],
    "connect-src": [CSP.SELF],
    "frame-ancestors": [CSP.NONE],
    "form-action": [CSP.SELF],
    "base-uri": [CSP.SELF],
}

if PRODUCTION:
    SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", True)
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000)
    SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", True)
    SESSION_COOKIE_SECURE = True
    CSRF_COOKIE_SECURE = True
    SECURE_REFERRER_POLICY = "same-origin"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
