"""The roll-up tables carry no index on organization_id alone: their primary keys lead
with it. Such an index costs every fold one more index write per new row, and the
planner took it for time-range reads, filtering a whole organization's rows instead of
seeking the range in the primary key."""

import pytest
from django.apps import apps
from django.db import connection, models


def _rollups_keyed_by_organization():
    for model in apps.get_app_config("metering").get_models():
        pk = model._meta.pk
        if isinstance(pk, models.CompositePrimaryKey) and pk.field_names[0] == "organization":
            yield model


def test_the_roll_ups_are_found():
    names = {m.__name__ for m in _rollups_keyed_by_organization()}
    assert {"OrgUsage15m", "ScopeUsageDaily", "LatencyHistogramPartDaily"} <= names
    assert {"ViewerUsageHourly", "ViewerHistogramDaily", "RollupPending"} <= names


@pytest.mark.django_db
def test_no_roll_up_has_an_index_on_organization_alone():
    redundant = []
    with connection.cursor() as cursor:
        for model in _rollups_keyed_by_organization():
            table = model._meta.db_table
            for name, info in connection.introspection.get_constraints(cursor, table).items():
                if (
                    info["index"]
                    and not info["primary_key"]
                    and info["columns"] == ["organization_id"]
                ):
                    redundant.append(f"{table}.{name}")
    assert redundant == []


def test_the_models_ask_for_none():
    asking = [
        m.__name__
        for m in _rollups_keyed_by_organization()
        if m._meta.get_field("organization").db_index
    ]
    assert asking == []
