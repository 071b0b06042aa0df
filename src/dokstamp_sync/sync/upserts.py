"""Upserting an entity in DokStamp: find-or-create (search before create, under a lock per
natural key, with the database's natural-key table behind it), update what changed, attach a
course's modules, and re-check references DokStamp refuses (a referenced entity deleted in
DokStamp behind our back). Files (:mod:`.files`) and certificates (:mod:`.certificates`) use the
same find-or-create and re-check; each returns an :class:`~.outcomes.Outcome`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from hashlib import sha256
from typing import Any

from redis.exceptions import LockError
from redis.lock import Lock

from dokstamp_sync.dokstamp import Entity
from dokstamp_sync.dokstamp.client import Resource
from dokstamp_sync.dokstamp.errors import (
    Conflict,
    MalformedResponse,
    NotFound,
    ServerError,
    TransientError,
    TransportError,
    ValidationFailed,
    may_land_later,
)
from dokstamp_sync.events import Event
from dokstamp_sync.states import MappingStatus
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.entities import (
    REFERENCES,
    SPECS,
    Spec,
    matches,
    natural_key,
    remote_value,
    same_value,
)
from dokstamp_sync.sync.listing import distrust, listing_trusted, read_scope, scope_of
from dokstamp_sync.sync.marks import CreateMark
from dokstamp_sync.sync.outcomes import Dead, Drifted, InFlight, Outcome
from dokstamp_sync.sync.statements import Snapshot

log = logging.getLogger("dokstamp_sync.sync")


def unchanged(ctx: SyncContext, snapshot: Snapshot | None, digest: str) -> Outcome | None:
    """The outcome of an upsert whose data and references are what DokStamp was last sent
    (the mapping is active with the same digest): synced with no API call; else None."""
    if snapshot is None or snapshot.status != MappingStatus.ACTIVE or snapshot.digest != digest:
        return None
    ctx.count("unchanged")
    return Outcome.synced(uuid=snapshot.uuid, sent=snapshot.sent, digest=digest,
                          note="unchanged: no API call")


def check_identity(spec: Spec, event: Event, payload: dict[str, Any], remote: Entity) -> None:
    """A found entity that belongs to something else is a conflict, never adopted: its
    references (``identity``, and the natural key's ``*_uuid`` fields) must be the event's."""
    refs = [f for f in spec.natural_key if f.endswith("_uuid") and f not in spec.identity]
    for field in (*spec.identity, *refs):
        theirs, ours = remote_value(remote, field), payload.get(field)
        if ours and theirs and theirs != ours:
            raise Dead(f"conflict: {event.entity} {event.key} matches DokStamp {event.entity} "
                       f"{remote.get('uuid')} by {', '.join(spec.natural_key)}, but there "
                       f"{field}={theirs} while the event has {field}={ours}")


def check_owner(ctx: SyncContext, event: Event, uuid: str, *, found_by: str) -> None:
    """One DokStamp entity belongs to one ERP key (docs/erp-guide.md): an entity found (by a search,
    the natural-key table or ``data.uuid``) that another key's mapping holds is a conflict,
    never adopted: sharing it, one key would rename the other's entity and delete it."""
    if event.entity == "file":  # DokStamp deduplicates uploads: equal contents share one
        return
    owner = ctx.store.mapped_key(event.entity, uuid, deleted=True)
    if owner is not None and owner != event.key:
        raise Dead(f"conflict: {event.entity} {event.key} matches DokStamp {event.entity} {uuid} "
                   f"by {found_by}, which belongs to ERP key {owner}: one DokStamp entity "
                   f"belongs to one ERP key (merge {owner} and {event.key} in the ERP, or give "
                   f"{event.key} its own data, then replay)")


def search(ctx: SyncContext, spec: Spec, payload: dict[str, Any]) -> Entity | None:
    """The DokStamp entity whose every natural-key field equals the event's, or ``None`` when
    provably there is none. Counted once per search (``searches``).

    Only the filters the docs show are sent (``spec.search_filters``): a server may ignore any
    other and answer with all its rows, so each hit is checked here, reading every page. A
    listing that cannot be proven complete is no proof of absence: retry rather than create a
    duplicate. A scoped kind's search reads its whole scope and records it (see :mod:`.listing`).
    """
    ctx.count("searches")
    resource = ctx.resource(spec.resource)
    where = {f: payload.get(f) for f in spec.search_filters}
    if spec.scope is not None:
        rows, listing = read_scope(ctx, spec, payload, where)
        found = [remote for remote in rows if matches(spec, payload, remote)]
        if found:
            return found[0]
    else:
        listing = resource.listing(where)
        for remote in listing:
            if matches(spec, payload, remote):
                return remote
    if not listing.complete:
        raise TransientError(f"the search for {spec.entity} {natural_key(spec, payload)} read "
                             f"{listing.seen} of {listing.total} rows in {listing.pages} pages "
                             "and could not read the rest; not creating it blind",
                             method="GET", path=resource.path)
    return None


def wait_for_create_in_flight(ctx: SyncContext, entity: str, key: str,
                              mark: CreateMark | None = None) -> CreateMark:
    """Raise :class:`InFlight` while a failed create of natural key ``key`` may still land:
    never search (and create) before it had time to, or a late write and ours would both
    stay. Else the key's marks (unresolved: no listing proves it absent). ``mark``: read
    already (with the natural key's lock)."""
    mark = mark if mark is not None else ctx.creates.look(entity, key)
    if mark.left > 0:
        raise InFlight(f"a failed create of {entity} {key} may still land in DokStamp: "
                       "searching once it had time to", retry_after=mark.left)
    return mark


def find_or_create(ctx: SyncContext, spec: Spec, event: Event, payload: dict[str, Any],
                   create: Callable[[dict[str, Any]], Entity]) -> tuple[str, Entity | None]:
    """Search before create, under a lock per natural key, with the database behind it.

    A trusted listing of the key's scope (see :mod:`.listing`) stands in for the search,
    unless a create of this key was sent and its outcome never recorded (a lost response, a
    killed worker: the unresolved mark). A create refused as a duplicate (a 409, or a 422 after
    the listing shortcut) distrusts the listing, searches and adopts an exact match. Returns
    the UUID and, when an existing entity was found, what DokStamp holds for it.
    """
    resource = ctx.resource(spec.resource)
    adopt = (event.data or {}).get("uuid")
    if adopt:  # data.uuid: adopt an existing entity without a create
        check_owner(ctx, event, str(adopt), found_by="data.uuid")
        adopted = resource.get(str(adopt))
        check_identity(spec, event, payload, adopted)
        return str(adopted["uuid"]), adopted
    key = natural_key(spec, payload)
    # The key's marks, and whether its scope's listing is trusted, read as the lock is taken;
    # released (and the marks cleared) with the entity's lock, which the caller holds.
    reads = ctx.creates.reads(spec.entity, key, scope_of(spec, payload),
                              spec.entity if spec.scope is None else None)
    with ctx.locks.take(f"nk:{spec.entity}:{sha256(key.encode()).hexdigest()}", wait=10,
                        reads=reads, release_later=True) as held:
        try:
            mark = wait_for_create_in_flight(ctx, spec.entity, key,
                                             ctx.creates.parse(held.read))
            return _find_or_create_locked(ctx, spec, event, payload, create, key, mark, held)
        finally:
            ctx.creates.let_go(spec.entity, key)  # a mark left (a failure) expires on its own


def _find_or_create_locked(ctx: SyncContext, spec: Spec, event: Event, payload: dict[str, Any],
                           create: Callable[[dict[str, Any]], Entity],
                           key: str, mark: CreateMark, guard: Lock) -> tuple[str, Entity | None]:
    """:func:`find_or_create` under the natural key's lock ``guard`` (its marks: ``mark``)."""
    resource = ctx.resource(spec.resource)
    known = ctx.store.known_uuid(spec.entity, key)
    remote: Entity | None = None
    if known is not None:
        try:
            remote = resource.get(known)
        except NotFound:  # deleted in DokStamp meanwhile: forget it, search again
            ctx.store.forget_natural_keys(spec.entity, known)
            known = None
    listed = known is None and not mark.unresolved \
        and listing_trusted(ctx, spec, payload, resource, marked=mark.scope_trusted,
                            untrusted=mark.kind_untrusted)
    if known is None and not listed:
        remote = search(ctx, spec, payload)
    created: Entity | None = None
    sent = remote is None
    if sent:
        created, remote = _create(ctx, spec, event, payload, create, key, listed, guard)
    try:
        if remote is not None:
            check_identity(spec, event, payload, remote)
            uuid = str(remote["uuid"])
            check_owner(ctx, event, uuid, found_by=", ".join(spec.natural_key))
        else:
            assert created is not None
            uuid = str(created["uuid"])
        held = ctx.store.remember_natural_key(spec.entity, key, uuid)
    except Exception:  # (not a process going down: that leaves the mark, as kill -9 does)
        if sent:  # the create's outcome is known (it landed): nothing may land late any more
            ctx.creates.landed(spec.entity, key, guard)
        raise
    ctx.creates.clear(spec.entity, key, guard)  # recorded: the natural key answers for it
    if held != uuid:
        distrust(ctx, spec, payload)
        raise Dead(f"duplicate: {spec.entity} with {key} is {held} in the mapping store, "
                   f"but DokStamp returned {uuid}")
    return uuid, remote


def _create(ctx: SyncContext, spec: Spec, event: Event, payload: dict[str, Any],
            create: Callable[[dict[str, Any]], Entity], key: str,
            listed: bool, guard: Lock) -> tuple[Entity | None, Entity | None]:
    """POST the create, marked in flight; (what it created, None), or (None, the exact match
    adopted when DokStamp refused it as a duplicate)."""
    window = ctx.limits.create_window
    # Marked before the POST: a worker killed after sending it leaves the mark, so the next
    # attempt waits for a late write and then searches (no listing trusted for it). Renewed
    # with the locks until the answer is recorded, and lasting a window longer than they do: a
    # worker that takes over from this one (frozen with its request out) still waits, then
    # searches.
    ctx.creates.hold(spec.entity, key, window + ctx.locks.timeout)
    sent = time.monotonic()
    try:
        created = create(payload)
        ctx.count("creates")
        return created, None
    except (TransportError, ServerError, MalformedResponse) as exc:
        # The write may have happened, or may still happen (a slow write lands after the
        # client gave up). Marked first (a worker lost from here on leaves the window), then
        # searched at once: a lost response (the common case) is found and adopted now.
        took = time.monotonic() - sent  # a slow 5xx may be a gateway that gave up waiting
        ctx.creates.mark(spec.entity, key, window)
        landed, searched = search_after_failure(ctx, spec, event, payload)
        if landed is not None:
            return None, landed
        if searched and not may_land_later(exc, took):
            # Answered (a prompt 5xx other than a gateway's timeout, an unusable 2xx) or never
            # sent: the request is over and wrote nothing the search could find, so nothing can
            # land late. Settled: the attempt is retried as any 5xx is, and creates again.
            ctx.creates.clear(spec.entity, key, guard)
            ctx.count("failed_creates_settled")
            raise
        # No answer came, or a gateway gave up waiting: a late write may land. Wait out the
        # window before searching again, never creating before it had time to.
        raise InFlight(f"{exc} (the create may still land: searching after {window:g} s)",
                       retry_after=window) from exc
    except (Conflict, ValidationFailed) as exc:
        ctx.creates.clear(spec.entity, key, guard)  # refused: nothing was created
        if listed:
            distrust(ctx, spec, payload)  # the listing missed a duplicate: read it again
        if isinstance(exc, ValidationFailed) and not listed:
            raise
        # Refused, maybe as a duplicate (409: a unique key taken; 422 after the listing
        # shortcut): adopt an exact match, else say what it conflicts with.
        remote = search(ctx, spec, payload)
        if remote is None and isinstance(exc, Conflict):
            raise Dead(f"conflict: DokStamp refused to create {spec.entity} {event.key} "
                       f"({exc.status}: {exc.message}) and no {spec.entity} with "
                       f"{key} exists to adopt", exc) from None
        if remote is None:
            raise
        return None, remote
    except LockError:
        # Not sent, and the locks are another worker's now: so may the mark be; leave it.
        ctx.creates.let_go(spec.entity, key)
        raise
    except BaseException:
        ctx.creates.clear(spec.entity, key, guard)  # not sent (the breaker, a pause)
        raise


def search_after_failure(ctx: SyncContext, spec: Spec, event: Event,
                         payload: dict[str, Any]) -> tuple[Entity | None, bool]:
    """The entity a create that just failed (5xx, timeout, a malformed answer) wrote after
    all, searched at once, and whether the search was made: (None, False) when it cannot be
    done now (DokStamp failing, the breaker open), and the create's window is then waited out
    whatever the failure was."""
    try:
        found = search(ctx, spec, payload)
    except TransientError as exc:
        log.info("%s %s: the search after a failed create failed too (%s): waiting out the "
                 "create window", event.entity, event.key, type(exc).__name__)
        return None, False
    if found is not None:
        ctx.count("lost_responses_adopted")
        log.info("%s %s: a failed create had landed (%s): adopted at once", event.entity,
                 event.key, found.get("uuid"))
    return found, True


@contextmanager
def references_rechecked(ctx: SyncContext, event: Event, refs: dict[str, Any]) -> Iterator[None]:
    """Around an upsert: a 422 naming a reference (``"The selected student uuid is
    invalid."``) may mean the referenced entity was deleted outside dokstamp-sync while our
    mapping still points at it. GET it; when it is gone, forget its mapping, reopen its latest
    upsert and raise :class:`Drifted` (the retry recreates it first). Otherwise the 422
    stands."""
    try:
        yield
    except ValidationFailed as exc:
        _recheck_references(ctx, event, refs, exc)
        raise


def _recheck_references(ctx: SyncContext, event: Event, refs: dict[str, Any],
                        exc: ValidationFailed) -> None:
    data = event.data or {}
    gone = []
    for field in exc.errors:
        entity = REFERENCES.get(field.removesuffix("_uuid") + "_key")
        key, uuid = data.get(field.removesuffix("_uuid") + "_key"), refs.get(field)
        if not field.endswith("_uuid") or entity is None or not isinstance(key, str) \
                or not isinstance(uuid, str):
            continue
        try:
            ctx.resource(SPECS[entity].resource).get(uuid)
        except NotFound:
            ctx.store.forget_mapping(entity, key, uuid, reopen=True)
            log.warning("%s %s (%s) was deleted in DokStamp outside dokstamp-sync: mapping "
                        "forgotten, recreating it for %s %s", entity, key, uuid, event.entity,
                        event.key)
            gone.append(f"{entity} {key} ({uuid})")
    if gone:
        raise Drifted(f"{', '.join(gone)} deleted in DokStamp outside dokstamp-sync: "
                      "recreating, then trying again")


def upsert_entity(ctx: SyncContext, event: Event, payload: dict[str, Any],
                  refs: dict[str, Any], snapshot: Snapshot | None, digest: str) -> Outcome:
    """Create or update an entity other than a file or a certificate."""
    if (same := unchanged(ctx, snapshot, digest)) is not None:
        return same
    spec = SPECS[event.entity]
    resource = ctx.resource(spec.resource)
    created = False
    note = None
    uuid: str | None = None
    if snapshot is not None and snapshot.status in (MappingStatus.ACTIVE,
                                                    MappingStatus.ARCHIVED):
        try:
            uuid = _update_mapped(spec, event, payload, snapshot, resource)
        except NotFound:  # deleted on the dashboard: forget it and find or create it again
            ctx.store.forget_mapping(event.entity, event.key, snapshot.uuid, reopen=False)
            log.warning("%s %s (%s) was deleted in DokStamp outside dokstamp-sync: mapping "
                        "forgotten, recreating it", event.entity, event.key, snapshot.uuid)
            note = f"recreated: {snapshot.uuid} was deleted in DokStamp outside dokstamp-sync"
    if uuid is None:
        uuid, remote = find_or_create(ctx, spec, event, payload, resource.create)
        created = remote is None
        if remote is not None:
            changes = {k: v for k, v in payload.items()
                       if k not in spec.fixed and not same_value(v, remote_value(remote, k))}
            if changes:
                resource.update(uuid, changes)
    if event.entity == "course" and refs.get("modules"):
        _attach_missing_modules(ctx, uuid, refs["modules"], all_missing=created)
    sent = payload | ({"modules": refs["modules"]} if "modules" in refs else {})
    return Outcome.synced(uuid=uuid, sent=sent, digest=digest, note=note)


def _update_mapped(spec: Spec, event: Event, payload: dict[str, Any], snapshot: Snapshot,
                   resource: Resource) -> str:
    """PATCH what changed since the mapping's last payload; NotFound when it is gone."""
    uuid = snapshot.uuid
    moved = sorted(k for k in spec.fixed if k in snapshot.sent
                   and payload.get(k) != snapshot.sent[k])
    if moved:
        raise Dead(f"{event.entity} {event.key}: DokStamp cannot change {', '.join(moved)} "
                   f"of an existing {event.entity} ({uuid}); delete it and send it anew")
    changes = {k: v for k, v in payload.items()
               if k not in spec.fixed and snapshot.sent.get(k) != v}
    if snapshot.status == MappingStatus.ARCHIVED:  # upserted after a refused delete: revive
        changes["status"] = payload.get("status", "active")
    if changes:
        resource.update(uuid, changes)
    return uuid


def _attach_missing_modules(ctx: SyncContext, course_uuid: str, modules: list[dict[str, Any]],
                            *, all_missing: bool) -> None:
    """Attach the course's modules that are not attached yet (a new course has none).

    A module that is not attachable is taken as attached already; one of another institution is
    refused by DokStamp when attached, which the caller dead-letters.
    """
    if all_missing:
        missing = modules
    else:
        attachable = {m["uuid"] for m in ctx.client.courses.attachable_modules(course_uuid)}
        missing = [m for m in modules if m["uuid"] in attachable]
    if missing:
        ctx.client.courses.attach_modules(course_uuid, missing)
