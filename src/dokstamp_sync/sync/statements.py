"""The SQL behind :class:`.store.Store`: the hot path's statements, built once on the tables
(Core, not the ORM's unit of work) with bound parameters, and the row-level steps its
transactions share (save a mapping, finish an event, file a dead letter, park, report). Only the
store calls these; no other module of the walk writes SQL.
"""

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

from dokstamp_sync.db import dialect_insert, lock_tag
from dokstamp_sync.events import utc
from dokstamp_sync.held import held_before, older_held
from dokstamp_sync.models import (
    DeadLetter,
    InboxEvent,
    Mapping,
    NaturalKey,
    utcnow,
)
from dokstamp_sync.reporting import Result
from dokstamp_sync.states import EXISTING, OPEN, EventState, MappingStatus, RunState
from dokstamp_sync.sync.entities import REFERENCES
from dokstamp_sync.sync.outcomes import Park

log = logging.getLogger("dokstamp_sync.sync")
REFERENCED = {*REFERENCES.values(), "module"}  # entities other events can wait for
DESTRUCTIVE = ("delete", "revoke")  # the ops whose dead letters only their own kind resolves

EVENTS = cast(Table, InboxEvent.__table__)
MAPPINGS = cast(Table, Mapping.__table__)
NATURAL_KEYS = cast(Table, NaturalKey.__table__)
LETTERS = cast(Table, DeadLetter.__table__)


def data_hash(payload: Any) -> str:
    return sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Snapshot:
    """A mapping as it stood when read."""

    uuid: str
    status: str
    sent: dict[str, Any]
    digest: str | None
    remote_status: str | None = None  # a certificate's status in DokStamp, as last read
    verification_url: str | None = None  # a certificate's public_verification_url
    produced_at: datetime | None = None  # occurred_at of the event that produced ``uuid``

    def produced_after(self, occurred_at: datetime) -> bool:
        """Whether an event newer than ``occurred_at`` produced the mapped entity (a revoke
        at ``occurred_at`` must then leave it alone); unknown (NULL) counts as before."""
        return self.produced_at is not None and utc(self.produced_at) > utc(occurred_at)


@dataclass(frozen=True)
class Neighbour:
    """Another event of the same certificate (see :func:`.certificates.place`)."""

    pk: int
    op: str
    state: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class _Finished:
    """An event just marked final: what the mapping and the log line need of it."""

    id: int
    event_id: str
    entity: str
    erp_key: str
    op: str
    occurred_at: datetime
    received_at: datetime


def _newer(other: Any, entity: Any, key: Any, occurred_at: Any, pk: Any) -> ColumnElement[bool]:
    """``other`` is a newer event for the same entity, already synced or still to be synced.

    Newer means a later ``occurred_at``, or the same one received later (a higher id). A synced
    delete counts too, so an older upsert arriving after it cannot bring the entity back.
    """
    return and_(other.entity == entity, other.erp_key == key,
                other.state.in_((*OPEN, EventState.SYNCED)), other.id != pk,
                (other.occurred_at > occurred_at)
                | ((other.occurred_at == occurred_at) & (other.id > pk)))


_OPEN = and_(EVENTS.c.id == bindparam("pk"), EVENTS.c.state.in_(OPEN))
_OTHER = EVENTS.alias("other")
_HELD = EVENTS.alias("held")
# The attempt's one read: counts, "a newer event exists", and "an older event of this entity is
# held by the change guard" (docs/guard.md), so an ordinary upsert costs the guard no query.
_READ_OPEN = select(
    EVENTS.c.attempts, EVENTS.c.deliveries,
    exists().where(_newer(_OTHER.c, EVENTS.c.entity, EVENTS.c.erp_key, EVENTS.c.occurred_at,
                          EVENTS.c.id)),
    exists().where(held_before(_HELD.c, EVENTS.c.entity, EVENTS.c.erp_key,
                               EVENTS.c.occurred_at, EVENTS.c.id)),
).where(_OPEN)
_GET_MAPPINGS = select(MAPPINGS.c.entity, MAPPINGS.c.erp_key, MAPPINGS.c.dokstamp_uuid,
                       MAPPINGS.c.status, MAPPINGS.c.sent, MAPPINGS.c.data_hash,
                       MAPPINGS.c.remote_status, MAPPINGS.c.verification_url,
                       MAPPINGS.c.produced_at).where(
    tuple_(MAPPINGS.c.entity, MAPPINGS.c.erp_key).in_(bindparam("keys", expanding=True)))
