"""``dokstamp-sync plan FILE|-``: the command (registered by the cli) and its text output."""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from typing import IO

from dokstamp_sync.ops.plan import Plan

ACTION_ORDER = ("invalid", "superseded", "waits", "behind", "held", "unchanged", "create",
                "adopt", "update", "attach", "issue", "revoke", "delete", "archive")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    pl = sub.add_parser("plan", help="a dry run: what each event of a file would do, and the "
                                     "API calls it takes; writes nothing (CONTRACT §7)")
    pl.add_argument("file", help="one JSON event per line, as for enqueue; - reads stdin")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--check-dokstamp", action="store_true",
                    help="also search DokStamp (GET only): adoptions, entities gone")
    pl.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    import redis

    from dokstamp_sync.config import ConfigError, load_settings, load_store_settings
    from dokstamp_sync.db import make_engine, make_sessionmaker
    from dokstamp_sync.guard import GuardPolicy
    from dokstamp_sync.ops.plan import Planner, read_events

    opened: IO[str] | nullcontext[IO[str]] = nullcontext(sys.stdin) if args.file == "-" \
        else open(args.file, encoding="utf-8")  # noqa: SIM115  # closed by the with below
    with opened as fh:
        events = read_events(fh)
    try:
        settings = load_settings()
        rate = settings.dokstamp_rate_limit
    except ConfigError:
        if args.check_dokstamp:
            raise  # the searches need the credentials
        store, rate = load_store_settings(), 10.0  # the contract's default rate
    else:
        store = settings
    client = redis.Redis.from_url(store.redis_url)
    engine = make_engine(store.database_url)
    with make_sessionmaker(engine)() as session:
        plan = Planner(session, client, GuardPolicy.from_settings(store), rate).run(events)
        session.rollback()  # read only: nothing to keep
    if args.check_dokstamp:
        from dokstamp_sync.dokstamp import RateLimiter, RedisTokenStore, client_from_settings
        from dokstamp_sync.ops.plan_check import check

        api = client_from_settings(settings, store=RedisTokenStore(client), limiter=RateLimiter(
            client, settings.dokstamp_tenant, settings.dokstamp_rate_limit))
        with api.http:
            check(plan, api)
    print(json.dumps(plan.as_dict()) if args.json else render(plan))
    return 0


def render(plan: Plan) -> str:
    """One line per event, then the summary per entity and action, calls and time."""
    lines = []
    for s in plan.steps:
        what = f"{s.entity or '?'} {s.key or '-'} {s.op or ''}".strip()
        detail = f" ({s.detail})" if s.detail else ""
        lines.append(f"line {s.line:<5} {what:<32} {' + '.join(s.actions)}{detail}")
    lines.append("summary:")
    for entity, actions in plan.summary().items():
        ordered = sorted(actions.items(), key=lambda kv: ACTION_ORDER.index(kv[0])
                         if kv[0] in ACTION_ORDER else len(ACTION_ORDER))
        lines.append(f"  {entity:<12} " + ", ".join(f"{a} {n}" for a, n in ordered))
    lines.append(f"about {plan.api_calls} API calls, {plan.seconds:g} s at "
                 f"{plan.rate_limit:g} requests/s (DOKSTAMP_RATE_LIMIT)")
    return "\n".join(lines)
