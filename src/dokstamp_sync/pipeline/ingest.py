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
from typing import Any

import redis
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import (
    dialect_insert,
    insert_ignore,
    once_more_if_disconnected,
    session_scope,
)
from dokstamp_sync.events import Event, InvalidEvent, parse_event
from dokstamp_sync.models import DeadLetter, InboxEvent, utcnow
from dokstamp_sync.redis_keys import GROUP, HEARTBEAT

log = logging.getLogger("dokstamp_sync.pipeline.ingest")

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


def _parse(stream_id: str, fields: dict[bytes, bytes]) -> tuple[str, Event | InvalidEvent]:
    raw_bytes = fields.get(b"event")
    raw = raw_bytes.decode("utf-8", "replace") if raw_bytes is not None else repr(fields)
    try:
        if raw_bytes is None:
            raise InvalidEvent("stream entry has no 'event' field")
        return raw, parse_event(raw)
    except InvalidEvent as exc:
        return raw, exc


def _row(event: Event, lease: float) -> dict[str, Any]:
    now = utcnow()
    return {"event_id": event.event_id, "entity": event.entity, "op": event.op,
            "erp_key": event.key, "occurred_at": event.occurred_at,
            "payload": event.model_dump(mode="json"), "state": "pending", "attempts": 0,
            "deliveries": 0, "received_at": now,
            # Dispatched right away; the scheduler re-dispatches if this lease runs out.
            "next_attempt_at": now + timedelta(seconds=lease)}


def _reused(session: Session, stream_id: str, raw: str, event_id: str) -> None:
    # An ERP bug: keep it visible, never drop it silently.
    _invalid(session, stream_id, raw, f"event_id {event_id} was already used by a different "
             "event; the first one is kept, this one is not applied", event_id)


def record_entry(session: Session, stream_id: str, fields: dict[bytes, bytes],
                 lease: float) -> int | None:
    """Store one stream entry; return the new event's primary key (None: nothing new).

    The entry is written in its own savepoint: an entry the database refuses becomes a dead
    letter and cannot take the rest of its batch down with it.
    """
    raw, parsed = _parse(stream_id, fields)
    if isinstance(parsed, InvalidEvent):
        _invalid(session, stream_id, raw, parsed.reason, parsed.event_id)
        return None
    row = _row(parsed, lease)
    try:
        with session.begin_nested():
            pk = insert_ignore(session, InboxEvent.__table__,  # type: ignore[arg-type]
                               row, ["event_id"])
    except DBAPIError as exc:
        _invalid(session, stream_id, raw, f"refused by the database: {exc.orig}",
                 parsed.event_id)
        return None
    if pk is None and session.scalar(select(InboxEvent.payload).where(
            InboxEvent.event_id == parsed.event_id)) != row["payload"]:
        _reused(session, stream_id, raw, parsed.event_id)
    return pk


def record_entries(session: Session, entries: Sequence[tuple[bytes, dict[bytes, bytes]]],
                   lease: float) -> list[int]:
    """Store a batch of stream entries; return the new events' primary keys.

    The valid entries go in one multi-row INSERT (one round trip for the batch, not three per
    entry). If the database refuses it, the batch is written again entry by entry
    (:func:`record_entry`), so only the entry it refuses becomes a dead letter.
    """
    try:
        with session.begin_nested():
            return _record_bulk(session, entries, lease)
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise  # the connection, not the data: the caller tries the batch again
        pks = (record_entry(session, entry_id.decode(), fields, lease)
               for entry_id, fields in entries)
        return [pk for pk in pks if pk is not None]


def _record_bulk(session: Session, entries: Sequence[tuple[bytes, dict[bytes, bytes]]],
                 lease: float) -> list[int]:
    rows: dict[str, dict[str, Any]] = {}  # by event_id: the first entry with it is the one
    origin: dict[str, tuple[str, str]] = {}  # event_id -> (stream id, raw text)
    repeats: list[tuple[str, str, dict[str, Any]]] = []
    for entry_id, fields in entries:
        stream_id = entry_id.decode()
        raw, parsed = _parse(stream_id, fields)
        if isinstance(parsed, InvalidEvent):
            _invalid(session, stream_id, raw, parsed.reason, parsed.event_id)
            continue
        row = _row(parsed, lease)
        if parsed.event_id in rows:
            repeats.append((stream_id, raw, row))
        else:
            rows[parsed.event_id] = row
            origin[parsed.event_id] = (stream_id, raw)
    if not rows:
        return []
    table = InboxEvent.__table__
    stmt = dialect_insert(session.get_bind().dialect.name)(table).values(list(rows.values()))
    inserted: dict[str, int] = dict(session.execute(
        stmt.on_conflict_do_nothing(index_elements=["event_id"])
        .returning(table.c.event_id, table.c.id)).all())
    existed = [event_id for event_id in rows if event_id not in inserted]
    known: dict[str, Any] = dict(session.execute(
        select(InboxEvent.event_id, InboxEvent.payload)
        .where(InboxEvent.event_id.in_(existed))).all()) if existed else {}
    for event_id, row in rows.items():
        if event_id not in inserted and known.get(event_id) != row["payload"]:
            _reused(session, *origin[event_id], event_id)
    for stream_id, raw, row in repeats:  # compared with the copy that is kept
        event_id = row["event_id"]
        kept = rows[event_id]["payload"] if event_id in inserted else known.get(event_id)
        if kept != row["payload"]:
            _reused(session, stream_id, raw, event_id)
    return sorted(inserted.values())


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
        def record() -> list[int]:
            with session_scope(self.sessions) as session:
                return record_entries(session, entries, self.lease)

        new = once_more_if_disconnected(record)
        ids = [entry_id for entry_id, _ in entries]
        with self.redis.pipeline() as pipe:
            pipe.xack(self.stream, self.group, *ids)
            pipe.xdel(self.stream, *ids)  # durable in the database now; keep the stream short
            pipe.execute()
        if new:
            self.dispatch(new)
        return new
