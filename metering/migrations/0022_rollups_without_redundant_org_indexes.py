"""The roll-up tables' own index on organization_id alone goes: each primary key leads
with organization_id, so that index only cost every fold an extra index write per new
row, and led the planner to read a whole organization's rows and filter them by time
instead of seeking the time range in the primary key.

Only the indexes are dropped (the foreign keys stay as they are): Django's own
AlterField would drop and re-add each foreign key, re-checking every roll-up row under
a table lock."""

import django.db.models.deletion
from django.db import migrations, models

ROLLUPS = [
    "latencyhistogramdaily",
    "latencyhistogramhourly",
    "latencyhistogrammodeldaily",
    "latencyhistogrampartdaily",
    "latencyhistogramscopedaily",
    "orgusage15m",
    "orgusagedaily",
    "orgusagehourly",
    "scopeactordaily",
    "scopekeydaily",
    "scopeusage15m",
    "scopeusagedaily",
    "vieweractordaily",
    "vieweractorhourly",
    "viewerhistogramdaily",
    "viewerlink",
    "viewerusagedaily",
    "viewerusagehourly",
]


def _org_indexes(apps, schema_editor):
    """The name of each roll-up's single-column organization_id index."""
    connection = schema_editor.connection
    with connection.cursor() as cursor:
        for name in ROLLUPS:
            table = apps.get_model("metering", name)._meta.db_table
            constraints = connection.introspection.get_constraints(cursor, table)
            for index, info in constraints.items():
                if (
                    info["columns"] == ["organization_id"]
                    and info["index"]
                    and not info["primary_key"]
                    and not info["unique"]
                ):
                    yield index


def drop_org_indexes(apps, schema_editor):
    quote = schema_editor.quote_name
    for index in list(_org_indexes(apps, schema_editor)):
        schema_editor.execute(f"DROP INDEX IF EXISTS {quote(index)}")


def add_org_indexes(apps, schema_editor):
    for name in ROLLUPS:
        model = apps.get_model("metering", name)
        field = model._meta.get_field("organization")
        index = schema_editor._create_index_name(model._meta.db_table, [field.column], "")
        schema_editor.execute(schema_editor._create_index_sql(model, fields=[field], name=index))


def _without_index(name: str) -> migrations.AlterField:
    return migrations.AlterField(
        model_name=name,
        name="organization",
        field=models.ForeignKey(
            db_index=False,
            on_delete=django.db.models.deletion.CASCADE,
            to="accounts.organization",
            **({"related_name": "+"} if name == "viewerlink" else {}),
        ),
    )


class Migration(migrations.Migration):
    dependencies = [
        ("accounts", "0001_initial"),
        ("metering", "0021_team_model_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[_without_index(name) for name in ROLLUPS],
            database_operations=[migrations.RunPython(drop_org_indexes, add_org_indexes)],
        ),
    ]
