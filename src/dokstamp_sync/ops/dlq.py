"""The dead-letter store, for operators: list, show, replay, discard.

Replaying puts the event back to ``pending`` (attempts and retry budget reset); the worker's
scheduler dispatches it within a second. Replay is idempotent: only open letters are replayed,
and each becomes ``replayed``. A malformed stream entry is parsed again; if it is still invalid
it stays open with its reason refreshed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dokstamp_sync.events import InvalidEvent, parse_event
from dokstamp_sync.models import DeadLetter, InboxEvent, utcnow
from dokstamp_sync.pipeline.inbox import EXCERPT, record_entry


def excerpt(letter: DeadLetter) -> str | None:
    """The first characters of a malformed stream entry's raw text (None for a valid event)."""
    raw = letter.raw if letter.event_pk is None else None
    if not raw:
        return None
    return raw if len(raw) <= EXCERPT else raw[:EXCERPT] + "…"


def as_dict(letter: DeadLetter, *, full: bool = False,
            event: InboxEvent | None = None) -> dict[str, Any]:
    """A dead letter as JSON-ready data: ``dlq list --json`` (``full``: ``dlq show``)."""
    out: dict[str, Any] = {
        "id": letter.id, "event_id": letter.event_id, "entity": letter.entity,
        "key": letter.erp_key, "reason": letter.reason, "http_status": letter.http_status,
        "status": letter.status, "attempts": letter.attempts, "excerpt": excerpt(letter),
        "first_failed_at": letter.first_failed_at.isoformat(),
        "last_failed_at": letter.last_failed_at.isoformat()}
    if full:
        out |= {"request": f"{letter.request_method} {letter.request_path}"
                if letter.request_method else None,
                "response_body": letter.response_body, "raw": letter.raw,
                "resolved_at": letter.resolved_at.isoformat() if letter.resolved_at else None,
                "event": event.payload if event is not None else None}
    return out


def list_letters(session: Session, *, entity: str | None = None,
                 include_resolved: bool = False) -> list[DeadLetter]:
    query = select(DeadLetter).order_by(DeadLetter.id)
    if entity:
        query = query.where(DeadLetter.entity == entity)
    if not include_resolved:
        query = query.where(DeadLetter.status == "open")
    return list(session.scalars(query))


@dataclass
class ReplayReport:
    replayed: list[int] = field(default_factory=list)
    still_invalid: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # not open (already replayed/discarded)
    missing: list[int] = field(default_factory=list)


def _select(session: Session, ids: Sequence[int], entity: str | None,
            everything: bool) -> tuple[list[DeadLetter], list[int]]:
    if everything or entity:
        return list_letters(session, entity=entity), []
    found = {d.id: d for d in session.scalars(select(DeadLetter).where(DeadLetter.id.in_(ids)))}
    return [found[i] for i in ids if i in found], [i for i in ids if i not in found]


def replay(session: Session, ids: Sequence[int] = (), *, entity: str | None = None,
           everything: bool = False) -> ReplayReport:
    letters, missing = _select(session, ids, entity, everything)
    report = ReplayReport(missing=missing)
    now = utcnow()
    for letter in letters:
        if letter.status != "open":
            report.skipped.append(letter.id)
            continue
        if letter.event_pk is None:  # a malformed stream entry: parse it again
            try:
                parse_event(letter.raw or "")
            except InvalidEvent as exc:
                letter.reason, letter.last_failed_at = f"invalid event: {exc.reason}", now
                letter.attempts += 1
                report.still_invalid.append(letter.id)
                continue
            record_entry(session, f"replay-{letter.id}", {b"event": (letter.raw or "").encode()},
                         lease=0)
        else:
            event = session.get(InboxEvent, letter.event_pk)
            if event is not None and event.state == "dead":
                event.state, event.attempts, event.deliveries = "pending", 0, 0
                event.first_failed_at, event.finished_at, event.waiting_for = None, None, None
                event.reported_at = None  # its next final outcome is reported (CONTRACT §5)
                event.next_attempt_at = now
                event.received_at = now  # a fresh dependency timeout
        letter.status, letter.resolved_at = "replayed", now
        letter.reported_at = letter.reported_at or now  # not reported: its event's is
        report.replayed.append(letter.id)
    return report


def discard(session: Session, ids: Sequence[int]) -> tuple[list[int], list[int]]:
    """Drop open letters on purpose (their events stay dead); returns (discarded, not open)."""
    letters, missing = _select(session, ids, None, False)
    done, other = [], list(missing)
    for letter in letters:
        if letter.status == "open":
            letter.status, letter.resolved_at = "discarded", utcnow()
            done.append(letter.id)
        else:
            other.append(letter.id)
    return done, other
