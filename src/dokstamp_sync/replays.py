"""Replaying dead letters whose event is in the inbox (docs/erp-guide.md): the letter becomes
``replayed`` and its event, if dead, ``pending`` as if just received. Shared by the operator's
replay (:func:`.pipeline.inbox.replay_letters`, which also re-reads malformed entries) and the
walk (a refused re-issue replayed once the older revoke synced: :mod:`.sync.letters`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, update
from sqlalchemy.orm import Session

from dokstamp_sync.models import DeadLetter, InboxEvent
from dokstamp_sync.states import EventState, LetterStatus


def replay_event_letters(session: Session, ids: Sequence[int], now: datetime) -> list[int]:
    """Replay the open letters among ``ids`` that have an inbox event (one short transaction
    is the caller's): attempts and deliveries reset, a fresh dependency timeout, due now, its
    next outcome reported again. Returns the letters replayed."""
    letters = DeadLetter.__table__.c
    rows = session.execute(
        update(DeadLetter).where(letters.id.in_(ids), letters.status == LetterStatus.OPEN,
                                 letters.event_pk.is_not(None))
        .values(status=LetterStatus.REPLAYED, resolved_at=now,
                # not reported itself: its event's new outcome is
                reported_at=func.coalesce(letters.reported_at, now))
        .returning(letters.id, letters.event_pk)).all()
    pks = [pk for _, pk in rows]
    if pks:
        session.execute(
            update(InboxEvent).where(InboxEvent.id.in_(pks), InboxEvent.state == EventState.DEAD)
            .values(state=EventState.PENDING, attempts=0, deliveries=0, first_failed_at=None,
                    finished_at=None, waiting_for=None, reported_at=None, next_attempt_at=now,
                    received_at=now))
    return [letter_id for letter_id, _ in rows]
