"""Reading the ERP's Redis stream into the event inbox.

Entries are read with a consumer group (``XREADGROUP``); entries a dead consumer left pending are
taken over with ``XAUTOCLAIM``. An entry is acknowledged (and deleted from the stream) only after
its event is committed to the database, once per ``event_id``: a redelivered entry changes
nothing. A malformed entry becomes a dead letter holding its raw text and the reason, once per
stream entry id; it never stops the consumer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import timedelta

import redis
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import insert_ignore, session_scope
from dokstamp_sync.events import InvalidEvent, parse_event
from dokstamp_sync.models import DeadLetter, EventRecord, utcnow
from dokstamp_sync.redis_keys import HEARTBEAT

log = logging.getLogger("dokstamp_sync.ingest")
GROUP = "dokstamp-sync"
Dispatch = Callable[[Sequence[int]], None]


def _invalid(session: Session, stream_id: str, raw: str, reason: str,
             event_id: str | None) -> None:
    now = utcnow()
    clean = raw.replace("\x00", "\\u0000")  # PostgreSQL text cannot hold NUL
    insert_ignore(session, DeadLetter.__table__, {  # type: ignore[arg-type]
        "stream_id": stream_id, "event_id": (event_id or "")[:255] or None,
        "reason": f"invalid event: {reason}", "raw": clean, "attempts": 1, "status": "open",
        "first_failed_at": now, "last_failed_at": now}, ["stream_id"])
    log.warning("stream entry %s is not a valid event: %s", stream_id, reason,
                extra={"event_id": event_id, "state": "dead"})


def record_entry(session: Session, stream_id: str, fields: dict[bytes, bytes],
                 lease: float) -> int | None:
    """Store one stream entry; return the new event's primary key (None: nothing new).

    Each entry is written in its own savepoint: an entry the database refuses becomes a dead
    letter and cannot take the rest of its batch down with it.
    """
    raw_bytes = fields.get(b"event")
    raw = raw_bytes.decode("utf-8", "replace") if raw_bytes is not None else repr(fields)
    try:
        if raw_bytes is None:
            raise InvalidEvent("stream entry has no 'event' field")
        event = parse_event(raw)
    except InvalidEvent as exc:
        _invalid(session, stream_id, raw, exc.reason, exc.event_id)
        return None
    now = utcnow()
    payload = event.model_dump(mode="json")
    try:
        with session.begin_nested():
            pk = insert_ignore(session, EventRecord.__table__, {  # type: ignore[arg-type]
                "event_id": event.event_id, "entity": event.entity, "op": event.op,
                "erp_key": event.key, "occurred_at": event.occurred_at, "payload": payload,
                "state": "pending", "attempts": 0, "deliveries": 0, "received_at": now,
                # Dispatched right away; the scheduler re-dispatches if this lease runs out.
                "next_attempt_at": now + timedelta(seconds=lease)}, ["event_id"])
    except DBAPIError as exc:
        _invalid(session, stream_id, raw, f"refused by the database: {exc.orig}",
                 event.event_id)
        return None
    if pk is None:
        known = session.scalar(select(EventRecord.payload).where(
            EventRecord.event_id == event.event_id))
        if known != payload:  # an ERP bug: keep it visible, never drop it silently
            _invalid(session, stream_id, raw, f"event_id {event.event_id} was already used by "
                     "a different event; the first one is kept, this one is not applied",
                     event.event_id)
    return pk


class StreamIngester:
    """One consumer of the group; :meth:`poll` handles one batch."""

    def __init__(self, client: redis.Redis, sessions: sessionmaker[Session], stream: str, *,
                 consumer: str, dispatch: Dispatch, lease: float, group: str = GROUP,
                 claim_idle_ms: int = 60_000, batch: int = 200) -> None:
        self.redis, self.sessions, self.stream = client, sessions, stream
        self.consumer, self.dispatch, self.lease, self.group = consumer, dispatch, lease, group
        self.claim_idle_ms, self.batch = claim_idle_ms, batch
        self.last_read = 0.0  # time.time() of the last successful read (health)

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def poll(self, block_ms: int = 1000) -> int:
        """Claim abandoned entries, read new ones, record, ack; return how many were handled."""
        claimed = self.redis.xautoclaim(self.stream, self.group, self.consumer,
                                        min_idle_time=self.claim_idle_ms, start_id="0-0",
                                        count=self.batch)
        entries = list(claimed[1]) if claimed else []
        if not entries:
            read = self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"},
                                         count=self.batch, block=block_ms)
            # redis-py's hints do not cover XREADGROUP's [[stream, [(id, fields)]]] answer
            entries = [e for _, items in (read or []) for e in items]  # type: ignore[str-unpack,union-attr]
        self.last_read = time.time()
        # The health check's proof that this consumer is reading (expires if it stops).
        self.redis.set(f"{HEARTBEAT}ingest:{self.consumer}", str(self.last_read), ex=60)
        if entries:
            self.handle(entries)
        return len(entries)

    def handle(self, entries: Sequence[tuple[bytes, dict[bytes, bytes]]]) -> list[int]:
        new: list[int] = []
        with session_scope(self.sessions) as session:
            for entry_id, fields in entries:
                pk = record_entry(session, entry_id.decode(), fields, self.lease)
                if pk is not None:
                    new.append(pk)
        ids = [entry_id for entry_id, _ in entries]
        with self.redis.pipeline() as pipe:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)  # durable in the database now; keep the stream short
            pipe.execute()
        if new:
            self.dispatch(new)
        return new
