"""What one event does in DokStamp: upsert (search before create, change detection), delete
(or archive when refused), revoke. Each makes DokStamp calls and returns an
:class:`~.outcomes.Outcome` for the engine to record; the natural keys behind search-before-create
are read and written through :class:`~.store.Store`, never inside an open transaction.
"""

from __future__ import annotations

import logging
from contextlib import suppress
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from redis.exceptions import LockError
from redis.lock import Lock

from dokstamp_sync.dokstamp import Entity, Upload
from dokstamp_sync.dokstamp.client import Resource
from dokstamp_sync.dokstamp.errors import (
    AuthenticationError,
    Conflict,
    DokStampError,
    NotFound,
    PermanentError,
    PermissionDenied,
    TransientError,
    UploadMismatch,
    ValidationFailed,
)
from dokstamp_sync.events import Event
from dokstamp_sync.states import MappingStatus
from dokstamp_sync.sync import files
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
from dokstamp_sync.sync.listing import listing_is_fresh
from dokstamp_sync.sync.outcomes import Companion, Dead, Drifted, Outcome
from dokstamp_sync.sync.store import Snapshot, data_hash

log = logging.getLogger("dokstamp_sync.sync")
BATCH_FILES = 50  # files per POST /files
BATCH_BYTES = 20 * 1024 * 1024


def _resource(ctx: SyncContext, spec: Spec) -> Resource:
    resource: Resource = getattr(ctx.client, spec.resource)
    return resource


def _changes(spec: Spec, payload: dict[str, Any], remote: dict[str, Any]) -> dict[str, Any]:
    """Fields whose value differs in DokStamp and that DokStamp lets us PATCH."""
    return {k: v for k, v in payload.items()
            if k not in spec.fixed and not same_value(v, remote_value(remote, k))}


def _check_identity(spec: Spec, event: Event, payload: dict[str, Any],
                    remote: Entity) -> None:
    """A found entity that belongs to something else is a conflict, never adopted: its
    references (``identity``, and the natural key's ``*_uuid`` fields) must be the event's."""
    refs = [f for f in spec.natural_key if f.endswith("_uuid") and f not in spec.identity]
    for field in (*spec.identity, *refs):
        theirs, ours = remote_value(remote, field), payload.get(field)
        if ours and theirs and theirs != ours:
            raise Dead(f"conflict: {event.entity} {event.key} matches DokStamp {event.entity} "
                       f"{remote.get('uuid')} by {', '.join(spec.natural_key)}, but there "
                       f"{field}={theirs} while the event has {field}={ours}")


def _search(ctx: SyncContext, spec: Spec, resource: Resource,
            payload: dict[str, Any]) -> Entity | None:
    """The DokStamp entity whose every natural-key field equals the event's, or ``None`` when
    provably there is none.

    Only the filters the docs show are sent (``spec.search_filters``): a server may ignore any
    other and answer with all its rows, so each hit is checked here, reading every page. A
    listing that cannot be proven complete is no proof of absence: retry rather than create a
    duplicate.
    """
    ctx.count("searches")
    where = {f: payload.get(f) for f in spec.search_filters}
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


def _find_or_create(ctx: SyncContext, spec: Spec, event: Event, payload: dict[str, Any],
                    create: Any, *, fresh: bool = False) -> tuple[str, Entity | None]:
    """Search before create, under a lock per natural key, with the database behind it.

    ``fresh``: the event's first attempt; then a fresh listing (see :mod:`.listing`) may stand in
    for the search. A create refused as a duplicate (a 409, or a 422 after the listing
    shortcut) searches and adopts an exact match. Returns the UUID and, when an existing entity
    was found, what DokStamp holds for it.
    """
    resource = _resource(ctx, spec)
    adopt = (event.data or {}).get("uuid")
    if adopt:  # data.uuid: adopt an existing entity without a create
        adopted = resource.get(str(adopt))
        _check_identity(spec, event, payload, adopted)
        return str(adopted["uuid"]), adopted
    key = natural_key(spec, payload)
    with ctx.lock(f"nk:{spec.entity}:{sha256(key.encode()).hexdigest()}", wait=10):
        known = ctx.store.known_uuid(spec.entity, key)
        remote: Entity | None = None
        if known is not None:
            try:
                remote = resource.get(known)
            except NotFound:  # deleted in DokStamp meanwhile: forget it, search again
                ctx.store.forget_natural_keys(spec.entity, known)
                known = None
        listed = known is None and fresh and listing_is_fresh(ctx, spec, resource)
        if known is None and not listed:
            remote = _search(ctx, spec, resource, payload)
        if remote is None:
            try:
                created: Entity | None = create(payload)
                ctx.count("creates")
            except (Conflict, ValidationFailed) as exc:
                if isinstance(exc, ValidationFailed) and not listed:
                    raise
                # Refused, maybe as a duplicate (409: a unique key taken; 422 after the
                # listing shortcut): adopt an exact match, else say what it conflicts with.
                created = None
                remote = _search(ctx, spec, resource, payload)
                if remote is None and isinstance(exc, Conflict):
                    raise Dead(f"conflict: DokStamp refused to create {spec.entity} {event.key} "
                               f"({exc.status}: {exc.message}) and no {spec.entity} with "
                               f"{key} exists to adopt", exc) from None
                if remote is None:
                    raise
        if remote is not None:
            _check_identity(spec, event, payload, remote)
            uuid = str(remote["uuid"])
        else:
            assert created is not None
            uuid = str(created["uuid"])
        held = ctx.store.remember_natural_key(spec.entity, key, uuid)
        if held != uuid:
            raise Dead(f"duplicate: {spec.entity} with {key} is {held} in the mapping store, "
                       f"but DokStamp returned {uuid}")
    return uuid, remote


