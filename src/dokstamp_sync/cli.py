"""The ``dokstamp-sync`` command. Each subcommand takes its arguments and the settings (read once,
in :func:`main`, as far as it needs them), calls one function and returns its exit code.

Any failure ends as one line on standard error and an exit status other than 0 (see
:mod:`.explain`); ``--debug`` or ``DOKSTAMP_SYNC_DEBUG=1`` adds the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dokstamp_sync import cli_args, wiring
from dokstamp_sync.config import (
    ConfigError,
    Settings,
    StoreSettings,
    debug_wanted,
    load_settings,
    load_store_settings,
    redact_url,
)
from dokstamp_sync.explain import CommandError, Where, explain


def _sandbox(args: argparse.Namespace, _: None) -> int:
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


def _walkthrough(args: argparse.Namespace, settings: Settings | None) -> int:
    from dokstamp_sync.demo.walkthrough import walk
    from dokstamp_sync.dokstamp import client_from_settings
    from dokstamp_sync.sandbox import Account, SandboxServer

    if settings is not None:  # --use-settings
        client = client_from_settings(settings)
        with client.http:
            walk(client)
        return 0
    account = Account()
    with SandboxServer() as server:
        print(f"started an in-process DokStamp sandbox at {server.url}")
        sandbox = load_settings(dokstamp_api_url=server.url, dokstamp_tenant=account.tenant,
                                dokstamp_email=account.email,
                                dokstamp_password=account.password)
        client = client_from_settings(sandbox)
        with client.http:
            walk(client)
            print("second run (nothing new is created):")
            walk(client)
        stats = server.sandbox.stats.to_json()
        print(f"{stats['requests']} API calls: " + ", ".join(
            f"{k} x{v}" for k, v in sorted(stats["by_route"].items())))
    return 0


def _store(settings: StoreSettings) -> Any:
    """Sessions on the database, once its schema is known to be this version's."""
    from dokstamp_sync.migrate import require_current

    sessions = wiring.database(settings.database_url)
    require_current(sessions.kw["bind"])
    return sessions


def _redis(settings: StoreSettings) -> Any:
    return wiring.redis_client(settings.redis_url, socket_connect_timeout=5)


