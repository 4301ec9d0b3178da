from django.core.management.base import BaseCommand

from metering.aggregates import rebuild_day, reconcile_days
from metering.management.selection import organizations, since_day


class Command(BaseCommand):
    help = (
        "Recompute every roll-up and spend counter from the raw events, day by day (repairs "
        "what check_aggregates reports; each UTC day in its own transaction)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--org", help="one organization (slug); default all")
        parser.add_argument("--since-days", type=int, help="only the last N days")

    def handle(self, *args, org, since_days, **options):
        orgs = organizations(org)
        since = since_day(since_days)
        total = 0
        for organization in orgs:
            days, _ = reconcile_days(organization.id, since)
            for i, day in enumerate(days, start=1):
                rebuild_day(organization.id, day)
                if i % 10 == 0 or i == len(days):
                    self.stdout.write(f"  {organization.slug}: {i}/{len(days)} days rebuilt")
            total += len(days)
        self.stdout.write(self.style.SUCCESS(f"Rebuilt {total} organization-days."))
