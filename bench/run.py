"""Benchmark: API calls per certificate, throughput against the rate-limit bound, latency.

    python bench/run.py                      # 1,000 certificates, R=100 req/s, L=20 ms
    python bench/run.py --certificates 10000 --baseline-certificates 1000
    python bench/run.py --certificates 10000 --courses 1   # one large course (issue 21)
    python bench/run.py --sweep 1,2,4,8 --sweep-certificates 300 --plot bench/throughput.png

Everything is real: the DokStamp sandbox over HTTP on loopback (rate limit R, latency L), the
machine's Redis (database 9, emptied) and PostgreSQL (a database of its own, dropped at the end),
and `dokstamp-sync worker` processes (Celery prefork). In one invocation, on one sandbox:

1. single-event latency on an idle system (L = 0): XADD one student, wait until it is synced;
2. a fresh cohort of N certificates with its whole graph, enqueued at once: wall time from the
   first XADD until every event is settled, API calls by route, 429s, worker RSS;
3. the same events sent again unchanged (new event ids): the API calls they cost;
4. the baseline: the docs' pattern (bench/baseline.py) done synchronously on the same sandbox.

The last line printed is one JSON object with the figures (see README, "Benchmark").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psutil
import redis
from sqlalchemy import exists, func, select

sys.path.insert(0, str(Path(__file__).resolve().parent))
import baseline  # bench/ is a folder of scripts, not a package

from dokstamp_sync.db import make_engine, make_sessionmaker, session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.dokstamp import (
    MemoryTokenStore,
    PasswordLogin,
    TokenManager,
    build_http_client,
)
from dokstamp_sync.dokstamp.client import DokStampClient
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.sandbox import (
    Account,
    Faults,
    Sandbox,
    SandboxConfig,
    SandboxServer,
)
from dokstamp_sync.testing import scratch_database

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
STREAM = "bench:events"
ACCOUNT = Account()
EXE = [sys.executable, "-m", "dokstamp_sync.cli"]


class Worker:
    """`dokstamp-sync worker` as a subprocess (its own process group), and its RSS.

    ``exe``: the command (another checkout's ``bin/dokstamp-sync`` to measure it); ``extra``:
    environment on top of the benchmark's settings."""

    def __init__(self, sandbox_url: str, database_url: str, *, concurrency: int, rate: float,
                 log: Path, exe: Sequence[str] = EXE, redis_url: str = REDIS_URL,
                 stream: str = STREAM, extra: dict[str, str] | None = None) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
            "DOKSTAMP_API_URL": sandbox_url, "DOKSTAMP_TENANT": ACCOUNT.tenant,
            "DOKSTAMP_EMAIL": ACCOUNT.email, "DOKSTAMP_PASSWORD": ACCOUNT.password,
            "REDIS_URL": redis_url, "DATABASE_URL": database_url,
            "DOKSTAMP_SYNC_STREAM": stream, "DOKSTAMP_RATE_LIMIT": str(rate)} | (extra or {})
        self.log = log.open("a")
        level = os.environ.get("BENCH_LOGLEVEL", "WARNING")
        self.proc = subprocess.Popen(  # noqa: S603  # our own command
            [*exe, "worker", "--concurrency", str(concurrency), "--loglevel", level], env=env,
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.concurrency = concurrency

    def wait_ready(self, client: redis.Redis, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not list(client.scan_iter("*dokstamp:heartbeat:ingest:*")) or \
                len(psutil.Process(self.proc.pid).children()) < self.concurrency:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the worker did not start")
            time.sleep(0.1)

    def rss_mb(self) -> float:
        root = psutil.Process(self.proc.pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if not self.log.closed:
            self.log.close()


def xadd(client: redis.Redis, events: list[dict[str, Any]], stream: str = STREAM) -> None:
    with client.pipeline(transaction=False) as pipe:
        for e in events:
            pipe.xadd(stream, {"event": json.dumps(e)})
        pipe.execute()


def settled(sessions: Any, expected: int) -> bool:
    # The cheap question first (an index lookup): is any event still open? Only then count
    # them all. Polling must not take much CPU from what it measures.
    with session_scope(sessions) as s:
        open_ = s.scalar(select(exists().where(InboxEvent.state.in_(("pending", "waiting")))))
        if open_:
            return False
        total = s.scalar(select(func.count()).select_from(InboxEvent)) or 0
    return total >= expected


def wait_settled(sessions: Any, expected: int, worker: Worker, timeout: float) -> None:
    # Poll often for short runs (wall-time resolution), rarely for long ones: two COUNT(*)s
    # over tens of thousands of rows would otherwise take CPU from what is being measured.
    interval = 0.05 if expected < 5000 else 0.5
    deadline = time.monotonic() + timeout
    while not settled(sessions, expected):
        if worker.proc.poll() is not None:
            raise RuntimeError("the worker died")
        if time.monotonic() > deadline:
            raise RuntimeError(f"not settled after {timeout:.0f} s")
        time.sleep(interval)


def states(sessions: Any) -> dict[str, int]:
    with session_scope(sessions) as s:
        return dict(s.execute(select(InboxEvent.state, func.count())
                              .group_by(InboxEvent.state)).all())


def latency(client: redis.Redis, sessions: Any, n: int) -> list[float]:
    """Enqueue -> synced, one event at a time, on an idle system (ms)."""
    out = []
    for i in range(n):
        e = samples.event("student", f"LAT-{i}", {"name": f"Latency {i}",
                                                  "email": f"latency{i}@example.edu",
                                                  "date_of_birth": "2000-01-01"})
        start = time.perf_counter()
        client.xadd(STREAM, {"event": json.dumps(e)})
        while True:
            with session_scope(sessions) as s:
                state = s.scalar(select(InboxEvent.state).where(
                    InboxEvent.event_id == e["event_id"]))
            if state in ("synced", "dead", "superseded"):
                break
            time.sleep(0.002)
        out.append((time.perf_counter() - start) * 1000)
        time.sleep(0.02)
    return out


def cpu_seconds(worker: Worker) -> dict[str, float]:
    """CPU time (user + system) so far of each group of processes sharing this machine."""
    root = psutil.Process(worker.proc.pid)
    workers = {p.pid for p in [root, *root.children(recursive=True)]}
    out = {"worker_main": 0.0, "worker_children": 0.0, "sandbox_and_bench": 0.0,
           "postgres": 0.0, "redis": 0.0}
    for proc in psutil.process_iter(["name", "cpu_times"]):
        times = proc.info["cpu_times"]
        if times is None:
            continue
        name = proc.info["name"] or ""
        group = ("worker_main" if proc.pid == root.pid else
                 "worker_children" if proc.pid in workers else
                 "sandbox_and_bench" if proc.pid == os.getpid() else
                 "postgres" if name.startswith("postgres") else
                 "redis" if name.startswith("redis-server") else None)
        if group:
            out[group] += times.user + times.system
    return out


def throughput(server: SandboxServer, client: redis.Redis, sessions: Any, worker: Worker,
               n: int, prefix: str, *, latency_ms: float, rate: float,
               timeout: float, courses: int = 2) -> dict[str, Any]:
    """One fresh cohort of ``n`` certificates through a running worker."""
    sb = server.sandbox
    sb.faults.configure(Faults(rate_limit=rate, latency_ms=latency_ms))
    sb.stats.reset()
    before = states(sessions)
    events = samples.graduating_class(n, prefix=prefix, courses=courses)
    cpu_before = cpu_seconds(worker)
    start = time.monotonic()
    xadd(client, events)
    wait_settled(sessions, sum(before.values()) + len(events), worker, timeout)
    wall = time.monotonic() - start
    cpu = {k: round(v - cpu_before[k], 2) for k, v in cpu_seconds(worker).items()}
    stats = sb.stats.to_json()
    after = states(sessions)
    return {"events": events, "wall_s": wall, "stats": stats, "cpu_s": cpu,
            "states": {k: after.get(k, 0) - before.get(k, 0) for k in after}}


def run_baseline(server: SandboxServer, n: int, prefix: str, *, latency_ms: float,
                 rate: float) -> dict[str, Any]:
    sb = server.sandbox
    sb.faults.configure(Faults(rate_limit=rate, latency_ms=latency_ms))
    http = build_http_client(server.url)
    client = DokStampClient(http, tenant=ACCOUNT.tenant, tokens=TokenManager(
        http, PasswordLogin(ACCOUNT.email, ACCOUNT.password), MemoryTokenStore()))
    events = samples.graduating_class(n, prefix=prefix)
    sb.stats.reset()
    start = time.monotonic()
    baseline.run(client, events)
    wall = time.monotonic() - start
    http.close()
    return {"wall_s": wall, "stats": sb.stats.to_json()}


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] \
        if len(values) > 1 else values[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--certificates", type=int, default=1000)
    p.add_argument("--rate", type=float, default=100.0, help="R: sandbox rate limit, req/s")
    p.add_argument("--latency-ms", type=float, default=20.0, help="L: sandbox latency")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--courses", type=int, default=2,
                   help="courses the cohort's students are spread over (1: one large course)")
    p.add_argument("--baseline-certificates", type=int, default=None,
                   help="certificates for the baseline (default: --certificates)")
    p.add_argument("--latency-samples", type=int, default=100)
    p.add_argument("--sweep", default="", help="comma-separated concurrencies to plot")
    p.add_argument("--sweep-certificates", type=int, default=300)
    p.add_argument("--plot", default="bench/throughput.png")
    p.add_argument("--timeout", type=float, default=3600.0)
    args = p.parse_args(argv)
    logs = Path(os.environ.get("BENCH_LOG_DIR", "bench-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    result: dict[str, Any] = {}
    try:
        with scratch_database(PG_ADMIN, "dokstamp_sync_bench") as db_url, \
                SandboxServer(Sandbox(SandboxConfig(
                accounts=[ACCOUNT]))) as server:
            sessions = make_sessionmaker(make_engine(db_url))
            if args.sweep:
                result["sweep"] = sweep(server, client, sessions, db_url, args, logs)
            else:
                result = full(server, client, sessions, db_url, args, logs)
    finally:
        client.flushdb()
    print(json.dumps(result))
    return 0


def full(server: SandboxServer, client: redis.Redis, sessions: Any, db_url: str,
         args: argparse.Namespace, logs: Path) -> dict[str, Any]:
    n, rate = args.certificates, args.rate
    worker = Worker(server.url, db_url, concurrency=args.concurrency, rate=rate,
                    log=logs / "worker.log")
    try:
        worker.wait_ready(client)
        server.sandbox.faults.configure(Faults(rate_limit=rate, latency_ms=0))
        lat = latency(client, sessions, args.latency_samples)
        print(f"latency (idle, L=0, {len(lat)} events): p50 {pct(lat, 50):.1f} ms, "
              f"p95 {pct(lat, 95):.1f} ms", file=sys.stderr)
        rss_start = worker.rss_mb()
        run = throughput(server, client, sessions, worker, n, "B-", latency_ms=args.latency_ms,
                         rate=rate, timeout=args.timeout, courses=args.courses)
        rss_end = worker.rss_mb()
        stats = run["stats"]
        counters = {k.decode(): int(v) for k, v in client.hgetall("dokstamp:metrics").items()}
        calls = stats["requests"]
        # The same events again, unchanged, with new event ids: what do they cost?
        again = [dict(e, event_id=f"again-{e['event_id']}") for e in run["events"]
                 if e["entity"] in ("student", "enrollment", "certificate")][:300]
        server.sandbox.stats.reset()
        before = sum(states(sessions).values())
        xadd(client, again)
        wait_settled(sessions, before + len(again), worker, args.timeout)
        unchanged_calls = server.sandbox.stats.to_json()["requests"]
    finally:
        worker.stop()
    bn = args.baseline_certificates or n
    base = run_baseline(server, bn, "N-", latency_ms=args.latency_ms, rate=rate)
    bound = calls / rate
    out = {
        "certificates": n, "courses": args.courses, "concurrency": args.concurrency,
        "rate_limit": rate,
        "latency_ms_injected": args.latency_ms, "events": len(run["events"]),
        "states": run["states"], "api_calls": calls,
        "calls_per_certificate": round(calls / n, 3), "wall_s": round(run["wall_s"], 2),
        "bound_s": round(bound, 2), "rate_ratio": round(bound / run["wall_s"], 3),
        "http_429": stats["http_429"], "http_429_share": round(stats["http_429"] / calls, 4),
        "calls_by_route": stats["by_route"], "unchanged_events": len(again),
        "unchanged_calls": unchanged_calls,
        "baseline_certificates": bn,
        "baseline_calls_per_certificate": round(base["stats"]["requests"] / bn, 3),
        "baseline_wall_s": round(base["wall_s"], 2),
        "baseline_calls_by_route": base["stats"]["by_route"],
        "latency_p50_ms": round(pct(lat, 50), 1), "latency_p95_ms": round(pct(lat, 95), 1),
        "rss_start_mb": round(rss_start, 1), "rss_end_mb": round(rss_end, 1),
        "cpu_s": run["cpu_s"], "worker_counters": counters,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python "
                   f"{platform.python_version()}",
    }
    print(f"{n} certificates: {calls} API calls ({out['calls_per_certificate']}/certificate), "
          f"{out['wall_s']} s wall vs {out['bound_s']} s bound (ratio {out['rate_ratio']}), "
          f"429s {out['http_429']}; baseline {out['baseline_calls_per_certificate']}/certificate"
          f" in {out['baseline_wall_s']} s for {bn}; RSS {out['rss_start_mb']} -> "
          f"{out['rss_end_mb']} MB", file=sys.stderr)
    return out


def sweep(server: SandboxServer, client: redis.Redis, sessions: Any, db_url: str,
          args: argparse.Namespace, logs: Path) -> list[dict[str, Any]]:
    points = []
    for i, c in enumerate(int(x) for x in args.sweep.split(",")):
        worker = Worker(server.url, db_url, concurrency=c, rate=args.rate,
                        log=logs / f"worker-c{c}.log")
        try:
            worker.wait_ready(client)
            run = throughput(server, client, sessions, worker, args.sweep_certificates,
                             f"W{i}-", latency_ms=args.latency_ms, rate=args.rate,
                             timeout=args.timeout)
        finally:
            worker.stop()
        calls = run["stats"]["requests"]
        point = {"concurrency": c, "certificates": args.sweep_certificates,
                 "wall_s": round(run["wall_s"], 2), "api_calls": calls,
                 "calls_per_s": round(calls / run["wall_s"], 1),
                 "certificates_per_s": round(args.sweep_certificates / run["wall_s"], 2),
                 "http_429": run["stats"]["http_429"]}
        print(json.dumps(point), file=sys.stderr)
        points.append(point)
    plot(points, args)
    return points


def plot(points: list[dict[str, Any]], args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    xs = [p["concurrency"] for p in points]
    ax.plot(xs, [p["calls_per_s"] for p in points], "o-", label="API calls/s (measured)")
    ax.axhline(args.rate, color="grey", linestyle="--", label=f"rate limit R = {args.rate:g}/s")
    ax.set_xlabel("worker concurrency (Celery prefork processes)")
    ax.set_ylabel("API calls per second")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax2 = ax.twinx()
    ax2.plot(xs, [p["certificates_per_s"] for p in points], "s:", color="tab:green",
             label="certificates/s")
    ax2.set_ylabel("certificates per second")
    ax.set_title(f"Throughput vs concurrency ({args.sweep_certificates} certificates, "
                 f"L={args.latency_ms:g} ms)")
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    labels = ax.get_legend_handles_labels()[1] + ax2.get_legend_handles_labels()[1]
    ax.legend(lines, labels, loc="lower right", fontsize=8)
    ax.set_ylim(bottom=0)
    ax2.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(args.plot)


if __name__ == "__main__":
    sys.exit(main())
