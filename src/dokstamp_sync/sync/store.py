"""The sync walk's one seam to the database: every method of :class:`Store` is one short
transaction, and no other module of :mod:`dokstamp_sync.sync` opens a session or writes SQL.

The walk never holds a transaction across an HTTP call: it reads what an attempt needs
(:meth:`Store.claim`, :meth:`Store.attempt`), calls DokStamp, then records how the attempt ended
(:meth:`Store.finish_synced`, :meth:`Store.conclude`). What the outcome is, the engine decides;
the store applies it, guarded so that an event already final is never changed again.

The hot path's statements are built once, on the tables (Core, not the ORM's unit of work), with
bound parameters: building and caching a statement per call cost more than running it.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
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
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import dialect_insert, insert_ignore, once_more_if_disconnected, session_scope
from dokstamp_sync.dokstamp.errors import PermanentError
from dokstamp_sync.events import utc
from dokstamp_sync.models import DeadLetter, InboxEvent, Mapping, NaturalKey, utcnow
from dokstamp_sync.pipeline.held import held_before
from dokstamp_sync.pipeline.outbox import mark_reported
from dokstamp_sync.pipeline.results import Report, Result
from dokstamp_sync.states import OPEN, EventState, LetterStatus, MappingStatus
from dokstamp_sync.sync.entities import REFERENCES
from dokstamp_sync.sync.outcomes import Companion, Outcome

log = logging.getLogger("dokstamp_sync.sync")
REFERENCED = {*REFERENCES.values(), "module"}  # entities other events can wait for

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


@dataclass(frozen=True)
class Claimed:
    """A task's run has started on an open event: its delivery count and payload."""

    deliveries: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class Neighbour:
    """Another event of the same certificate (see :class:`Lifecycle`)."""

    pk: int
    op: str
    state: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class Lifecycle:
    """A certificate event among the other events of its certificate (CONTRACT §2).

    Upserts decide the data, the newest of a run of upserts wins; a revoke (or delete) is
    applied on top of the newest upsert before it, and neither kind supersedes the other:
    an event is superseded only when the next one (by ``occurred_at``, then arrival) is of
    its own kind. Dead events are not counted (as for every entity), except as the data a
    revoke may search by.
    """

    superseded: bool
    end: Neighbour | None = None  # an upsert's: the revoke or delete right after it
    upsert: Neighbour | None = None  # a revoke's or delete's: the newest upsert before it


@dataclass(frozen=True)
class View:
    """What one attempt needs to know, read in one transaction."""

    attempts: int
    deliveries: int
    superseded: bool  # a newer event for the same entity exists
    own: Snapshot | None  # the entity's own mapping
    refs: dict[tuple[str, str], Snapshot]  # the mappings of what it refers to
    lifecycle: Lifecycle | None = None  # a certificate's: its neighbours
    behind: bool = False  # an older event of this entity is held (CONTRACT §6): wait for it


@dataclass(frozen=True)
class Latest:
    """The newest event for an entity that was not superseded."""

    pk: int
    state: str
    op: str
    next_attempt_at: datetime | None = None  # when it is parked: its next attempt time


@dataclass(frozen=True)
class Facts:
    """An open event as :meth:`Store.conclude` hands it to the engine's decision."""

    attempts: int
    received_at: datetime
    first_failed_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class Park:
    """Put the event back to ``waiting`` for ``delay`` seconds."""

    delay: float
    error: str
    waiting_for: str | None = None
    counted: bool = True  # a transient failure, counted against the retry budget
    now: datetime | None = None


@dataclass(frozen=True, kw_only=True)
class Letter:
    """Mark the event dead and file (or refresh) its open dead letter."""

    reason: str
    error: PermanentError | None = None


