"""Reading the ERP's Redis stream into the event inbox.

Entries are read with a consumer group (``XREADGROUP``); entries a dead consumer left pending are
taken over with ``XAUTOCLAIM``, following its cursor through the whole pending list. Every read
is bounded by bytes as well as by count (:mod:`dokstamp_sync.pipeline.batch`): an entry larger
than a batch may read becomes a dead letter without ever being read. An entry is
acknowledged (and deleted from the stream) only after its batch is committed to the database,
once per ``event_id``: a redelivered entry changes nothing. A malformed entry, or one the
database refuses, becomes a dead letter holding its raw text and the reason, once per stream
entry id; it never holds up the entries read with it (:mod:`dokstamp_sync.pipeline.inbox`).

A consumer group that is gone (the stream key deleted, Redis restarted empty) is created again
from the start of the stream. The health check sees progress, not a process: the heartbeat is
written only after a batch was recorded (or there was nothing to read), and a failing batch
leaves its time and reason in Redis (:attr:`~.redis_keys.RedisKeys.ingest_failure`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence

import redis
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import once_more_if_disconnected, session_scope
from dokstamp_sync.limits import FILE_MAX_BYTES, INGEST_BATCH_BYTES
from dokstamp_sync.pipeline.batch import Batch, BoundedReader
from dokstamp_sync.pipeline.inbox import (
    Recorded,
    StreamEntry,
    describe_error,
    record_entries,
    record_entry,
    record_oversized,
)
from dokstamp_sync.pipeline.outbox import mark_reported
from dokstamp_sync.pipeline.results import Report, Result
from dokstamp_sync.redis_keys import RedisKeys

__all__ = ["Dispatch", "StreamIngester", "record_entries", "record_entry"]

log = logging.getLogger("dokstamp_sync.pipeline.ingest")

Dispatch = Callable[[Sequence[int]], None]
Arrivals = Callable[[Sequence[tuple[str, str]]], None]  # (entity, event_id) of deletes/revokes
HEARTBEAT_TTL = 60  # s: a consumer that stops reading disappears from the health check
FAILURE_TTL = 300  # s: a failure older than this no longer says ingestion "keeps" failing
START = "0-0"
WAIT_STEP = 0.02  # s between two looks at an empty stream


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class StreamIngester:
    """One consumer of the group; :meth:`poll` handles one batch."""

    def __init__(self, client: redis.Redis, sessions: sessionmaker[Session], stream: str, *,
                 consumer: str, dispatch: Dispatch, lease: float, keys: RedisKeys = RedisKeys(),
                 claim_idle_ms: int = 60_000, batch: int = 200,
                 batch_bytes: int = INGEST_BATCH_BYTES,
                 max_file_bytes: int = FILE_MAX_BYTES, report: Report | None = None,
                 arrivals: Arrivals | None = None) -> None:
        self.redis, self.sessions, self.stream = client, sessions, stream
        self.report = report  # told the dead letters of entries that are no valid event
        # told the new deletes and revokes (the change guard counts them as they arrive)
        self.arrivals = arrivals
        self.consumer, self.dispatch, self.lease = consumer, dispatch, lease
        self.keys, self.group = keys, keys.group
        self.claim_idle_ms, self.batch = claim_idle_ms, batch
        self.reader = BoundedReader(client, stream, keys.group, consumer, count=batch,
                                    max_bytes=batch_bytes)
        self.claimed: list[bytes] = []  # ids claimed from others, not read yet
        self.max_file_bytes = max_file_bytes
        self.cursor = START  # where XAUTOCLAIM goes on in the pending list
        # Read this consumer's own pending entries first: at the start, and after a batch
        # failed (it is tried again at once, and no heartbeat is written while it fails).
        self.own_pending = True
        self.last_read = 0.0  # time.time() of the last batch recorded (health)

    def ensure_group(self) -> None:
        """Create the consumer group (from the stream's start) unless it exists."""
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self, block_ms: int = 1000) -> int:
        """Claim abandoned entries or read new ones, record, ack; return how many were read.

        Raises what made the batch fail (after noting it for the health check)."""
        try:
            batch = self._read(block_ms)
            if batch.gone:  # deleted from the stream while pending: they only leave the list
                self.redis.xack(self.stream, self.group, *batch.gone)
            entries = batch.entries
            recorded = self._handle(entries, batch.oversized) \
                if entries or batch.oversized else Recorded()
        except Exception as exc:
            self.own_pending = True
            self._note_failure(describe_error(exc))
            raise
        if recorded.failed:
            first = next(iter(recorded.failed.values()))
            self._note_failure(f"{len(recorded.failed)} stream entries could not be recorded "
                               f"(they stay pending): {first}")
        else:
            self._beat()
        return len(entries) + bool(batch.oversized)

    def handle(self, entries: Sequence[StreamEntry]) -> list[int]:
        """Record ``entries``, acknowledge them, dispatch the new events; return their keys."""
        return self._handle(entries).new

    def _read(self, block_ms: int) -> Batch:
        try:
            return self._next(block_ms)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
        log.warning("stream %s has no consumer group %s (the key was deleted, or Redis "
                    "restarted empty): creating it again", self.stream, self.group)
        self.ensure_group()
        self.cursor = START
        self.claimed = []
        return self._next(block_ms)

    def _next(self, block_ms: int) -> Batch:
        if self.own_pending:
            batch = self.reader.own_pending()  # ours, delivered, not acknowledged
            if batch:
                return batch
            self.own_pending = False
        batch = self._claimed()
        if batch:
            return batch
        batch = self.reader.new()
        # Waiting for new entries without reading any (a blocking XREADGROUP would hand over
        # the next entry whatever its size): look again every WAIT_STEP until block_ms.
        deadline = time.monotonic() + block_ms / 1000
        while not batch and time.monotonic() < deadline:
            time.sleep(min(WAIT_STEP, max(0.0, deadline - time.monotonic())))
            batch = self.reader.new()
        return batch

    def _claimed(self) -> Batch:
        """Entries idle in the pending list longer than ``claim_idle_ms``, claimed by id (up
        to a batch, going on from where the last call stopped; the cursor is back at 0-0 at
        the end), then read as many as fit; the rest are read by the next polls."""
        if not self.claimed:
            while len(self.claimed) < self.batch:
                self.cursor, ids = self.reader.claim(self.claim_idle_ms, self.cursor,
                                                     self.batch - len(self.claimed))
                self.claimed += ids
                if self.cursor == START:
                    break
        if not self.claimed:
            return Batch()
        batch = self.reader.claimed(self.claimed)
        del self.claimed[:len(batch.entries) + len(batch.gone) + bool(batch.oversized)]
        return batch

    def _handle(self, entries: Sequence[StreamEntry],
                oversized: tuple[bytes, int] | None = None) -> Recorded:
        def record() -> Recorded:
            with session_scope(self.sessions) as session:
                recorded = record_entries(session, entries, self.lease,
                                          max_file_bytes=self.max_file_bytes)
                if oversized is not None:
                    recorded.letters += record_oversized(session, *oversized,
                                                         self.reader.max_bytes)
                return recorded

        recorded = once_more_if_disconnected(record)
        done = [entry_id for entry_id, _ in entries if entry_id not in recorded.failed]
        done += [oversized[0]] if oversized is not None else []
        if done:  # committed: now, and only now, they may leave the stream
            with self.redis.pipeline() as pipe:
                pipe.xack(self.stream, self.group, *done)
                pipe.xdel(self.stream, *done)  # durable in the database; keep the stream short
                pipe.execute()
        if recorded.letters and self.report is not None and self.report(recorded.letters):
            self._mark_reported(recorded.letters)  # committed, then written (docs/outcomes.md)
        if recorded.arrivals and self.arrivals is not None:
            self.arrivals(recorded.arrivals)
        if recorded.new:
            self.dispatch(recorded.new)
        return recorded

    def _mark_reported(self, letters: list[Result]) -> None:
        try:
            with session_scope(self.sessions) as session:
                mark_reported(session, letters)
        except Exception as exc:  # the pump's sweeper writes them again
            log.warning("could not mark %d dead letter(s) reported (%s)", len(letters),
                        type(exc).__name__)

    def _beat(self) -> None:
        # The health check's proof that this consumer makes progress (expires if it stops).
        self.last_read = time.time()
        self.redis.set(f"{self.keys.heartbeat}ingest:{self.consumer}", str(self.last_read),
                       ex=HEARTBEAT_TTL)

    def _note_failure(self, reason: str) -> None:
        """Leave the failure where the health check looks (no secret: a short reason)."""
        try:
            self.redis.set(self.keys.ingest_failure, json.dumps(
                {"at": time.time(), "consumer": self.consumer, "reason": reason}),
                ex=FAILURE_TTL)
        except redis.RedisError:  # Redis itself is away: the health check says so already
            log.warning("could not note the ingest failure in Redis: %s", reason)
