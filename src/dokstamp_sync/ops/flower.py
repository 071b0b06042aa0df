"""What Flower shows of a task: the events it carried, and the truth about how they ended.

A task's arguments are inbox row ids; Flower shows Celery's ``argsrepr`` instead, written when
the task is sent (:class:`TaskLabels`): ``student S-1 (ev-1); enrollment E-1 (ev-2)``, so
Flower's search finds an ERP key or an ``event_id``.

A task that left any of its events dead raises :class:`DeadEvents` at its very end, after every
event was recorded and the counters flushed: Flower shows it FAILURE (and counts it in the
Workers page's Failed column) with each dead letter's id, entity, key and reason. The task is
declared to throw it (``throws``), so Celery logs it without a traceback, and with
``task_acks_on_failure_or_timeout`` (set in :mod:`..worker`) the message is acknowledged once, as
for a success: no redelivery, no retry.
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.models import DeadLetter, InboxEvent
from dokstamp_sync.states import EventState, LetterStatus

# Flower's task list: what the task carried and how it ended, before when and where.
TASKS_COLUMNS = "name,state,args,result,exception,received,runtime,worker,uuid"
REASON_MAX = 200  # characters of a letter's reason in Flower (the console shows all of it)


class DeadEvents(Exception):  # named for what Flower shows
    """Some events of the task ended dead; the message names each dead letter."""


class TaskLabels:
    """Describes inbox events for a task's ``argsrepr`` (one query per dispatch)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self, pks: Sequence[int]) -> dict[int, str]:
        """``{pk: "entity key (event_id)"}`` for the events that exist."""
        if not pks:
            return {}
        with session_scope(self.sessions) as session:
            rows = session.execute(
                select(InboxEvent.id, InboxEvent.entity, InboxEvent.erp_key,
                       InboxEvent.event_id).where(InboxEvent.id.in_(list(pks)))).all()
        return {pk: f"{entity} {key} ({event_id})" for pk, entity, key, event_id in rows}


def argsrepr(batch: Sequence[int], labels: dict[int, str]) -> str:
    """The task's arguments as Flower shows them: each event's label, or its id if unknown."""
    return "; ".join(labels.get(pk, f"event #{pk}") for pk in batch)


def letter_line(letter: DeadLetter) -> str:
    reason = letter.reason if len(letter.reason) <= REASON_MAX else (
        letter.reason[:REASON_MAX] + "…")
    return f"dead letter {letter.id}: {letter.entity} {letter.erp_key}: {reason}"


def dead_letters(session: Session, pks: Sequence[int]) -> list[DeadLetter]:
    """The open dead letters of the given events, by id."""
    return list(session.scalars(select(DeadLetter).where(
        DeadLetter.event_pk.in_(list(pks)), DeadLetter.status == LetterStatus.OPEN)
        .order_by(DeadLetter.id)))


def raise_if_dead(sessions: sessionmaker[Session], pks: Sequence[int],
                  states: Sequence[str]) -> None:
    """Raise :class:`DeadEvents` naming the dead letters when any event ended dead."""
    dead = [pk for pk, state in zip(pks, states, strict=False) if state == EventState.DEAD]
    if not dead:
        return
    with session_scope(sessions) as session:
        lines = [letter_line(letter) for letter in dead_letters(session, dead)]
    if not lines:  # resolved meanwhile (superseded, replayed): say which events it was
        lines = [f"event #{pk}: dead" for pk in dead]
    raise DeadEvents(f"{len(dead)} of {len(pks)} events dead: " + "; ".join(lines))
