"""Queries and writes on the mapping store used by the graph walk. Functions take a session and
never commit: the caller (the engine's short transactions) does."""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from hashlib import sha256
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    ColumnElement,
    String,
    Table,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session

from dokstamp_sync.db import dialect_insert
from dokstamp_sync.dokstamp.errors import PermanentError
from dokstamp_sync.models import DeadLetter, InboxEvent, Mapping, NaturalKey, utcnow
from dokstamp_sync.sync.entities import REFERENCES

log = logging.getLogger("dokstamp_sync.sync")
ACTIVE = ("active", "archived", "revoked")  # mapped entities that still exist in DokStamp
FINAL = ("synced", "superseded", "dead")
REFERENCED = {*REFERENCES.values(), "module"}  # entities other events can wait for


def data_hash(payload: Any) -> str:
    return sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


# The hot path's statements are built once, on the tables (Core, not the ORM's unit of work),
# with bound parameters: building and caching a statement per call cost more than running it.
EVENTS = cast(Table, InboxEvent.__table__)
MAPPINGS = cast(Table, Mapping.__table__)
NATURAL_KEYS = cast(Table, NaturalKey.__table__)


@dataclass(frozen=True)
class Snapshot:
    """A mapping as it stood when read."""

    uuid: str
    status: str
    sent: dict[str, Any]
    digest: str | None


_GET_MAPPINGS = select(MAPPINGS.c.entity, MAPPINGS.c.erp_key, MAPPINGS.c.dokstamp_uuid,
                       MAPPINGS.c.status, MAPPINGS.c.sent, MAPPINGS.c.data_hash).where(
    tuple_(MAPPINGS.c.entity, MAPPINGS.c.erp_key).in_(bindparam("keys", expanding=True)))


def get_mappings(session: Session,
                 keys: list[tuple[str, str]]) -> dict[tuple[str, str], Snapshot]:
    """Several mappings in one query, by (entity, ERP key)."""
    if not keys:
        return {}
    rows = session.execute(_GET_MAPPINGS, {"keys": keys})
    return {(entity, key): Snapshot(uuid, status, dict(sent or {}), digest)
            for entity, key, uuid, status, sent, digest in rows}


def get_mapping(session: Session, entity: str, key: str) -> Mapping | None:
    return session.scalar(select(Mapping).where(Mapping.entity == entity,
                                                Mapping.erp_key == key))


def latest_event(session: Session, entity: str, key: str) -> InboxEvent | None:
    """The newest event for an entity that has not been superseded."""
    return session.scalar(
        select(InboxEvent)
        .where(InboxEvent.entity == entity, InboxEvent.erp_key == key,
               InboxEvent.state != "superseded")
        .order_by(InboxEvent.occurred_at.desc(), InboxEvent.id.desc()).limit(1))


def _newer(other: Any, entity: Any, key: Any, occurred_at: Any, pk: Any) -> ColumnElement[bool]:
    """``other`` is a newer event for the same entity, already synced or still to be synced.

    Newer means a later ``occurred_at``, or the same one received later (a higher id). A synced
    delete counts too, so an older upsert arriving after it cannot bring the entity back.
    """
    return and_(other.entity == entity, other.erp_key == key,
                other.state.in_(("pending", "waiting", "synced")), other.id != pk,
                (other.occurred_at > occurred_at)
                | ((other.occurred_at == occurred_at) & (other.id > pk)))


def newer_event_exists(session: Session, record: InboxEvent) -> bool:
    """Is there a newer event for the same entity (see :func:`_newer`)?"""
    return session.scalar(select(InboxEvent.id).where(_newer(
        InboxEvent, record.entity, record.erp_key, record.occurred_at, record.id)).limit(1)
    ) is not None


@dataclass(frozen=True)
class Open:
    """What an attempt needs to know of its event, read in one statement."""

    attempts: int
    deliveries: int
    superseded: bool  # a newer event for the same entity exists


_OPEN = and_(EVENTS.c.id == bindparam("pk"), EVENTS.c.state.not_in(FINAL))
_OTHER = EVENTS.alias("other")
_READ_OPEN = select(
    EVENTS.c.attempts, EVENTS.c.deliveries,
    exists().where(_newer(_OTHER.c, EVENTS.c.entity, EVENTS.c.erp_key, EVENTS.c.occurred_at,
                          EVENTS.c.id)),
).where(_OPEN)


