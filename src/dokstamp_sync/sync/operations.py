"""What one event does in DokStamp: upsert (search before create, change detection), delete
(or archive when refused), revoke. Each makes DokStamp calls and returns an
:class:`~.outcomes.Outcome` for the engine to record; the natural keys behind search-before-create
are read and written through :class:`~.store.Store`, never inside an open transaction.
"""

from __future__ import annotations

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
    DokStampError,
    MalformedResponse,
    NotFound,
    PermanentError,
    PermissionDenied,
    ServerError,
    TransportError,
    ValidationFailed,
)
from dokstamp_sync.events import Event
from dokstamp_sync.redis_keys import INFLIGHT
from dokstamp_sync.states import MappingStatus
from dokstamp_sync.sync import files
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.entities import SPECS, Spec, natural_key, remote_value, same_value
from dokstamp_sync.sync.listing import listing_is_fresh
from dokstamp_sync.sync.outcomes import Companion, Dead, InFlight, Outcome
from dokstamp_sync.sync.store import Snapshot, data_hash

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
    """A found entity that belongs to something else is a conflict, never adopted."""
    for field in spec.identity:
        theirs, ours = remote_value(remote, field), payload.get(field)
        if ours and theirs and theirs != ours:
            raise Dead(f"conflict: {event.entity} {event.key} matches DokStamp {event.entity} "
                       f"{remote.get('uuid')} by {', '.join(spec.natural_key)}, but there "
                       f"{field}={theirs} while the event has {field}={ours}")


def _find_or_create(ctx: SyncContext, spec: Spec, event: Event, payload: dict[str, Any],
                    create: Any, *, fresh: bool = False) -> tuple[str, Entity | None]:
    """Search before create, under a lock per natural key, with the database behind it.

    ``fresh``: the event's first attempt; then a fresh listing (see :mod:`.listing`) may stand in
    for the search. Returns the UUID and, when an existing entity was found, what DokStamp
    holds for it.
    """
    resource = _resource(ctx, spec)
    adopt = (event.data or {}).get("uuid")
    if adopt:  # data.uuid: adopt an existing entity without a create
        adopted = resource.get(str(adopt))
        _check_identity(spec, event, payload, adopted)
        return str(adopted["uuid"]), adopted
    key = natural_key(spec, payload)
    digest = sha256(key.encode()).hexdigest()
    inflight = f"{INFLIGHT}{spec.entity}:{digest}"
    with ctx.lock(f"nk:{spec.entity}:{digest}", wait=10):
        # A create of this key failed in a way that may still land: never search (and create)
        # before it had time to, or a late write and ours would both stay.
        if (left := ctx.redis.pttl(inflight)) > 0:
            raise InFlight(f"a failed create of {spec.entity} {key} may still land in DokStamp",
                           retry_after=left / 1000)
        known = ctx.store.known_uuid(spec.entity, key)
        remote: Entity | None = None
        if known is not None:
            try:
                remote = resource.get(known)
            except NotFound:  # deleted in DokStamp meanwhile: forget it, search again
                ctx.store.forget_natural_keys(spec.entity, known)
                known = None
        where = {f: payload.get(f) for f in spec.natural_key}
        listed = known is None and fresh and listing_is_fresh(ctx, spec, resource)
        if known is None and not listed:
            remote = resource.find_one(**where)
            ctx.count("searches")
        if remote is None:
            try:
                created: Entity | None = create(payload)
                ctx.count("creates")
            except (TransportError, ServerError, MalformedResponse) as exc:
                # The write may have happened, or may still happen (a slow write lands after
                # the client gave up): wait twice the HTTP timeout, then search first.
                ctx.redis.set(inflight, "1", px=max(1, int(ctx.create_window * 1000)))
                raise InFlight(f"{exc} (the create may still land: searching after "
                               f"{ctx.create_window:g} s)", retry_after=ctx.create_window) from exc
            except ValidationFailed:
                if not listed:
                    raise
                created = None  # refused, maybe as a duplicate the listing missed: search
                remote = resource.find_one(**where)
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
    if snapshot is not None and snapshot.status in (MappingStatus.ACTIVE,
                                                    MappingStatus.ARCHIVED):
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
    else:
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
    return Outcome.synced(uuid=uuid, sent=sent, digest=digest)


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
            records = ctx.client.files.upload(
                [Upload(str(p.data["filename"]), p.content, p.mime) for p in batch])
            ctx.count("uploads")
            uuid, companions = _remember_batch(ctx, batch, records)
        finally:
            for p in batch:
                if p.lock is not None:
                    ctx.drop(p.lock)
                    with suppress(LockError):
                        p.lock.release()
    return Outcome.synced(uuid=uuid, sent=_sent(own), digest=digest, companions=companions)


def _sent(p: _Pending) -> dict[str, Any]:
    return {"filename": p.data["filename"], "sha256": p.sha, "size": len(p.content)}


def _companions(ctx: SyncContext, event: Event, used: int) -> list[_Pending]:
    out: list[_Pending] = []
    for pk, key, payload in ctx.store.file_companions(event.event_id, BATCH_FILES - 1):
        lock = ctx.new_lock(f"entity:file:{key}")
        if not lock.acquire(blocking=False):
            continue  # its own task is on it
        ctx.hold(lock)
        try:
            data = dict(payload.get("data") or {})
            content, mime = files.load(data, ctx.files, ctx.file_http)
        except (files.FileSourceError, DokStampError):
            ctx.drop(lock)
            lock.release()
            continue
        if used + len(content) > BATCH_BYTES:
            ctx.drop(lock)
            lock.release()
            break
        used += len(content)
        out.append(_Pending(data, content, mime, pk, key, lock))
    return out


def _remember_batch(ctx: SyncContext, batch: list[_Pending],
                    records: list[Entity]) -> tuple[str, tuple[Companion, ...]]:
    """Record every uploaded file's natural key; the own file's UUID and the companions."""
    own = ctx.store.remember_natural_key("file", f"sha256={batch[0].sha}",
                                         str(records[0]["uuid"]))
    companions = []
    for p, remote in zip(batch[1:], records[1:], strict=True):
        uuid = ctx.store.remember_natural_key("file", f"sha256={p.sha}", str(remote["uuid"]))
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
    """Delete when nothing depends on it; else archive where DokStamp has a status for it."""
    if snapshot is None or snapshot.status == MappingStatus.DELETED:
        return Outcome.synced(note="nothing to delete: not in DokStamp")
    spec = SPECS[event.entity]
    resource = _resource(ctx, spec)
    try:
        resource.delete(snapshot.uuid)
    except NotFound:
        pass  # already gone
    except (AuthenticationError, PermissionDenied):
        raise  # our credentials, not the entity's dependents: never archive for that
    except PermanentError as exc:
        if spec.archive_status is None:
            raise Dead(f"DokStamp refused to delete {event.entity} {event.key}: {exc.message}",
                       exc) from None
        resource.update(snapshot.uuid, {"status": spec.archive_status})
        return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.ARCHIVED,
                              sent=snapshot.sent,
                              note=f"archived ({spec.archive_status}): {exc.message}")
    return Outcome.synced(uuid=snapshot.uuid, status=MappingStatus.DELETED, sent=snapshot.sent)


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
