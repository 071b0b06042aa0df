"""Deleting an entity in DokStamp (docs/erp-guide.md): locate it (by its mapping, else by searching
with its recent upserts' data), count what depends on it, delete it, or archive it where
DokStamp refuses and the entity has a status for that. Certificates are never deleted here:
their deletes revoke (:mod:`.certificates`).
"""

from __future__ import annotations

import logging
from typing import Any

from dokstamp_sync.dokstamp.errors import (
    AuthenticationError,
    NotFound,
    PermanentError,
    PermissionDenied,
)
from dokstamp_sync.events import Event
from dokstamp_sync.states import MappingStatus
from dokstamp_sync.sync import references
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.entities import REFERENCES, SPECS, Spec, natural_key
from dokstamp_sync.sync.outcomes import Dead, Outcome
from dokstamp_sync.sync.statements import Snapshot
from dokstamp_sync.sync.upserts import check_identity, search, wait_for_create_in_flight

log = logging.getLogger("dokstamp_sync.sync")
LOCATE_DEPTH = 3  # enrollment -> course -> institution is the longest chain of references


def delete_entity(ctx: SyncContext, event: Event, snapshot: Snapshot | None) -> Outcome:
    """Delete when nothing depends on it; else archive where DokStamp has a status for it.

    Dependents are counted first, as the docs' deletion rules do (``where[<entity>_uuid]``,
    ``per_page=1``, ``meta.total``), so a blocked delete is never sent: how DokStamp answers one
    is undocumented (it might be a 5xx, which would be retried for a day). A delete still
    refused (a dependent no documented filter can count) archives or dead-letters as well.
    Without a mapping to trust, the entity is first searched for (:func:`locate`). A file
    another key's mapping (not deleted) still holds (equal contents share one DokStamp file)
    is never deleted: only this key's mapping is forgotten.
    """
    spec = SPECS[event.entity]
    if snapshot is None or snapshot.status == MappingStatus.DELETED:
        # No mapping, or one a later create (its answer lost) may have made stale: a
        # missing mapping is not proof of absence, a search is.
        if event.entity == "file":  # the docs show no search of files by content
            return Outcome.synced(note="nothing to delete: no file mapped to this key (DokStamp "
                                       "documents no search of files by content)")
        found = locate(ctx, event.entity, event.key)
        if isinstance(found, str):
            return Outcome.synced(
                uuid=snapshot.uuid if snapshot else None, status=MappingStatus.DELETED,
                sent=snapshot.sent if snapshot else None, note=f"nothing to delete: {found}")
        snapshot = found
    if event.entity == "file" and (other := ctx.store.mapped_key(
            "file", snapshot.uuid, besides=event.key)) is not None:
        # DokStamp deduplicates uploads: another key uploaded the same content and still maps
        # this file. Deleting it would take that key's file away: forget this key's only.
        return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED,
                              sent=snapshot.sent,
                              note=f"not deleted in DokStamp: the file is shared with file "
                                   f"{other} (equal contents), kept for it; this key's "
                                   "mapping is forgotten")
    blockers = count_dependents(ctx, spec, snapshot.uuid)
    if blockers:
        return archive_instead(ctx, spec, event, snapshot, f"referenced by {blockers}")
    try:
        ctx.resource(spec.resource).delete(snapshot.uuid)
    except NotFound:
        log.info("%s %s (%s) was already deleted in DokStamp", event.entity, event.key,
                 snapshot.uuid)
        return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED,
                              sent=snapshot.sent, note="already deleted in DokStamp")
    except (AuthenticationError, PermissionDenied):
        raise  # our credentials, not the entity's dependents: never archive for that
    except PermanentError as exc:
        return archive_instead(ctx, spec, event, snapshot, exc.message, exc)
    return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED, sent=snapshot.sent)


