"""The ``dokstamp-sync`` command's arguments: every command and subcommand, each argument with
its help, and the checks that refuse a bad value before anything runs (an unknown entity names
the valid ones; a negative count, a port out of range, a stream id Redis would refuse).

The commands themselves are in :mod:`dokstamp_sync.cli`; each parser's ``func`` names one, and
``settings`` says what it needs read: ``"none"``, ``"store"`` (Redis and the database) or
``"full"`` (DokStamp's credentials too).
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from typing import Any, get_args

from dokstamp_sync.events import Entity

ENTITIES: tuple[str, ...] = get_args(Entity)
Command = Callable[..., int]


def entity(value: str) -> str:
    """An entity name (docs/erp-guide.md, lower case), else a clear error naming the valid ones."""
    if value in ENTITIES:
        return value
    hint = f" (did you mean {value.lower()}?)" if value.lower() in ENTITIES else ""
    raise argparse.ArgumentTypeError(
        f"unknown entity {value!r}{hint}: one of {', '.join(ENTITIES)}")


def _number(kind: Callable[[str], Any], low: float | None, high: float | None,
            what: str) -> Callable[[str], Any]:
    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not {what}") from None
        if (low is not None and number < low) or (high is not None and number > high):
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return number

    return parse


positive_int = _number(int, 1, None, "a whole number of at least 1")
count = _number(int, 0, None, "a whole number of at least 0")
positive_float = _number(float, 1e-9, None, "a positive number")
non_negative_float = _number(float, 0, None, "a number of at least 0")
share = _number(float, 0, 1, "a share between 0 and 1")
port = _number(int, 1, 65535, "a port between 1 and 65535")
_STREAM_ID = re.compile(r"^(\$|0|\d+(-\d+)?)$")


def stream_id(value: str) -> str:
    """A Redis stream entry id (``1712345678901-0`` or its millisecond part), ``0`` or ``$``."""
    if _STREAM_ID.match(value):
        return value
    raise argparse.ArgumentTypeError(
        f"{value!r} is not a stream entry id: give one printed in brackets by "
        "`dokstamp-sync results` (e.g. 1712345678901-0), 0 for the beginning or $ for new ones")


def _add(sub: Any, name: str, func: Command, settings: str, help_: str,
         description: str | None = None) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = sub.add_parser(name, help=help_,
                                                     description=description or help_)
    parser.set_defaults(func=func, settings=settings)
    return parser


def _json(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--json", action="store_true", help=f"print {what} as JSON")


def _sandbox(sub: Any, cmds: Any) -> None:
    sb = _add(sub, "sandbox", cmds._sandbox, "none", "run the local DokStamp sandbox API",
              "Run the DokStamp sandbox (shipped, in memory) until Ctrl-C; its admin API is "
              "under /_sandbox/. Faults are injected with the options below.")
    sb.add_argument("--host", default="127.0.0.1", help="address to listen on (default: "
                    "%(default)s; the admin API has no password: keep it on loopback)")
    sb.add_argument("--port", type=port, default=8400, help="port (default: %(default)s)")
    sb.add_argument("--tenant", default="demo-university",
                    help="the tenant's domain, sent as X-Tenant (default: %(default)s)")
    sb.add_argument("--email", default="admin@demo-university.edu",
                    help="password login's email (default: %(default)s)")
    sb.add_argument("--password", default="sandbox-password",
                    help="password login's password (default: %(default)s, as docs/sandbox.md "
                         "says; the sandbox is a test double)")
    sb.add_argument("--client-id", default="sandbox-client",
                    help="client-credentials login's id (default: %(default)s)")
    sb.add_argument("--client-secret", default="sandbox-secret",
                    help="client-credentials login's secret (default: %(default)s)")
    sb.add_argument("--token-ttl", type=positive_float, default=3600.0,
                    help="access token lifetime, seconds (default: %(default)s)")
    sb.add_argument("--generation", choices=("a", "b"), default="a",
                    help="which docs to follow: a (older: /auth/login, status=issued) or b "
                         "(newer: /oauth/token, finish=true, success:false in errors)")
    sb.add_argument("--strict", action="store_true",
                    help="apply only the documented where[...] filters, drop others silently")
    sb.add_argument("--error-style", choices=("v-a", "v-b"), default=None,
                    help="force error bodies without (v-a) or with (v-b) success:false; "
                         "default: as the generation")
    sb.add_argument("--rate-limit", type=positive_float, default=None,
                    help="requests per second per tenant before 429 (default: no limit)")
    sb.add_argument("--burst", type=positive_float, default=None,
                    help="token bucket size of the rate limit (default: the rate)")
    sb.add_argument("--error-rate", type=share, default=0.0,
                    help="share of requests answered 5xx, 0 to 1 (default: 0)")
    sb.add_argument("--lost-response-share", type=share, default=0.5,
                    help="share of those 5xx that happen after the write was applied "
                         "(a lost response; default: %(default)s)")
    sb.add_argument("--latency-ms", type=non_negative_float, default=0.0,
                    help="added to every answer, milliseconds (default: 0)")
    sb.add_argument("--slow-rate", type=share, default=0.0,
                    help="share of answers delayed by --slow-seconds (default: 0)")
    sb.add_argument("--slow-seconds", type=non_negative_float, default=0.0,
                    help="how long a slow answer takes, seconds (default: 0)")
    sb.add_argument("--seed", type=int, default=None,
                    help="random seed of the faults, for a repeatable run")
    sb.add_argument("--reorder-uploads", action="store_true",
                    help="POST /files answers its records in reverse order")
    sb.add_argument("--page-cap", type=positive_int, default=None,
                    help="list pages hold at most N rows; meta.per_page echoes the asked size")
    sb.add_argument("--conflict-409", action="store_true",
                    help="a broken uniqueness rule answers 409 instead of 422")


def _operations(sub: Any, cmds: Any) -> None:
    wt = _add(sub, "walkthrough", cmds._walkthrough, "none",
              "sync one certificate through the whole graph")
    wt.add_argument("--use-settings", action="store_true",
                    help="talk to the API configured in the environment instead of an "
                         "in-process sandbox")

    db = _add(sub, "db", cmds._db_upgrade, "store", "the mapping store's schema")
    dbs = db.add_subparsers(dest="action", required=True, metavar="ACTION",
                            help="what to do with the schema")
    _add(dbs, "upgrade", cmds._db_upgrade, "store",
         "create or migrate the schema of DATABASE_URL to this version (Alembic); says "
         "which migrations it applied")

    wk = _add(sub, "worker", cmds._worker, "full",
              "Celery workers + stream ingester + retry scheduler",
              "Run the worker until stopped (SIGTERM or Ctrl-C: exit 0). Exits 1 when it "
              "refuses to start (credentials, tenant, schema) or Celery stopped on a fatal "
              "error.")
    wk.add_argument("--concurrency", "-c", type=positive_int, default=4,
                    help="worker processes (default: %(default)s)")
    wk.add_argument("--loglevel", default="INFO",
                    choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
                    help="log level (default: %(default)s)")
    wk.add_argument("--metrics-port", type=port, default=None,
                    help="also serve /metrics and /healthz on this port")

    _add(sub, "check", cmds._check, "full",
         "credentials, tenant, issue style, DokStamp, database, schema and Redis: one "
         "line each, exit 1 if any fails")

    hc = _add(sub, "health", cmds._health, "store",
              "exit 0 if the pipeline is making progress, else 1")
    hc.add_argument("--max-age", type=positive_float, default=3600.0,
                    help="oldest unsynced event allowed, seconds (default: %(default)s)")
    hc.add_argument("--stall", type=positive_float, default=120.0,
                    help="seconds without a finished task while tasks are queued "
                         "(default: %(default)s)")
    _json(hc, "the verdict, the problems and the facts")

    me = _add(sub, "metrics", cmds._metrics, "store", "serve Prometheus /metrics and /healthz")
    me.add_argument("--address", default="127.0.0.1",
                    help="address to listen on (default: %(default)s)")
    me.add_argument("--port", type=port, default=9464, help="port (default: %(default)s)")

    st = _add(sub, "status", cmds._status, "store",
              "events by state, queue depth, oldest unsynced event (exit 1 if Redis is "
              "unreachable)")
    _json(st, "the status")


def _dlq(sub: Any, cmds: Any) -> None:
    dl = _add(sub, "dlq", cmds._dlq, "store", "dead letters: list, show, replay, discard",
              "Dead letters: events that could not be synced, with why. Replay and discard "
              "act on open letters only; a letter already resolved is reported and skipped "
              "(exit 0); an id that does not exist exits 1.")
    ds = dl.add_subparsers(dest="action", required=True, metavar="ACTION",
                           help="what to do with dead letters (ACTION --help for its options)")
    ls = _add(ds, "list", cmds._dlq, "store", "the open dead letters (reason, HTTP status)")
    ls.add_argument("--entity", type=entity, help="only this entity's letters")
    ls.add_argument("--include-resolved", action="store_true",
                    help="also the replayed, discarded and superseded letters")
    _json(ls, "the letters")
    sh = _add(ds, "show", cmds._dlq, "store",
              "one dead letter in full: request, response body, the event")
    sh.add_argument("id", type=positive_int, help="the letter's id (from dlq list)")
    for name, verb, does in (
            ("replay", "replay", "send dead letters through again (their events become "
                                 "pending; the worker picks them up within a second)"),
            ("discard", "discard", "drop dead letters on purpose (their events stay dead)")):
        p = _add(ds, name, cmds._dlq, "store", does)
        p.add_argument("ids", nargs="*", type=positive_int, metavar="ID",
                       help=f"the letters to {verb} (from dlq list)")
        p.add_argument("--all", action="store_true", help=f"{verb} every open letter")
        p.add_argument("--entity", type=entity,
                       help=f"{verb} every open letter of this entity (with --all: the same)")
        p.add_argument("--dry-run", action="store_true",
                       help=f"count what would be {verb}ed, by entity and reason; write "
                            "nothing")


def _guard(sub: Any, cmds: Any) -> None:
    hd = _add(sub, "held", cmds._held, "store",
              "destructive changes held by the change guard: list, release, discard",
              "Deletes and revokes held by the change guard (docs/guard.md). "
              "release applies them in the ERP's order and never holds them again; discard "
              "ends them discarded (reported, never applied). An id decided before is named, "
              "exit 0; one that does not exist or was never held exits 1.")
    hs = hd.add_subparsers(dest="action", required=True, metavar="ACTION",
                           help="what to do with held events (ACTION --help for its options)")
    ls = _add(hs, "list", cmds._held, "store", "the held events, oldest first, with the reason")
    ls.add_argument("--entity", type=entity, help="only this entity's held events")
    _json(ls, "the held events")
    for name, verb, does in (
            ("release", "release", "apply held events after all (in the ERP's order)"),
            ("discard", "discard", "drop held events (they end discarded, reported)")):
        p = _add(hs, name, cmds._held, "store", does)
        p.add_argument("ids", nargs="*", type=positive_int, metavar="ID",
                       help=f"the inbox ids to {verb} (from held list)")
        p.add_argument("--entity", type=entity, help=f"{verb} every held event of this entity")
        p.add_argument("--all", action="store_true", help=f"{verb} every held event")
        _json(p, "the ids done and those not held")

    pl = _add(sub, "plan", cmds._plan, "store",
              "a dry run: what each event of a file would do, and the API calls it takes",
              "Reads events as enqueue does and prints, for each, what would happen against "
              "the current mappings, then a summary per entity and action, the API calls and "
              "the time at DOKSTAMP_RATE_LIMIT. Writes nothing.")
    pl.add_argument("file", help="a file of events, one JSON object per line, or - for "
                                 "standard input")
    _json(pl, "the plan")
    pl.add_argument("--check-dokstamp", action="store_true",
                    help="also search DokStamp (GET only, within the rate limit): tell a "
                         "create from an adoption, find entities gone")


def _rest(sub: Any, cmds: Any) -> None:
    rs = _add(sub, "results", cmds._results, "store", "the outcome stream, readable",
              "The outcomes reported to the ERP (DOKSTAMP_SYNC_RESULTS_STREAM), oldest first.")
    rs.add_argument("--follow", action="store_true", help="wait for new outcomes (Ctrl-C)")
    rs.add_argument("--json", action="store_true", help="one JSON result per line")
    rs.add_argument("--since", type=stream_id, default="0",
                    help="start after this stream entry id; $ means only new ones "
                         "(default: 0, the beginning)")

    mp = _add(sub, "mapping", cmds._mapping, "store",
              "the DokStamp UUID of one ERP entity (exit 1 if not mapped)")
    mp.add_argument("entity", type=entity, help=f"one of {', '.join(ENTITIES)}")
    mp.add_argument("key", help="the ERP's key of the entity")

    eq = _add(sub, "enqueue", cmds._enqueue, "store",
              "send events (one JSON per line) to the stream")
    eq.add_argument("file", help="a file of events, one JSON object per line, or - for "
                                 "standard input")
    eq.add_argument("--strict", action="store_true",
                    help="send nothing when any line is invalid (exit 1, every bad line named)")

    fl = _add(sub, "flower", cmds._flower, "store",
              "the Celery dashboard for the worker's app (password: "
              "DOKSTAMP_SYNC_FLOWER_AUTH=user:password)")
    fl.add_argument("--address", default="127.0.0.1",
                    help="address to listen on (default: %(default)s)")
    fl.add_argument("--port", type=port, default=5555, help="port (default: %(default)s)")
    fl.add_argument("--insecure-no-auth", action="store_true",
                    help="start without a password (never on a shared network)")

    co = _add(sub, "console", cmds._console, "store",
              "the dead-letter console in the browser (password: "
              "DOKSTAMP_SYNC_CONSOLE_AUTH=user:password)")
    co.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default: %(default)s)")
    co.add_argument("--port", type=port, default=8080, help="port (default: %(default)s)")

    dm = _add(sub, "demo", cmds._demo, "none",
              "the whole pipeline on embedded defaults, with a summary")
    dm.add_argument("--students", type=positive_int, default=60,
                    help="students in the graduating class (default: %(default)s)")
    dm.add_argument("--data-dir", default="dokstamp-sync-data",
                    help="folder for the demo's SQLite store and logs (default: %(default)s)")
    dm.add_argument("--concurrency", type=positive_int, default=4,
                    help="worker processes (default: %(default)s)")
    dm.add_argument("--no-flower", action="store_true", help="do not start Flower")
    dm.add_argument("--keep-running", action="store_true",
                    help="leave the worker, Flower and the sandbox up until Ctrl-C")
    dm.add_argument("--use-configured", action="store_true",
                    help="use REDIS_URL and DATABASE_URL (else an embedded Redis and SQLite), "
                         "with a stream, consumer group, Celery queue and keys of its own")


def build_parser(cmds: Any) -> argparse.ArgumentParser:
    """The whole command line; ``cmds`` is the module holding the command functions."""
    parser = argparse.ArgumentParser(
        prog="dokstamp-sync",
        description="Keeps a university ERP/SIS in step with the DokStamp certificate API. "
                    "Errors are one line; --debug (or DOKSTAMP_SYNC_DEBUG=1) shows the "
                    "traceback too.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the traceback as well")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                help="what to run (COMMAND --help for its arguments)")
    for add in (_sandbox, _operations, _dlq, _guard, _rest):
        add(sub, cmds)
    _debug_everywhere(parser)
    return parser


def _debug_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after the command too (``dokstamp-sync status --debug``); SUPPRESS keeps a
    subcommand from resetting a ``--debug`` given before it."""
    for action in parser._actions:  # argparse has no public walk
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                if not any("--debug" in a.option_strings for a in child._actions):
                    child.add_argument("--debug", action="store_true",
                                       default=argparse.SUPPRESS,
                                       help="on an error, print the traceback as well")
                _debug_everywhere(child)
