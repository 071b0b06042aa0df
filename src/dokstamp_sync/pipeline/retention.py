"""The inbox's retention: final events older than ``DOKSTAMP_SYNC_INBOX_RETENTION_DAYS`` are
deleted, keeping what deduplication and ordering need.

Kept whatever their age: open events, events with a dead letter (the letter's page shows its
event), events whose outcome is not reported yet (docs/erp-guide.md), and the newest event of each
(entity, ERP key). So an old ``event_id`` the ERP sends again after its row was deleted is
recorded again and ends ``superseded`` by the newer event kept for its key: never applied
twice. Deleted in short batches (one short transaction each), oldest first; unset (the
default) keeps everything.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Select, and_, delete, exists, or_, select
from sqlalchemy.orm import Session, aliased, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.models import DeadLetter, InboxEvent, utcnow
from dokstamp_sync.states import FINAL

BATCH = 1000  # rows per transaction


def prunable(cutoff_days: float, limit: int = BATCH) -> Select[int]:
    """The ids of up to ``limit`` events the retention may delete, oldest first."""
    newer = aliased(InboxEvent)
    cutoff = utcnow() - timedelta(days=cutoff_days)
    return (select(InboxEvent.id)
            .where(InboxEvent.state.in_(FINAL), InboxEvent.finished_at < cutoff,
                   InboxEvent.reported_at.is_not(None),
                   ~exists().where(DeadLetter.event_pk == InboxEvent.id),
                   exists().where(newer.entity == InboxEvent.entity,
                                  newer.erp_key == InboxEvent.erp_key,
                                  or_(newer.occurred_at > InboxEvent.occurred_at,
                                      and_(newer.occurred_at == InboxEvent.occurred_at,
                                           newer.id > InboxEvent.id))))
            .order_by(InboxEvent.finished_at).limit(limit))


def prune(sessions: sessionmaker[Session], days: float, *, batch: int = BATCH,
          max_batches: int = 100) -> int:
    """Delete final events older than ``days`` (see the module docstring); return how many."""
    total = 0
    for _ in range(max_batches):
        with session_scope(sessions) as session:
            ids = list(session.scalars(prunable(days, batch)))
            if ids:
                session.execute(delete(InboxEvent).where(InboxEvent.id.in_(ids)))
        total += len(ids)
        if len(ids) < batch:
            break
    return total
