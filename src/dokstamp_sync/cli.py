"""The ``dokstamp-sync`` command. Each subcommand parses its arguments and calls one function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from dokstamp_sync.config import ConfigError, load_settings
from dokstamp_sync.dokstamp.errors import DokStampError
from dokstamp_sync.ops import held, plan_view
from dokstamp_sync.ops.check import StartRefused


def _sandbox(args: argparse.Namespace) -> int:
    from dokstamp_sync.sandbox import Account, Faults, SandboxConfig, serve

    account = Account(tenant=args.tenant, email=args.email, password=args.password,
                      client_id=args.client_id, client_secret=args.client_secret)
    faults = Faults(rate_limit=args.rate_limit, burst=args.burst, error_rate=args.error_rate,
                    lost_response_share=args.lost_response_share, latency_ms=args.latency_ms,
                    slow_rate=args.slow_rate, slow_seconds=args.slow_seconds, seed=args.seed,
                    reorder_uploads=args.reorder_uploads, page_cap=args.page_cap,
                    conflict_409=args.conflict_409)
    config = SandboxConfig(accounts=[account], token_ttl=args.token_ttl,
                           generation=args.generation, strict=args.strict,
                           error_style=args.error_style, faults=faults)
    print(f"DokStamp sandbox on http://{args.host}:{args.port} (tenant {args.tenant!r}); "
          "Ctrl-C stops it", file=sys.stderr)
    serve(config, host=args.host, port=args.port)
    return 0


def _walkthrough(args: argparse.Namespace) -> int:
    from dokstamp_sync.demo.walkthrough import walk
    from dokstamp_sync.dokstamp import client_from_settings
    from dokstamp_sync.sandbox import Account, SandboxServer

    if args.use_settings:
        client = client_from_settings(load_settings())
        with client.http:
            walk(client)
        return 0
    account = Account()
    with SandboxServer() as server:
        print(f"started an in-process DokStamp sandbox at {server.url}")
        settings = load_settings(dokstamp_api_url=server.url, dokstamp_tenant=account.tenant,
                                 dokstamp_email=account.email,
                                 dokstamp_password=account.password)
        client = client_from_settings(settings)
        with client.http:
            walk(client)
            print("second run (nothing new is created):")
            walk(client)
        stats = server.sandbox.stats.to_json()
        print(f"{stats['requests']} API calls: " + ", ".join(
            f"{k} x{v}" for k, v in sorted(stats["by_route"].items())))
    return 0


def _store() -> tuple[Any, Any]:
    from dokstamp_sync.config import load_store_settings
    from dokstamp_sync.db import make_engine, make_sessionmaker

    settings = load_store_settings()
    return settings, make_sessionmaker(make_engine(settings.database_url))


def _db_upgrade(args: argparse.Namespace) -> int:
    from dokstamp_sync.config import load_store_settings, redact_url
    from dokstamp_sync.migrate import upgrade

    url = load_store_settings().database_url
    upgrade(url)
    print(f"schema up to date on {redact_url(url)}")
    return 0


def _worker(args: argparse.Namespace) -> int:
    from dokstamp_sync import wiring

    overrides = {"dokstamp_sync_metrics_port": args.metrics_port} if args.metrics_port else {}
    settings = load_settings(**overrides)
    wiring.use(settings)  # before the worker module is imported: it configures the app
    from dokstamp_sync.worker import run_worker

    run_worker(settings, concurrency=args.concurrency, loglevel=args.loglevel)
    return 0


def _check(args: argparse.Namespace) -> int:
    from dokstamp_sync.ops.check import run_checks

    lines = run_checks(load_settings())
    for line in lines:
        print(line)
    return 0 if all(line.ok for line in lines) else 1


def _health(args: argparse.Namespace) -> int:
    import redis

    from dokstamp_sync.db import session_scope
    from dokstamp_sync.ops.health import check

    settings, sessions = _store()
    with session_scope(sessions) as session:
        health = check(session, redis.Redis.from_url(settings.redis_url),
                       settings.dokstamp_sync_stream, max_age=args.max_age, stall=args.stall)
    if args.json:
        print(json.dumps({"ok": health.ok, "problems": health.problems,
                          "facts": health.facts}))
    else:
        print("healthy" if health.ok else "UNHEALTHY: " + "; ".join(health.problems))
    return 0 if health.ok else 1


def _metrics(args: argparse.Namespace) -> int:
    import redis

    from dokstamp_sync.ops.metrics import serve

    settings, sessions = _store()
    print(f"metrics on http://{args.address}:{args.port}/metrics (health: /healthz)",
          file=sys.stderr)
    serve(sessions, redis.Redis.from_url(settings.redis_url), settings.dokstamp_sync_stream,
          address=args.address, port=args.port)
    return 0


def _status(args: argparse.Namespace) -> int:
    import redis

    from dokstamp_sync.db import session_scope
    from dokstamp_sync.ops.status import render, report

    settings, sessions = _store()
    with session_scope(sessions) as session:
        status = report(session, redis.Redis.from_url(settings.redis_url),
                        settings.dokstamp_sync_stream)
    print(json.dumps(status) if args.json else render(status))
    return 0


def _dlq(args: argparse.Namespace) -> int:
    from dokstamp_sync.db import session_scope
    from dokstamp_sync.models import DeadLetter, InboxEvent
    from dokstamp_sync.ops import dlq

    _, sessions = _store()
    with session_scope(sessions) as session:
        if args.action == "list":
            letters = [dlq.as_dict(d) for d in dlq.list_letters(
                session, entity=args.entity, include_resolved=args.include_resolved)]
            if args.json:
                print(json.dumps(letters))
            for d in [] if args.json else letters:
                status = f" {d['http_status']}" if d["http_status"] else ""
                resolved = f" [{d['status']}]" if d["status"] != "open" else ""
                print(f"#{d['id']:<5} {d['entity'] or '?':<11} {d['key'] or '-':<14}"
                      f"{status}{resolved} {d['reason']}")
            if not letters and not args.json:
                print("no open dead letters")
            return 0
        if args.action == "show":
            letter = session.get(DeadLetter, args.ids[0]) if args.ids else None
            if letter is None:
                print("no such dead letter", file=sys.stderr)
                return 1
            event = session.get(InboxEvent, letter.event_pk) if letter.event_pk else None
            print(json.dumps(dlq.as_dict(letter, full=True, event=event), indent=2,
                             default=str))
            return 0
        if args.action == "replay":
            if not (args.ids or args.all or args.entity):
                print("say which: IDs, --all or --entity E", file=sys.stderr)
                return 2
            rep = dlq.replay(session, args.ids, entity=args.entity, everything=args.all)
            print(f"replayed {len(rep.replayed)}" + "".join(
                f"; {name} {ids}" for name, ids in (("still invalid", rep.still_invalid),
                                                    ("not open", rep.skipped),
                                                    ("not found", rep.missing)) if ids))
            return 1 if rep.missing else 0
        done, other = dlq.discard(session, args.ids)
        print(f"discarded {len(done)}" + (f"; not open or not found {other}" if other else ""))
        return 1 if other else 0


def _results(args: argparse.Namespace) -> int:
    import redis

    from dokstamp_sync.pipeline import results

    settings, _ = _store()
    client = redis.Redis.from_url(settings.redis_url)
    try:
        for entry_id, result in results.read(client, settings.dokstamp_sync_results_stream,
                                             since=args.since, follow=args.follow):
            print(json.dumps(result) if args.json else results.render(entry_id, result),
                  flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def _mapping(args: argparse.Namespace) -> int:
    from dokstamp_sync.sync.store import Store

    _, sessions = _store()
    mapping = Store(sessions).mapping(args.entity, args.key)
    if mapping is None:
        print(f"{args.entity} {args.key} is not mapped", file=sys.stderr)
        return 1
    print(mapping.uuid if mapping.status == "active" else f"{mapping.uuid} ({mapping.status})")
    if mapping.remote_status is not None:  # a certificate: what DokStamp last said of it
        print(f"status in DokStamp: {mapping.remote_status}")
    if mapping.verification_url is not None:
        print(f"verification URL: {mapping.verification_url}")
    return 0


def _enqueue(args: argparse.Namespace) -> int:
    import redis

    from dokstamp_sync.config import load_store_settings
    from dokstamp_sync.pipeline.producer import enqueue_lines

    settings = load_store_settings()
    client = redis.Redis.from_url(settings.redis_url)
    stream = settings.dokstamp_sync_stream
    if args.file == "-":
        report = enqueue_lines(sys.stdin, client=client, stream=stream, strict=args.strict)
    else:
        with open(args.file, encoding="utf-8") as fh:
            report = enqueue_lines(fh, client=client, stream=stream, strict=args.strict)
    fate = "nothing sent (--strict)" if args.strict else "will be dead-lettered"
    for line, reason in report.invalid:
        print(f"line {line}: invalid, {fate}: {reason}", file=sys.stderr)
    if args.strict and report.invalid:
        print(f"{len(report.invalid)} invalid line(s): nothing enqueued", file=sys.stderr)
        return 1
    print(f"enqueued {report.sent} events on {stream}")
    return 0


def _flower(args: argparse.Namespace) -> int:  # noqa: RET503  # execve does not return
    import os

    from dokstamp_sync.config import load_store_settings

    settings = load_store_settings()
    auth = settings.dokstamp_sync_flower_auth
    env = dict(os.environ)
    if auth is not None:
        user, _, password = auth.get_secret_value().partition(":")
        if not user or not password:
            print("configuration error: DOKSTAMP_SYNC_FLOWER_AUTH must be user:password",
                  file=sys.stderr)
            return 2
        env["FLOWER_BASIC_AUTH"] = auth.get_secret_value()  # by environment: not seen in ps
    elif not args.insecure_no_auth:
        print("refusing to start Flower without a password: set DOKSTAMP_SYNC_FLOWER_AUTH="
              "user:password (or pass --insecure-no-auth)", file=sys.stderr)
        return 2
    argv = [sys.executable, "-m", "celery", "-A", "dokstamp_sync.worker", "flower",
            f"--address={args.address}", f"--port={args.port}"]
    os.execve(sys.executable, argv, env)  # noqa: S606  # becomes Flower: signals reach it


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from dokstamp_sync.demo.runner import DemoOptions, run_demo

    result = run_demo(DemoOptions(students=args.students, data_dir=Path(args.data_dir),
                                  concurrency=args.concurrency, flower=not args.no_flower,
                                  keep_running=args.keep_running,
                                  use_configured=args.use_configured))
    return 0 if result.states["pending"] == result.states["waiting"] == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dokstamp-sync",
        description="Keeps a university ERP/SIS in step with the DokStamp certificate API.")
    sub = parser.add_subparsers(dest="command", required=True)

    sb = sub.add_parser("sandbox", help="run the local DokStamp sandbox API")
    sb.add_argument("--host", default="127.0.0.1")
    sb.add_argument("--port", type=int, default=8400)
    sb.add_argument("--tenant", default="demo-university")
    sb.add_argument("--email", default="admin@demo-university.edu")
    sb.add_argument("--password", default="sandbox-password")
    sb.add_argument("--client-id", default="sandbox-client")
    sb.add_argument("--client-secret", default="sandbox-secret")
    sb.add_argument("--token-ttl", type=float, default=3600.0, help="access token lifetime, s")
    sb.add_argument("--generation", choices=("a", "b"), default="a",
                    help="which docs to follow: a (older: /auth/login, status=issued) or b "
                         "(newer: /oauth/token, finish=true, success:false in errors)")
    sb.add_argument("--strict", action="store_true",
                    help="apply only the documented where[...] filters, drop others silently")
    sb.add_argument("--error-style", choices=("v-a", "v-b"), default=None,
                    help="force error bodies without (v-a) or with (v-b) success:false; "
                         "default: as the generation")
    sb.add_argument("--rate-limit", type=float, default=None, help="requests/s per tenant")
    sb.add_argument("--burst", type=float, default=None, help="token bucket size")
    sb.add_argument("--error-rate", type=float, default=0.0, help="share answered 5xx")
    sb.add_argument("--lost-response-share", type=float, default=0.5,
                    help="share of the 5xx that happen after the write was applied")
    sb.add_argument("--latency-ms", type=float, default=0.0)
    sb.add_argument("--slow-rate", type=float, default=0.0, help="share of slow answers")
    sb.add_argument("--slow-seconds", type=float, default=0.0)
    sb.add_argument("--seed", type=int, default=None)
    sb.add_argument("--reorder-uploads", action="store_true",
                    help="POST /files answers its records in reverse order")
    sb.add_argument("--page-cap", type=int, default=None,
                    help="list pages hold at most N rows; meta.per_page echoes the asked size")
    sb.add_argument("--conflict-409", action="store_true",
                    help="a broken uniqueness rule answers 409 instead of 422")
    sb.set_defaults(func=_sandbox)

    wt = sub.add_parser("walkthrough", help="sync one certificate through the whole graph")
    wt.add_argument("--use-settings", action="store_true",
                    help="talk to the API configured in the environment instead of an "
                         "in-process sandbox")
    wt.set_defaults(func=_walkthrough)

    db = sub.add_parser("db", help="the mapping store's schema")
    db.add_argument("action", choices=["upgrade"])
    db.set_defaults(func=_db_upgrade)

    wk = sub.add_parser("worker", help="Celery workers + stream ingester + retry scheduler")
    wk.add_argument("--concurrency", "-c", type=int, default=4)
    wk.add_argument("--loglevel", default="INFO")
    wk.add_argument("--metrics-port", type=int, default=None,
                    help="also serve /metrics and /healthz on this port")
    wk.set_defaults(func=_worker)

    ck = sub.add_parser("check", help="credentials, tenant, issue style, DokStamp, database "
                                      "and Redis: one line each, exit 1 if any fails")
    ck.set_defaults(func=_check)

    hc = sub.add_parser("health", help="exit 0 if the pipeline is making progress, else 1")
    hc.add_argument("--max-age", type=float, default=3600.0,
                    help="oldest unsynced event allowed, seconds")
    hc.add_argument("--stall", type=float, default=120.0,
                    help="seconds without a finished task while tasks are queued")
    hc.add_argument("--json", action="store_true")
    hc.set_defaults(func=_health)

    me = sub.add_parser("metrics", help="serve Prometheus /metrics and /healthz")
    me.add_argument("--address", default="127.0.0.1")
    me.add_argument("--port", type=int, default=9464)
    me.set_defaults(func=_metrics)

    st = sub.add_parser("status", help="events by state, queue depth, oldest unsynced event")
    st.add_argument("--json", action="store_true")
    st.set_defaults(func=_status)

    dl = sub.add_parser("dlq", help="dead letters: list, show, replay, discard")
    dl.add_argument("action", choices=["list", "show", "replay", "discard"])
    dl.add_argument("ids", nargs="*", type=int)
    dl.add_argument("--entity")
    dl.add_argument("--all", action="store_true", help="replay every open dead letter")
    dl.add_argument("--json", action="store_true")
    dl.add_argument("--include-resolved", action="store_true",
                    help="list: also the replayed, discarded and superseded letters")
    dl.set_defaults(func=_dlq)

    rs = sub.add_parser("results", help="the outcome stream (CONTRACT §5), readable")
    rs.add_argument("--follow", action="store_true", help="wait for new outcomes (Ctrl-C)")
    rs.add_argument("--json", action="store_true", help="one JSON result per line")
    rs.add_argument("--since", default="0", help="a stream entry id; $ means only new ones")
    rs.set_defaults(func=_results)

    mp = sub.add_parser("mapping", help="the DokStamp UUID of one ERP entity")
    mp.add_argument("entity")
    mp.add_argument("key")
    mp.set_defaults(func=_mapping)

    held.register(sub)
    plan_view.register(sub)

    eq = sub.add_parser("enqueue", help="send events (one JSON per line) to the stream")
    eq.add_argument("file", help="a file, or - for standard input")
    eq.add_argument("--strict", action="store_true",
                    help="send nothing when any line is invalid (exit 1, every bad line named)")
    eq.set_defaults(func=_enqueue)

    fl = sub.add_parser("flower", help="the Celery dashboard for the worker's app")
    fl.add_argument("--address", default="127.0.0.1")
    fl.add_argument("--port", type=int, default=5555)
    fl.add_argument("--insecure-no-auth", action="store_true",
                    help="start without a password (never on a shared network)")
    fl.set_defaults(func=_flower)

    dm = sub.add_parser("demo", help="the whole pipeline on embedded defaults, with a summary")
    dm.add_argument("--students", type=int, default=60)
    dm.add_argument("--data-dir", default="dokstamp-sync-data")
    dm.add_argument("--concurrency", type=int, default=4)
    dm.add_argument("--no-flower", action="store_true")
    dm.add_argument("--keep-running", action="store_true",
                    help="leave the worker, Flower and the sandbox up until Ctrl-C")
    dm.add_argument("--use-configured", action="store_true",
                    help="use REDIS_URL and DATABASE_URL (else an embedded Redis and SQLite), "
                         "with a stream, consumer group, Celery queue and keys of its own")
    dm.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in ("worker", "flower"):  # those set up their own logging
        from dokstamp_sync.config import load_store_settings
        from dokstamp_sync.logs import setup

        try:
            setup(load_store_settings().dokstamp_sync_log_json, "WARNING")
        except ConfigError:
            setup(False, "WARNING")
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    except DokStampError as exc:
        print(f"DokStamp error: {exc}", file=sys.stderr)
        return 1
    except StartRefused as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
