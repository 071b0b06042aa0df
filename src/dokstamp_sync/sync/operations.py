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
from urllib.parse import urlsplit

from redis.exceptions import LockError
from redis.lock import Lock

from dokstamp_sync.dokstamp import Entity, Upload
from dokstamp_sync.dokstamp.client import Resource
from dokstamp_sync.dokstamp.errors import (
    AuthenticationError,
    Conflict,
    DokStampError,
    MalformedResponse,
    NotFound,
    PermanentError,
    PermissionDenied,
    ServerError,
    TransientError,
    TransportError,
    UploadMismatch,
    ValidationFailed,
)
from dokstamp_sync.events import Event
from dokstamp_sync.redis_keys import INFLIGHT
from dokstamp_sync.states import MappingStatus
from dokstamp_sync.sync import files, references
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
from dokstamp_sync.sync.outcomes import Companion, Dead, Drifted, InFlight, Outcome
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

    ``fresh``: the event's first delivery and attempt, at the top level; then a fresh listing
    (see :mod:`.listing`) may stand in for the search, unless another event for the same ERP key
    is open (its attempt, maybe a lost one, may have created the entity after the listing). A
    create refused as a duplicate (a 409, or a 422 after the listing shortcut) searches and
    adopts an exact match. Returns the UUID and, when an existing entity was found, what
    DokStamp holds for it.
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
        listed = known is None and fresh and listing_is_fresh(ctx, spec, resource) \
            and not ctx.store.others_open(spec.entity, event.key, event.event_id)
        if known is None and not listed:
            remote = _search(ctx, spec, resource, payload)
        if remote is None:
            window = max(1, int(ctx.create_window * 1000))
            # Marked before the POST: a worker killed after sending it leaves the mark, so the
            # next attempt (even a "fresh" one) waits for a late write and then searches.
            ctx.redis.set(inflight, "1", px=window)
            try:
                created: Entity | None = create(payload)
                ctx.count("creates")
            except (TransportError, ServerError, MalformedResponse) as exc:
                # The write may have happened, or may still happen (a slow write lands after
                # the client gave up): wait twice the HTTP timeout, then search first.
                ctx.redis.set(inflight, "1", px=window)
                raise InFlight(f"{exc} (the create may still land: searching after "
                               f"{ctx.create_window:g} s)", retry_after=ctx.create_window) from exc
            except (Conflict, ValidationFailed) as exc:
                ctx.redis.delete(inflight)  # refused: nothing was created
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
            except BaseException:
                ctx.redis.delete(inflight)  # not sent (a lock lost, the breaker, a pause)
                raise
        if remote is not None:
            _check_identity(spec, event, payload, remote)
            uuid = str(remote["uuid"])
        else:
            assert created is not None
            uuid = str(created["uuid"])
        held = ctx.store.remember_natural_key(spec.entity, key, uuid)
        ctx.redis.delete(inflight)  # recorded: the natural key now answers for it
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
        return upsert_certificate(ctx, event, payload, snapshot, digest, fresh=fresh)
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
                    ctx.drop(p.lock)
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
    """Other file events to upload along, each under its entity lock (held by the caller until
    the upload is recorded). A companion whose source fails in any way is left to its own task,
    which classifies the failure for that file alone; a document server that did not answer
    (a timeout, a refused connection) is not asked for more companions in this batch: each
    would wait for its timeout while this upload waits. An error answer (a 503 for one file)
    is about that file: the others of the same server are still taken."""
    out: list[_Pending] = []
    failing: set[str] = set()  # hosts that did not answer
    try:
        for pk, key, payload in ctx.store.file_companions(event.event_id, BATCH_FILES - 1):
            data = dict(payload.get("data") or {})
            if data.get("url") and _host(data["url"]) in failing:
                continue
            lock = ctx.new_lock(f"entity:file:{key}")
            if not lock.acquire(blocking=False):
                continue  # its own task is on it
            ctx.hold(lock)
            try:
                content, mime = files.load(data, ctx.files, ctx.file_http)
            except Exception as exc:  # whatever it is, the companion's own task will say it
                log.info("file %s not taken along in the upload of %s: %s", key, event.key,
                         exc if isinstance(exc, files.FileSourceError | DokStampError)
                         else type(exc).__name__)
                if isinstance(exc, files.SourceUnavailable) and exc.unreachable \
                        and data.get("url"):
                    failing.add(_host(data["url"]))
                _let_go(ctx, lock)
                continue
            if used + len(content) > BATCH_BYTES:
                _let_go(ctx, lock)
                break
            used += len(content)
            out.append(_Pending(data, content, mime, pk, key, lock))
    except BaseException:  # never keep (and renew) a companion's lock past this call
        for p in out:
            if p.lock is not None:
                _let_go(ctx, p.lock)
        raise
    return out


