"""Re-dispatching parked events when their next attempt is due.

Long waits live in the database (``next_attempt_at``), never as Celery countdown/ETA messages,
which Redis redelivers once the visibility timeout passes (a known cause of duplicate runs).
Claiming uses ``FOR UPDATE SKIP LOCKED``, so schedulers on several machines never dispatch the
same event twice; each claim extends the event's lease by ``lease`` seconds.

The lease is short (``DOKSTAMP_SYNC_LEASE``): a running task renews it (:mod:`..sync.lease`), so
an event whose lease ran out belongs to a lost worker or a lost task message and is handed out
again within seconds. An event can also still sit in Celery's queue when its lease runs out (a
long backlog): ``queued`` tells how many tasks wait there, and while that is ``max_queued`` or
more the scheduler sends nothing, so a backlog is not multiplied by re-dispatches (the few sent
twice when the queue is short find their event final and make no call).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.models import InboxEvent, utcnow
from dokstamp_sync.states import OPEN

MAX_QUEUED = 100  # tasks in Celery's queue above which nothing more is re-dispatched


def dispatch_due(sessions: sessionmaker[Session], dispatch: Callable[[Sequence[int]], None],
                 *, lease: float, limit: int = 500, queued: Callable[[], int] | None = None,
                 max_queued: int = MAX_QUEUED) -> int:
    """Dispatch up to ``limit`` due events; return how many."""
    if queued is not None and queued() >= max_queued:
        return 0
    now = utcnow()
    with session_scope(sessions) as session:
        ids = list(session.scalars(
            select(InboxEvent.id)
            .where(InboxEvent.state.in_(OPEN),
                   InboxEvent.next_attempt_at <= now)
            .order_by(InboxEvent.next_attempt_at).limit(limit)
            .with_for_update(skip_locked=True)))
        if ids:
            session.execute(update(InboxEvent).where(InboxEvent.id.in_(ids))
                            .values(next_attempt_at=now + timedelta(seconds=lease)))
    if ids:
        dispatch(ids)
    return len(ids)
