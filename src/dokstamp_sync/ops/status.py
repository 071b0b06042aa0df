"""What an operator sees with ``dokstamp-sync status``: events by state, queue depths, the
oldest unsynced event's age, open dead letters, events held by the change guard per kind."""

from __future__ import annotations

from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from dokstamp_sync import held
from dokstamp_sync.events import utc
from dokstamp_sync.models import DeadLetter, InboxEvent, utcnow
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.states import OPEN, EventState, LetterStatus


def report(session: Session, client: redis.Redis | None, stream: str, *,
           finals: bool = True, keys: RedisKeys = RedisKeys()) -> dict[str, Any]:
    """The status as a JSON-ready dict (docs/operator-guide.md: at least ``events`` by state).

    ``finals=False`` (a metrics scrape): only open events are counted, through the index that
    leads with ``state``, so the cost follows the backlog, not the inbox's whole history; the
    final states are left out (``dead`` is the open dead letters). ``keys``: the deployment's
    Redis names (its Celery queue)."""
    counts = dict.fromkeys([s.value for s in (EventState if finals else OPEN)], 0)
    by_state = select(InboxEvent.state, func.count()).group_by(InboxEvent.state)
    if not finals:
        counts[EventState.DEAD.value] = 0
        by_state = by_state.where(InboxEvent.state.in_(OPEN))
    for state, n in session.execute(by_state):
        counts[state] = n
    # Malformed stream entries never became events; they are dead all the same.
    invalid = session.scalar(select(func.count()).select_from(DeadLetter).where(
        DeadLetter.event_pk.is_(None), DeadLetter.status == LetterStatus.OPEN)) or 0
    counts[EventState.DEAD] += invalid
    oldest = session.scalar(select(func.min(InboxEvent.received_at)).where(
        InboxEvent.state.in_(OPEN)))
    open_letters = session.scalar(select(func.count()).select_from(DeadLetter).where(
        DeadLetter.status == LetterStatus.OPEN)) or 0
    out: dict[str, Any] = {
        "events": counts,
        "oldest_unsynced_age_s": round((utcnow() - utc(oldest)).total_seconds(), 1)
        if oldest else None,
        "dead_letters_open": open_letters,
        EventState.HELD.value: held.counts(session),  # per entity kind (docs/guard.md)
    }
    if client is not None:
        try:
            out["stream_depth"] = int(client.xlen(stream)) if client.exists(stream) else 0
            out["queue_depth"] = int(client.llen(keys.queue))
        except redis.RedisError as exc:
            out |= {"stream_depth": None, "queue_depth": None,
                    "redis_error": f"{type(exc).__name__}: {exc}"}
    return out


def render(status: dict[str, Any]) -> str:
    """The status as text for a terminal."""
    events = status["events"]
    lines = ["events:  " + "  ".join(f"{k} {v}" for k, v in events.items())]
    age = status["oldest_unsynced_age_s"]
    lines.append(f"oldest unsynced event: {'none' if age is None else f'{age:.0f} s old'}")
    if "redis_error" in status:
        lines.append(f"Redis unreachable: {status['redis_error']}")
    elif "stream_depth" in status:
        lines.append(f"stream depth: {status['stream_depth']}   "
                     f"task queue depth: {status['queue_depth']}")
    lines.append(f"open dead letters: {status['dead_letters_open']}"
                 + ("  (dokstamp-sync dlq list)" if status["dead_letters_open"] else ""))
    if held_counts := status.get(EventState.HELD.value):
        lines.append("held by the change guard: " + ", ".join(
            f"{entity} {n}" for entity, n in held_counts.items())
            + "  (dokstamp-sync held list)")
    return "\n".join(lines)
