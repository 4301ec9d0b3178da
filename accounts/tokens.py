"""API token services: issue, authenticate, revoke, rotate.

Secrets are 256-bit random strings, so a plain SHA-256 is enough to store them: there is
nothing to brute-force, and a hash lookup keeps authentication to one indexed query.
"""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from .models import ApiToken, Organization, Project, Team, TokenScope, User

TOKEN_PREFIX = "ud_"  # noqa: S105 - a public marker, not a secret
# Refresh last_used_at at most this often, so busy tokens don't write on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedToken:
    token: ApiToken
    secret: str


def _new_secret() -> tuple[str, str]:
    public = secrets.token_hex(4)
    secret = f"{TOKEN_PREFIX}{public}_{secrets.token_urlsafe(32)}"
    return f"{TOKEN_PREFIX}{public}", secret


def token_issue(
    *,
    organization: Organization,
    name: str,
    owner: User | None = None,
    scopes: list[str] | None = None,
    service_account: str = "",
    default_team: Team | None = None,
    default_project: Project | None = None,
) -> IssuedToken:
    """Create a token and return it with its secret, which is never stored or shown again."""
    scopes = sorted(set(scopes or [TokenScope.INGEST]))
    unknown = set(scopes) - set(TokenScope.values)
    if unknown:
        raise ValueError(f"Unknown scope(s): {', '.join(sorted(unknown))}")
    prefix, secret = _new_secret()
    token = ApiToken.objects.create(
        organization=organization,
        name=name,
        owner=owner,
        scopes=scopes,
        service_account=service_account,
        default_team=default_team,
        default_project=default_project,
        prefix=prefix,
        secret_hash=hash_secret(secret),
    )
    return IssuedToken(token=token, secret=secret)


def token_authenticate(secret: str, *, scope: str) -> ApiToken | None:
    """The active token with this secret and scope, or None. Updates last_used_at lazily."""
    if not secret or not secret.startswith(TOKEN_PREFIX) or len(secret) > 200:
        return None
    # On every API call: no ORDER BY (the hash is unique), only the relations callers use.
    found = list(
        ApiToken.objects.active()
        .select_related("organization", "owner")
        .filter(secret_hash=hash_secret(secret))[:1]
    )
    token = found[0] if found else None
    if token is None or not token.has_scope(scope):
        return None
    now = timezone.now()
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
        token.last_used_at = now
    return token


def token_revoke(*, token: ApiToken) -> None:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.save(update_fields=["revoked_at"])


@transaction.atomic
def token_rotate(*, token: ApiToken) -> IssuedToken:
    """Revoke `token` and issue a new one with the same settings."""
    token_revoke(token=token)
    return token_issue(
        organization=token.organization,
        name=token.name,
        owner=token.owner,
        scopes=token.scopes,
        service_account=token.service_account,
        default_team=token.default_team,
        default_project=token.default_project,
    )


def bearer_secret(request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer":
        return ""
    return value.strip()
