"""The inbox's held events (docs/guard.md): the queries and state changes of the change guard.

An event goes ``pending``/``waiting`` -> ``held`` when the guard holds its kind
(:func:`hold_kind`: every open destructive event of the kind not admitted yet, in one UPDATE,
so that two workers holding the same burst hold each event once). An operator then releases
it (:func:`release`: back to ``pending``, marked admitted, due in the ERP's order) or discards
it (:func:`discard`: ``discarded``, final). Either way the events that waited behind it (a
newer event of the same entity) are due at once.

Every function takes the caller's session and never commits; each returns the outcomes to
report once the caller's transaction has committed (``held`` and ``discarded`` are reported;
a released event reports its next outcome when it has one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, Table, and_, func, or_, select, update
from sqlalchemy.orm import Session

from dokstamp_sync.db import lock_tag
from dokstamp_sync.models import InboxEvent, Mapping, utcnow
from dokstamp_sync.reporting import Result
from dokstamp_sync.states import OPEN, EventState, MappingStatus

EVENTS = cast(Table, InboxEvent.__table__)
DESTRUCTIVE_OPS = ("delete", "revoke")  # a revoke is a certificate's only (events.py)
RELEASE_STEP = timedelta(milliseconds=1)  # released events fall due this far apart, in order


def destructive(op: str) -> bool:
    """Whether an event of ``op`` is destructive (docs/guard.md): a delete, or a revoke."""
    return op in DESTRUCTIVE_OPS


def behind_tag(entity: str, key: str) -> str:
    """``waiting_for`` of an event parked behind a held event of its entity."""
    return f"held:{entity}:{key}"


@dataclass(frozen=True)
class Blocker:
    """An older held event of the same entity: the event at hand waits behind it."""

    pk: int
    event_id: str
    op: str


@dataclass(frozen=True)
class Facts:
    """What the guard needs to judge one destructive event."""

    received_at: datetime
    admitted: bool
    active: int  # active mappings of its kind: the threshold's base


def held_before(other: Any, entity: Any, key: Any, occurred_at: Any,
                pk: Any) -> ColumnElement[bool]:
    """``other`` is a held event of the same entity, older than event ``pk`` (by
    ``occurred_at``, then arrival): the event waits behind it (``ix_inbox_entity_key``). The
    store reads it with every attempt (``View.behind``)."""
    return and_(other.entity == entity, other.erp_key == key,
                other.state == EventState.HELD, other.id != pk,
                or_(other.occurred_at < occurred_at,
                    and_(other.occurred_at == occurred_at, other.id < pk)))


def older_held(session: Session, entity: str, key: str, occurred_at: datetime,
               pk: int) -> Blocker | None:
    """The oldest held event of (entity, key) older than event ``pk``, if any."""
    row = session.execute(
        select(EVENTS.c.id, EVENTS.c.event_id, EVENTS.c.op)
        .where(held_before(EVENTS.c, entity, key, occurred_at, pk))
        .order_by(EVENTS.c.occurred_at, EVENTS.c.id).limit(1)).one_or_none()
    return Blocker(*row) if row is not None else None


def facts(session: Session, pk: int, entity: str) -> Facts | None:
    """Event ``pk``'s arrival and whether it was admitted, and its kind's active mappings;
    None when the event is gone."""
    row = session.execute(select(EVENTS.c.received_at, EVENTS.c.admitted_at)
                          .where(EVENTS.c.id == pk)).one_or_none()
    if row is None:
        return None
    active = session.scalar(select(func.count()).select_from(Mapping).where(
        Mapping.entity == entity, Mapping.status == MappingStatus.ACTIVE)) or 0
    return Facts(row[0], row[1] is not None, int(active))


def admit(session: Session, pk: int) -> bool:
    """Mark open event ``pk`` admitted (the guard let it through); False when it is not open
    any more (held meanwhile by another worker: then it is not applied)."""
    return session.execute(
        update(EVENTS).where(EVENTS.c.id == pk, EVENTS.c.state.in_(OPEN))
        .values(admitted_at=func.coalesce(EVENTS.c.admitted_at, utcnow()))
        .returning(EVENTS.c.id)).one_or_none() is not None


def hold_kind(session: Session, entity: str, reason: str) -> list[Result]:
    """Hold every open destructive event of ``entity`` not admitted yet; the outcomes of those
    this call held (none that another call held already: row locks serialize the UPDATEs)."""
    now = utcnow()
    rows = session.execute(
        update(EVENTS).where(EVENTS.c.entity == entity, EVENTS.c.op.in_(DESTRUCTIVE_OPS),
                             EVENTS.c.state.in_(OPEN), EVENTS.c.admitted_at.is_(None))
        .values(state=EventState.HELD, last_error=reason, finished_at=now, reported_at=None,
                waiting_for=None)
        .returning(EVENTS.c.id, EVENTS.c.event_id, EVENTS.c.erp_key, EVENTS.c.op)).all()
    return [Result(event_id=event_id, entity=entity, key=key, op=op, state=EventState.HELD,
                   at=now, reason=reason, event_pk=pk) for pk, event_id, key, op in rows]


@dataclass(frozen=True)
class Selection:
    """Which held events an operator means: ``ids`` (inbox ids), every one of ``entity``, or
    ``everything``."""

    ids: Sequence[int] = ()
    entity: str | None = None
    everything: bool = False


@dataclass
class Decided:
    """What :func:`release` or :func:`discard` did."""

    done: list[InboxEvent] = field(default_factory=list)
    not_held: list[int] = field(default_factory=list)  # named, found, decided before: not held
    missing: list[int] = field(default_factory=list)  # named, no such event
    results: list[Result] = field(default_factory=list)  # to report after the commit
    earlier: list[InboxEvent] = field(default_factory=list)  # the not_held ones' events


def list_held(session: Session, entity: str | None = None, *,
              lock: bool = False) -> list[InboxEvent]:
    """Held events in the ERP's order (``occurred_at``, then arrival); ``lock``: locked until
    the caller commits, so that two operators deciding at once never decide one event twice
    (the second sees it no longer held)."""
    query = select(InboxEvent).where(InboxEvent.state == EventState.HELD)
    if entity:
        query = query.where(InboxEvent.entity == entity)
    query = query.order_by(InboxEvent.occurred_at, InboxEvent.id)
    return list(session.scalars(query.with_for_update() if lock else query))


def counts(session: Session) -> dict[str, int]:
    """Held events per entity kind."""
    return {entity: int(n) for entity, n in session.execute(
        select(InboxEvent.entity, func.count()).where(InboxEvent.state == EventState.HELD)
        .group_by(InboxEvent.entity).order_by(InboxEvent.entity))}


def _chosen(session: Session, which: Selection) -> Decided:
    """The held events chosen (locked), in the ERP's order; of the ids named, those no longer
    held and those that do not exist."""
    if which.everything or which.entity:
        return Decided(list_held(session, None if which.everything else which.entity,
                                 lock=True))
    ids = list(dict.fromkeys(which.ids))  # an id named twice is decided (and reported) once
    # Locked in the ERP's order, as list_held locks them: two operators never deadlock.
    found = {e.id: e for e in session.scalars(
        select(InboxEvent).where(InboxEvent.id.in_(ids))
        .order_by(InboxEvent.occurred_at, InboxEvent.id).with_for_update())}
    held = [found[i] for i in ids if i in found and found[i].state == EventState.HELD]
    held.sort(key=lambda e: (e.occurred_at, e.id))
    earlier = [found[i] for i in ids if i in found and _decided_before(found[i])]
    return Decided(held, [e.id for e in earlier],
                   [i for i in ids if i not in found or (found[i].state != EventState.HELD
                                                         and not _decided_before(found[i]))],
                   earlier=earlier)


def _decided_before(event: InboxEvent) -> bool:
    """May have been held and decided since: discarded, or a delete or revoke admitted (by a
    release, or let through by the guard: the database cannot tell those apart). An upsert,
    or a delete never admitted, was never held: naming it is a mistake (exit 1)."""
    return event.state == EventState.DISCARDED or (
        destructive(event.op) and event.admitted_at is not None)


def _wake_behind(session: Session, events: Sequence[InboxEvent]) -> None:
    """The events waiting behind ``events`` are due now; each tag's lock first (in one order),
    so that a park behind one of them committed meanwhile is not missed (sync/statements.py)."""
    tags = sorted({behind_tag(e.entity, e.erp_key) for e in events})
    for tag in tags:
        lock_tag(session, tag)
    if tags:
        session.execute(update(EVENTS).where(EVENTS.c.state == EventState.WAITING,
                                             EVENTS.c.waiting_for.in_(tags))
                        .values(next_attempt_at=utcnow()))


def release(session: Session, which: Selection) -> Decided:
    """Held -> pending, admitted (never held again by the burst that held them), due one
    after another in the ERP's order; the events waiting behind them are due too."""
    chosen = _chosen(session, which)
    events = chosen.done
    now = utcnow()
    for rank, event in enumerate(events):
        event.state = EventState.PENDING
        event.admitted_at = now
        event.next_attempt_at = now + rank * RELEASE_STEP
        event.finished_at, event.waiting_for, event.deliveries = None, None, 0
        event.last_error = "released by an operator"
    _wake_behind(session, events)
    return chosen


def discard(session: Session, which: Selection) -> Decided:
    """Held -> discarded (final, never applied, reported); the events waiting behind them are
    due at once."""
    chosen = _chosen(session, which)
    events = chosen.done
    now = utcnow()
    reason = "discarded by an operator: never applied"
    for event in events:
        event.state = EventState.DISCARDED
        event.finished_at, event.reported_at, event.last_error = now, None, reason
    _wake_behind(session, events)
    chosen.results = [Result(event_id=e.event_id, entity=e.entity, key=e.erp_key, op=e.op,
                             state=EventState.DISCARDED, at=now, reason=reason, event_pk=e.id)
                      for e in events]
    return chosen


def as_dict(event: InboxEvent) -> dict[str, Any]:
    """A held event as JSON-ready data (``held list --json``)."""
    return {"id": event.id, "event_id": event.event_id, "entity": event.entity,
            "key": event.erp_key, "op": event.op, "occurred_at": event.occurred_at.isoformat(),
            "held_at": event.finished_at.isoformat() if event.finished_at else None,
            "reason": event.last_error}
