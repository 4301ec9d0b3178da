"""The visibility gate: the only authority on which usage a person may read.

Every read path starts here: pages, partials, option lists, exports, the JSON APIs and
chart data. A viewer's scope is the union of every role they hold (SPEC section 2):

- platform admin: everything;
- org admin: every event of that organization;
- team lead: events of that team;
- project admin: events of that project;
- everyone: their own events, and those sent with API tokens they own.

`scope_q` is one predicate over the columns the events table and the wide roll-up share
(organization_id, team_id, project_id, user_id, api_token_id), so a roll-up can never
show more than the events would.
"""

from dataclasses import dataclass

from django.db.models import BigIntegerField, Q, QuerySet, Value

from accounts.models import ApiToken, Membership, Organization, Project, Role, Team, User
from metering.aggregates import rollups_fold
from metering.models import ScopeKeyDaily, ScopeUsage15m, UsageEvent, ViewerLinkKind

# The role column's value for rows of owned API tokens in viewer_scope's one query.
_OWNED_ROLE = "owned token"


@dataclass(frozen=True)
class Scope:
    everything: bool = False
    org_ids: frozenset[int] = frozenset()  # whole organizations (org admin)
    team_ids: frozenset[int] = frozenset()
    project_ids: frozenset[int] = frozenset()
    user_id: int | None = None  # own events
    token_ids: frozenset[int] = frozenset()  # tokens the viewer owns
    member_org_ids: frozenset[int] = frozenset()  # every organization the viewer belongs to
    token_org_ids: frozenset[int] = frozenset()  # organizations of the tokens they own
    # (organization, kind, id) of the teams led, projects administered and tokens owned:
    # the partial scope per organization, as the viewer roll-ups link it.
    links: frozenset[tuple[int, str, int]] = frozenset()

    def links_in(self, org_id: int) -> set[tuple[str, int]]:
        """{(kind, id)} of this scope's links in one organization (metering.viewers)."""
        return {(kind, part) for org, kind, part in self.links if org == org_id}

    def covers_whole_orgs(self, org_ids) -> bool:
        """True when, within `org_ids`, the viewer sees every event (narrow roll-ups apply)."""
        if self.everything:
            return True
        return bool(org_ids) and set(org_ids) <= self.org_ids


def viewer_scope(user, *, fold: bool = True) -> Scope:
    """The scope of `user`, computed once per request object.

    Every read of the roll-ups starts here, so here events that ingestion listed and no
    worker folded yet are counted first (`fold`; only a reader of the budget spend
    counters, which ingestion keeps itself, passes False): what the viewer sees
    includes every event ingested before the request.
    """
    cached = getattr(user, "_usage_scope", None)
    if cached is not None:
        if fold:
            _fold_for(user, cached)
        return cached
    if not getattr(user, "is_authenticated", False) or not user.is_active:
        scope = Scope()
    elif user.is_platform_admin:
        scope = Scope(everything=True, user_id=user.id)
    else:
        orgs, teams, projects, member_orgs, tokens, token_orgs, links = (set() for _ in range(7))
        # One round trip for both: every page, partial and API call starts here.
        memberships = (
            Membership.objects.filter(user=user)
            .values_list("organization_id", "role", "team_id", "project_id")
            .order_by()
        )
        owned = (
            ApiToken.objects.filter(owner=user)
            .annotate(
                _role=Value(_OWNED_ROLE),
                _project=Value(None, output_field=BigIntegerField()),
            )
            .values_list("organization_id", "_role", "id", "_project")
            .order_by()
        )
        for org_id, role, team_id, project_id in memberships.union(owned, all=True).order_by():
            if role == _OWNED_ROLE:
                tokens.add(team_id)  # the token's id, in the third column
                token_orgs.add(org_id)
                links.add((org_id, ViewerLinkKind.TOKEN.value, team_id))
                continue
            member_orgs.add(org_id)
            if role == Role.ORG_ADMIN:
                orgs.add(org_id)
            elif role == Role.TEAM_LEAD and team_id:
                teams.add(team_id)
                links.add((org_id, ViewerLinkKind.TEAM.value, team_id))
            elif role == Role.PROJECT_ADMIN and project_id:
                projects.add(project_id)
                links.add((org_id, ViewerLinkKind.PROJECT.value, project_id))
        scope = Scope(
            org_ids=frozenset(orgs),
            team_ids=frozenset(teams),
            project_ids=frozenset(projects),
            user_id=user.id,
            token_ids=frozenset(tokens),
            member_org_ids=frozenset(member_orgs),
            token_org_ids=frozenset(token_orgs),
            links=frozenset(links),
        )
    if getattr(user, "is_authenticated", False):
        user._usage_scope = scope
        if fold:
            _fold_for(user, scope)
    return scope


