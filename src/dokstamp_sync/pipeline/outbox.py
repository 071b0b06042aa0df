"""The outbox behind the outcome stream's "at least once" (CONTRACT §5).

A final outcome is recorded with ``reported_at`` NULL: on its inbox row (synced, superseded,
dead or discarded, and the not-final ``held`` of CONTRACT §6), on a dead letter that a newer
event resolved (reported again as ``superseded``), or on the dead letter of a stream entry
that is no valid event. After the XADD succeeded,
:func:`mark_reported` sets it in one short UPDATE. What a kill or a Redis outage left
unreported, :func:`sweep` (the pump's sweeper thread) writes later, rebuilt from the database
rows: only rows finished more than ``settle`` seconds ago, so that it does not race the normal
path (which publishes within milliseconds of its commit).

Order matters to a consumer that keeps the last outcome per ``event_id``: the sweeper writes
the events first and the resolved letters only once no unreported event is left in the pass.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import timedelta
from typing import cast

from sqlalchemy import Table, and_, bindparam, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.events import utc
from dokstamp_sync.models import DeadLetter, InboxEvent, Mapping, utcnow
from dokstamp_sync.pipeline.results import Report, Result
from dokstamp_sync.states import REPORTED, EventState, LetterStatus

log = logging.getLogger("dokstamp_sync.results")

SETTLE = 10.0  # s: younger outcomes are the normal path's, which publishes right after commit
BATCH = 200
INTERVAL = 5.0  # s between two sweeps (the pump's)

EVENTS = cast(Table, InboxEvent.__table__)
LETTERS = cast(Table, DeadLetter.__table__)
MAPPINGS = cast(Table, Mapping.__table__)

# Only an event still final is marked: one replayed meanwhile is open again (and reported when
# it is final anew). A letter's outcome is marked only while it is the one reported: a letter
# resolved meanwhile owes its ``superseded`` outcome still.
_MARK_EVENTS = update(EVENTS).where(
    EVENTS.c.id.in_(bindparam("pks", expanding=True)), EVENTS.c.reported_at.is_(None),
    EVENTS.c.state.in_(REPORTED)).values(reported_at=bindparam("now"))
_MARK_RESOLVED = update(LETTERS).where(
    LETTERS.c.id.in_(bindparam("ids", expanding=True)), LETTERS.c.reported_at.is_(None),
    LETTERS.c.status == LetterStatus.SUPERSEDED).values(reported_at=bindparam("now"))
_MARK_DEAD = update(LETTERS).where(
    LETTERS.c.id.in_(bindparam("ids", expanding=True)), LETTERS.c.reported_at.is_(None),
    LETTERS.c.status != LetterStatus.SUPERSEDED).values(reported_at=bindparam("now"))

RESOLVED = "resolved: a newer event of this entity synced"


def mark_reported(session: Session, results: Sequence[Result]) -> None:
    """Mark the rows behind ``results`` reported (they were written to the stream)."""
    now = utcnow()
    pks = sorted({r.event_pk for r in results if r.event_pk is not None})
    resolved = sorted({r.dead_letter_id for r in results if r.dead_letter_id is not None
                       and r.state == EventState.SUPERSEDED and r.event_pk is None})
    dead = sorted({r.dead_letter_id for r in results if r.dead_letter_id is not None
                   and r.state != EventState.SUPERSEDED})
    if pks:
        session.execute(_MARK_EVENTS, {"pks": pks, "now": now})
    if resolved:
        session.execute(_MARK_RESOLVED, {"ids": resolved, "now": now})
    if dead:
        session.execute(_MARK_DEAD, {"ids": dead, "now": now})


def unreported(session: Session, *, settle: float = SETTLE, limit: int = BATCH) -> list[Result]:
    """Up to ``limit`` outcomes recorded more than ``settle`` seconds ago and not reported,
    oldest first, rebuilt from the rows: events first, then dead letters."""
    cutoff = utcnow() - timedelta(seconds=settle)
    rows = session.execute(
        select(EVENTS.c.id, EVENTS.c.event_id, EVENTS.c.entity, EVENTS.c.erp_key, EVENTS.c.op,
               EVENTS.c.state, EVENTS.c.finished_at, EVENTS.c.last_error,
               MAPPINGS.c.dokstamp_uuid, MAPPINGS.c.status, MAPPINGS.c.verification_url)
        .outerjoin(MAPPINGS, and_(MAPPINGS.c.entity == EVENTS.c.entity,
                                  MAPPINGS.c.erp_key == EVENTS.c.erp_key))
        .where(EVENTS.c.reported_at.is_(None), EVENTS.c.state.in_(REPORTED),
               EVENTS.c.finished_at < cutoff)
        .order_by(EVENTS.c.finished_at, EVENTS.c.id).limit(limit)).all()
    dead = [row.id for row in rows if row.state == EventState.DEAD]
    letters = {pk: (letter_id, reason, status) for letter_id, pk, reason, status in
               session.execute(select(LETTERS.c.id, LETTERS.c.event_pk, LETTERS.c.reason,
                                      LETTERS.c.http_status)
                               .where(LETTERS.c.event_pk.in_(dead))
                               .order_by(LETTERS.c.id))} if dead else {}  # the newest wins
    results = []
    for row in rows:
        common = {"event_id": row.event_id, "entity": row.entity, "key": row.erp_key,
                  "op": row.op, "state": row.state, "at": utc(row.finished_at),
                  "event_pk": row.id}
        if row.state == EventState.SYNCED:
            results.append(Result(
                **common, dokstamp_uuid=row.dokstamp_uuid,
                mapping_status=row.status if row.dokstamp_uuid is not None else None,
                public_verification_url=row.verification_url))
        elif row.state == EventState.DEAD and row.id in letters:
            letter_id, reason, http_status = letters[row.id]
            results.append(Result(**common, reason=reason or row.last_error,
                                  dead_letter_id=letter_id, http_status=http_status))
        else:
            results.append(Result(**common, reason=row.last_error))
    if len(rows) < limit:  # no unreported event left before the letters' outcomes
        results += _letters(session, cutoff, limit - len(rows))
    return results


def _letters(session: Session, cutoff: object, limit: int) -> list[Result]:
    """Resolved letters (``superseded``) and those of entries that are no valid event
    (``dead``; a replayed one is not reported: its new event is)."""
    lettered = EVENTS.alias("lettered")
    since = func.coalesce(LETTERS.c.resolved_at, LETTERS.c.last_failed_at)
    rows = session.execute(
        select(LETTERS.c.id, LETTERS.c.event_id, LETTERS.c.entity, LETTERS.c.erp_key,
               LETTERS.c.status, LETTERS.c.reason, LETTERS.c.http_status,
               LETTERS.c.resolved_at, LETTERS.c.last_failed_at, lettered.c.op)
        .outerjoin(lettered, lettered.c.id == LETTERS.c.event_pk)
        .where(LETTERS.c.reported_at.is_(None),
               or_(LETTERS.c.status == LetterStatus.SUPERSEDED,
                   and_(LETTERS.c.event_pk.is_(None),
                        LETTERS.c.status.in_((LetterStatus.OPEN, LetterStatus.DISCARDED)))),
               since < cutoff)
        .order_by(since, LETTERS.c.id).limit(limit)).all()
    out = []
    for row in rows:
        superseded = row.status == LetterStatus.SUPERSEDED
        out.append(Result(
            event_id=row.event_id, entity=row.entity, key=row.erp_key, op=row.op,
            state=EventState.SUPERSEDED if superseded else EventState.DEAD,
            at=utc(row.resolved_at if superseded and row.resolved_at else row.last_failed_at),
            reason=RESOLVED if superseded else row.reason, dead_letter_id=row.id,
            http_status=None if superseded else row.http_status))
    return out


def sweep(sessions: sessionmaker[Session], report: Report, *, settle: float = SETTLE,
          batch: int = BATCH, rounds: int = 50) -> int:
    """Write what the normal path left unreported, a batch at a time, marking each batch once
    written; stops when nothing is left, the stream cannot be written, or after ``rounds``
    batches (the next sweep goes on). Returns how many were written."""
    sent = 0
    for _ in range(rounds):
        with session_scope(sessions) as session:
            results = unreported(session, settle=settle, limit=batch)
        if not results or not report(results):
            return sent
        with session_scope(sessions) as session:
            mark_reported(session, results)
        sent += len(results)
        log.info("outbox: %d outcome(s) written late to the outcome stream", len(results))
        if len(results) < batch:
            break
    return sent

