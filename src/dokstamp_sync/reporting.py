"""An outcome as the outcome stream carries it (docs/erp-guide.md), and marking its rows reported.

The shared piece below the walk and the pipeline: the store records results and hands them to a
:data:`Report` (the pipeline's publisher, injected by wiring), then marks their rows reported;
the pipeline's sweeper (:mod:`dokstamp_sync.pipeline.outbox`) does the same for rows left
unreported. Neither the walk nor this module imports :mod:`dokstamp_sync.pipeline`.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, or_, update
from sqlalchemy.orm import Session

from dokstamp_sync.models import DeadLetter, InboxEvent, utcnow
from dokstamp_sync.states import REPORTED, EventState, LetterStatus

EVENTS = cast(Table, InboxEvent.__table__)
LETTERS = cast(Table, DeadLetter.__table__)


@dataclass(frozen=True, kw_only=True)
class Result:
    """One outcome as docs/erp-guide.md shows it (field names and order are the contract's)."""

    event_id: str | None
    entity: str | None
    key: str | None
    op: str | None
    state: str  # synced, superseded, dead, discarded, or held (docs/guard.md: not final)
    at: datetime
    dokstamp_uuid: str | None = None
    mapping_status: str | None = None
    public_verification_url: str | None = None
    reason: str | None = None
    dead_letter_id: int | None = None
    http_status: int | None = None
    # On the stream only when true: this entry reused an event_id already taken by other
    # content and was refused; it says nothing about the event kept under that event_id.
    refused_duplicate: bool = False
    # Not on the stream: the inbox row whose final state this is (None for a dead letter's
    # own outcome), so that it can be marked reported after the XADD.
    event_pk: int | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["event_pk"]
        if not self.refused_duplicate:
            del out["refused_duplicate"]
        out["at"] = self.at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        out["state"] = str(self.state)
        if self.mapping_status is not None:
            out["mapping_status"] = str(self.mapping_status)
        return out

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), ensure_ascii=False)


Report = Callable[[Sequence[Result]], bool]  # True: written (the rows may be marked reported)
# Queues results to be written with a round trip made anyway; calls back once they were.
Later = Callable[[Sequence[Result], Callable[[], None]], None]


# Only an event still final is marked: one replayed meanwhile is open again (and reported when
# it is final anew). A letter's outcome is marked only while it is the one reported: a letter
# resolved meanwhile owes its ``superseded`` outcome still.
_MARK_EVENTS = update(EVENTS).where(
    EVENTS.c.id.in_(bindparam("pks", expanding=True)), EVENTS.c.reported_at.is_(None),
    EVENTS.c.state.in_(REPORTED)).values(reported_at=bindparam("now"))
_MARK_EVENTS_IN_STATE = update(EVENTS).where(
    EVENTS.c.id.in_(bindparam("pks", expanding=True)), EVENTS.c.reported_at.is_(None),
    EVENTS.c.state == bindparam("b_state"),
    or_(EVENTS.c.finished_at.is_(None), EVENTS.c.finished_at <= bindparam("b_written")),
).values(reported_at=bindparam("now"))
_MARK_RESOLVED = update(LETTERS).where(
    LETTERS.c.id.in_(bindparam("ids", expanding=True)), LETTERS.c.reported_at.is_(None),
    LETTERS.c.status == LetterStatus.SUPERSEDED).values(reported_at=bindparam("now"))
_MARK_DEAD = update(LETTERS).where(
    LETTERS.c.id.in_(bindparam("ids", expanding=True)), LETTERS.c.reported_at.is_(None),
    LETTERS.c.status != LetterStatus.SUPERSEDED).values(reported_at=bindparam("now"))

RESOLVED = "resolved: a newer event of this entity synced"


def mark_reported(session: Session, results: Sequence[Result], *,
                  written: datetime | None = None) -> None:
    """Mark the rows behind ``results`` reported (they were written to the stream).
    ``written`` (when they were written, marked a while later): an event's row only while it
    is still in the state reported and finished no later than that, so that an event replayed
    and ended again since, its new outcome still to be written, is not marked by the old."""
    now = utcnow()
    same_state = written is not None
    if same_state:
        by_state: dict[str, set[int]] = {}
        for r in results:
            if r.event_pk is not None:
                by_state.setdefault(r.state, set()).add(r.event_pk)
        for state, in_state in sorted(by_state.items()):
            session.execute(_MARK_EVENTS_IN_STATE, {"pks": sorted(in_state), "now": now,
                                                    "b_state": state, "b_written": written})
    pks = [] if same_state else sorted({r.event_pk for r in results if r.event_pk is not None})
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


class Unmarked:
    """Outcomes written to the stream whose rows are not marked reported yet: marked in the
    next transaction that records outcomes (:meth:`take`), not in one transaction each, and at
    the end of every task (the store's ``flush_reported``). Until then a row is unreported for
    the time between two outcomes, well under the sweeper's settle delay; a process killed
    meanwhile leaves it to the sweeper, which writes its outcome again (the stream is at least
    once, docs/outcomes.md)."""

    def __init__(self) -> None:
        self._written: list[tuple[Sequence[Result], datetime]] = []
        self._guard = threading.Lock()

    def add(self, results: Sequence[Result]) -> None:
        """Outcomes just written to the stream."""
        if results:
            with self._guard:
                self._written.append((results, utcnow()))

    def take(self) -> list[tuple[Sequence[Result], datetime]]:
        """All of them, with when each was written, to be marked by the caller's transaction
        (:meth:`mark`; :meth:`add` them back if it fails)."""
        with self._guard:
            taken, self._written = self._written, []
        return taken

    def put_back(self, taken: list[tuple[Sequence[Result], datetime]]) -> None:
        with self._guard:
            self._written[:0] = taken

    @staticmethod
    def mark(session: Session, taken: list[tuple[Sequence[Result], datetime]]) -> None:
        for results, written in taken:
            mark_reported(session, results, written=written)