def read_open(session: Session, pk: int) -> Open | None:
    """The event, if it exists and is not final yet."""
    row = session.execute(_READ_OPEN, {"pk": pk}).one_or_none()
    return Open(row[0], row[1], bool(row[2])) if row is not None else None


@dataclass(frozen=True)
class Finished:
    """An event just marked final: what the mapping and the log line need of it."""

    id: int
    event_id: str
    entity: str
    erp_key: str
    op: str
    occurred_at: datetime


_CLAIM = update(EVENTS).where(_OPEN).values(
    deliveries=EVENTS.c.deliveries + 1, next_attempt_at=bindparam("until"),
).returning(EVENTS.c.deliveries, EVENTS.c.payload)
_LEASE = update(EVENTS).where(EVENTS.c.id.in_(bindparam("pks", expanding=True)),
                              EVENTS.c.state.not_in(FINAL)).values(
    next_attempt_at=bindparam("until"))
_FINISH_SYNCED = update(EVENTS).where(_OPEN).values(
    state="synced", finished_at=bindparam("now"), waiting_for=None,
    last_error=func.coalesce(bindparam("note", type_=String), EVENTS.c.last_error),
    deliveries=case((and_(bindparam("completed", type_=Boolean), EVENTS.c.deliveries > 0),
                     EVENTS.c.deliveries - 1), else_=EVENTS.c.deliveries),
).returning(EVENTS.c.id, EVENTS.c.event_id, EVENTS.c.entity, EVENTS.c.erp_key, EVENTS.c.op,
            EVENTS.c.occurred_at)
_WAKE = update(EVENTS).where(EVENTS.c.state == "waiting",
                             EVENTS.c.waiting_for == bindparam("tag")).values(
    next_attempt_at=bindparam("now"))


def lease(session: Session, pks: list[int], seconds: float) -> None:
    """Keep the scheduler off these open events for ``seconds`` (a task holds them)."""
    session.execute(_LEASE, {"pks": pks, "until": utcnow() + timedelta(seconds=seconds)})


def claim(session: Session, pk: int, lease: float) -> tuple[int, dict[str, Any]] | None:
    """Count a delivery of an open event and lease it, in one statement.

    Returns the delivery count and the payload; None when the event is final or missing.
    """
    row = session.execute(_CLAIM, {"pk": pk, "until": utcnow() + timedelta(seconds=lease)}
                          ).one_or_none()
    return (row[0], row[1]) if row is not None else None


def finish_synced(session: Session, pk: int, *, note: str | None,
                  completed: bool) -> Finished | None:
    """Mark an open event synced in one statement, waking the events that waited for its
    entity. ``completed``: a task's run ended, undo its delivery count. None: it was final."""
    row = session.execute(_FINISH_SYNCED, {"pk": pk, "now": utcnow(), "note": note,
                                           "completed": completed}).one_or_none()
    if row is None:
        return None
    done = Finished(*row)
    wake_waiting(session, done.entity, done.erp_key)
    return done


def wake_waiting(session: Session, entity: str, key: str) -> None:
    """The events that wait for (entity, key) are due now (it has just been synced)."""
    if entity in REFERENCED:  # nothing ever waits for the others (certificates)
        session.execute(_WAKE, {"tag": f"{entity}:{key}", "now": utcnow()})


_KNOWN_UUID = select(NATURAL_KEYS.c.dokstamp_uuid).where(
    NATURAL_KEYS.c.entity == bindparam("entity"), NATURAL_KEYS.c.natural_key == bindparam("key"))


def known_uuid(session: Session, entity: str, key: str) -> str | None:
    uuid: str | None = session.scalar(_KNOWN_UUID, {"entity": entity, "key": key})
    return uuid


def forget_natural_keys(session: Session, entity: str, uuid: str) -> None:
    """A deleted entity's natural keys are free again: a later upsert searches and creates."""
    session.execute(delete(NaturalKey).where(NaturalKey.entity == entity,
                                             NaturalKey.dokstamp_uuid == uuid))


