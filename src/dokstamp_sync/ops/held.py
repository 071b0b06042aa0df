"""``dokstamp-sync held list|release|discard``: the operator's side of the change guard
(docs/guard.md).

``release`` puts held events back to ``pending``, admitted: the workers' scheduler applies them
within a second, in the ERP's order, and the guard never holds them again. ``discard`` ends them
``discarded`` (reported on the outcome stream, never applied). Both take the events out of
their kind's window, so the burst an operator dealt with no longer counts against the next
ordinary delete or revoke, and make the events that waited behind them due at once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import redis
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync import held
from dokstamp_sync.db import session_scope
from dokstamp_sync.guard import forget
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.reporting import Report, mark_reported

Decide = Callable[[Session, held.Selection], held.Decided]


@dataclass(frozen=True)
class Done:
    """The inbox ids released or discarded; of those named, the ones decided before (not held
    any more) and the ones that do not exist."""

    ids: list[int]
    not_held: list[int]
    missing: list[int]


def decide(sessions: sessionmaker[Session], client: redis.Redis, report: Report | None,
           action: Decide, which: held.Selection, *, prefix: str = RedisKeys().guard) -> Done:
    """Release or discard (``action``) the chosen held events in one transaction; then take
    them out of the guard's window and report what the action reports. Ids named that were
    decided before are taken out of the window again: running the command a second time
    finishes what a Redis failure after the first one's commit left."""
    with session_scope(sessions) as session:
        decided = action(session, which)
        session.flush()
        chosen = [(e.entity, e.event_id) for e in [*decided.done, *decided.earlier]]
        done = Done([e.id for e in decided.done], decided.not_held, decided.missing)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for entity, event_id in chosen:
        by_kind[entity].append(event_id)
    for entity, event_ids in by_kind.items():
        forget(client, entity, event_ids, prefix=prefix)
    if decided.results and report is not None and report(decided.results):
        with session_scope(sessions) as session:
            mark_reported(session, decided.results)
    return done


def decide_command(sessions: sessionmaker[Session], client: redis.Redis, report: Report | None,
                   action: str, which: held.Selection, *, as_json: bool,
                   prefix: str = RedisKeys().guard) -> int:
    """``held release|discard``: print what was done. As ``dlq``: an id decided before (not
    held any more) is named and not an error, so running a command twice is safe; an id that
    does not exist exits 1."""
    chosen: Decide = held.release if action == "release" else held.discard
    done = decide(sessions, client, report, chosen, which, prefix=prefix)
    verb = "released" if action == "release" else "discarded"
    if as_json:
        print(json.dumps({verb: done.ids, "not_held": done.not_held,
                          "not_found": done.missing}))
    else:
        print(f"{verb} {len(done.ids)}"
              + (f"; not held (decided before) {done.not_held}" if done.not_held else "")
              + (f"; not found or never held {done.missing}" if done.missing else ""))
    return 1 if done.missing else 0


def list_command(sessions: sessionmaker[Session], entity: str | None, *, as_json: bool) -> int:
    """``held list``: the held events, oldest first, and the reason they are held."""
    with session_scope(sessions) as session:
        events = [held.as_dict(e) for e in held.list_held(session, entity)]
    if as_json:
        print(json.dumps(events))
        return 0
    for e in events:
        print(f"#{e['id']:<6} {e['entity']:<11} {e['key']:<14} {e['op']:<7} "
              f"{e['event_id']}  occurred {e['occurred_at']}")
    if events:
        print(f"{len(events)} held: {events[0]['reason']}")
    else:
        print("nothing is held")
    return 0