Decision = Outcome | Park | Letter


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
_READ_OPEN = select(
    EVENTS.c.attempts, EVENTS.c.deliveries,
    exists().where(_newer(_OTHER.c, EVENTS.c.entity, EVENTS.c.erp_key, EVENTS.c.occurred_at,
                          EVENTS.c.id)),
    exists().where(held_before(_HELD.c, EVENTS.c.entity, EVENTS.c.erp_key,
                               EVENTS.c.occurred_at, EVENTS.c.id)),
).where(_OPEN)
_GET_MAPPINGS = select(MAPPINGS.c.entity, MAPPINGS.c.erp_key, MAPPINGS.c.dokstamp_uuid,
                       MAPPINGS.c.status, MAPPINGS.c.sent, MAPPINGS.c.data_hash,
                       MAPPINGS.c.remote_status, MAPPINGS.c.verification_url).where(
    tuple_(MAPPINGS.c.entity, MAPPINGS.c.erp_key).in_(bindparam("keys", expanding=True)))
_CLAIM = update(EVENTS).where(_OPEN).values(
    deliveries=EVENTS.c.deliveries + 1, next_attempt_at=bindparam("until"),
).returning(EVENTS.c.deliveries, EVENTS.c.payload)
_LEASE = update(EVENTS).where(EVENTS.c.id.in_(bindparam("pks", expanding=True)),
                              EVENTS.c.state.in_(OPEN)).values(
    next_attempt_at=bindparam("until"))
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
# The open dead letters a newly synced event resolves (CONTRACT §3): those of the same entity
# whose event is older (the order of :func:`_newer`), and those of malformed stream entries that
# named the entity and were filed before the synced event was received.
_LETTER_EVENT = EVENTS.alias("lettered")
_SUPERSEDE_LETTERS = update(LETTERS).where(
    LETTERS.c.status == LetterStatus.OPEN, LETTERS.c.entity == bindparam("l_entity"),
    LETTERS.c.erp_key == bindparam("l_key"),
    or_(exists().where(_LETTER_EVENT.c.id == LETTERS.c.event_pk,
                       (_LETTER_EVENT.c.occurred_at < bindparam("occurred_at"))
                       | ((_LETTER_EVENT.c.occurred_at == bindparam("occurred_at"))
                          & (_LETTER_EVENT.c.id < bindparam("pk")))),
        and_(LETTERS.c.event_pk.is_(None), LETTERS.c.first_failed_at <= bindparam("received")))
).values(status=LetterStatus.SUPERSEDED, resolved_at=bindparam("l_now"),
         reported_at=None).returning(
    LETTERS.c.id, LETTERS.c.event_id, LETTERS.c.event_pk)
_MAPPING_VALUES = ("dokstamp_uuid", "status", "data_hash", "occurred_at", "event_id",
                   "synced_at")


@functools.cache
def _insert_natural_key(dialect: str) -> Any:
    return dialect_insert(dialect)(NATURAL_KEYS).on_conflict_do_nothing(
        index_elements=["entity", "natural_key"]).returning(NATURAL_KEYS.c.id)


@functools.cache
def _upsert_mapping(dialect: str, with_sent: bool, with_remote: bool = False) -> Any:
    stmt = dialect_insert(dialect)(MAPPINGS)
    updated = [*_MAPPING_VALUES, *(["sent"] if with_sent else []),
               *(["remote_status", "verification_url"] if with_remote else [])]
    return stmt.on_conflict_do_update(index_elements=["entity", "erp_key"],
                                      set_={c: stmt.excluded[c] for c in updated})