def locate(ctx: SyncContext, entity: str, key: str, depth: int = 0) -> Snapshot | str:
    """(entity, key) as DokStamp holds it, found without a mapping to trust; or why it provably
    is not there (``"a search by email=... found none"``, ``"never sent by the ERP"``).

    Searched by the natural key of each of its recent upserts known in the inbox (newest
    first; an older one may be what a lost create wrote), with the same verified search as an
    upsert's. References are taken from their mappings, else located the same way; one that
    provably is not in DokStamp means nothing of ours exists under that key. Whatever cannot
    be concluded raises (an incomplete listing, a create that may still land): absence is
    only ever concluded from a complete search. A hit mapped to another ERP key is not this
    entity.
    """
    if depth > LOCATE_DEPTH:
        raise Dead(f"cannot locate {entity} {key}: its references go deeper than {LOCATE_DEPTH}")
    spec = SPECS[entity]
    upserts = ctx.store.upserts(entity, key)
    if not upserts:
        return "never sent by the ERP"
    searched: list[str] = []  # natural keys a complete search found nothing under
    reasons: list[str] = []  # upserts nothing of ours can exist under
    for raw in upserts:
        try:
            event = Event.model_validate(raw)
        except ValueError:
            reasons.append("an upsert that is not a valid event")
            continue
        data = event.data or {}
        if data.get("uuid"):  # adopted (data.uuid): that entity or nothing
            try:
                adopted = ctx.resource(spec.resource).get(str(data["uuid"]))
            except NotFound:
                searched.append(f"uuid={data['uuid']}")
                continue
            return Snapshot(str(adopted["uuid"]), MappingStatus.ACTIVE,
                            references.payload(event, {}), None)
        refs: dict[str, Any] = {}
        for field, other in REFERENCES.items():
            ref = data.get(field)
            if isinstance(ref, str) and ref:
                if (uuid := _reference_uuid(ctx, other, ref, depth)) is None:
                    reasons.append(f"its {other} {ref} is not in DokStamp")
                    break
                refs[field.removesuffix("_key") + "_uuid"] = uuid
        else:
            body = references.payload(event, refs)
            if not all(body.get(f) for f in (*spec.natural_key, *spec.search_filters)):
                reasons.append(f"an upsert without {', '.join(spec.natural_key)}")
                continue
            nk = natural_key(spec, body)
            if nk in searched:
                continue
            wait_for_create_in_flight(ctx, entity, nk)
            found = search(ctx, spec, body)
            searched.append(nk)
            if found is None:
                continue
            uuid = str(found["uuid"])
            owner = ctx.store.mapped_key(entity, uuid)
            if owner is not None and owner != key:
                continue  # another ERP key's (it took this natural key over): not this one
            check_identity(spec, event, body, found)
            return Snapshot(uuid, MappingStatus.ACTIVE, body, None)
    if not searched:
        return "; ".join(dict.fromkeys(reasons))
    why = f" ({'; '.join(dict.fromkeys(reasons))})" if reasons else ""
    return f"a search by {' / '.join(searched)} found none{why}"


def _reference_uuid(ctx: SyncContext, entity: str, key: str, depth: int) -> str | None:
    """The UUID a reference was (or would have been) created with: its mapping's, whatever its
    status, else the one a search finds; ``None`` when provably it is not in DokStamp."""
    mapping = ctx.store.mapping(entity, key)
    if mapping is not None:
        return mapping.uuid
    if entity == "file":
        raise Dead(f"cannot locate file {key} without its mapping: DokStamp documents no "
                   "search of files by content")
    found = locate(ctx, entity, key, depth=depth + 1)
    return None if isinstance(found, str) else found.uuid


def count_dependents(ctx: SyncContext, spec: Spec, uuid: str) -> str:
    """``"2 certificates, 5 enrollments"``: the dependents that block deleting ``uuid``, counted
    with the documented filters (empty when none)."""
    found = []
    for resource, field in spec.dependents:
        n = ctx.resource(resource).count(**{field: uuid})
        if n:
            found.append(f"{n} {resource}")
    return ", ".join(found)


def archive_instead(ctx: SyncContext, spec: Spec, event: Event, snapshot: Snapshot,
                    why: str, error: PermanentError | None = None) -> Outcome:
    """A delete DokStamp does not allow: archive where the entity has a status for it."""
    if spec.archive_status is None:
        raise Dead(f"DokStamp refused to delete {event.entity} {event.key}: {why}", error)
    try:
        ctx.resource(spec.resource).update(snapshot.uuid, {"status": spec.archive_status})
    except NotFound:
        return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED,
                              sent=snapshot.sent, note="already deleted in DokStamp")
    return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.ARCHIVED,
                          sent=snapshot.sent, note=f"archived ({spec.archive_status}): {why}")
