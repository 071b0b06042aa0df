"""The sync walk's one seam to the database: every method of :class:`Store` that writes is one
short transaction (reads run outside one), and no other module of :mod:`dokstamp_sync.sync`
opens a session or writes SQL. No transaction spans an HTTP call: the walk reads what an
attempt needs (:meth:`Store.claim`, :meth:`Store.attempt`), calls DokStamp, then records how it
ended (:meth:`Store.finish_synced`, :meth:`Store.conclude`), as the engine decided, guarded so
that an event already final is never changed again. The hot path's statements are built once,
on the tables (Core, not the ORM), with bound parameters.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import (
    dialect_insert,
    lock_tag,
    once_more_if_disconnected,
    reader_of,
    session_scope,
)
from dokstamp_sync.events import utc
from dokstamp_sync.models import InboxEvent, Mapping, utcnow
from dokstamp_sync.reporting import Later, Report, Result, Unmarked
from dokstamp_sync.states import OPEN, EventState, MappingStatus, RunState
from dokstamp_sync.sync.letters import file_letter, resolve_letters
from dokstamp_sync.sync.outcomes import Decision, Facts, Letter, Outcome, Park
from dokstamp_sync.sync.reads import Claimed, Latest, View
from dokstamp_sync.sync.statements import (  # the SQL, and the steps the transactions share
    _CLAIM,
    _FINISH_SYNCED,
    _LEASE,
    _READ_OPEN,
    _RELEASE,
    _RENEW,
    NATURAL_KEYS,
    Snapshot,
    _finish,
    _Finished,
    _forget,
    _held_elsewhere,
    _known_uuid,
    _mappings,
    _neighbours,
    _newer_exists,
    _park,
    _ready,
    _remember,
    _result,
    _save_mapping,
    _state,
    _synced_result,
    _wake,
    log_outcome,
    wakes,
)

log = logging.getLogger("dokstamp_sync.sync")


class Store:
    """The mapping store as the sync walk sees it; each method is one transaction."""

    def __init__(self, sessions: sessionmaker[Session], report: Report | None = None,
                 later: Later | None = None) -> None:
        self.sessions = sessions
        self.readers = reader_of(sessions)
        # Told the outcomes a commit recorded; ``later`` queues them for a lock's release.
        self.report, self.later = report, later
        self.unmarked = Unmarked()  # outcomes written, their rows marked reported by the next

    def _tx(self) -> AbstractContextManager[Session]:
        return session_scope(self.sessions)

    def _read(self) -> AbstractContextManager[Session]:
        """Reads only, no transaction around them (see :func:`~dokstamp_sync.db.reader_of`)."""
        return self.readers()

    @contextmanager
    def _recording(self) -> Iterator[tuple[Session, list[Result]]]:
        """A transaction that records final outcomes: they are reported once it committed
        (never when it failed), then marked reported (see :mod:`dokstamp_sync.pipeline.results`
        for the guarantee)."""
        results: list[Result] = []
        earlier = self.unmarked.take()
        try:
            with session_scope(self.sessions) as session:
                yield session, results
                Unmarked.mark(session, earlier)
        except BaseException:
            self.unmarked.put_back(earlier)
            raise
        if results and self.later is not None:
            self.later(results, lambda: self.unmarked.add(results))
        elif results and self.report is not None and self.report(results):
            self.unmarked.add(results)

    def flush_reported(self) -> None:
        """Mark what was written reported now (the end of a task): one short transaction; a
        failure leaves them to the sweeper, which writes them again."""
        if earlier := self.unmarked.take():
            try:
                with self._tx() as session:
                    Unmarked.mark(session, earlier)
            except Exception as exc:
                log.warning("could not mark %d outcome(s) reported (%s); they will be written "
                            "again", sum(len(r) for r, _ in earlier), type(exc).__name__)

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

    def release(self, pk: int) -> str:
        """A run that failed on the database's side (a dropped connection) hands its open event
        back: due at once, its delivery count undone (the worker was not lost), no attempt
        counted. Returns the state the event is in (``error`` when even this fails: then the
        lease runs out as after a lost worker)."""
        def run() -> str:
            with self._tx() as session:
                session.execute(_RELEASE, {"pk": pk, "now": utcnow()})
                return _state(session, pk)

        try:
            return once_more_if_disconnected(run)
        except Exception as exc:
            log.warning("event %s: could not hand it back (%s); due once its lease ends", pk,
                        type(exc).__name__)
            return RunState.ERROR

    def payload(self, pk: int) -> dict[str, Any] | str:
        """The open event's payload, or the state it is in."""
        with self._read() as session:
            record = session.get(InboxEvent, pk)
            if record is None or record.state not in OPEN:
                return _state(session, pk)
            return record.payload

    def attempt(self, pk: int, own: tuple[str, str],
                refs: Iterable[tuple[str, str]]) -> View | str:
        """The open event, whether a newer one exists, its own mapping and those of the
        entities it refers to (in one query); or the state it is in."""
        with self._read() as session:
            row = session.execute(_READ_OPEN, {"pk": pk}).one_or_none()
            if row is None:
                return _state(session, pk)
            mappings = _mappings(session, [own, *refs])
            near = _neighbours(session, own[1]) if own[0] == "certificate" else None
        return View(row[0], row[1], bool(row[2]), mappings.pop(own, None), mappings, near,
                    behind=bool(row[3]))

    def mapping(self, entity: str, key: str) -> Snapshot | None:
        with self._read() as session:
            return _mappings(session, [(entity, key)]).get((entity, key))

    def latest(self, entity: str, key: str) -> tuple[Latest | None, Snapshot | None]:
        """The newest event for the entity that was not superseded, and its mapping.

        The event is read first: a synced event's mapping was committed with its state, so the
        mapping read after it cannot miss it (READ COMMITTED: each statement sees the latest).
        """
        with self._read() as session:
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
        with self._read() as session:
            return list(session.scalars(
                select(InboxEvent.payload)
                .where(InboxEvent.entity == entity, InboxEvent.erp_key == key,
                       InboxEvent.op == "upsert")
                .order_by(InboxEvent.occurred_at.desc(), InboxEvent.id.desc()).limit(limit)))

    def mapped_key(self, entity: str, uuid: str, *, deleted: bool = False,
                   besides: str | None = None) -> str | None:
        """The ERP key whose mapping (in any status but deleted; ``deleted``: in any status)
        holds DokStamp's ``uuid``: at most one (``uq_mappings_entity_dokstamp_uuid``), files
        apart (equal contents share one file: ``besides`` names a key to leave out)."""
        query = select(Mapping.erp_key).where(Mapping.entity == entity,
                                              Mapping.dokstamp_uuid == uuid)
        if not deleted:
            query = query.where(Mapping.status != MappingStatus.DELETED)
        if besides is not None:
            query = query.where(Mapping.erp_key != besides).order_by(Mapping.erp_key)
        with self._read() as session:
            key: str | None = session.scalar(query.limit(1))
            return key

    def backlog(self, entity: str) -> int:
        """Open upserts of one entity kind (the listing shortcut's threshold)."""
        with self._read() as session:
            return int(session.scalar(select(func.count()).select_from(InboxEvent).where(
                InboxEvent.entity == entity, InboxEvent.op == "upsert",
                InboxEvent.state.in_(OPEN))) or 0)

    def file_companions(self, event_id: str, limit: int) -> list[tuple[int, str, dict[str, Any]]]:
        """Other file upserts never tried yet: (pk, ERP key, payload), oldest first."""
        with self._read() as session:
            rows = session.execute(
                select(InboxEvent.id, InboxEvent.erp_key, InboxEvent.payload)
                .where(InboxEvent.entity == "file", InboxEvent.op == "upsert",
                       InboxEvent.state.in_(OPEN), InboxEvent.attempts == 0,
                       InboxEvent.event_id != event_id)
                .order_by(InboxEvent.id).limit(limit)).all()
        return [(pk, key, payload) for pk, key, payload in rows]

    # -- natural keys ---------------------------------------------------------------------

    def known_uuid(self, entity: str, key: str) -> str | None:
        with self._read() as session:
            return _known_uuid(session, entity, key)

    def remember_natural_key(self, entity: str, key: str, uuid: str) -> str:
        """Record natural key -> UUID; return the UUID the database holds for it (maybe
        another: the constraint behind the natural-key lock)."""
        with self._tx() as session:
            return _remember(session, entity, key, uuid)

    def remember_natural_keys(self, entity: str, pairs: Iterable[tuple[str, str]]) -> None:
        """Record many (natural key, UUID) pairs, keeping what is recorded already; a few
        multi-row statements, not one per pair (a listing may hold tens of thousands)."""
        rows = [{"entity": entity, "natural_key": key, "dokstamp_uuid": uuid}
                for key, uuid in dict(reversed(list(pairs))).items()]  # the first UUID per key
        with self._tx() as session:
            insert = dialect_insert(session.get_bind().dialect.name)
            for start in range(0, len(rows), 1000):
                session.execute(insert(NATURAL_KEYS).values(rows[start:start + 1000])
                                .on_conflict_do_nothing(index_elements=["entity", "natural_key"]))

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

    def finish_synced(self, pk: int, outcome: Outcome, *, completed: bool, entity: str,
                      key: str, companion_note: str = "uploaded in a batch") -> str:
        """Mark open event ``pk`` (of ``entity`` ``key``) synced with its mapping, in as few
        statements as it takes, and wake the events that waited for its entity; in the same
        transaction, the file events uploaded along with it (``outcome.companions``) that are
        still open with no newer event (else their own tasks decide). ``completed``: a task's
        run ended, undo its delivery count. Returns the state the event is in afterwards."""
        with self._recording() as (session, results):
            riders = [(r, c) for c in outcome.companions
                      if (r := session.get(InboxEvent, c.pk)) is not None
                      and r.state in OPEN and not _newer_exists(session, r)]
            tags = {f"{r.entity}:{r.erp_key}" for r, _ in riders}
            for tag in sorted(tags | ({f"{entity}:{key}"} if wakes(entity) else set())):
                lock_tag(session, tag)  # tags before rows, in one order (as every writer)
            for record, rider in riders:
                _save_mapping(session, record, rider.uuid, sent=rider.sent, digest=rider.digest)
                _finish(session, record, EventState.SYNCED, companion_note)
                log_outcome(record, EventState.SYNCED, companion_note)
                results.append(_synced_result(record, rider.uuid, MappingStatus.ACTIVE, rider))
                results += resolve_letters(session, record)
            row = session.execute(_FINISH_SYNCED, {
                "pk": pk, "now": utcnow(), "note": outcome.note, "completed": completed,
            }).one_or_none()
            if row is None:
                return _state(session, pk)
            done = _Finished(*row)
            _wake(session, done.entity, done.erp_key, locked=True)
            if outcome.uuid is not None:
                _save_mapping(session, done, outcome.uuid, status=outcome.status,
                              sent=outcome.sent, digest=outcome.digest,
                              remote=(outcome.remote_status, outcome.verification_url),
                              produced=outcome.produced)
                if outcome.status == MappingStatus.DELETED and not _held_elsewhere(
                        session, done.entity, done.erp_key, outcome.uuid):
                    _forget(session, done.entity, outcome.uuid)
            log_outcome(done, EventState.SYNCED, outcome.note)
            results.append(_synced_result(done, outcome.uuid, outcome.status, outcome))
            results += resolve_letters(session, done, _ended(outcome))
        return EventState.SYNCED

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
            decision = decide(Facts(record.attempts, utc(record.received_at),
                                    utc(record.first_failed_at) if record.first_failed_at
                                    else None))
            # The tag's lock before this row is written (see db.lock_tag): the tag a park waits
            # for, or, ending the event, its own (it wakes its waiters).
            if isinstance(decision, Park) and decision.waiting_for:
                lock_tag(session, decision.waiting_for)
                if _ready(session, record, decision.waiting_for,
                          decision.since or utcnow()):  # woken while we ran
                    decision = replace(decision, delay=0.0)
            elif not isinstance(decision, Park) and wakes(record.entity):
                lock_tag(session, f"{record.entity}:{record.erp_key}")
            if completed:  # this run ended normally: undo its delivery count
                record.deliveries = max(0, record.deliveries - 1)
            if isinstance(decision, Letter):
                letter = file_letter(session, record, decision.reason, decision.error)
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
                    results.append(_synced_result(record, decision.uuid, decision.status, decision))
                    results += resolve_letters(session, record, _ended(decision))
                else:
                    results.append(_result(record, decision.state, reason=decision.note))
                state = decision.state
        return state


def _ended(outcome: Outcome) -> str | None:
    """The certificate a revoke or delete ended (its uuid), if it acted on one."""
    ended = outcome.status in (MappingStatus.REVOKED, MappingStatus.DELETED)
    return outcome.uuid if ended else None