def _db_upgrade(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.migrate import NEWER_SCHEMA, newer_than_this, pending, revisions, upgrade

    url = settings.database_url
    engine = wiring.database(url).kw["bind"]
    try:
        before = revisions(engine)
    finally:
        engine.dispose()
    if before.at_head:
        print(f"schema up to date on {redact_url(url)} (at {before.head}, the newest "
              "revision: nothing to migrate)")
        return 0
    if newer_than_this(url, before.current):
        raise CommandError(f"the database at {redact_url(url)} is at revision "
                           f"{before.current}, {NEWER_SCHEMA}", status=1)
    steps = pending(url, before.current)
    upgrade(url)
    print(f"migrated {redact_url(url)} from {before.current or 'an empty database'} to "
          f"{before.head}:")
    for revision, doc in steps:
        print(f"  {revision}  {doc}")
    return 0


def _worker(args: argparse.Namespace, settings: Settings) -> int:
    wiring.use(settings)
    from dokstamp_sync.worker import run_worker

    return run_worker(settings, concurrency=args.concurrency, loglevel=args.loglevel)


def _check(args: argparse.Namespace, settings: Settings) -> int:
    from dokstamp_sync.ops.check import run_checks

    lines = run_checks(settings)
    for line in lines:
        print(line)
    return 0 if all(line.ok for line in lines) else 1


def _health(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.db import session_scope
    from dokstamp_sync.ops.health import check

    with session_scope(_store(settings)) as session:
        health = check(session, _redis(settings), settings.dokstamp_sync_stream,
                       max_age=args.max_age, stall=args.stall,
                       keys=wiring.redis_keys(settings))
    if args.json:
        print(json.dumps({"ok": health.ok, "problems": health.problems,
                          "facts": health.facts}))
    else:
        print("healthy" if health.ok else "UNHEALTHY: " + "; ".join(health.problems))
    return 0 if health.ok else 1


def _metrics(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.ops.metrics import serve

    sessions = _store(settings)
    serve(sessions, _redis(settings), settings.dokstamp_sync_stream,
          address=args.address, port=args.port, keys=wiring.redis_keys(settings),
          listening=lambda url: print(f"metrics on {url} (health: /healthz)", file=sys.stderr,
                                      flush=True))
    return 0


def _status(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.db import session_scope
    from dokstamp_sync.ops.status import render, report

    with session_scope(_store(settings)) as session:
        status = report(session, _redis(settings), settings.dokstamp_sync_stream,
                        keys=wiring.redis_keys(settings))
    print(json.dumps(status) if args.json else render(status))
    if "redis_error" in status:
        print(f"cannot reach Redis at {redact_url(settings.redis_url)}: check REDIS_URL and "
              "that Redis is running", file=sys.stderr)
        return 1
    return 0


def _dlq(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync import cli_dlq

    return cli_dlq.run(args, _store(settings))


def _results(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.pipeline import results

    client = _redis(settings)
    try:
        for entry_id, result in results.read(client, settings.dokstamp_sync_results_stream,
                                             since=args.since, follow=args.follow):
            print(json.dumps(result) if args.json else results.render(entry_id, result),
                  flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def _mapping(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.states import MappingStatus
    from dokstamp_sync.sync.store import Store

    mapping = Store(_store(settings)).mapping(args.entity, args.key)
    if mapping is None:
        raise CommandError(f"{args.entity} {args.key} is not mapped (no event of it synced; "
                           f"dokstamp-sync dlq list --entity {args.entity} shows its "
                           "dead letters)", 1)
    print(mapping.uuid if mapping.status == MappingStatus.ACTIVE
          else f"{mapping.uuid} ({mapping.status})")
    if mapping.remote_status is not None:  # a certificate: what DokStamp last said of it
        print(f"status in DokStamp: {mapping.remote_status}")
    if mapping.verification_url is not None:
        print(f"verification URL: {mapping.verification_url}")
    return 0


def _readable(file: str) -> Path:
    """A file of events named on the command line (enqueue, plan): one line if it is not."""
    path = Path(file)
    if path.is_dir():
        raise CommandError(f"{file} is a folder: give a file with one JSON event per line, or "
                           "- for standard input")
    if not path.exists():
        raise CommandError(f"{file}: no such file (give a file with one JSON event per line, "
                           "or - for standard input)", 1)
    return path


def _enqueue(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.pipeline.producer import enqueue_lines

    client = _redis(settings)
    stream = settings.dokstamp_sync_stream
    if args.file == "-":
        report = enqueue_lines(sys.stdin, client=client, stream=stream, strict=args.strict)
    else:
        with _readable(args.file).open(encoding="utf-8") as fh:
            report = enqueue_lines(fh, client=client, stream=stream, strict=args.strict)
    fate = "nothing sent (--strict)" if args.strict else "will be dead-lettered"
    for line, reason in report.invalid:
        print(f"line {line}: invalid, {fate}: {reason}", file=sys.stderr)
    if args.strict and report.invalid:
        print(f"{len(report.invalid)} invalid line(s): nothing enqueued", file=sys.stderr)
        return 1
    print(f"enqueued {report.sent} events on {stream}")
    return 0


def _held(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.held import Selection
    from dokstamp_sync.ops import held
    from dokstamp_sync.pipeline.results import Publisher
    from dokstamp_sync.redis_keys import RedisKeys

    sessions = _store(settings)
    if args.action == "list":
        return held.list_command(sessions, args.entity, as_json=args.json)
    given = sum((bool(args.ids), bool(args.entity), bool(args.all)))
    if given != 1:  # one selection only: discard is final, so never guess what was meant
        raise CommandError(f"held {args.action}: say which, one of: IDs (from held list), "
                           "--entity E or --all" + (" (not several)" if given else ""))
    client = _redis(settings)
    report = Publisher(client, settings.dokstamp_sync_results_stream,
                       settings.dokstamp_sync_results_maxlen)
    return held.decide_command(sessions, client, report, args.action,
                               Selection(args.ids, args.entity, args.all),
                               as_json=args.json, prefix=RedisKeys(
                                   settings.dokstamp_sync_namespace.strip()).guard)


def _plan(args: argparse.Namespace, settings: StoreSettings) -> int:
    from dokstamp_sync.ops import plan_view

    if args.file != "-":
        _readable(args.file)
    full = settings if isinstance(settings, Settings) else None
    return plan_view.command(args.file, settings, _store(settings), _redis(settings), full,
                             as_json=args.json, check_dokstamp=args.check_dokstamp)


def _flower(args: argparse.Namespace, settings: StoreSettings) -> int:
    import os

    from dokstamp_sync.config import child_environment

    auth = settings.dokstamp_sync_flower_auth
    env = child_environment()
    if auth is not None:
        user, _, password = auth.get_secret_value().partition(":")
        if not user or not password:
            raise CommandError("configuration error: DOKSTAMP_SYNC_FLOWER_AUTH must be "
                               "user:password")
        env["FLOWER_BASIC_AUTH"] = auth.get_secret_value()  # by environment: not seen in ps
    elif not args.insecure_no_auth:
        raise CommandError("refusing to start Flower without a password: set "
                           "DOKSTAMP_SYNC_FLOWER_AUTH=user:password (or pass "
                           "--insecure-no-auth)")
    from dokstamp_sync.ops.flower import TASKS_COLUMNS

    argv = [sys.executable, "-m", "celery", "-A", "dokstamp_sync.worker", "flower",
            f"--address={args.address}", f"--port={args.port}",
            f"--tasks_columns={TASKS_COLUMNS}"]
    os.execve(sys.executable, argv, env)  # noqa: S606  # becomes Flower: signals reach it


def _console(args: argparse.Namespace, settings: StoreSettings | None) -> int:
    from dokstamp_sync.console import AuthMissing, console_for, serve

    assert settings is not None
    try:
        console = console_for(settings)  # refuses (AuthMissing) before anything is printed
    except AuthMissing as exc:
        raise CommandError(str(exc)) from None
    print(f"console on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    serve(console, args.host, args.port)
    return 0


def _demo(args: argparse.Namespace, settings: StoreSettings | None) -> int:
    from dokstamp_sync.demo.runner import DemoOptions, run_demo
    from dokstamp_sync.states import EventState

    result = run_demo(DemoOptions(students=args.students, data_dir=Path(args.data_dir),
                                  concurrency=args.concurrency, flower=not args.no_flower,
                                  keep_running=args.keep_running, configured=settings))
    unfinished = result.states[EventState.PENDING] + result.states[EventState.WAITING]
    return 0 if unfinished == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    return cli_args.build_parser(sys.modules[__name__])


def _settings(args: argparse.Namespace) -> StoreSettings | None:
    """The settings the command needs, read once (None: it needs none)."""
    kind = args.settings
    if args.command == "walkthrough":
        kind = "full" if args.use_settings else "none"
    elif args.command == "demo":
        kind = "store" if args.use_configured else "none"
    elif args.command == "plan":  # the rate limit, and DokStamp's credentials when searching
        if args.check_dokstamp:
            kind = "full"
        else:
            try:
                return load_settings()
            except ConfigError:
                return load_store_settings()
    if kind == "full":
        port = getattr(args, "metrics_port", None)
        return load_settings(**({"dokstamp_sync_metrics_port": port} if port else {}))
    if kind == "store":
        return load_store_settings()
    return None


def _setup_logs(args: argparse.Namespace, settings: StoreSettings | None) -> None:
    if args.command in ("worker", "flower"):  # those set up their own logging
        return
    from dokstamp_sync.logs import setup

    setup(bool(settings and settings.dokstamp_sync_log_json), "WARNING")
    # The audit lines (who replayed or discarded which letters, console logins) are INFO:
    # shown although the rest of a command's logging is kept to warnings.
    for audit in ("dokstamp_sync.dlq", "dokstamp_sync.console"):
        logging.getLogger(audit).setLevel(logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = getattr(args, "debug", False) or debug_wanted()
    settings: StoreSettings | None = None
    try:
        settings = _settings(args)
        _setup_logs(args, settings)
        return int(args.func(args, settings))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # every failure: one line (and the traceback when asked)
        if debug:
            traceback.print_exc()
        where = Where(settings.database_url, settings.redis_url) if settings else Where()
        explained = explain(exc, where)
        print(explained.line, file=sys.stderr)
        return explained.status


__all__ = ["ConfigError", "build_parser", "main"]


if __name__ == "__main__":
    sys.exit(main())
