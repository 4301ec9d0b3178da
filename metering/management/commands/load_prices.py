from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from metering.pricing import CATALOG_FILE, catalog_load


class Command(BaseCommand):
    help = "Load (upsert) the default price catalog from the shipped data file or FILE."

    def add_arguments(self, parser):
        parser.add_argument("file", nargs="?", default=str(CATALOG_FILE))

    def handle(self, *args, file, **options):
        path = Path(file)
        if not path.exists():
            raise CommandError(f"No such file: {path}")
        try:
            created, updated = catalog_load(path)
        except (KeyError, ValueError) as exc:
            raise CommandError(f"{path} is not a valid price catalog: {exc}") from exc
        self.stdout.write(self.style.SUCCESS(f"Prices loaded: {created} new, {updated} updated."))