def _fold_for(user, scope: Scope) -> None:
    """Fold the pending events of every organization `scope` reaches, once per request."""
    if getattr(user, "_usage_folded", False):
        return
    user._usage_folded = True
    if scope.everything:
        rollups_fold(None)
    else:
        rollups_fold(scope.org_ids | scope.member_org_ids | scope.token_org_ids)


def organization_scope(organization_id: int, *, fold: bool = True) -> Scope:
    """The scope of a reader of one whole organization (an API token with no owner),
    after folding its pending events (see viewer_scope)."""
    if fold:
        rollups_fold([organization_id])
    return Scope(org_ids=frozenset({organization_id}))


def scope_q(scope: Scope) -> Q:
    """The predicate for `scope` over events or the wide roll-up. Matches nothing if empty."""
    if scope.everything:
        return Q()
    q = Q(pk__in=[])
    for part in scope_parts(scope):
        q |= part
    return q


def scope_parts(scope: Scope) -> list[Q]:
    """The parts whose OR is `scope_q(scope)` (not for `everything`), one column = one
    value each: each part alone matches a leading-column prefix of an events index, so a
    reader that needs rows in index order (the events log) can read part by part and
    merge, where the OR of them would have to sort every row of the scope."""
    parts = [Q(organization_id=org_id) for org_id in sorted(scope.org_ids)]
    parts += [Q(team_id=team_id) for team_id in sorted(scope.team_ids)]
    parts += [Q(project_id=project_id) for project_id in sorted(scope.project_ids)]
    if scope.user_id:
        parts.append(Q(user_id=scope.user_id))
    parts += [Q(api_token_id=token_id) for token_id in sorted(scope.token_ids)]
    return parts


def scope_disjoint_parts(scope: Scope) -> list[Q] | None:
    """A partial scope split into parts no event matches twice, whose OR is
    `scope_q(scope)`: one per team, project, own user and own token, each excluding the
    earlier kinds (an own-token event of the lead's team is in the team's part only).
    Parts of one kind never overlap: an event has one team, one project, one user and one
    token. Each part matches a leading prefix of an events index that carries the other
    scope columns, so a reader can count every part from the index alone and add the
    counts. None when the scope holds whole organizations (or everything)."""
    columns = scope_columns(scope)
    if columns is None:
        return None
    parts: list[Q] = []
    earlier = Q()
    for column, ids in columns.items():
        for value in sorted(ids):
            part = Q(**{column: value})
            parts.append(part & ~earlier if earlier else part)
        earlier |= Q(**{f"{column}__in": sorted(ids)})
    return parts


def scope_columns(scope: Scope) -> dict[str, frozenset[int]] | None:
    """A partial scope as {column: ids} over team_id, project_id, user_id and
    api_token_id: the events visible are those matching any one of them. None when the
    scope holds whole organizations (or everything), which no such column says."""
    if scope.everything or scope.org_ids:
        return None
    columns = {
        "team_id": scope.team_ids,
        "project_id": scope.project_ids,
        "user_id": frozenset({scope.user_id}) if scope.user_id else frozenset(),
        "api_token_id": scope.token_ids,
    }
    return {column: ids for column, ids in columns.items() if ids}


def _rollup_scope_q(scope: Scope) -> Q:
    # The roll-up has a composite key, so "match nothing" cannot use pk__in.
    if scope.everything:
        return Q()
    q = Q(bucket__lt=0)  # buckets are epoch seconds: never negative
    for part in scope_parts(scope):
        q |= part
    return q


def visible_events(user) -> QuerySet[UsageEvent]:
    """The only authority on which usage events `user` may read."""
    return UsageEvent.objects.filter(scope_q(viewer_scope(user)))


def visible_events_in(user, org_ids) -> QuerySet[UsageEvent]:
    """The events `user` may read within organizations `org_ids`.

    The same rows as `visible_events(user)` in those organizations; when the user sees
    every one of them whole (an org admin), the predicate is the organization alone, which
    the (organization, ...) indexes answer in order, without an OR over the user's own
    events and tokens.
    """
    scope = viewer_scope(user)
    org_ids = tuple(org_ids)
    if scope.covers_whole_orgs(org_ids):
        return UsageEvent.objects.filter(organization_id__in=org_ids)
    return UsageEvent.objects.filter(scope_q(scope), organization_id__in=org_ids)


