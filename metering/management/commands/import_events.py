import csv
import json
from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from accounts.models import Organization
from metering.ingest import ingest_batch

INTEGER_FIELDS = {
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "quantity",
    "status_code",
}
BATCH = 1000


def csv_event(row: dict) -> dict:
    """A CSV row as an API event: empty cells are absent, numbers become numbers."""
    event = {}
    for key, value in row.items():
        if key is None or value is None or value == "":
            continue
        if key in INTEGER_FIELDS:
            try:
                event[key] = int(value)
            except ValueError:
                event[key] = value  # left for validation to reject with its message
        elif key == "latency_ms":
            try:
                event[key] = float(value) if "." in value else int(value)
            except ValueError:
                event[key] = value
        elif key == "metadata":
            try:
                event[key] = json.loads(value)
            except ValueError:
                event[key] = value
        else:
            event[key] = value
    return event


class Command(BaseCommand):
    help = "Import usage events from a JSONL or CSV file (the API's field names) through the ingestion path."

    def add_arguments(self, parser):
        parser.add_argument("file")
        parser.add_argument(
            "--org",
            help="organization slug (optional when only one exists, or "
            "when each line has an 'organization' field)",
        )
        parser.add_argument(
            "--format", choices=["jsonl", "csv"], help="default: from the file name"
        )

    def handle(self, *args, file, org, format, **options):
        path = Path(file)
        if not path.exists():
            raise CommandError(f"No such file: {path}")
        fmt = format or ("csv" if path.suffix.lower() == ".csv" else "jsonl")
        default_org = self._default_org(org)
        self.summary = {"accepted": 0, "duplicates": 0, "rejected": 0}
        self.orgs: dict[str, Organization | None] = {}
        pending: dict[int, list] = {}
        self.lines = 0  # counted by _read, also the lines that are not JSON
        with path.open(newline="", encoding="utf-8") as handle:
            for line_no, event in self._read(handle, fmt):
                target = default_org
                if isinstance(event, dict) and event.get("organization"):
                    target = self._org(event.pop("organization"))
                if target is None:
                    self._reject(
                        line_no, "No organization: pass --org or give each line an 'organization'."
                    )
                    continue
                bucket = pending.setdefault(target.id, [])
                bucket.append((line_no, event))
                if len(bucket) >= BATCH:
                    self._flush(target, pending.pop(target.id))
                if self.lines % 10_000 == 0:
                    self.stdout.write(
                        f"  {self.lines:,} lines read, {self.summary['accepted']:,} accepted so far"
                    )
        for org_id, items in pending.items():
            self._flush(Organization.objects.get(id=org_id), items)
        s = self.summary
        self.stdout.write(
            self.style.SUCCESS(
                f"{self.lines:,} lines: {s['accepted']:,} accepted, {s['duplicates']:,} duplicates, {s['rejected']:,} rejected."
            )
        )

    def _default_org(self, slug):
        if slug:
            found = Organization.objects.filter(slug=slug).first()
            if found is None:
                raise CommandError(f"No organization with slug {slug!r}.")
            return found
        orgs = list(Organization.objects.all()[:2])
        return orgs[0] if len(orgs) == 1 else None

    def _org(self, slug):
        if slug not in self.orgs:
            self.orgs[slug] = Organization.objects.filter(slug=slug).first()
        return self.orgs[slug]

    def _read(self, handle, fmt):
        if fmt == "csv":
            for line_no, row in enumerate(csv.DictReader(handle), start=2):
                self.lines += 1
                yield line_no, csv_event(row)
            return
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            self.lines += 1
            try:
                yield line_no, json.loads(line)
            except ValueError as exc:
                self._reject(line_no, f"not JSON: {exc}")

    def _reject(self, line_no, message):
        self.summary["rejected"] += 1
        self.stderr.write(f"line {line_no}: {message}")

    def _flush(self, org, items):
        result = ingest_batch(organization=org, events=[e for _, e in items])
        self.summary["accepted"] += result.accepted
        self.summary["duplicates"] += result.duplicates
        for rejection in result.rejected:
            line_no = items[rejection.index][0]
            self._reject(line_no, json.dumps(rejection.errors))
