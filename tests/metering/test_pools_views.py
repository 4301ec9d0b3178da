"""The pools page, its HTMX partial, CSV and the per-user partial, per persona; and the
pool settings with their validation messages."""

import json
import re
from datetime import UTC, datetime, timedelta

import pytest
from django.urls import reverse

from metering.models import Pool, PoolAllocation
from tests.factories import event_payload, ingest

pytestmark = pytest.mark.django_db

PERSONAS = ["platform_admin", "org_admin", "team_lead", "project_admin", "member", "outsider"]


@pytest.fixture
def pools(personas):
    alpha = Pool.objects.create(
        organization=personas.org, resource_type="tokens", limit=10_000, base_allocation=1_000
    )
    beta = Pool.objects.create(
        organization=personas.other_org, resource_type="tokens", limit=50_000, base_allocation=7_777
    )
    when = datetime.now(UTC) - timedelta(hours=2)
    ingest(
        personas.org,
        [
            event_payload(
                input_tokens=1_200, output_tokens=0, user="member@example.test", timestamp=when
            )
        ],
    )
    ingest(
        personas.org,
        [
            event_payload(
                input_tokens=300, output_tokens=0, user="lead@example.test", timestamp=when
            )
        ],
    )
    ingest(
        personas.other_org,
        [
            event_payload(
                input_tokens=4_444, output_tokens=0, user="outsider@beta.test", timestamp=when
            )
        ],
    )
    return {"alpha": alpha, "beta": beta}


def login(client, personas, name):
    client.force_login(getattr(personas, name))


