"""Indexes for a team + model filter: the events of one team and model (raw latency
percentiles of a partial scope), and the wide daily roll-up's rows of them.

The events index is built CONCURRENTLY on PostgreSQL, so ingestion goes on while it
builds on a large table (hence a non-atomic migration)."""

from django.db import migrations, models

EVENT_INDEX = models.Index(
    fields=["organization", "team", "model", "timestamp"],
    include=("operation", "latency_ms", "status_code", "user_id", "project_id", "api_token_id"),
    name="event_org_team_model_time",
)


def add_event_index(apps, schema_editor):
    model = apps.get_model("metering", "UsageEvent")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.add_index(model, EVENT_INDEX, concurrently=True)
    else:
        schema_editor.add_index(model, EVENT_INDEX)


def remove_event_index(apps, schema_editor):
    model = apps.get_model("metering", "UsageEvent")
    if schema_editor.connection.vendor == "postgresql":
        schema_editor.remove_index(model, EVENT_INDEX, concurrently=True)
    else:
        schema_editor.remove_index(model, EVENT_INDEX)


class Migration(migrations.Migration):
    atomic = False

    dependencies = [
        ("metering", "0020_people_and_label_rollups"),
    ]

    operations = [
        migrations.AddIndex(
            model_name="scopeusagedaily",
            index=models.Index(
                fields=["organization", "team_id", "model", "bucket"], name="scoped_team_model"
            ),
        ),
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.AddIndex(model_name="usageevent", index=EVENT_INDEX)],
            database_operations=[migrations.RunPython(add_event_index, remove_event_index)],
        ),
    ]
