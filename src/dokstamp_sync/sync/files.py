"""Uploading a file event: DokStamp deduplicates files by content, and so do we (the sha256 is
the natural key). Other file events still to do ride along in the same ``POST /files`` (up to
``BATCH_FILES`` files or ``BATCH_BYTES``), each under its own entity lock; where a file's bytes
come from is :mod:`.sources`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from hashlib import sha256
from typing import Any
from urllib.parse import urlsplit

from redis.lock import Lock

from dokstamp_sync.dokstamp import Entity, Upload
from dokstamp_sync.dokstamp.errors import DokStampError, UploadMismatch
from dokstamp_sync.events import Event
from dokstamp_sync.sync import sources
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.outcomes import Companion, Outcome
from dokstamp_sync.sync.statements import Snapshot, data_hash
from dokstamp_sync.sync.upserts import unchanged

log = logging.getLogger("dokstamp_sync.sync")
BATCH_FILES = 50  # files per POST /files
BATCH_BYTES = 20 * 1024 * 1024


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


def upsert_file(ctx: SyncContext, event: Event, snapshot: Snapshot | None,
                digest: str) -> Outcome:
    """Upload the file unless its content is known already (then map it, no call).

    The outcome carries the companions uploaded along for the engine to record; their tasks
    then find them synced and make no call. A companion that cannot be read is left to its
    own task.
    """
    if (same := unchanged(ctx, snapshot, digest)) is not None:
        return same
    data = event.data or {}
    content, mime = sources.load(data, ctx.files, ctx.file_http)
    own = _Pending(data, content, mime)
    uuid = ctx.store.known_uuid("file", f"sha256={own.sha}")
    companions: tuple[Companion, ...] = ()
    if uuid is None:
        batch = [own, *_companions(ctx, event, len(content))]
        try:
            uuid, companions = _remember_batch(ctx, batch, _upload(ctx, batch))
        finally:
            ctx.locks.release_all(p.lock for p in batch)
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
            lock = ctx.locks.try_take(f"entity:file:{key}")
            if lock is None:
                continue  # its own task is on it
            try:
                content, mime = sources.load(data, ctx.files, ctx.file_http)
            except Exception as exc:  # whatever it is, the companion's own task will say it
                log.info("file %s not taken along in the upload of %s: %s", key, event.key,
                         exc if isinstance(exc, sources.FileSourceError | DokStampError)
                         else type(exc).__name__)
                if isinstance(exc, sources.SourceUnavailable) and exc.unreachable \
                        and data.get("url"):
                    failing.add(_host(data["url"]))
                ctx.locks.release(lock)
                continue
            if used + len(content) > BATCH_BYTES:
                ctx.locks.release(lock)
                break
            used += len(content)
            out.append(_Pending(data, content, mime, pk, key, lock))
    except BaseException:  # never keep (and renew) a companion's lock past this call
        ctx.locks.release_all(p.lock for p in out)
        raise
    return out


def _host(url: Any) -> str:
    try:
        return (urlsplit(str(url)).hostname or "").lower()
    except ValueError:
        return ""


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