_CLAIM = update(EVENTS).where(_OPEN).values(
    deliveries=EVENTS.c.deliveries + 1, next_attempt_at=bindparam("until"),
).returning(EVENTS.c.deliveries, EVENTS.c.payload)
_LEASE = update(EVENTS).where(EVENTS.c.id.in_(bindparam("pks", expanding=True)),
                              EVENTS.c.state.in_(OPEN)).values(
    next_attempt_at=bindparam("until"))
# A run that failed on a dropped database connection hands its event back (see Store.release).
_RELEASE = update(EVENTS).where(EVENTS.c.id == bindparam("pk"), EVENTS.c.state.in_(OPEN)).values(
    next_attempt_at=bindparam("now"),
    deliveries=case((EVENTS.c.deliveries > 0, EVENTS.c.deliveries - 1),
                    else_=EVENTS.c.deliveries))
# A heartbeat's renewal: only events still under the lease it set (or a later claim's), never an
# event a run has just parked for less than that (``floor``), never shortening a longer wait.
_RENEW = update(EVENTS).where(EVENTS.c.id.in_(bindparam("pks", expanding=True)),
                              EVENTS.c.state.in_(OPEN),
                              EVENTS.c.next_attempt_at >= bindparam("floor"),
                              EVENTS.c.next_attempt_at < bindparam("until")).values(
    next_attempt_at=bindparam("until"))
_FINISH_SYNCED = update(EVENTS).where(_OPEN).values(
    state=EventState.SYNCED, finished_at=bindparam("now"), waiting_for=None, reported_at=None,
    last_error=func.coalesce(bindparam("note", type_=String), EVENTS.c.last_error),
    deliveries=case((and_(bindparam("completed", type_=Boolean), EVENTS.c.deliveries > 0),
                     EVENTS.c.deliveries - 1), else_=EVENTS.c.deliveries),
).returning(EVENTS.c.id, EVENTS.c.event_id, EVENTS.c.entity, EVENTS.c.erp_key, EVENTS.c.op,
            EVENTS.c.occurred_at, EVENTS.c.received_at)
_WAKE = update(EVENTS).where(EVENTS.c.state == EventState.WAITING,
                             EVENTS.c.waiting_for == bindparam("tag")).values(
    next_attempt_at=bindparam("now"))
_KNOWN_UUID = select(NATURAL_KEYS.c.dokstamp_uuid).where(
    NATURAL_KEYS.c.entity == bindparam("entity"), NATURAL_KEYS.c.natural_key == bindparam("key"))
_MAPPING_VALUES = ("dokstamp_uuid", "status", "data_hash", "occurred_at", "event_id",
                   "synced_at")


@functools.cache
def _insert_natural_key(dialect: str) -> Any:
    return dialect_insert(dialect)(NATURAL_KEYS).on_conflict_do_nothing(
        index_elements=["entity", "natural_key"]).returning(NATURAL_KEYS.c.id)


@functools.cache
def _upsert_mapping(dialect: str, with_sent: bool, with_remote: bool = False,
                    produced: bool = False) -> Any:
    stmt = dialect_insert(dialect)(MAPPINGS)
    updated = [*_MAPPING_VALUES, *(["sent"] if with_sent else []),
               *(["remote_status", "verification_url"] if with_remote else [])]
    # The producer is the event that wrote the entity: one that created, changed or issued it
    # (``produced``), or one that brought a new UUID. An event only acting on the same entity
    # (a revoke, an unchanged re-send) keeps it.
    same = MAPPINGS.c.dokstamp_uuid == stmt.excluded.dokstamp_uuid
    producer = {c: stmt.excluded[c] if produced else
                case((same, MAPPINGS.c[c]), else_=stmt.excluded[c])
                for c in ("produced_by", "produced_at")}
    return stmt.on_conflict_do_update(index_elements=["entity", "erp_key"],
                                      set_={c: stmt.excluded[c] for c in updated} | producer)


