"""The dead-letter store, for operators: list, show, replay, discard, and what a replay or
discard would do (:func:`preview`, ``--dry-run``).

Replaying puts the event back to ``pending`` (attempts and retry budget reset); the worker's
scheduler dispatches it within a second. Replay and discard are idempotent: only open letters
are acted on, a letter already resolved is reported as skipped (not an error). They run in
short batches, one transaction each, so workers are never held up by a long one. The state
transitions themselves are the inbox's (:mod:`dokstamp_sync.pipeline.inbox`). As the console's,
each letter replayed, discarded or still invalid gets a :class:`LetterHistory` row (who: the
``actor``, ``cli:<os user>`` by default; when; what) in its batch's transaction, and each batch
logs one line naming who did what.
"""

from __future__ import annotations

import getpass
import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.dokstamp.errors import redact, redact_text
from dokstamp_sync.models import DeadLetter, InboxEvent, utcnow
from dokstamp_sync.pipeline import inbox
from dokstamp_sync.pipeline.inbox import EXCERPT
from dokstamp_sync.replays import history
from dokstamp_sync.states import LetterStatus

log = logging.getLogger("dokstamp_sync.dlq")


def cli_actor() -> str:
    """Who runs a CLI replay/discard, for the letters' history: ``cli:<os user>``."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's arbitrary uid)
        user = f"uid{os.getuid()}"
    return f"cli:{user}"[:100]


def excerpt(letter: DeadLetter) -> str | None:
    """The first characters of a malformed stream entry's raw text (None for a valid event)."""
    raw = redact_text(letter.raw) if letter.event_pk is None and letter.raw else None
    if not raw:
        return None
    return raw if len(raw) <= EXCERPT else raw[:EXCERPT] + "…"


def as_dict(letter: DeadLetter, *, full: bool = False,
            event: InboxEvent | None = None) -> dict[str, Any]:
    """A dead letter as JSON-ready data: ``dlq list --json`` (``full``: ``dlq show``); the
    value of every secret-named field is ``***``, as on the console's letter page."""
    out: dict[str, Any] = {
        "id": letter.id, "event_id": letter.event_id, "entity": letter.entity,
        "key": letter.erp_key, "reason": letter.reason, "http_status": letter.http_status,
        "status": letter.status, "attempts": letter.attempts, "excerpt": excerpt(letter),
        "first_failed_at": letter.first_failed_at.isoformat(),
        "last_failed_at": letter.last_failed_at.isoformat()}
    if full:
        out |= {"request": f"{letter.request_method} {letter.request_path}"
                if letter.request_method else None,
                "response_body": _hidden(letter.response_body), "raw": _hidden(letter.raw),
                "resolved_at": letter.resolved_at.isoformat() if letter.resolved_at else None,
                "event": redact(event.payload) if event is not None else None}
    return out


def _hidden(value: Any) -> Any:
    """``value`` (parsed JSON, or text that may not parse) with secret-named fields ``***``."""
    return redact_text(value) if isinstance(value, str) else redact(value)


def list_letters(session: Session, *, entity: str | None = None,
                 include_resolved: bool = False) -> list[DeadLetter]:
    query = select(DeadLetter).order_by(DeadLetter.id)
    if entity:
        query = query.where(DeadLetter.entity == entity)
    if not include_resolved:
        query = query.where(DeadLetter.status == LetterStatus.OPEN)
    return list(session.scalars(query))


@dataclass(frozen=True)
class Selection:
    """Which letters a replay or discard is about: ``ids``, or every open letter (of
    ``entity`` when given)."""

    ids: tuple[int, ...] = ()
    entity: str | None = None
    everything: bool = False

    @property
    def by_id(self) -> bool:
        return not (self.everything or self.entity)


@dataclass
class Targets:
    """A selection resolved: the open letters to act on, the others named by id."""

    open: list[int] = field(default_factory=list)
    not_open: list[int] = field(default_factory=list)  # replayed, discarded or superseded
    missing: list[int] = field(default_factory=list)


def targets(session: Session, selection: Selection) -> Targets:
    if not selection.by_id:
        query = select(DeadLetter.id).where(DeadLetter.status == LetterStatus.OPEN)
        if selection.entity:
            query = query.where(DeadLetter.entity == selection.entity)
        return Targets(open=list(session.scalars(query.order_by(DeadLetter.id))))
    wanted = list(dict.fromkeys(selection.ids))
    status = dict(session.execute(select(DeadLetter.id, DeadLetter.status)
                                  .where(DeadLetter.id.in_(wanted))).all())
    return Targets(open=[i for i in wanted if status.get(i) == LetterStatus.OPEN],
                   not_open=[i for i in wanted if i in status
                             and status[i] != LetterStatus.OPEN],
                   missing=[i for i in wanted if i not in status])


