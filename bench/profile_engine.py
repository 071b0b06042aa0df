"""Where an event's time goes: cProfile of the engine in one process.

    python bench/profile_engine.py [--certificates 200] [--top 45]

Runs ``engine.run`` on every event of a fresh class (ingested through the real stream), in
tasks of 8 as the worker dispatches them (``worker.task_batches``), against
the sandbox (no latency, no rate limit), with a scratch PostgreSQL database and Redis database 8,
and prints the hottest functions by cumulative time, with per event: SQL statements, database
transactions (commits and rollbacks; a read-only session on an autocommit connection, which
sends no BEGIN, is counted apart) and Redis round trips (a pipeline is one).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import threading
import time
from collections import Counter
from typing import Any

import redis
from redis.connection import Connection
from sqlalchemy import event
from sqlalchemy.engine import Engine

from dokstamp_sync.db import make_engine, make_sessionmaker
from dokstamp_sync.demo import samples
from dokstamp_sync.pipeline.ingest import StreamIngester
from dokstamp_sync.sandbox import Account, Sandbox, SandboxConfig, SandboxServer
from dokstamp_sync.sync import engine
from dokstamp_sync.testing import sandbox_settings, scratch_database
from dokstamp_sync.wiring import build_context
from dokstamp_sync.worker import task_batches

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_PROFILE_REDIS_URL", "redis://127.0.0.1:6379/8")


def caller() -> str:
    """The innermost function of dokstamp_sync (outside this file) on the stack, as
    ``module:function``: who asked for a round trip."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        name = frame.f_code.co_name
        # wrappers (a session scope, a store's transaction helpers) name no caller
        wrapper = module == "dokstamp_sync.db" or (module == "dokstamp_sync.sync.store" and (
            name.startswith("_") or name == "run"))
        if module.startswith("dokstamp_sync") and name != "<lambda>" and not wrapper:
            return f"{module.removeprefix('dokstamp_sync.')}:{name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


def watch(db: Engine, counts: Counter[str], callers: Counter[str] | None = None,
          txs: Counter[str] | None = None, sqls: Counter[str] | None = None) -> None:
    """Count SQL statements, transactions and Redis round trips from now on (this process);
    with ``callers``, ``txs`` and ``sqls``, the round trips, the transactions and the
    statements by the dokstamp_sync function that made them."""
    txs = txs if txs is not None else Counter()
    sqls = sqls if sqls is not None else Counter()
    def executed(*_a: Any) -> None:
        counts.update(["sql"])
        if callers is not None:
            sqls.update([caller()])

    event.listen(db, "before_cursor_execute", executed)

    def ended(conn: Any) -> None:  # a session on an autocommit connection sent no BEGIN
        autocommit = conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT"
        kind = "reads" if autocommit else "tx"
        counts.update([kind])
        if callers is not None and kind == "tx":
            txs.update([caller()])

    event.listen(db, "commit", ended)
    event.listen(db, "rollback", ended)
    send = Connection.send_packed_command

    def counted(self: Connection, command: object, check_health: bool = True) -> None:
        counts.update(["redis"])
        if callers is not None and threading.current_thread() is threading.main_thread():
            callers.update([caller()])
        send(self, command, check_health)

    # Every command or pipeline goes out through this one method: one call, one round trip.
    Connection.send_packed_command = counted  # type: ignore[method-assign,assignment]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--certificates", type=int, default=200)
    p.add_argument("--top", type=int, default=45)
    p.add_argument("--no-profile", action="store_true",
                   help="time only: no cProfile overhead")
    p.add_argument("--callers", action="store_true",
                   help="also list Redis round trips and transactions per event by the "
                        "function that made them")
    args = p.parse_args()
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    account = Account()
    with scratch_database(PG_ADMIN, "dokstamp_sync_profile") as url, \
            SandboxServer(Sandbox(SandboxConfig(accounts=[account]))) as server:
        db = make_engine(url)
        sessions = make_sessionmaker(db)
        settings = sandbox_settings(server.url, account=account, dokstamp_rate_limit=10_000,
                                    dokstamp_sync_file_max_bytes=10**7)
        ctx = build_context(settings, sessions=sessions, redis_client=client)
        pks: list[int] = []
        ingester = StreamIngester(client, sessions, "profile:events", consumer="profile",
                                  dispatch=pks.extend, lease=600)
        ingester.ensure_group()
        for e in samples.graduating_class(args.certificates):
            client.xadd("profile:events", {"event": json.dumps(e)})
        while ingester.poll(block_ms=10):
            pass
        counts: Counter[str] = Counter()
        callers: Counter[str] = Counter()
        txs: Counter[str] = Counter()
        sqls: Counter[str] = Counter()
        watch(db, counts, callers if args.callers else None, txs, sqls)
        profile = cProfile.Profile()
        start, cpu_start = time.perf_counter(), time.thread_time()

        def tasks() -> None:  # as the worker runs them: 8 events per task, flushed at its end
            for batch in task_batches(pks):
                for pk in batch:
                    engine.run(ctx, pk, flush=False)
                engine.flush_counters(ctx)

        if args.no_profile:
            tasks()
        else:
            profile.runcall(tasks)
        elapsed, cpu = time.perf_counter() - start, time.thread_time() - cpu_start
        calls = server.sandbox.stats.to_json()["requests"]
        ctx.client.http.close()
    client.flushdb()
    # thread_time: CPU of this thread alone (the sandbox answers from another thread)
    print(f"{len(pks)} events in {elapsed:.2f} s ({1000 * elapsed / len(pks):.1f} ms/event, "
          f"{1000 * cpu / len(pks):.1f} ms CPU/event in the engine's thread), {calls} API calls")
    n = len(pks)
    print(f"per event: {counts['sql'] / n:.1f} SQL statements, {counts['tx'] / n:.1f} "
          f"transactions, {counts['reads'] / n:.1f} reads outside one, "
          f"{counts['redis'] / n:.1f} Redis round trips")
    for name, k in callers.most_common():
        print(f"  {k / n:5.2f} Redis round trips per event: {name}")
    for name, k in txs.most_common():
        print(f"  {k / n:5.2f} transactions per event: {name}")
    for name, k in sqls.most_common():
        print(f"  {k / n:5.2f} SQL statements per event: {name}")
    if args.no_profile:
        return
    pstats.Stats(profile).sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