class Store:
    """The mapping store as the sync walk sees it; each method is one transaction."""

    def __init__(self, sessions: sessionmaker[Session], report: Report | None = None) -> None:
        self.sessions = sessions
        self.report = report  # told the final outcomes a transaction recorded, after its commit

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with session_scope(self.sessions) as session:
            yield session

    @contextmanager
    def _recording(self) -> Iterator[tuple[Session, list[Result]]]:
        """A transaction that records final outcomes: they are reported once it committed
        (never when it failed), then marked reported (see :mod:`dokstamp_sync.pipeline.results`
        for the guarantee)."""
        results: list[Result] = []
        with session_scope(self.sessions) as session:
            yield session, results
        if results and self.report is not None and self.report(results):
            self.mark_reported(results)

    def mark_reported(self, results: list[Result]) -> None:
        """The outcomes were written to the stream: mark their rows reported (one short
        transaction; a failure leaves them to the sweeper, which writes them again)."""
        try:
            with self._tx() as session:
                mark_reported(session, results)
        except Exception as exc:
            log.warning("could not mark %d outcome(s) reported (%s); they will be written "
                        "again", len(results), type(exc).__name__)

    # -- reading what an attempt needs ----------------------------------------------------

    def claim(self, pk: int, lease: float) -> Claimed | str:
        """Count a delivery of open event ``pk`` and lease it, in one statement; else return
        the state it is in (``missing`` when there is no such event). The first transaction
        of a run, so it is tried once more on a connection the database had dropped."""
        def run() -> Claimed | str:
            with self._tx() as session:
                row = session.execute(_CLAIM, {
                    "pk": pk, "until": utcnow() + timedelta(seconds=lease)}).one_or_none()
                return Claimed(row[0], row[1]) if row is not None else _state(session, pk)

        return once_more_if_disconnected(run)

    def lease(self, pks: list[int], seconds: float) -> datetime:
        """Keep the scheduler off these open events for ``seconds`` (a task holds them);
        returns the lease's end (a heartbeat's first ``floor``, see :meth:`renew`)."""
        until = utcnow() + timedelta(seconds=seconds)
        with self._tx() as session:
            session.execute(_LEASE, {"pks": pks, "until": until})
        return until

    def renew(self, pks: list[int], seconds: float, floor: datetime) -> datetime:
        """A heartbeat: extend to ``seconds`` from now the lease of those open events whose
        next attempt time is still at least ``floor`` (the previous renewal's end: an event
        parked meanwhile for a shorter wait keeps it). Returns the new lease's end."""
        until = utcnow() + timedelta(seconds=seconds)
        with self._tx() as session:
            session.execute(_RENEW, {"pks": pks, "floor": floor, "until": until})
        return until

    def payload(self, pk: int) -> dict[str, Any] | str:
        """The open event's payload, or the state it is in."""
        with self._tx() as session:
            record = session.get(InboxEvent, pk)
            if record is None or record.state not in OPEN:
                return _state(session, pk)
            return record.payload

    def attempt(self, pk: int, own: tuple[str, str],
                refs: Iterable[tuple[str, str]]) -> View | str:
        """The open event, whether a newer one exists, its own mapping and those of the
        entities it refers to (in one query); or the state it is in."""
        with self._tx() as session:
            row = session.execute(_READ_OPEN, {"pk": pk}).one_or_none()
            if row is None:
                return _state(session, pk)
            mappings = _mappings(session, [own, *refs])
            life = _lifecycle(session, pk, own[1]) if own[0] == "certificate" else None
        superseded = life.superseded if life is not None else bool(row[2])
        return View(row[0], row[1], superseded, mappings.pop(own, None), mappings, life,
                    behind=bool(row[3]))

    def mapping(self, entity: str, key: str) -> Snapshot | None:
        with self._tx() as session:
            return _mappings(session, [(entity, key)]).get((entity, key))

    def latest(self, entity: str, key: str) -> tuple[Latest | None, Snapshot | None]:
        """The newest event for the entity that was not superseded, and its mapping.

        The event is read first: a synced event's mapping was committed with its state, so the
        mapping read after it cannot miss it (READ COMMITTED: each statement sees the latest).
        """
        with self._tx() as session:
            row = session.execute(
                select(InboxEvent.id, InboxEvent.state, InboxEvent.op,
                       InboxEvent.next_attempt_at)
                .where(InboxEvent.entity == entity, InboxEvent.erp_key == key,
                       InboxEvent.state != EventState.SUPERSEDED)
                .order_by(InboxEvent.occurred_at.desc(), InboxEvent.id.desc()).limit(1)
            ).one_or_none()
            mapping = _mappings(session, [(entity, key)]).get((entity, key))
        return (Latest(row[0], row[1], row[2], utc(row[3]) if row[3] else None)
                if row else None), mapping

    def upserts(self, entity: str, key: str, limit: int = 5) -> list[dict[str, Any]]:
        """The payloads of the entity's newest upserts known in the inbox, newest first, in
        any state (open, synced, dead, superseded): what a delete without a mapping to trust
        searches DokStamp by."""
        with self._tx() as session:
            return list(session.scalars(
                select(InboxEvent.payload)
                .where(InboxEvent.entity == entity, InboxEvent.erp_key == key,
                       InboxEvent.op == "upsert")
                .order_by(InboxEvent.occurred_at.desc(), InboxEvent.id.desc()).limit(limit)))

    def mapped_key(self, entity: str, uuid: str) -> str | None:
        """The ERP key whose mapping (in any status but deleted) holds DokStamp's ``uuid``."""
        with self._tx() as session:
            key: str | None = session.scalar(
                select(Mapping.erp_key).where(Mapping.entity == entity,
                                              Mapping.dokstamp_uuid == uuid,
                                              Mapping.status != MappingStatus.DELETED)
                .limit(1))
            return key

    def backlog(self, entity: str) -> int:
        """Open upserts of one entity kind (the listing shortcut's threshold)."""
        with self._tx() as session:
            return int(session.scalar(select(func.count()).select_from(InboxEvent).where(
                InboxEvent.entity == entity, InboxEvent.op == "upsert",
                InboxEvent.state.in_(OPEN))) or 0)

    def others_open(self, entity: str, key: str, event_id: str) -> bool:
        """Whether another event for (entity, ERP key) is open besides ``event_id`` (the
        listing shortcut is only for an event alone on its key); ``ix_inbox_entity_key``."""
        with self._tx() as session:
            return bool(session.scalar(select(exists().where(
                InboxEvent.entity == entity, InboxEvent.erp_key == key,
                InboxEvent.event_id != event_id, InboxEvent.state.in_(OPEN)))))

    def file_companions(self, event_id: str, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
        """Other file upserts never tried yet: (pk, ERP key, payload), oldest first."""
        with self._tx() as session:
            rows = session.execute(
                select(InboxEvent.id, InboxEvent.erp_key, InboxEvent.payload)
                .where(InboxEvent.entity == "file", InboxEvent.op == "upsert",
                       InboxEvent.state.in_(OPEN), InboxEvent.attempts == 0,
                       InboxEvent.event_id != event_id)
                .order_by(InboxEvent.id).limit(limit)).all()
        return [(pk, key, payload) for pk, key, payload in rows]

    # -- natural keys ---------------------------------------------------------------------

    def known_uuid(self, entity: str, key: str) -> str | None:
        with self._tx() as session:
            return _known_uuid(session, entity, key)

    def remember_natural_key(self, entity: str, key: str, uuid: str) -> str:
        """Record natural key -> UUID; return the UUID the database holds for it (maybe
        another: the constraint behind the natural-key lock)."""
        with self._tx() as session:
            return _remember(session, entity, key, uuid)

    def remember_natural_keys(self, entity: str, pairs: Iterable[tuple[str, str]]) -> None:
        """Record many (natural key, UUID) pairs, keeping what is recorded already."""
        with self._tx() as session:
            for key, uuid in pairs:
                insert_ignore(session, NATURAL_KEYS, {
                    "entity": entity, "natural_key": key, "dokstamp_uuid": uuid},
                    ["entity", "natural_key"])

    def forget_natural_keys(self, entity: str, uuid: str) -> None:
        """A deleted entity's natural keys are free again: a later upsert searches and creates."""
        with self._tx() as session:
            _forget(session, entity, uuid)

    def forget_mapping(self, entity: str, key: str, uuid: str, *, reopen: bool) -> bool:
        """The entity ``uuid`` is gone from DokStamp (deleted outside dokstamp-sync): forget its
        mapping (only while it still points at ``uuid``) and its natural keys. ``reopen``: make
        the entity's latest event pending again when it is a synced upsert, so that it is synced
        (recreated) anew; returns whether it was."""
        with self._tx() as session:
            session.execute(delete(Mapping).where(Mapping.entity == entity,
                                                  Mapping.erp_key == key,
                                                  Mapping.dokstamp_uuid == uuid))
            _forget(session, entity, uuid)
            if not reopen:
                return False
            record = session.scalar(
                select(InboxEvent).where(InboxEvent.entity == entity, InboxEvent.erp_key == key,
                                         InboxEvent.state != EventState.SUPERSEDED)
                .order_by(InboxEvent.occurred_at.desc(), InboxEvent.id.desc()).limit(1))
            if record is None or record.op != "upsert" or record.state != EventState.SYNCED:
                return False
            record.state = EventState.PENDING
            record.finished_at = None
            record.next_attempt_at = utcnow()
            record.last_error = "recreating: deleted in DokStamp outside dokstamp-sync"
            return True

    # -- recording how a run ended --------------------------------------------------------

    def finish_synced(self, pk: int, outcome: Outcome, *, completed: bool) -> str:
        """Mark an open event synced with its mapping, in as few statements as it takes, and
        wake the events that waited for its entity. ``completed``: a task's run ended, undo its
        delivery count. Returns the state the event is in afterwards."""
        with self._recording() as (session, results):
            row = session.execute(_FINISH_SYNCED, {
                "pk": pk, "now": utcnow(), "note": outcome.note, "completed": completed,
            }).one_or_none()
            if row is None:
                return _state(session, pk)
            done = _Finished(*row)
            _wake(session, done.entity, done.erp_key)
            if outcome.uuid is not None:
                _save_mapping(session, done, outcome.uuid, status=outcome.status,
                              sent=outcome.sent, digest=outcome.digest,
                              remote=(outcome.remote_status, outcome.verification_url))
                if outcome.status == MappingStatus.DELETED:
                    _forget(session, done.entity, outcome.uuid)
            log_outcome(done, EventState.SYNCED, outcome.note)
            results.append(_synced(done, outcome.uuid, outcome.status, outcome))
            results += _supersede_letters(session, done)
        return EventState.SYNCED

    def finish_companion(self, companion: Companion, note: str) -> bool:
        """Mark a file event uploaded along with another one synced, unless it is final
        already or a newer event for its entity exists (then its own task decides)."""
        with self._recording() as (session, results):
            record = session.get(InboxEvent, companion.pk)
            if record is None or record.state not in OPEN or _newer_exists(session, record):
                return False
            _save_mapping(session, record, companion.uuid, sent=companion.sent,
                          digest=companion.digest)
            _finish(session, record, EventState.SYNCED, note)
            log_outcome(record, EventState.SYNCED, note)
            results.append(_synced(record, companion.uuid, MappingStatus.ACTIVE, companion))
            results += _supersede_letters(session, record)
        return True

    def conclude(self, pk: int, *, completed: bool,
                 decide: Callable[[Facts], Decision]) -> str:
        """Record how a run ended, in one transaction: ``decide`` (the engine's) chooses from
        the event's facts; the choice is applied here. An event no longer open (final, or held by
        the guard) is left alone.
        Returns the state the event is in afterwards."""
        with self._recording() as (session, results):
            record = session.get(InboxEvent, pk)
            if record is None or record.state not in OPEN:
                return _state(session, pk)
            if completed:  # this run ended normally: undo its delivery count
                record.deliveries = max(0, record.deliveries - 1)
            decision = decide(Facts(record.attempts, utc(record.received_at),
                                    utc(record.first_failed_at) if record.first_failed_at
                                    else None))
            if isinstance(decision, Letter):
                letter = _dead_letter(session, record, decision.reason, decision.error)
                log_outcome(record, EventState.DEAD, decision.reason)
                results.append(_result(record, EventState.DEAD, reason=decision.reason,
                                       dead_letter_id=letter.id,
                                       http_status=letter.http_status))
                state: str = EventState.DEAD
            elif isinstance(decision, Park):
                _park(record, decision)
                log_outcome(record, EventState.WAITING, decision.error)
                return EventState.WAITING
            else:
                _finish(session, record, decision.state, decision.note)
                log_outcome(record, decision.state, decision.note)
                if decision.state == EventState.SYNCED:
                    results.append(_synced(record, decision.uuid, decision.status, decision))
                    results += _supersede_letters(session, record)
                else:
                    results.append(_result(record, decision.state, reason=decision.note))
                state = decision.state
        return state


# -- statements shared by the methods above -------------------------------------------------

def _state(session: Session, pk: int) -> str:
    state = session.scalar(select(InboxEvent.state).where(InboxEvent.id == pk))
    return str(state) if state is not None else "missing"


def _mappings(session: Session,
              keys: list[tuple[str, str]]) -> dict[tuple[str, str], Snapshot]:
    if not keys:
        return {}
    rows = session.execute(_GET_MAPPINGS, {"keys": keys})
    return {(entity, key): Snapshot(uuid, status, dict(sent or {}), digest, remote, url)
            for entity, key, uuid, status, sent, digest, remote, url in rows}


def _lifecycle(session: Session, pk: int, key: str) -> Lifecycle:
    """Where certificate event ``pk`` stands among its certificate's events (one query)."""
    rows = session.execute(
        select(InboxEvent.id, InboxEvent.op, InboxEvent.state, InboxEvent.payload)
        .where(InboxEvent.entity == "certificate", InboxEvent.erp_key == key,
               InboxEvent.state != EventState.SUPERSEDED)
        .order_by(InboxEvent.occurred_at, InboxEvent.id)).all()
    events = [Neighbour(i, op, state, payload) for i, op, state, payload in rows]
    at = next(n for n, e in enumerate(events) if e.pk == pk)
    me = events[at]
    counted = (*OPEN, EventState.SYNCED)
    after = next((e for e in events[at + 1:] if e.state in counted), None)
    if after is not None and (after.op == "upsert") == (me.op == "upsert"):
        return Lifecycle(superseded=True)
    if me.op == "upsert":
        return Lifecycle(superseded=False, end=after)
    before = next((e for e in reversed(events[:at]) if e.op == "upsert"), None)
    return Lifecycle(superseded=False, upsert=before)


def _newer_exists(session: Session, record: InboxEvent) -> bool:
    return session.scalar(select(InboxEvent.id).where(_newer(
        InboxEvent, record.entity, record.erp_key, record.occurred_at, record.id)).limit(1)
    ) is not None


def _wake(session: Session, entity: str, key: str) -> None:
    """The events that wait for (entity, key) are due now (it has just been synced)."""
    if entity in REFERENCED:  # nothing ever waits for the others (certificates)
        session.execute(_WAKE, {"tag": f"{entity}:{key}", "now": utcnow()})


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


def _save_mapping(session: Session, record: InboxEvent | _Finished, uuid: str, *,
                  status: str = MappingStatus.ACTIVE, sent: dict[str, Any] | None = None,
                  digest: str | None = None,
                  remote: tuple[str | None, str | None] = (None, None)) -> None:
    """Insert or update the event's mapping in one statement (INSERT ... ON CONFLICT).

    ``sent`` None keeps the last payload sent; ``digest`` None (after a delete or archive)
    makes the next upsert send again. ``remote``: a certificate's DokStamp status and
    verification URL; (None, None) keeps what the mapping holds.
    """
    values: dict[str, Any] = {
        "entity": record.entity, "erp_key": record.erp_key, "dokstamp_uuid": uuid,
        "status": status, "data_hash": digest, "occurred_at": record.occurred_at,
        "event_id": record.event_id, "synced_at": utcnow()}
    if sent is not None:
        values["sent"] = sent
    with_remote = remote != (None, None)
    if with_remote:
        values["remote_status"], values["verification_url"] = remote
    session.execute(_upsert_mapping(session.get_bind().dialect.name, sent is not None,
                                    with_remote), values)


def _finish(session: Session, record: InboxEvent, state: str, note: str | None) -> None:
    """Mark an event final; when synced, wake the events that waited for its entity."""
    record.state = state
    record.finished_at = utcnow()
    record.waiting_for = None
    record.reported_at = None  # until its outcome is written (the outbox)
    if note is not None:
        record.last_error = note
    if state == EventState.SYNCED:
        _wake(session, record.entity, record.erp_key)


def _dead_letter(session: Session, record: InboxEvent, reason: str,
                 error: PermanentError | None) -> DeadLetter:
    """Mark the event dead and file (or refresh) its open dead letter."""
    _finish(session, record, EventState.DEAD, reason)
    letter = session.scalar(select(DeadLetter).where(DeadLetter.event_pk == record.id,
                                                     DeadLetter.status == LetterStatus.OPEN))
    if letter is None:
        letter = DeadLetter(event_pk=record.id, event_id=record.event_id,
                            entity=record.entity, erp_key=record.erp_key,
                            first_failed_at=record.first_failed_at or utcnow())
        session.add(letter)
    letter.reason = reason
    letter.reported_at = None  # reported with its event's outcome
    letter.attempts = record.attempts + 1
    letter.last_failed_at = utcnow()
    if error is not None:
        letter.http_status = error.status
        letter.response_body = error.body
        letter.request_method = error.method
        letter.request_path = error.path
    session.flush()  # its id, for the outcome stream
    return letter


def _result(record: InboxEvent | _Finished, state: str, **fields: Any) -> Result:
    return Result(event_id=record.event_id, entity=record.entity, key=record.erp_key,
                  op=record.op, state=state, at=utcnow(), event_pk=record.id, **fields)


def _synced(record: InboxEvent | _Finished, uuid: str | None, status: str,
            source: object) -> Result:
    # A verification URL is reported once the outcome (or companion) carries one.
    url = getattr(source, "public_verification_url", None) or \
        getattr(source, "verification_url", None)
    return _result(record, EventState.SYNCED, dokstamp_uuid=uuid,
                   mapping_status=status if uuid is not None else None,
                   public_verification_url=url)


def _supersede_letters(session: Session, record: InboxEvent | _Finished) -> list[Result]:
    """Resolve the open dead letters this synced event makes stale (one UPDATE); each is
    reported again as ``superseded``."""
    rows = session.execute(_SUPERSEDE_LETTERS, {
        "l_entity": record.entity, "l_key": record.erp_key, "occurred_at": record.occurred_at,
        "pk": record.id, "received": record.received_at, "l_now": utcnow()}).all()
    if not rows:
        return []
    pks = [event_pk for _, _, event_pk in rows if event_pk is not None]
    ops = dict(session.execute(select(InboxEvent.id, InboxEvent.op)
                               .where(InboxEvent.id.in_(pks))).all()) if pks else {}
    reason = f"resolved: a newer event of this entity synced ({record.event_id})"
    log.info("%s %s: %d dead letter(s) resolved by event %s", record.entity, record.erp_key,
             len(rows), record.event_id)
    return [Result(event_id=event_id, entity=record.entity, key=record.erp_key,
                   op=ops.get(event_pk), state=EventState.SUPERSEDED, at=utcnow(),
                   reason=reason, dead_letter_id=letter_id)
            for letter_id, event_id, event_pk in rows]


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
