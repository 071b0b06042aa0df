"""``dokstamp-sync dlq list|show|replay|discard``: the dead-letter commands' output and exit
codes (the work is :mod:`dokstamp_sync.ops.dlq`'s).

One rule for replay and discard: a letter acted on, or already resolved (skipped, named), is
not an error (exit 0: doing it twice is safe); an id that does not exist, or a malformed entry
that is still invalid, exits 1; a missing selection exits 2.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.explain import CommandError
from dokstamp_sync.models import DeadLetter, InboxEvent
from dokstamp_sync.ops import dlq
from dokstamp_sync.states import LetterStatus


def run(args: argparse.Namespace, sessions: sessionmaker[Session]) -> int:
    if args.action == "list":
        return _list(args, sessions)
    if args.action == "show":
        return _show(args, sessions)
    _check_selection(args)
    which: dict[str, Any] = {"ids": args.ids, "entity": args.entity, "everything": args.all}
    if args.dry_run:
        with session_scope(sessions) as session:
            return _preview(args.action, dlq.preview(session, **which))
    if args.action == "replay":
        rep = dlq.replay(sessions, **which)
        print(f"replayed {len(rep.replayed)}" + _named(
            ("still invalid", rep.still_invalid), ("not open", rep.skipped),
            ("not found", rep.missing)))
        return 1 if rep.missing or rep.still_invalid else 0
    done = dlq.discard(sessions, **which)
    print(f"discarded {len(done.discarded)}" + _named(("not open", done.skipped),
                                                      ("not found", done.missing)))
    return 1 if done.missing else 0


def _check_selection(args: argparse.Namespace) -> None:
    if args.ids and (args.all or args.entity):
        raise CommandError(f"dlq {args.action}: give IDs, or --all / --entity E, not both")
    if not (args.ids or args.all or args.entity):
        raise CommandError(f"dlq {args.action}: say which letters: IDs, --all or --entity E "
                           "(--dry-run shows what they would be)")


def _named(*groups: tuple[str, list[int]]) -> str:
    return "".join(f"; {name} {ids}" for name, ids in groups if ids)


def _preview(action: str, preview: dlq.Preview) -> int:
    print(f"would {action} {preview.total} dead letter(s) (dry run: nothing written)"
          + _named(("not open", preview.not_open), ("not found", preview.missing)))
    for entity, reason, n in preview.counts:
        short = reason if len(reason) <= 100 else reason[:99] + "…"
        print(f"  {n:>7}  {entity or '?':<11} {short}")
    return 1 if preview.missing else 0


def _list(args: argparse.Namespace, sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as session:
        letters = [dlq.as_dict(d) for d in dlq.list_letters(
            session, entity=args.entity, include_resolved=args.include_resolved)]
    if args.json:
        print(json.dumps(letters))
        return 0
    for d in letters:
        status = f" {d['http_status']}" if d["http_status"] else ""
        resolved = f" [{d['status']}]" if d["status"] != LetterStatus.OPEN else ""
        print(f"#{d['id']:<5} {d['entity'] or '?':<11} {d['key'] or '-':<14}"
              f"{status}{resolved} {d['reason']}")
    if not letters:
        which = f" of {args.entity}" if args.entity else ""
        print(f"no {'' if args.include_resolved else 'open '}dead letters{which}")
    return 0


def _show(args: argparse.Namespace, sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as session:
        letter = session.get(DeadLetter, args.id)
        if letter is None:
            raise CommandError(f"no dead letter #{args.id} (dokstamp-sync dlq list shows the "
                               "open ones)", 1)
        event = session.get(InboxEvent, letter.event_pk) if letter.event_pk else None
        shown: dict[str, Any] = dlq.as_dict(letter, full=True, event=event)
    print(json.dumps(shown, indent=2, default=str))
    return 0