@functools.cache
def _insert_natural_key(dialect: str) -> Any:
    return dialect_insert(dialect)(NATURAL_KEYS).on_conflict_do_nothing(
        index_elements=["entity", "natural_key"]).returning(NATURAL_KEYS.c.id)


_MAPPING_VALUES = ("dokstamp_uuid", "status", "data_hash", "occurred_at", "event_id",
                   "synced_at")


@functools.cache
def _upsert_mapping(dialect: str, with_sent: bool) -> Any:
    stmt = dialect_insert(dialect)(MAPPINGS)
    updated = [*_MAPPING_VALUES, *(["sent"] if with_sent else [])]
    return stmt.on_conflict_do_update(index_elements=["entity", "erp_key"],
                                      set_={c: stmt.excluded[c] for c in updated})


def remember_natural_key(session: Session, entity: str, key: str, uuid: str) -> str:
    """Record natural key -> UUID; return the UUID the database holds for it (maybe another)."""
    inserted = session.scalar(_insert_natural_key(session.get_bind().dialect.name), {
        "entity": entity, "natural_key": key, "dokstamp_uuid": uuid, "created_at": utcnow()})
    return uuid if inserted is not None else (known_uuid(session, entity, key) or uuid)


def save_mapping(session: Session, record: InboxEvent | Finished, uuid: str, *,
                 status: str = "active",
                 sent: dict[str, Any] | None = None, digest: str | None = None) -> None:
    """Insert or update the event's mapping in one statement (INSERT ... ON CONFLICT).

    ``sent`` None keeps the last payload sent; ``digest`` None (after a delete or archive)
    makes the next upsert send again.
    """
    values: dict[str, Any] = {
        "entity": record.entity, "erp_key": record.erp_key, "dokstamp_uuid": uuid,
        "status": status, "data_hash": digest, "occurred_at": record.occurred_at,
        "event_id": record.event_id, "synced_at": utcnow()}
    if sent is not None:
        values["sent"] = sent
    session.execute(_upsert_mapping(session.get_bind().dialect.name, sent is not None), values)


def finish(session: Session, record: InboxEvent, state: str, error: str | None = None) -> None:
    """Mark an event final; when synced, wake the events that waited for its entity."""
    record.state = state
    record.finished_at = utcnow()
    record.waiting_for = None
    if error is not None:
        record.last_error = error
    if state == "synced":
        wake_waiting(session, record.entity, record.erp_key)


def dead_letter(session: Session, record: InboxEvent, reason: str,
                error: PermanentError | None = None) -> DeadLetter:
    """Mark the event dead and file (or refresh) its open dead letter."""
    finish(session, record, "dead", reason)
    letter = session.scalar(select(DeadLetter).where(DeadLetter.event_pk == record.id,
                                                     DeadLetter.status == "open"))
    if letter is None:
        letter = DeadLetter(event_pk=record.id, event_id=record.event_id,
                            entity=record.entity, erp_key=record.erp_key,
                            first_failed_at=record.first_failed_at or utcnow())
        session.add(letter)
    letter.reason = reason
    letter.attempts = record.attempts + 1
    letter.last_failed_at = utcnow()
    if error is not None:
        letter.http_status = error.status
        letter.response_body = error.body
        letter.request_method = error.method
        letter.request_path = error.path
    return letter


def park(record: InboxEvent, *, delay: float, error: str, waiting_for: str | None = None,
         count: bool = True, now: datetime | None = None) -> None:
    """Put an event back to ``waiting`` until ``delay`` seconds from now.

    ``count``: a transient failure, counted against the retry budget.
    """
    now = now or utcnow()
    record.state = "waiting"
    record.last_error = error
    record.waiting_for = waiting_for
    record.next_attempt_at = now + timedelta(seconds=delay)
    if count:
        record.attempts += 1
        record.first_failed_at = record.first_failed_at or now


def log_outcome(record: InboxEvent | Finished, state: str, detail: str | None = None) -> None:
    """The one log line per event outcome (fields for JSON logs; never a secret)."""
    log.info("event %s %s %s %s -> %s%s", record.event_id, record.entity, record.erp_key,
             record.op, state, f": {detail}" if detail else "",
             extra={"event_id": record.event_id, "entity": record.entity,
                    "key": record.erp_key, "op": record.op, "state": state})