def _host(url: Any) -> str:
    try:
        return (urlsplit(str(url)).hostname or "").lower()
    except ValueError:
        return ""


def _let_go(ctx: SyncContext, lock: Lock) -> None:
    ctx.drop(lock)
    with suppress(LockError):
        lock.release()


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


def _is_issued(cert: Entity) -> bool:
    """What DokStamp answered says issued: ``status: issued``, or a verification URL on a
    certificate that does not say it is something else."""
    status = cert.get("status")
    return status == "issued" or (status not in ("draft", "revoked", "expired")
                                  and bool(cert.get("public_verification_url")))


def _verify_issued(ctx: SyncContext, key: str, cert: Entity) -> Entity:
    """A write meant to issue must have issued: trust the answer only if it says so, else
    read the certificate once more; still not issued is a dead letter naming the style."""
    if _is_issued(cert):
        return cert
    cert = ctx.client.certificates.get(str(cert["uuid"]))
    if _is_issued(cert):
        return cert
    style = ctx.client.certificates.issue_style
    other = "status" if style == "finish" else "finish"
    fields = {"status": '"status": "issued"', "finish": '"finish": true'}
    raise Dead(f"certificate {key}: DokStamp did not issue it: {cert['uuid']} is "
               f"{cert.get('status') or 'without a status'} after a write meant to issue it "
               f"with DOKSTAMP_ISSUE_STYLE={style} ({fields[style]}). This server may issue the "
               f"other way: set DOKSTAMP_ISSUE_STYLE={other} (or leave it unset to follow the "
               "credential scheme: client credentials -> finish, password login -> status) "
               "and replay the dead letter")


def _synced(cert: Entity | None, *, uuid: str, sent: dict[str, Any] | None,
            digest: str | None = None, status: MappingStatus = MappingStatus.ACTIVE,
            note: str | None = None) -> Outcome:
    """A certificate's outcome, carrying DokStamp's status and verification URL when read."""
    return Outcome.synced(
        uuid=uuid, status=status, sent=sent, digest=digest, note=note,
        remote_status=None if cert is None else str(cert.get("status") or "") or None,
        verification_url=None if cert is None else cert.get("public_verification_url"))


def _bring(ctx: SyncContext, key: str, cert: Entity, changes: dict[str, Any], *, issue: bool,
           issued_at: Any, ending: bool) -> Entity:
    """Make the certificate DokStamp holds (``cert``, just read) what the event asks, acting
    on its real state: issued already (a lost answer, a replay) is left alone."""
    uuid = str(cert["uuid"])
    status = cert.get("status")
    if status in ("revoked", "expired"):
        if ending:  # a revoke follows: it is revoked already, which is where it ends
            return cert
        raise Dead(f"certificate {key}: DokStamp's certificate {uuid} for this file is "
                   f"{status}; a new certificate needs a new file")
    if _is_issued(cert):
        if changes:
            raise Dead(f"certificate {key} is already issued in DokStamp ({uuid}) and cannot be "
                       f"changed ({', '.join(sorted(changes))}): revoke it and issue a new one")
        return cert
    certs = ctx.client.certificates
    body = changes | (certs.issue_fields(issued_at) if issue else {})
    if body:
        cert = certs.update(uuid, body)
    return _verify_issued(ctx, key, cert) if issue else cert


