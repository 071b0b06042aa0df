"""Re-dispatching parked events when their next attempt is due.

Long waits live in the database (``next_attempt_at``), never as Celery countdown/ETA messages,
which Redis redelivers once the visibility timeout passes (a known cause of duplicate runs).
Claiming uses ``FOR UPDATE SKIP LOCKED``, so schedulers on several machines never dispatch the
same event twice; each claim extends the event's lease by ``lease`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.models import InboxEvent, utcnow


def dispatch_due(sessions: sessionmaker[Session], dispatch: Callable[[Sequence[int]], None],
                 *, lease: float, limit: int = 500) -> int:
    """Dispatch up to ``limit`` due events; return how many."""
    now = utcnow()
    with session_scope(sessions) as session:
        ids = list(session.scalars(
            select(InboxEvent.id)
            .where(InboxEvent.state.in_(("pending", "waiting")),
                   InboxEvent.next_attempt_at <= now)
            .order_by(InboxEvent.next_attempt_at).limit(limit)
            .with_for_update(skip_locked=True)))
        if ids:
            session.execute(update(InboxEvent).where(InboxEvent.id.in_(ids))
                            .values(next_attempt_at=now + timedelta(seconds=lease)))
    if ids:
        dispatch(ids)
    return len(ids)
