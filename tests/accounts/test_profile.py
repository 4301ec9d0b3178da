from datetime import UTC, datetime

import pytest

from tests.factories import event_payload, ingest


def test_profile_time_zone_changes_the_dashboards_buckets(client, personas):
    ingest(personas.org, [event_payload(timestamp=datetime(2026, 11, 1, 23, 30, tzinfo=UTC))])
    client.force_login(personas.org_admin)
    query = "period=custom&start=2026-11-01T00:00&end=2026-11-03T00:00&bucket=1d&format=csv"

    berlin = client.get(f"/dashboard/widgets/requests/?{query}")
    assert b"2026-11-02 00:00,1,0,1" in b"".join(berlin.streaming_content)  # 00:30 in Berlin

    response = client.post("/profile/", {"name": "Olga", "timezone": "America/New_York"})
    assert response.status_code == 302
    personas.org_admin.refresh_from_db()
    assert personas.org_admin.timezone == "America/New_York"
    new_york = client.get(f"/dashboard/widgets/requests/?{query}")
    assert b"2026-11-01 00:00,1,0,1" in b"".join(new_york.streaming_content)  # 18:30 in New York


def test_profile_rejects_an_unknown_time_zone(client, personas):
    client.force_login(personas.member)
    response = client.post("/profile/", {"name": "Max", "timezone": "Mars/Olympus"})
    assert response.status_code == 200
    assert b"Select a valid choice" in response.content


@pytest.mark.parametrize("path", ["/profile/", "/"])
def test_pages_need_a_sign_in(client, path):
    assert client.get(path).status_code == 302
