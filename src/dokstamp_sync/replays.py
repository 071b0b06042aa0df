"""Replaying dead letters whose event is in the inbox (docs/erp-guide.md): the letter becomes
``replayed`` and its event, if dead, ``pending`` as if just received; and the letters' history
(who replayed or discarded which, when). Shared by the operator's replay and discard (the CLI's
:mod:`.ops.dlq`, the console's :mod:`.console.actions`; :func:`.pipeline.inbox.replay_letters`
also re-reads malformed entries) and the walk (a refused re-issue replayed once the older
revoke synced: :mod:`.sync.letters`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, update
from sqlalchemy.orm import Session

from dokstamp_sync.models import DeadLetter, InboxEvent, LetterHistory, utcnow
from dokstamp_sync.states import EventState, LetterStatus


def history(session: Session, action: str, letter_ids: Sequence[int], actor: str,
            at: datetime | None = None) -> None:
    """Keep ``action`` (replayed, discarded, still_invalid) by ``actor`` in each letter's
    history, in the caller's transaction (``at``: when, by default now)."""
    when = at or utcnow()
    session.add_all([LetterHistory(letter_id=i, action=action, actor=actor, at=when)
                     for i in letter_ids])


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
