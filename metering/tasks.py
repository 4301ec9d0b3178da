"""Celery tasks for budgets: thin interfaces that fetch by id and call the service.

budget_check   a batch (or a budget change) may have crossed a threshold: record alerts
alert_deliver  send one alert (email + webhooks); retried with exponential backoff
budgets_sweep  periodic (beat): alerts a lost message missed, deliveries never finished
rollups_fold   count events ingestion listed as pending in the roll-ups (after a batch,
               and periodically for all organizations, for a lost message)
viewers_rebuild  recount one viewer's roll-ups after their roles or tokens changed (or
               build an organization's, when it has none yet)
"""

from celery import shared_task
from django.conf import settings
from django.db import transaction

from . import aggregates, budgets, viewers
from .models import Budget


@shared_task(name="metering.budget_check", acks_late=True, ignore_result=True)
def budget_check(budget_id: int) -> int:
    budget = Budget.objects.select_related("organization").filter(pk=budget_id).first()
    if budget is None or not budget.is_active:
        return 0
    with transaction.atomic():
        return len(budgets.budget_alerts_evaluate(budget=budget))


@shared_task(name="metering.alert_deliver", bind=True, acks_late=True, ignore_result=True)
def alert_deliver(self, alert_id: int) -> str:
    try:
        return budgets.alert_deliver(alert_id=alert_id, retry=self.request.retries > 0)
    except budgets.AlertDeliveryError as exc:
        attempt = self.request.retries + 1
        if attempt >= settings.BUDGET_ALERT_MAX_ATTEMPTS:
            raise
        if self.request.is_eager:
            # Eager mode (embedded demo, unit tests) cannot retry while it propagates
            # errors: try again at once, in-process, as the next attempt.
            return self.apply(args=(alert_id,), retries=attempt).get()
        raise self.retry(
            exc=exc,
            countdown=budgets.alert_retry_delay(attempt),
            max_retries=settings.BUDGET_ALERT_MAX_ATTEMPTS - 1,
        ) from exc


@shared_task(name="metering.budgets_sweep", acks_late=True, ignore_result=True)
def budgets_sweep() -> dict:
    result = budgets.budgets_sweep()
    return {"checked": result.checked, "created": result.created, "resent": result.resent}


@shared_task(name="metering.rollups_fold", acks_late=True, ignore_result=True)
def rollups_fold(organization_id: int | None = None) -> int:
    return aggregates.rollups_fold(None if organization_id is None else [organization_id])


@shared_task(name="metering.viewers_rebuild", acks_late=True, ignore_result=True)
def viewers_rebuild(organization_id: int, viewer_id: int | None = None) -> None:
    if viewer_id is None:
        viewers.build_organization(organization_id)
    else:
        viewers.rebuild_viewer(organization_id, viewer_id)