def upsert(ctx: SyncContext, event: Event, payload: dict[str, Any], refs: dict[str, Any],
           snapshot: Snapshot | None, digest: str, *, fresh: bool = False) -> Outcome:
    try:
        return _upsert(ctx, event, payload, refs, snapshot, digest, fresh=fresh)
    except ValidationFailed as exc:
        _recheck_references(ctx, event, refs, exc)
        raise


def _recheck_references(ctx: SyncContext, event: Event, refs: dict[str, Any],
                        exc: ValidationFailed) -> None:
    """A 422 naming a reference (``"The selected student uuid is invalid."``) may mean the
    referenced entity was deleted outside dokstamp-sync while our mapping still points at it:
    GET it; when it is gone, forget its mapping, reopen its latest upsert and raise
    :class:`Drifted` (the retry recreates it first). Otherwise the 422 stands."""
    data = event.data or {}
    gone = []
    for field in exc.errors:
        entity = REFERENCES.get(field.removesuffix("_uuid") + "_key")
        key, uuid = data.get(field.removesuffix("_uuid") + "_key"), refs.get(field)
        if not field.endswith("_uuid") or entity is None or not isinstance(key, str) \
                or not isinstance(uuid, str):
            continue
        try:
            _resource(ctx, SPECS[entity]).get(uuid)
        except NotFound:
            ctx.store.forget_mapping(entity, key, uuid, reopen=True)
            log.warning("%s %s (%s) was deleted in DokStamp outside dokstamp-sync: mapping "
                        "forgotten, recreating it for %s %s", entity, key, uuid, event.entity,
                        event.key)
            gone.append(f"{entity} {key} ({uuid})")
    if gone:
        raise Drifted(f"{', '.join(gone)} deleted in DokStamp outside dokstamp-sync: "
                      "recreating, then trying again")


def _upsert(ctx: SyncContext, event: Event, payload: dict[str, Any], refs: dict[str, Any],
            snapshot: Snapshot | None, digest: str, *, fresh: bool) -> Outcome:
    spec = SPECS[event.entity]
    if snapshot is not None and snapshot.status == MappingStatus.ACTIVE \
            and snapshot.digest == digest:
        ctx.count("unchanged")
        return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus(snapshot.status),
                              sent=snapshot.sent, digest=digest, note="unchanged: no API call")
    if event.entity == "file":
        return _upsert_file(ctx, event, snapshot, digest)
    if event.entity == "certificate":
        return _upsert_certificate(ctx, event, payload, snapshot, digest, fresh=fresh)
    resource = _resource(ctx, spec)
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
        uuid, remote = _find_or_create(ctx, spec, event, payload, resource.create,
                                       fresh=fresh)
        created = remote is None
        if remote is not None:
            changes = _changes(spec, payload, remote)
            if changes:
                resource.update(uuid, changes)
    if event.entity == "course" and refs.get("modules"):
        _attach_missing(ctx, uuid, refs["modules"], all_missing=created)
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


def _attach_missing(ctx: SyncContext, course_uuid: str, modules: list[dict[str, Any]], *,
                    all_missing: bool) -> None:
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


@dataclass
class _Pending:
    """A file to upload: this event's own, or a companion's taken along in the same request."""

    data: dict[str, Any]
    content: bytes
    mime: str
    pk: int | None = None  # a companion's event
    key: str = ""
    lock: Lock | None = None

    @property
    def sha(self) -> str:
        return sha256(self.content).hexdigest()