def figure(html: str, fig_id: str) -> dict | None:
    match = re.search(rf'<script id="{fig_id}" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(match.group(1)) if match else None


def total(fig: dict) -> int:
    return sum(sum(trace["y"]) for trace in fig["data"])


@pytest.mark.parametrize("name", PERSONAS)
def test_pools_page_shows_what_the_persona_may_see(client, personas, pools, name):
    login(client, personas, name)
    html = client.get(reverse("metering:pools")).content.decode()
    consumption = figure(html, "fig-consumption")
    if name in ("platform_admin", "org_admin"):
        # The whole organization, with the surplus chart and the users table.
        assert figure(html, "fig-surplus") is not None
        assert total(consumption) == 1_500
        assert "lead@example.test" in html
    elif name == "outsider":
        assert figure(html, "fig-surplus") is None
        assert total(consumption) == 4_444
        assert "Alpha" not in html
    else:
        # Everyone else: their own consumption and allocation only.
        assert figure(html, "fig-surplus") is None
        own = {"member": 1_200, "team_lead": 300}.get(name, 0)
        assert total(consumption) == own
        assert "Your base this period" in html
        assert "lead@example.test" not in html or name == "team_lead"


@pytest.mark.parametrize("name", ["team_lead", "project_admin", "member", "outsider", "org_admin"])
def test_another_organizations_pools_answer_404(client, personas, pools, name):
    login(client, personas, name)
    foreign = personas.other_org if name != "outsider" else personas.org
    assert client.get(reverse("metering:pools"), {"org": foreign.id}).status_code == 404
    assert (
        client.get(reverse("metering:pools"), {"org": foreign.id, "format": "csv"}).status_code
        == 404
    )
    assert (
        client.get(
            reverse("metering:pools"), {"org": foreign.id}, HTTP_HX_REQUEST="true"
        ).status_code
        == 404
    )


def test_pools_partial_and_csv_follow_the_filters(client, personas, pools):
    login(client, personas, "org_admin")
    partial = client.get(
        reverse("metering:pools"), {"resource": "tokens"}, HTTP_HX_REQUEST="true"
    ).content.decode()
    assert partial.startswith('\n<div id="pool-charts"') or '<div id="pool-charts"' in partial[:200]
    assert "<html" not in partial
    csv = client.get(
        reverse("metering:pools"), {"format": "csv", "chart": "consumption"}
    ).content.decode()
    rows = [line.split(",") for line in csv.strip().splitlines()]
    assert rows[0][1:] == ["allocated", "surplus"]
    assert sum(int(r[1]) + int(r[2]) for r in rows[1:]) == 1_500
    surplus = client.get(
        reverse("metering:pools"), {"format": "csv", "chart": "surplus"}
    ).content.decode()
    assert surplus.splitlines()[0].endswith("surplus_remaining")
    ocr = client.get(reverse("metering:pools"), {"resource": "ocr"}).content.decode()
    assert "has no ocr pool" in ocr


def test_default_range_is_the_last_seven_days(client, personas, pools):
    login(client, personas, "org_admin")
    html = client.get(reverse("metering:pools")).content.decode()
    start = re.search(r'name="start" value="([\d-]+)"', html).group(1)
    end = re.search(r'name="end" value="([\d-]+)"', html).group(1)
    assert (datetime.fromisoformat(end) - datetime.fromisoformat(start)).days == 6


@pytest.mark.parametrize(
    ("viewer", "subject", "status"),
    [
        ("member", "member", 200),
        ("member", "team_lead", 404),
        ("team_lead", "member", 404),
        ("project_admin", "member", 404),
        ("org_admin", "member", 200),
        ("platform_admin", "member", 200),
        ("outsider", "member", 404),
        ("outsider", "outsider", 200),
    ],
)
def test_user_pool_partial(client, personas, pools, viewer, subject, status):
    login(client, personas, viewer)
    user = getattr(personas, subject)
    org = personas.other_org if subject == "outsider" else personas.org
    response = client.get(reverse("metering:user-pools", args=[user.id]), {"org": org.id})
    assert response.status_code == status
    if status == 200:
        html = response.content.decode()
        assert "<html" not in html
        assert f"{user.email}'s base" in html or "Your base" in html


@pytest.mark.parametrize("name", ["team_lead", "project_admin", "member", "outsider"])
def test_pool_settings_answer_404_to_non_admins(client, personas, pools, name):
    login(client, personas, name)
    for pool in pools.values():
        assert client.get(reverse("metering:pool-edit", args=[pool.id])).status_code == 404
        assert client.post(reverse("metering:pool-delete", args=[pool.id])).status_code == 404
    assert Pool.objects.count() == 2


def test_org_admin_edits_only_their_pools(client, personas, pools):
    login(client, personas, "org_admin")
    assert client.get(reverse("metering:pool-edit", args=[pools["alpha"].id])).status_code == 200
    assert client.get(reverse("metering:pool-edit", args=[pools["beta"].id])).status_code == 404


def _pool_form(personas, **overrides):
    form = {
        "pool-organization": personas.org.id,
        "pool-resource_type": "ocr",
        "pool-limit": "1000",
        "pool-base_allocation": "100",
        "pool-period": "monthly",
        "pool-week_start": "0",
        "pool-month_day": "1",
    }
    form.update({f"pool-{k}": v for k, v in overrides.items()})
    return form


def test_pool_form_validation_messages(client, personas, pools):
    login(client, personas, "org_admin")
    clash = client.post(reverse("metering:pool-new"), _pool_form(personas, resource_type="tokens"))
    assert "Alpha Corp already has a tokens pool" in clash.content.decode()
    too_big = client.post(reverse("metering:pool-new"), _pool_form(personas, base_allocation="400"))
    # 4 members x 400 = 1,600 > 1,000
    assert "add up to 1,600" in too_big.content.decode()
    ok = client.post(reverse("metering:pool-new"), _pool_form(personas))
    assert ok.status_code == 302
    assert Pool.objects.filter(resource_type="ocr").exists()


def test_per_user_overrides(client, personas, pools):
    login(client, personas, "org_admin")
    pool = pools["alpha"]
    url = reverse("metering:pool-edit", args=[pool.id])
    ok = client.post(url, {"alloc-user": personas.member.id, "alloc-base_allocation": "2500"})
    assert ok.status_code == 302
    assert PoolAllocation.objects.get().base_allocation == 2_500
    too_big = client.post(
        url, {"alloc-user": personas.team_lead.id, "alloc-base_allocation": "9000"}
    )
    assert "more than the pool&#x27;s limit of 10,000" in too_big.content.decode()
    outsider = client.post(url, {"alloc-user": personas.outsider.id, "alloc-base_allocation": "1"})
    assert outsider.status_code == 200 and PoolAllocation.objects.count() == 1