def visible_event_parts(user, org_ids) -> list[QuerySet[UsageEvent]]:
    """The events `user` may read within organizations `org_ids`, one queryset per part
    of their scope (`scope_parts`): together the rows of `visible_events_in`, each part
    alone a prefix of an (organization, part, time) index. A reader that reads part by
    part (the events log) filters each of these rather than `visible_events_in` narrowed
    to the part: the OR of every part beside its own part makes the planner expect a
    fraction of the part's rows, and sort them instead of walking the index in order."""
    scope = viewer_scope(user)
    org_ids = tuple(org_ids)
    events = UsageEvent.objects.filter(organization_id__in=org_ids) if org_ids else None
    if events is None:
        return [UsageEvent.objects.filter(part) for part in scope_parts(scope)]
    return [events.filter(part) for part in scope_parts(scope)]


def visible_scope_rollup(user) -> QuerySet[ScopeUsage15m]:
    """The wide roll-up rows `user` may read (the same predicate as visible_events)."""
    return ScopeUsage15m.objects.filter(_rollup_scope_q(viewer_scope(user)))


def rollup_scope_q(scope: Scope) -> Q:
    return _rollup_scope_q(scope)


def visible_organizations(user) -> QuerySet[Organization]:
    """Organizations `user` may pick: all for platform admins, else those they belong to."""
    scope = viewer_scope(user)
    if scope.everything:
        return Organization.objects.all()
    ids = set(scope.member_org_ids)
    ids |= set(Team.objects.filter(id__in=scope.team_ids).values_list("organization_id", flat=True))
    return Organization.objects.filter(id__in=ids)


def _partial_scope_usage(scope: Scope) -> QuerySet[ScopeKeyDaily] | None:
    """Scope-key rows (which team, project, user and token sent events on a day) of the
    parts of `scope` that are not whole organizations.

    Option lists take whole organizations from memberships (cheap) and only look up usage
    for team / project / own / own-token scopes, in the small scope-key roll-up, instead
    of scanning a whole organization's usage.
    """
    partial = Scope(
        team_ids=scope.team_ids,
        project_ids=scope.project_ids,
        user_id=scope.user_id,
        token_ids=scope.token_ids,
    )
    reach = (set(scope.member_org_ids) - set(scope.org_ids)) | set(scope.token_org_ids)
    # The organization leads every roll-up index: naming it lets each part of the
    # scope use its own index.
    return ScopeKeyDaily.objects.filter(_rollup_scope_q(partial), organization_id__in=reach)


def visible_teams(user) -> QuerySet[Team]:
    scope = viewer_scope(user)
    if scope.everything:
        return Team.objects.all()
    ids = _partial_scope_usage(scope).exclude(team_id=0).values("team_id")
    return Team.objects.filter(
        Q(organization_id__in=scope.org_ids) | Q(id__in=scope.team_ids) | Q(id__in=ids)
    )


def visible_projects(user) -> QuerySet[Project]:
    scope = viewer_scope(user)
    if scope.everything:
        return Project.objects.all()
    ids = _partial_scope_usage(scope).exclude(project_id=0).values("project_id")
    return Project.objects.filter(
        Q(organization_id__in=scope.org_ids) | Q(id__in=scope.project_ids) | Q(id__in=ids)
    )


def visible_users(user) -> QuerySet[User]:
    """People whose usage `user` may see: members of their orgs/teams/projects, and
    anyone with visible usage."""
    scope = viewer_scope(user)
    if scope.everything:
        return User.objects.all()
    member_ids = Membership.objects.filter(
        Q(organization_id__in=scope.org_ids)
        | Q(team_id__in=scope.team_ids)
        | Q(project_id__in=scope.project_ids)
    ).values("user_id")
    with_usage = _partial_scope_usage(scope).exclude(user_id=0).values("user_id")
    return User.objects.filter(Q(id=scope.user_id) | Q(id__in=member_ids) | Q(id__in=with_usage))


def visible_tokens(user) -> QuerySet[ApiToken]:
    scope = viewer_scope(user)
    if scope.everything:
        return ApiToken.objects.all()
    with_usage = _partial_scope_usage(scope).exclude(api_token_id=0).values("api_token_id")
    return ApiToken.objects.filter(
        Q(organization_id__in=scope.org_ids) | Q(owner_id=scope.user_id) | Q(id__in=with_usage)
    )
