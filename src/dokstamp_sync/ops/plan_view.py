"""``dokstamp-sync plan FILE|-``: the command (its arguments are in :mod:`dokstamp_sync.cli_args`)
and its text output."""

from __future__ import annotations

import json
import sys
from contextlib import nullcontext
from typing import IO

import redis
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.config import Settings, StoreSettings
from dokstamp_sync.ops.plan import Plan

ACTION_ORDER = ("invalid", "superseded", "waits", "behind", "held", "unchanged", "create",
                "adopt", "update", "attach", "issue", "revoke", "delete", "archive")


def command(file: str, store: StoreSettings, sessions: sessionmaker[Session],
            client: redis.Redis, settings: Settings | None, *, as_json: bool,
            check_dokstamp: bool) -> int:
    """``dokstamp-sync plan``: read the events, plan them against the mappings (in a
    transaction rolled back: nothing is written), search DokStamp when asked, print."""
    from dokstamp_sync.guard import GuardPolicy
    from dokstamp_sync.ops.plan import Planner, read_events
    from dokstamp_sync.redis_keys import RedisKeys

    opened: IO[str] | nullcontext[IO[str]] = nullcontext(sys.stdin) if file == "-" \
        else open(file, encoding="utf-8")  # noqa: SIM115  # closed by the with below
    with opened as fh:
        events = read_events(fh)
    rate = settings.dokstamp_rate_limit if settings is not None else 10.0  # the documented default
    with sessions() as session:
        keys = RedisKeys(store.dokstamp_sync_namespace.strip())
        plan = Planner(session, client, GuardPolicy.from_settings(store), rate,
                       keys).run(events)
        session.rollback()  # read only: nothing to keep
    if check_dokstamp and settings is not None:
        from dokstamp_sync.dokstamp import RateLimiter, RedisTokenStore, client_from_settings
        from dokstamp_sync.ops.plan_check import check, refuse_writes

        # the fence refuses any write before it leaves: the plan only reads
        api = client_from_settings(
            settings, store=RedisTokenStore(client, prefix=keys.token),
            limiter=RateLimiter(client, settings.dokstamp_tenant, settings.dokstamp_rate_limit,
                                keys=keys), fence=refuse_writes)
        with api.http:
            check(plan, api)
    print(json.dumps(plan.as_dict()) if as_json else render(plan))
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