@dataclass
class Preview:
    """What a replay or discard would act on (``--dry-run``): open letters counted by
    (entity, reason), most first, and the ids it would leave alone."""

    counts: list[tuple[str | None, str, int]]
    not_open: list[int]
    missing: list[int]

    @property
    def total(self) -> int:
        return sum(n for _, _, n in self.counts)


def preview(session: Session, ids: Sequence[int] = (), *, entity: str | None = None,
            everything: bool = False) -> Preview:
    """What :func:`replay` or :func:`discard` would act on, counted: writes nothing."""
    found = targets(session, Selection(tuple(ids), entity, everything))
    counts: list[tuple[str | None, str, int]] = []
    for chunk in _chunks(found.open, BATCH):
        counts += session.execute(
            select(DeadLetter.entity, DeadLetter.reason, func.count())
            .where(DeadLetter.id.in_(chunk)).group_by(DeadLetter.entity, DeadLetter.reason)
        ).all()
    merged: Counter[tuple[str | None, str]] = Counter()
    for entity, reason, n in counts:
        merged[(entity, reason)] += n
    return Preview([(e, r, n) for (e, r), n in merged.most_common()], found.not_open,
                   found.missing)


@dataclass
class ReplayReport:
    replayed: list[int] = field(default_factory=list)
    still_invalid: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # not open (already replayed/discarded)
    missing: list[int] = field(default_factory=list)


@dataclass
class DiscardReport:
    discarded: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # not open (already replayed/discarded)
    missing: list[int] = field(default_factory=list)


# Letters per transaction: each batch is two or three statements, so a worker recording a sync
# of a key with an open letter waits for one batch at most (well under a second), never for
# the whole replay (README "Dead letters"; bench figures in docs/cli-errors.md).
BATCH = 200


def _chunks(ids: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def replay(sessions: sessionmaker[Session], ids: Sequence[int] = (), *,
           entity: str | None = None, everything: bool = False,
           batch: int = BATCH, actor: str | None = None) -> ReplayReport:
    """Replay the open letters ``ids``, or every open one (of ``entity``), ``batch`` letters
    per short transaction (see :func:`~.pipeline.inbox.replay_letters`); idempotent: a letter
    not open is skipped. Each letter acted on is kept in its history as ``actor``'s
    (:func:`cli_actor` by default)."""
    actor = actor or cli_actor()
    with session_scope(sessions) as session:
        found = targets(session, Selection(tuple(ids), entity, everything))
    report = ReplayReport(skipped=found.not_open, missing=found.missing)
    for chunk in _chunks(found.open, batch):
        with session_scope(sessions) as session:
            done = inbox.replay_letters(session, chunk, utcnow())
            history(session, "replayed", done.replayed, actor)
            history(session, "still_invalid", done.still_invalid, actor)
        log.info("dlq: %s replay letters %s (replayed %d, still invalid %d)", actor,
                 list(chunk), len(done.replayed), len(done.still_invalid))
        report.replayed += done.replayed
        report.still_invalid += done.still_invalid
        report.skipped += done.not_open  # resolved meanwhile (a newer event synced)
    return report


def discard(sessions: sessionmaker[Session], ids: Sequence[int] = (), *,
            entity: str | None = None, everything: bool = False,
            batch: int = BATCH, actor: str | None = None) -> DiscardReport:
    """Discard open letters as :func:`replay` selects them (their events stay dead), ``batch``
    per short transaction; idempotent as :func:`replay`, kept in history as it."""
    actor = actor or cli_actor()
    with session_scope(sessions) as session:
        found = targets(session, Selection(tuple(ids), entity, everything))
    report = DiscardReport(skipped=found.not_open, missing=found.missing)
    for chunk in _chunks(found.open, batch):
        with session_scope(sessions) as session:
            done = inbox.discard_letters(session, chunk, utcnow())
            history(session, "discarded", done, actor)
        log.info("dlq: %s discard letters %s (discarded %d)", actor, list(chunk), len(done))
        report.discarded += done
        report.skipped += [i for i in chunk if i not in set(done)]
    return report