def upsert_certificate(ctx: SyncContext, event: Event, payload: dict[str, Any],
                       snapshot: Snapshot | None, digest: str, *, fresh: bool,
                       revocation: Event | None = None) -> Outcome:
    """Create, change or issue a certificate, verifying that an issue issued; with
    ``revocation`` (a revoke or delete after this upsert, CONTRACT §2) it is then revoked on
    top (a draft, never issued, ends deleted: it is not created at all)."""
    data = event.data or {}
    issue = bool(data.get("issue"))
    issued_at = data.get("issued_at")
    certs = ctx.client.certificates
    fields = {k: v for k, v in payload.items() if k not in ("issued_at", "status", "finish")}
    sent = fields | {"issue": issue}
    reason = _revocation_reason(revocation)
    if revocation is not None and not issue:
        return _end(ctx, event.key, reason, snapshot, fields)
    if revocation is None and snapshot is not None and snapshot.status == MappingStatus.ACTIVE \
            and snapshot.digest == digest:
        ctx.count("unchanged")
        return Outcome.synced(uuid=snapshot.uuid, sent=snapshot.sent, digest=digest,
                              note="unchanged: no API call")
    cert: Entity | None = None
    if snapshot is not None and snapshot.status == MappingStatus.ACTIVE:
        uuid = snapshot.uuid
        was_issued = bool(snapshot.sent.get("issue"))
        changed = {k: v for k, v in fields.items() if snapshot.sent.get(k) != v}
        if was_issued and changed:
            raise Dead(f"certificate {event.key} is already issued in DokStamp "
                       f"({snapshot.uuid}) and cannot be changed ({', '.join(sorted(changed))}):"
                       " revoke it and issue a new one")
        if revocation is not None or changed or (issue and not was_issued):
            # The mapping may be stale (a lost answer issued it already): read, then act.
            cert = _bring(ctx, event.key, certs.get(uuid), changed, issue=issue,
                          issued_at=issued_at, ending=revocation is not None)
    else:
        created: list[Entity] = []

        def create(body: dict[str, Any]) -> Entity:
            created.append(certs.create(body, issue=issue, issued_at=issued_at))
            return created[-1]

        try:
            uuid, remote = _find_or_create(ctx, SPECS["certificate"], event, fields, create,
                                           fresh=fresh)
        except ValidationFailed as exc:
            _explain_used_file(ctx, event, fields, exc)
            raise
        if remote is not None:
            cert = _bring(ctx, event.key, remote, {}, issue=issue, issued_at=issued_at,
                          ending=revocation is not None)
        elif created:
            cert = _verify_issued(ctx, event.key, created[-1]) if issue else created[-1]
    if revocation is not None:
        return _end_on(ctx, event.key, reason, cert or certs.get(uuid), sent)
    return _synced(cert, uuid=uuid, sent=sent, digest=digest)


def _explain_used_file(ctx: SyncContext, event: Event, fields: dict[str, Any],
                       exc: ValidationFailed) -> None:
    """A create refused because the file is used: by a certificate of another student (found
    among the course's, a documented filter), that is a conflict, named with both sides."""
    if "file_uuid" not in exc.errors or not fields.get("course_uuid"):
        return
    for other in ctx.client.certificates.listing({"course_uuid": fields["course_uuid"]}):
        if matches(Spec("certificate", "certificates", ("file_uuid",)), fields, other):
            theirs = remote_value(other, "student_uuid")
            raise Dead(f"conflict: certificate {event.key} matches DokStamp certificate "
                       f"{other.get('uuid')} by file_uuid, but there student_uuid={theirs} "
                       f"while the event has student_uuid={fields.get('student_uuid')}",
                       exc) from None


def _revocation_reason(event: Event | None) -> str | None:
    if event is None:
        return None
    return (event.data or {}).get("revocation_reason") or (
        "deleted in the ERP" if event.op == "delete" else None)


def _end(ctx: SyncContext, key: str, reason: str | None, snapshot: Snapshot | None,
         fields: dict[str, Any] | None) -> Outcome:
    """Revoke (or, a draft, delete) the certificate DokStamp really holds: found by its
    mapping (read, never assumed) or, without one, by a search with the newest upsert's
    data; "nothing to revoke" only once the search confirms it is absent."""
    certs = ctx.client.certificates
    cert: Entity | None = None
    if snapshot is not None:
        with suppress(NotFound):  # gone (a deleted draft), or a stale mapping: search
            cert = certs.get(snapshot.uuid)
    wanted = fields or (snapshot.sent if snapshot is not None else None)
    spec = SPECS["certificate"]
    if cert is None and wanted and all(wanted.get(f) for f in (*spec.natural_key,
                                                               *spec.search_filters)):
        cert = _search(ctx, spec, ctx.client.certificates, wanted)
        ctx.count("searches")
        if cert is None:
            return Outcome.synced(
                uuid=snapshot.uuid if snapshot else None, status=MappingStatus.DELETED,
                sent=snapshot.sent if snapshot else None,
                note="nothing to revoke: not in DokStamp (searched by student and course)")
    if cert is None:
        return Outcome.synced(note="nothing to revoke: no upsert of this certificate is known "
                                   "(one arriving later is created and revoked)")
    return _end_on(ctx, key, reason, cert, snapshot.sent if snapshot else fields)


