"""Background work of the analytics app. Tasks are thin: they call a service by id."""

from celery import shared_task

from .eventlog import export_write


@shared_task(name="analytics.export_events", acks_late=True, ignore_result=True)
def export_events(export_id: str) -> None:
    """Write the events export `export_id` (see eventlog.export_request) to its file."""
    export_write(export_id=export_id)