def _upsert_file(ctx: SyncContext, event: Event, snapshot: Snapshot | None,
                 digest: str) -> Outcome:
    """Upload the file; DokStamp deduplicates by content, and so do we (sha256 natural key).

    Other file events still to do ride along in the same ``POST /files`` (up to
    ``BATCH_FILES`` files or ``BATCH_BYTES``), each under its own entity lock; the outcome
    carries them as companions for the engine to record, and their tasks then find them synced
    and make no call. A companion that cannot be read is left to its own task.
    """
    data = event.data or {}
    content, mime = files.load(data, ctx.files, ctx.file_http)
    own = _Pending(data, content, mime)
    uuid = ctx.store.known_uuid("file", f"sha256={own.sha}")
    companions: tuple[Companion, ...] = ()
    if uuid is None:
        batch = [own, *_companions(ctx, event, len(content))]
        try:
            uuid, companions = _remember_batch(ctx, batch, _upload(ctx, batch))
        finally:
            for p in batch:
                if p.lock is not None:
                    with suppress(LockError):
                        p.lock.release()
    return Outcome.synced(uuid=uuid, sent=_sent(own), digest=digest, companions=companions)


def _upload(ctx: SyncContext, batch: list[_Pending]) -> dict[str, Entity]:
    """Upload the batch's distinct contents in one request: their records by sha256.

    Two files with the same content are sent once (DokStamp would answer one record for both:
    both map to it). When the answer cannot be matched to the files (:class:`UploadMismatch`:
    a record missing, a size or a name that does not fit), each file is sent on its own, whose
    single record is unambiguous (deduplication makes sending one again harmless).
    """
    distinct: dict[str, _Pending] = {}
    for p in batch:
        distinct.setdefault(p.sha, p)
    pending = list(distinct.values())

    def send(items: list[_Pending]) -> list[Entity]:
        records = ctx.client.files.upload(
            [Upload(str(p.data["filename"]), p.content, p.mime) for p in items])
        ctx.count("uploads")
        return records

    try:
        records = send(pending)
    except UploadMismatch as exc:
        if len(pending) == 1:
            raise
        log.warning("file upload of %d files: %s; uploading them one per request",
                    len(pending), exc.message)
        records = [record for p in pending for record in send([p])]
    return {p.sha: r for p, r in zip(pending, records, strict=True)}


def _sent(p: _Pending) -> dict[str, Any]:
    return {"filename": p.data["filename"], "sha256": p.sha, "size": len(p.content)}


def _companions(ctx: SyncContext, event: Event, used: int) -> list[_Pending]:
    out: list[_Pending] = []
    for pk, key, payload in ctx.store.file_companions(event.event_id, BATCH_FILES - 1):
        lock = ctx.redis.lock(f"{ctx.lock_prefix}entity:file:{key}",
                              timeout=ctx.lock_timeout)
        if not lock.acquire(blocking=False):
            continue  # its own task is on it
        try:
            data = dict(payload.get("data") or {})
            content, mime = files.load(data, ctx.files, ctx.file_http)
        except (files.FileSourceError, DokStampError):
            lock.release()
            continue
        if used + len(content) > BATCH_BYTES:
            lock.release()
            break
        used += len(content)
        out.append(_Pending(data, content, mime, pk, key, lock))
    return out


def _remember_batch(ctx: SyncContext, batch: list[_Pending],
                    records: dict[str, Entity]) -> tuple[str, tuple[Companion, ...]]:
    """Record every uploaded file's natural key; the own file's UUID and the companions."""
    own = ctx.store.remember_natural_key("file", f"sha256={batch[0].sha}",
                                         str(records[batch[0].sha]["uuid"]))
    companions = []
    for p in batch[1:]:
        uuid = ctx.store.remember_natural_key("file", f"sha256={p.sha}",
                                              str(records[p.sha]["uuid"]))
        assert p.pk is not None
        companions.append(Companion(pk=p.pk, uuid=uuid, sent=_sent(p),
                                    digest=data_hash({"data": p.data, "refs": {}})))
    return own, tuple(companions)