# -- row-level steps the store's transactions share -------------------------------------------

def _state(session: Session, pk: int) -> str:
    state = session.scalar(select(InboxEvent.state).where(InboxEvent.id == pk))
    return str(state) if state is not None else RunState.MISSING


def _mappings(session: Session,
              keys: list[tuple[str, str]]) -> dict[tuple[str, str], Snapshot]:
    if not keys:
        return {}
    rows = session.execute(_GET_MAPPINGS, {"keys": keys})
    return {(entity, key): Snapshot(uuid, status, dict(sent or {}), digest, remote, url, made)
            for entity, key, uuid, status, sent, digest, remote, url, made in rows}


def _neighbours(session: Session, key: str) -> tuple[Neighbour, ...]:
    """The events of certificate ``key`` not superseded, oldest first (one query); where one
    of them stands among the others, :func:`.certificates.place` says."""
    rows = session.execute(
        select(InboxEvent.id, InboxEvent.op, InboxEvent.state, InboxEvent.payload)
        .where(InboxEvent.entity == "certificate", InboxEvent.erp_key == key,
               InboxEvent.state != EventState.SUPERSEDED)
        .order_by(InboxEvent.occurred_at, InboxEvent.id)).all()
    return tuple(Neighbour(i, op, state, payload) for i, op, state, payload in rows)


def _newer_exists(session: Session, record: InboxEvent) -> bool:
    return session.scalar(select(InboxEvent.id).where(_newer(
        InboxEvent, record.entity, record.erp_key, record.occurred_at, record.id)).limit(1)
    ) is not None


def wakes(entity: str) -> bool:
    """Whether other events can wait for an entity of this kind (and so are woken by it)."""
    return entity in REFERENCED or entity == "certificate"


def _wake(session: Session, entity: str, key: str, *, locked: bool = False) -> None:
    """The events that wait for (entity, key) are due now (it has just been synced, or, a
    certificate's, its revoke or delete ended: a newer upsert waits for it). ``locked``: the
    caller took the tag's lock already."""
    if wakes(entity):
        tag = f"{entity}:{key}"
        if not locked:
            lock_tag(session, tag)
        session.execute(_WAKE, {"tag": tag, "now": utcnow()})


def _ready(session: Session, record: InboxEvent, tag: str, since: datetime) -> bool:
    """What ``record`` parks waiting for came while its run was on (``since``: the run's
    start), so the wake-up went by before this park: the referenced entity recorded in
    DokStamp since; for a certificate's upsert, no older revoke or delete of it still open; for
    an event behind a held one, nothing older of its entity held any more. Only a change
    since the run began counts: a wait that an existing mapping does not end (a course with no
    known institution) keeps its delay instead of running again at every tick."""
    kind, _, rest = tag.partition(":")
    if kind == "held":
        entity, _, key = rest.partition(":")
        return older_held(session, entity, key, record.occurred_at, record.id) is None
    if kind == "certificate":
        return session.scalar(select(EVENTS.c.id).where(
            EVENTS.c.entity == kind, EVENTS.c.erp_key == rest, EVENTS.c.op != "upsert",
            EVENTS.c.state.in_(OPEN), EVENTS.c.occurred_at <= record.occurred_at,
            EVENTS.c.id != record.id).limit(1)) is None
    row = session.execute(select(MAPPINGS.c.status, MAPPINGS.c.synced_at).where(
        MAPPINGS.c.entity == kind, MAPPINGS.c.erp_key == rest)).one_or_none()
    return row is not None and row[0] in EXISTING and utc(row[1]) >= since


def _known_uuid(session: Session, entity: str, key: str) -> str | None:
    uuid: str | None = session.scalar(_KNOWN_UUID, {"entity": entity, "key": key})
    return uuid


def _remember(session: Session, entity: str, key: str, uuid: str) -> str:
    inserted = session.scalar(_insert_natural_key(session.get_bind().dialect.name), {
        "entity": entity, "natural_key": key, "dokstamp_uuid": uuid, "created_at": utcnow()})
    return uuid if inserted is not None else (_known_uuid(session, entity, key) or uuid)


