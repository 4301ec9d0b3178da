from django.core.management.base import BaseCommand

from metering.aggregates import reconcile_day, reconcile_days
from metering.management.selection import organizations, since_day


class Command(BaseCommand):
    help = (
        "Recompute every roll-up from the raw events and report mismatches (exit status 1 on any)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--org", help="check one organization (slug); default all")
        parser.add_argument("--since-days", type=int, help="check only the last N days")
        parser.add_argument("--max-report", type=int, default=50, help="mismatches to print")

    def handle(self, *args, org, since_days, max_report, **options):
        orgs = organizations(org)
        since = since_day(since_days)
        problems: list[str] = []
        for organization in orgs:
            days, extra = reconcile_days(organization.id, since)
            problems += extra
            for i, day in enumerate(days, start=1):
                problems += [
                    f"{organization.slug}: {p}" for p in reconcile_day(organization.id, day)
                ]
                if i % 10 == 0 or i == len(days):
                    self.stdout.write(f"  {organization.slug}: {i}/{len(days)} days checked")
        if problems:
            for line in problems[:max_report]:
                self.stdout.write(self.style.ERROR(line))
            if len(problems) > max_report:
                self.stdout.write(f"... and {len(problems) - max_report} more")
            self.stdout.write(self.style.ERROR(f"{len(problems)} mismatches."))
            raise SystemExit(1)
        self.stdout.write(self.style.SUCCESS("Roll-ups match the raw events: no mismatch."))
