# Production image: gunicorn serving usage_dashboard.wsgi on :8000, as a non-root user.
# The same image runs the Celery worker and beat (see docker-compose.yml).
FROM python:3.13-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONPATH=/app \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so code changes don't reinstall them. The project's modules are
# used from /app (PYTHONPATH); `pip install .` brings in the dependencies from pyproject.
COPY pyproject.toml README.md ./
RUN pip install .

COPY . .

# Static files with their hashed manifest (production storage). The settings insist on a
# 50+ character SECRET_KEY in production, so give collectstatic a throwaway one.
RUN USAGE_ENV=production \
    SECRET_KEY=collectstatic-only-not-a-real-secret-0123456789abcdefghijklmnopqrstuvwxyz \
    ALLOWED_HOSTS=localhost \
    DATA_DIR=/tmp/build-data \
    python manage.py collectstatic --no-input \
    && rm -rf /tmp/build-data

RUN useradd --system --uid 10001 --home-dir /app --shell /usr/sbin/nologin app \
    && mkdir -p /app/data \
    && chown app /app/data
USER app

EXPOSE 8000
CMD ["gunicorn", "usage_dashboard.wsgi", "--bind", "0.0.0.0:8000", "--access-logfile", "-"]
