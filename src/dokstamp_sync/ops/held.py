"""``dokstamp-sync held list|release|discard``: the operator's side of the change guard
(CONTRACT §6, docs/guard.md).

``release`` puts held events back to ``pending``, admitted: the workers' scheduler applies them
within a second, in the ERP's order, and the guard never holds them again. ``discard`` ends them
``discarded`` (reported on the outcome stream, never applied). Both take the events out of
their kind's window, so the burst an operator dealt with no longer counts against the next
ordinary delete or revoke, and make the events that waited behind them due at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import redis
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.guard import forget
from dokstamp_sync.pipeline import held
from dokstamp_sync.pipeline.outbox import mark_reported
from dokstamp_sync.pipeline.results import Report

Decide = Callable[[Session, held.Selection], held.Decided]


@dataclass(frozen=True)
class Done:
    """The inbox ids released or discarded, and those named that were not held."""

    ids: list[int]
    not_held: list[int]


def decide(sessions: sessionmaker[Session], client: redis.Redis, report: Report | None,
           action: Decide, which: held.Selection) -> Done:
    """Release or discard (``action``) the chosen held events in one transaction; then take
    them out of the guard's window and report what the action reports."""
    with session_scope(sessions) as session:
        decided = action(session, which)
        session.flush()
        chosen = [(e.entity, e.event_id) for e in decided.done]
        done = Done([e.id for e in decided.done], decided.not_held)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for entity, event_id in chosen:
        by_kind[entity].append(event_id)
    for entity, event_ids in by_kind.items():
        forget(client, entity, event_ids)
    if decided.results and report is not None and report(decided.results):
        with session_scope(sessions) as session:
            mark_reported(session, decided.results)
    return done


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add ``held`` to the ``dokstamp-sync`` command."""
    hp = sub.add_parser("held", help="destructive changes held by the change guard: list, "
                                     "release, discard (CONTRACT §6)")
    hp.add_argument("action", choices=["list", "release", "discard"])
    hp.add_argument("ids", nargs="*", type=int, help="inbox ids, as `held list` shows them")
    hp.add_argument("--entity", help="every held event of this entity kind")
    hp.add_argument("--all", action="store_true", help="every held event")
    hp.add_argument("--json", action="store_true")
    hp.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    from dokstamp_sync.config import load_store_settings
    from dokstamp_sync.db import make_engine, make_sessionmaker
    from dokstamp_sync.pipeline.results import Publisher

    settings = load_store_settings()
    sessions = make_sessionmaker(make_engine(settings.database_url))
    if args.action == "list":
        return _list(sessions, args.entity, as_json=args.json)
    if not (args.ids or args.all or args.entity):
        print("say which: IDs, --entity E or --all", file=sys.stderr)
        return 2
    client = redis.Redis.from_url(settings.redis_url)
    report = Publisher(client, settings.dokstamp_sync_results_stream,
                       settings.dokstamp_sync_results_maxlen)
    action: Decide = held.release if args.action == "release" else held.discard
    done = decide(sessions, client, report, action,
                     held.Selection(args.ids, args.entity, args.all))
    verb = "released" if args.action == "release" else "discarded"
    if args.json:
        print(json.dumps({verb: done.ids, "not_held": done.not_held}))
    else:
        print(f"{verb} {len(done.ids)}"
              + (f"; not held or not found {done.not_held}" if done.not_held else ""))
    return 1 if done.not_held else 0


def _list(sessions: sessionmaker[Session], entity: str | None, *, as_json: bool) -> int:
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
