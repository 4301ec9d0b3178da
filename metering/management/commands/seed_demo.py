from django.core.management.base import BaseCommand, CommandError

from accounts.models import Organization
from metering.demo import DEMO_LOGINS, DEMO_PASSWORD, demo_reset, seed_demo


class Command(BaseCommand):
    help = "Create the demo organizations, people, tokens and usage events (deterministic)."

    def add_arguments(self, parser):
        parser.add_argument(
            "--events", type=int, default=200_000, help="events to create (default 200000)"
        )
        parser.add_argument(
            "--days", type=int, default=30, help="spread over the last D days (default 30)"
        )
        parser.add_argument("--seed", type=int, default=42, help="random seed (default 42)")
        parser.add_argument("--reset", action="store_true", help="delete existing demo data first")

    def handle(self, *args, events, days, seed, reset, **options):
        if events < 0 or days < 1:
            raise CommandError("--events must be >= 0 and --days >= 1")
        if reset:
            demo_reset()
        elif Organization.objects.filter(slug="acme").exists():
            raise CommandError("Demo data already exists; pass --reset to recreate it.")
        step = max(events // 20, 1000)
        next_report = [step]

        def progress(done, total, seconds):
            if done >= next_report[0] or done == total:
                rate = done / seconds if seconds else 0
                self.stdout.write(f"  {done:>10,} / {total:,} events  ({rate:,.0f} events/s)")
                self.stdout.flush()
                next_report[0] += step

        self.stdout.write(f"Seeding {events:,} events over {days} days (seed {seed})...")
        summary = seed_demo(events=events, days=days, seed=seed, progress=progress)
        rate = summary["events"] / summary["seconds"] if summary["seconds"] else 0
        self.stdout.write(
            self.style.SUCCESS(
                f"Done: {summary['accepted']:,} events stored in {summary['seconds']:.1f} s ({rate:,.0f} events/s)."
            )
        )
        self.stdout.write(f"Demo logins (password '{DEMO_PASSWORD}'):")
        for email, what in DEMO_LOGINS.items():
            self.stdout.write(f"  {email:<26} {what}")
