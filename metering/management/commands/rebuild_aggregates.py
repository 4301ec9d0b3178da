from django.core.management.base import BaseCommand

from metering.aggregates import rebuild_day, reconcile_days
from metering.management.selection import organizations, since_day
from metering.viewers import refresh_organization


class Command(BaseCommand):
    help = (
        "Recompute every roll-up and spend counter from the raw events, day by day (repairs "
        "what check_aggregates reports; each UTC day in its own transaction), and the viewer "
        "roll-ups of viewers whose roles or tokens changed."
    )

    def add_arguments(self, parser):
        parser.add_argument("--org", help="one organization (slug); default all")
        parser.add_argument("--since-days", type=int, help="only the last N days")

    def handle(self, *args, org, since_days, **options):
        orgs = organizations(org)
        since = since_day(since_days)
        total = 0
        for organization in orgs:
            # Viewer roll-ups first: built if missing, recounted for changed roles.
            refreshed = refresh_organization(organization.id)
            if refreshed:
                what = "built" if refreshed < 0 else f"{refreshed} viewer(s) recounted"
                self.stdout.write(f"  {organization.slug}: viewer roll-ups {what}")
            days, _ = reconcile_days(organization.id, since)
            for i, day in enumerate(days, start=1):
                rebuild_day(organization.id, day)
                if i % 10 == 0 or i == len(days):
                    self.stdout.write(f"  {organization.slug}: {i}/{len(days)} days rebuilt")
            total += len(days)
        self.stdout.write(self.style.SUCCESS(f"Rebuilt {total} organization-days."))