def _upsert_certificate(ctx: SyncContext, event: Event, payload: dict[str, Any],
                        snapshot: Snapshot | None, digest: str, *, fresh: bool) -> Outcome:
    data = event.data or {}
    issue = bool(data.get("issue"))
    issued_at = data.get("issued_at")
    certs = ctx.client.certificates
    fields = {k: v for k, v in payload.items() if k not in ("issued_at", "status", "finish")}
    sent = fields | {"issue": issue}
    if snapshot is not None and snapshot.status == MappingStatus.ACTIVE:
        was_issued = bool(snapshot.sent.get("issue"))
        changed = {k: v for k, v in fields.items() if snapshot.sent.get(k) != v}
        if was_issued and changed:
            raise Dead(f"certificate {event.key} is already issued in DokStamp "
                       f"({snapshot.uuid}) and cannot be changed ({', '.join(sorted(changed))}):"
                       " revoke it and issue a new one")
        if not was_issued and (changed or issue):
            certs.update(snapshot.uuid, changed | (certs.issue_fields(issued_at) if issue
                                                   else {}))
        return Outcome.synced(uuid=snapshot.uuid, sent=sent, digest=digest)
    spec = SPECS["certificate"]

    def create(body: dict[str, Any]) -> Entity:
        return certs.create(body, issue=issue, issued_at=issued_at)

    uuid, remote = _find_or_create(ctx, spec, event, fields, create, fresh=fresh)
    if remote is not None:
        status = remote.get("status")
        if status in ("revoked", "expired"):
            raise Dead(f"certificate {event.key}: DokStamp's certificate {uuid} for this file is "
                       f"{status}; a new certificate needs a new file")
        if status == "draft" and issue:
            certs.update(uuid, certs.issue_fields(issued_at))
    return Outcome.synced(uuid=uuid, sent=sent, digest=digest)


def delete(ctx: SyncContext, event: Event, snapshot: Snapshot | None) -> Outcome:
    """Delete when nothing depends on it; else archive where DokStamp has a status for it.

    Dependents are counted first, as the docs' deletion rules do (``where[<entity>_uuid]``,
    ``per_page=1``, ``meta.total``), so a blocked delete is never sent: how DokStamp answers one
    is undocumented (it might be a 5xx, which would be retried for a day). A delete still
    refused (a dependent no documented filter can count) archives or dead-letters as well.
    """
    if snapshot is None or snapshot.status == MappingStatus.DELETED:
        return Outcome.synced(note="nothing to delete: not in DokStamp")
    spec = SPECS[event.entity]
    resource = _resource(ctx, spec)
    blockers = _count_dependents(ctx, spec, snapshot.uuid)
    if blockers:
        return _refuse_delete(ctx, spec, event, snapshot, f"referenced by {blockers}")
    try:
        resource.delete(snapshot.uuid)
    except NotFound:
        log.info("%s %s (%s) was already deleted in DokStamp", event.entity, event.key,
                 snapshot.uuid)
        return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED,
                              sent=snapshot.sent, note="already deleted in DokStamp")
    except (AuthenticationError, PermissionDenied):
        raise  # our credentials, not the entity's dependents: never archive for that
    except PermanentError as exc:
        return _refuse_delete(ctx, spec, event, snapshot, exc.message, exc)
    return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED, sent=snapshot.sent)


def _count_dependents(ctx: SyncContext, spec: Spec, uuid: str) -> str:
    """``"2 certificates, 5 enrollments"``: the dependents that block deleting ``uuid``, counted
    with the documented filters (empty when none)."""
    found = []
    for resource, field in spec.dependents:
        n = getattr(ctx.client, resource).count(**{field: uuid})
        if n:
            found.append(f"{n} {resource}")
    return ", ".join(found)


def _refuse_delete(ctx: SyncContext, spec: Spec, event: Event, snapshot: Snapshot,
                   why: str, error: PermanentError | None = None) -> Outcome:
    """A delete DokStamp does not allow: archive where the entity has a status for it."""
    if spec.archive_status is None:
        raise Dead(f"DokStamp refused to delete {event.entity} {event.key}: {why}", error)
    try:
        _resource(ctx, spec).update(snapshot.uuid, {"status": spec.archive_status})
    except NotFound:
        return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED,
                              sent=snapshot.sent, note="already deleted in DokStamp")
    return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.ARCHIVED,
                          sent=snapshot.sent, note=f"archived ({spec.archive_status}): {why}")


def revoke(ctx: SyncContext, event: Event, snapshot: Snapshot | None) -> Outcome:
    """Revoke an issued certificate (a draft is deleted instead: it was never issued)."""
    if snapshot is None or snapshot.status in (MappingStatus.DELETED, MappingStatus.REVOKED):
        return Outcome.synced(note="nothing to revoke")
    reason = (event.data or {}).get("revocation_reason") or (
        "deleted in the ERP" if event.op == "delete" else None)
    if not snapshot.sent.get("issue"):
        with suppress(NotFound):
            ctx.client.certificates.delete(snapshot.uuid)
        return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED,
                              sent=snapshot.sent, note="draft deleted")
    ctx.client.certificates.revoke(snapshot.uuid, reason)
    return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.REVOKED, sent=snapshot.sent)
