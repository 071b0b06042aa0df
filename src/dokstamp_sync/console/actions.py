"""Replay and discard from the console: in short batches, each kept in the letter's history.

A batch is ``BATCH`` letters in one short transaction (as ``dlq replay``'s per-letter work,
:mod:`..ops.dlq`), so a worker recording a sync of a key with an open letter waits at most for
one batch, never for the whole selection. Each letter changed gets a :class:`LetterHistory`
row (action, who, when) in the same transaction, and a log line names who did what.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.console.queries import Filter, ids
from dokstamp_sync.db import session_scope
from dokstamp_sync.models import utcnow
from dokstamp_sync.pipeline import inbox
from dokstamp_sync.replays import history
from dokstamp_sync.states import LetterStatus

log = logging.getLogger("dokstamp_sync.console")
BATCH = 100  # letters per transaction
PAST = {"replay": "replayed", "discard": "discarded"}  # the history's words
ACTIONS = tuple(PAST)


@dataclass
class Done:
    changed: list[int] = field(default_factory=list)
    unchanged: list[int] = field(default_factory=list)  # not open, missing, still invalid


def _batch(session: Session, action: str, chunk: Sequence[int], actor: str, done: Done) -> None:
    now = utcnow()
    if action == "replay":
        report = inbox.replay_letters(session, chunk, now)
        changed = list(report.replayed)
        history(session, "still_invalid", report.still_invalid, actor)
        skipped = [i for i in chunk if i not in set(changed)]
    else:
        changed = list(inbox.discard_letters(session, chunk, now))
        skipped = [i for i in chunk if i not in set(changed)]
    history(session, PAST[action], changed, actor)
    done.changed += changed
    done.unchanged += skipped


def act(sessions: sessionmaker[Session], action: str, letter_ids: Sequence[int],
        actor: str) -> Done:
    """Replay or discard the given letters, ``BATCH`` per transaction."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    done = Done()
    ordered = list(dict.fromkeys(letter_ids))
    for start in range(0, len(ordered), BATCH):
        chunk = ordered[start:start + BATCH]
        with session_scope(sessions) as session:
            _batch(session, action, chunk, actor, done)
        log.info("console: %s %s letters %s", actor, action, chunk)
    return done


def act_on_filter(sessions: sessionmaker[Session], action: str, f: Filter,
                  actor: str) -> Done:
    """Replay or discard every open letter ``f`` matches, a batch at a time, newest first
    (letters that arrive meanwhile with a higher id are left for the next time)."""
    scope = Filter(**{**f.__dict__, "status": LetterStatus.OPEN.value})
    done = Done()
    before: int | None = None
    while True:
        with session_scope(sessions) as session:
            chunk = ids(session, scope, before, BATCH)
        if not chunk:
            return done
        part = act(sessions, action, chunk, actor)
        done.changed += part.changed
        done.unchanged += part.unchanged
        before = min(chunk)
