"""Ingestion keeps answering when the cache (Redis) is down: the rate limit fails open."""

from django.core.cache.backends.redis import RedisCache

from metering import api
from metering.models import UsageEvent
from tests.conftest import bearer
from tests.factories import event_payload


def test_ingestion_answers_when_the_cache_is_unreachable(client, monkeypatch, service_token):
    unreachable = RedisCache("redis://127.0.0.1:1/0", {})  # nothing listens on port 1
    monkeypatch.setattr(api, "cache", unreachable)
    response = client.post(
        "/api/v1/events",
        data={"events": [event_payload()]},
        content_type="application/json",
        **bearer(service_token),
    )
    assert response.status_code == 200, response.content
    assert UsageEvent.objects.count() == 1
