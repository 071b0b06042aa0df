"""The outbox behind the outcome stream's "at least once" (docs/erp-guide.md).

A final outcome is recorded with ``reported_at`` NULL: on its inbox row (synced, superseded,
dead or discarded, and the not-final ``held`` of docs/guard.md), on a dead letter that a newer
event resolved (reported again as ``superseded``), or on the dead letter of a stream entry
that is no valid event. After the XADD succeeded,
:func:`mark_reported` sets it in one short UPDATE. What a kill or a Redis outage left
unreported, :func:`sweep` (the pump's sweeper thread) writes later, rebuilt from the database
rows: only rows finished more than ``settle`` seconds ago, so that it does not race the normal
path (which publishes within milliseconds of its commit).

Order matters to a consumer that keeps the last outcome per ``event_id``: the sweeper writes
the events first and the resolved letters only once no unreported event is left in the pass;
and a dead event whose letter was resolved since is written as ``superseded`` (what it is now),
never as a late ``dead`` after its letter's ``superseded``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import cast

from sqlalchemy import Table, and_, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.events import entry_op, utc
from dokstamp_sync.models import DeadLetter, InboxEvent, Mapping, utcnow
from dokstamp_sync.pipeline.results import Report, Result, reused_reason
from dokstamp_sync.reporting import RESOLVED as RESOLVED
from dokstamp_sync.reporting import mark_reported as mark_reported
from dokstamp_sync.states import REPORTED, EventState, LetterStatus

log = logging.getLogger("dokstamp_sync.results")

SETTLE = 10.0  # s: younger outcomes are the normal path's, which publishes right after commit
BATCH = 200
INTERVAL = 5.0  # s between two sweeps (the pump's)

EVENTS = cast(Table, InboxEvent.__table__)
LETTERS = cast(Table, DeadLetter.__table__)
MAPPINGS = cast(Table, Mapping.__table__)


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
    letters = {row.event_pk: row for row in
               session.execute(select(LETTERS.c.id, LETTERS.c.event_pk, LETTERS.c.reason,
                                      LETTERS.c.http_status, LETTERS.c.status)
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
            letter = letters[row.id]
            if letter.status == LetterStatus.SUPERSEDED:
                # Its death was never written and its letter is resolved since: report what
                # it is now, so that no late "dead" lands after the letter's "superseded".
                results.append(Result(**common | {"state": EventState.SUPERSEDED},
                                      reason=RESOLVED, dead_letter_id=letter.id))
                continue
            results.append(Result(**common, reason=letter.reason or row.last_error,
                                  dead_letter_id=letter.id, http_status=letter.http_status))
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
               LETTERS.c.resolved_at, LETTERS.c.last_failed_at, lettered.c.op, LETTERS.c.raw)
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
            event_id=row.event_id, entity=row.entity, key=row.erp_key,
            op=row.op if row.op is not None else entry_op(row.raw),
            state=EventState.SUPERSEDED if superseded else EventState.DEAD,
            at=utc(row.resolved_at if superseded and row.resolved_at else row.last_failed_at),
            reason=RESOLVED if superseded else row.reason, dead_letter_id=row.id,
            http_status=None if superseded else row.http_status,
            refused_duplicate=not superseded and row.reason == reused_reason(row.event_id)))
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

