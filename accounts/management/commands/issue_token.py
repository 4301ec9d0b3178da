from django.core.management.base import BaseCommand, CommandError

from accounts.models import Organization, Project, Team, TokenScope, User
from accounts.tokens import token_issue


class Command(BaseCommand):
    help = "Create an API token and print only its secret (shown this once, stored hashed)."

    def add_arguments(self, parser):
        parser.add_argument("--org", required=True, help="organization slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--owner", help="owner's email")
        parser.add_argument("--scopes", default="ingest", help="comma-separated: ingest,read")
        parser.add_argument("--service-account", default="")
        parser.add_argument("--team", help="default team slug")
        parser.add_argument("--project", help="default project slug")

    def handle(self, *args, **opts):
        org = Organization.objects.filter(slug=opts["org"]).first()
        if org is None:
            raise CommandError(f"No organization with slug {opts['org']!r}.")
        owner = None
        if opts["owner"]:
            owner = User.objects.filter(email=opts["owner"].lower()).first()
            if owner is None:
                raise CommandError(f"No user with email {opts['owner']!r}.")
        scopes = [s.strip() for s in opts["scopes"].split(",") if s.strip()]
        bad = set(scopes) - set(TokenScope.values)
        if bad or not scopes:
            raise CommandError(f"--scopes takes ingest and/or read, got {opts['scopes']!r}.")
        team = project = None
        if opts["team"]:
            team = Team.objects.filter(organization=org, slug=opts["team"]).first()
            if team is None:
                raise CommandError(f"No team {opts['team']!r} in {org.slug}.")
        if opts["project"]:
            project = Project.objects.filter(organization=org, slug=opts["project"]).first()
            if project is None:
                raise CommandError(f"No project {opts['project']!r} in {org.slug}.")
        issued = token_issue(
            organization=org,
            name=opts["name"],
            owner=owner,
            scopes=scopes,
            service_account=opts["service_account"],
            default_team=team,
            default_project=project,
        )
        self.stdout.write(issued.secret)