def _end_on(ctx: SyncContext, key: str, reason: str | None, cert: Entity,
            sent: dict[str, Any] | None) -> Outcome:
    """Revoke ``cert`` (as just read) unless it is revoked already; a draft is deleted (it
    was never issued); an issued certificate is never deleted."""
    certs = ctx.client.certificates
    uuid = str(cert["uuid"])
    status = cert.get("status")
    if status in ("revoked", "expired"):
        return _synced(cert, uuid=uuid, sent=sent, status=MappingStatus.REVOKED,
                       note=f"already {status}")
    if status == "draft":
        with suppress(NotFound):
            certs.delete(uuid)
        return _synced(cert | {"status": "deleted", "public_verification_url": None},
                       uuid=uuid, sent=sent, status=MappingStatus.DELETED, note="draft deleted")
    try:
        cert = certs.revoke(uuid, reason)
    except ValidationFailed:
        cert = certs.get(uuid)  # revoked meanwhile (a lost answer, another worker)?
        if cert.get("status") != "revoked":
            raise
    return _synced(cert, uuid=uuid, sent=sent, status=MappingStatus.REVOKED)


def delete(ctx: SyncContext, event: Event, snapshot: Snapshot | None) -> Outcome:
    """Delete when nothing depends on it; else archive where DokStamp has a status for it.

    Dependents are counted first, as the docs' deletion rules do (``where[<entity>_uuid]``,
    ``per_page=1``, ``meta.total``), so a blocked delete is never sent: how DokStamp answers one
    is undocumented (it might be a 5xx, which would be retried for a day). A delete still
    refused (a dependent no documented filter can count) archives or dead-letters as well.
    Without a mapping to trust, the entity is first searched for (:func:`_locate`).
    """
    spec = SPECS[event.entity]
    if snapshot is None or snapshot.status == MappingStatus.DELETED:
        # No mapping, or one a later create (its answer lost) may have made stale: a
        # missing mapping is not proof of absence, a search is.
        if event.entity == "file":  # the docs show no search of files by content
            return Outcome.synced(note="nothing to delete: no file mapped to this key (DokStamp "
                                       "documents no search of files by content)")
        found = _locate(ctx, event.entity, event.key)
        if isinstance(found, str):
            return Outcome.synced(
                uuid=snapshot.uuid if snapshot else None, status=MappingStatus.DELETED,
                sent=snapshot.sent if snapshot else None, note=f"nothing to delete: {found}")
        snapshot = found
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


LOCATE_DEPTH = 3  # enrollment -> course -> institution is the longest chain of references


def _locate(ctx: SyncContext, entity: str, key: str, depth: int = 0) -> Snapshot | str:
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
    resource = _resource(ctx, spec)
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
                adopted = resource.get(str(data["uuid"]))
            except NotFound:
                searched.append(f"uuid={data['uuid']}")
                continue
            return Snapshot(str(adopted["uuid"]), MappingStatus.ACTIVE,
                            references.payload(event, {}), None)
        refs: dict[str, Any] = {}
        for field, other in REFERENCES.items():
            ref = data.get(field)
            if isinstance(ref, str) and ref:
                if (uuid := _reference(ctx, other, ref, depth)) is None:
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
            inflight = f"{INFLIGHT}{entity}:{sha256(nk.encode()).hexdigest()}"
            if (left := ctx.redis.pttl(inflight)) > 0:
                raise InFlight(f"a failed create of {entity} {nk} may still land in DokStamp: "
                               "searching once it had time to", retry_after=left / 1000)
            found = _search(ctx, spec, resource, body)
            searched.append(nk)
            if found is None:
                continue
            uuid = str(found["uuid"])
            owner = ctx.store.mapped_key(entity, uuid)
            if owner is not None and owner != key:
                continue  # another ERP key's (it took this natural key over): not this one
            _check_identity(spec, event, body, found)
            return Snapshot(uuid, MappingStatus.ACTIVE, body, None)
    if not searched:
        return "; ".join(dict.fromkeys(reasons))
    why = f" ({'; '.join(dict.fromkeys(reasons))})" if reasons else ""
    return f"a search by {' / '.join(searched)} found none{why}"


def _reference(ctx: SyncContext, entity: str, key: str, depth: int) -> str | None:
    """The UUID a reference was (or would have been) created with: its mapping's, whatever its
    status, else the one a search finds; ``None`` when provably it is not in DokStamp."""
    mapping = ctx.store.mapping(entity, key)
    if mapping is not None:
        return mapping.uuid
    if entity == "file":
        raise Dead(f"cannot locate file {key} without its mapping: DokStamp documents no "
                   "search of files by content")
    found = _locate(ctx, entity, key, depth=depth + 1)
    return None if isinstance(found, str) else found.uuid


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


def revoke(ctx: SyncContext, event: Event, snapshot: Snapshot | None,
           fields: dict[str, Any] | None = None) -> Outcome:
    """A certificate's revoke or delete (CONTRACT §2): revoke what DokStamp holds (a draft is
    deleted instead). ``fields``: the newest upsert's payload, to search by when there is no
    mapping; the engine syncs that upsert first when it is still open."""
    return _end(ctx, event.key, _revocation_reason(event), snapshot, fields)