def _forget(session: Session, entity: str, uuid: str) -> None:
    session.execute(delete(NaturalKey).where(NaturalKey.entity == entity,
                                             NaturalKey.dokstamp_uuid == uuid))


def _held_elsewhere(session: Session, entity: str, key: str, uuid: str) -> bool:
    """Another key's mapping, not deleted, holds ``uuid`` (a file shared by equal contents):
    its natural keys are not forgotten."""
    return session.scalar(select(MAPPINGS.c.erp_key).where(
        MAPPINGS.c.entity == entity, MAPPINGS.c.dokstamp_uuid == uuid,
        MAPPINGS.c.erp_key != key, MAPPINGS.c.status != MappingStatus.DELETED).limit(1)
    ) is not None


def _save_mapping(session: Session, record: InboxEvent | _Finished, uuid: str, *,
                  status: str = MappingStatus.ACTIVE, sent: dict[str, Any] | None = None,
                  digest: str | None = None,
                  remote: tuple[str | None, str | None] = (None, None),
                  produced: bool = False) -> None:
    """Insert or update the event's mapping in one statement (INSERT ... ON CONFLICT).

    ``sent`` None keeps the last payload sent; ``digest`` None (after a delete or archive)
    makes the next upsert send again. ``remote``: a certificate's DokStamp status and
    verification URL; (None, None) keeps what the mapping holds. ``produced``: the event wrote
    the entity (see :class:`.outcomes.Outcome`), it becomes the producer.
    """
    values: dict[str, Any] = {
        "entity": record.entity, "erp_key": record.erp_key, "dokstamp_uuid": uuid,
        "status": status, "data_hash": digest, "occurred_at": record.occurred_at,
        "event_id": record.event_id, "synced_at": utcnow(),
        "produced_by": record.event_id, "produced_at": record.occurred_at}
    if sent is not None:
        values["sent"] = sent
    with_remote = remote != (None, None)
    if with_remote:
        values["remote_status"], values["verification_url"] = remote
    session.execute(_upsert_mapping(session.get_bind().dialect.name, sent is not None,
                                    with_remote, produced), values)


def _finish(session: Session, record: InboxEvent, state: EventState, note: str | None) -> None:
    """Mark an event final; when synced, wake the events that waited for its entity."""
    record.state = state
    record.finished_at = utcnow()
    record.waiting_for = None
    record.reported_at = None  # until its outcome is written (the outbox)
    if note is not None:
        record.last_error = note
    if state == EventState.SYNCED or record.entity == "certificate":
        _wake(session, record.entity, record.erp_key)


def _result(record: InboxEvent | _Finished, state: str, **fields: Any) -> Result:
    return Result(event_id=record.event_id, entity=record.entity, key=record.erp_key,
                  op=record.op, state=state, at=utcnow(), event_pk=record.id, **fields)


def _synced_result(record: InboxEvent | _Finished, uuid: str | None, status: str,
            source: object) -> Result:
    # A verification URL is reported once the outcome (or companion) carries one.
    url = getattr(source, "public_verification_url", None) or \
        getattr(source, "verification_url", None)
    return _result(record, EventState.SYNCED, dokstamp_uuid=uuid,
                   mapping_status=status if uuid is not None else None,
                   public_verification_url=url)


def _park(record: InboxEvent, park: Park) -> None:
    now = park.now or utcnow()
    record.state = EventState.WAITING
    record.last_error = park.error
    record.waiting_for = park.waiting_for
    record.next_attempt_at = now + timedelta(seconds=park.delay)
    if park.counted:
        record.attempts += 1
        record.first_failed_at = record.first_failed_at or now


def log_outcome(record: InboxEvent | _Finished, state: str, detail: str | None = None) -> None:
    """The one log line per event outcome (fields for JSON logs; never a secret)."""
    log.info("event %s %s %s %s -> %s%s", record.event_id, record.entity, record.erp_key,
             record.op, state, f": {detail}" if detail else "",
             extra={"event_id": record.event_id, "entity": record.entity,
                    "key": record.erp_key, "op": record.op, "state": state})
