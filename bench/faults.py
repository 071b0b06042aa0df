"""Benchmark: recovery after kill -9 of every worker process, and a DokStamp outage; with
``--ratios``, what faults cost against the same cohort undisturbed (issue 22).

    python bench/faults.py                                   # this checkout's worker
    python bench/faults.py --worker-bin /tmp/before11/.venv/bin --label before
    python bench/faults.py --ratios --runs 3 --before-pythonpath /work/wt/before22/src

Everything is real: the DokStamp sandbox over HTTP on loopback (run in this process, from this
checkout, so both workers face the same API), the machine's Redis (``BENCH_REDIS_URL``, default
database 7, emptied) and PostgreSQL (a database of its own, migrated by the worker's own
``dokstamp-sync db upgrade``, dropped at the end), and ``dokstamp-sync worker`` processes started
from ``--worker-bin`` (default: the bin folder of this Python). The script talks to the worker
only the way an ERP and an operator would (XADD, SQL on the inbox table, the sandbox's admin
routes), so it measures the code before issue 11 and after it alike:

1. kill: a cohort of N certificates with its whole graph is enqueued; once a share of its events
   is synced, every worker process gets SIGKILL (the whole process group) and a new worker is
   started at once. Measured: seconds from the kill until every event is settled (synced,
   superseded or dead), and the wall time of the whole cohort;
2. outage: a second cohort is enqueued; once a share of it is synced, ``POST /_sandbox/outage``
   makes every API request answer 503 for ``--outage`` seconds. Measured: the requests the
   sandbox received during the outage (``outage_requests``), and seconds from its end until every
   event is settled.

``--ratios`` runs instead, each in a fresh sandbox, Redis database and PostgreSQL database with
a fresh worker (measured from the XADD of the cohort until every event is settled):
``clean``, the cohort undisturbed; ``5xx``, 10 % of writes (not GETs) answered 500/502/503 as a
proxy's HTML page, half of them after the write was applied (lost responses); ``dbkill``, every
PostgreSQL connection of the worker terminated (``pg_terminate_backend``) three times, once 20,
45 and 70 % of the events are synced. Each faulty run is divided by the clean run of the same
round and variant; ``--before-pythonpath`` adds a variant whose worker imports another checkout's
code (rounds interleave: before, then after, scenario by scenario).

Both waits are capped (``--timeout``); a wait that hit the cap is reported as a lower bound
(``"settled": false``). The last line printed is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import psutil
import psycopg
import redis
import run  # bench/ is a folder of scripts, not a package: its worker harness

from dokstamp_sync.demo import samples
from dokstamp_sync.sandbox import Account, Faults, Sandbox, SandboxConfig, SandboxServer

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/7")
STREAM = "bench:fault-events"
ACCOUNT = Account()
OPEN = ("pending", "waiting")


class Worker(run.Worker):
    """``dokstamp-sync worker`` from ``bin_dir`` (see :class:`run.Worker`), which can be killed."""

    def __init__(self, bin_dir: Path, sandbox_url: str, database_url: str, *, concurrency: int,
                 rate: float, log: Path, extra: dict[str, str] | None = None) -> None:
        super().__init__(sandbox_url, database_url, concurrency=concurrency, rate=rate, log=log,
                         exe=[str(bin_dir / "dokstamp-sync")], redis_url=REDIS_URL,
                         stream=STREAM, extra=extra)

    def kill9(self) -> int:
        """SIGKILL to every process of the worker (its process group); how many there were."""
        procs = [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(
            recursive=True)]
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        psutil.wait_procs(procs, timeout=10)
        self.log.close()
        return len(procs)


def xadd(client: redis.Redis, events: list[dict[str, Any]]) -> None:
    run.xadd(client, events, STREAM)


class Inbox:
    """The inbox table, read with plain SQL (its name differs between versions)."""

    def __init__(self, url: str) -> None:
        self.conn = psycopg.connect(url, autocommit=True)
        names = {r[0] for r in self.conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")}
        self.table = "inbox" if "inbox" in names else "events"

    def states(self, prefix: str) -> dict[str, int]:
        rows = self.conn.execute(
            f"SELECT state, count(*) FROM {self.table} WHERE event_id LIKE %s "  # noqa: S608
            "GROUP BY state", (f"{prefix}%",)).fetchall()
        return dict(rows)

    def wait(self, prefix: str, until: Any, timeout: float, worker: Worker) -> bool:
        deadline = time.monotonic() + timeout
        while not until(self.states(prefix)):
            if worker.proc.poll() is not None:
                raise RuntimeError(f"the worker died (see its log, {worker.log.name})")
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True


def settled(expected: int) -> Any:
    return lambda s: sum(s.values()) >= expected and not any(s.get(k) for k in OPEN)


def some_synced(share: float, expected: int) -> Any:
    return lambda s: s.get("synced", 0) >= share * expected


def cohort(n: int, prefix: str) -> list[dict[str, Any]]:
    """A graduating class whose event ids start with ``prefix`` (to count it apart)."""
    return [dict(e, event_id=f"{prefix}{e['event_id']}")
            for e in samples.graduating_class(n, prefix=prefix)]


def held(server: SandboxServer) -> dict[str, int]:
    """Live entities of each kind in the sandbox: duplicates would show as more than asked."""
    dump = server.sandbox.tenants[ACCOUNT.tenant].dump()
    return {k: sum(1 for r in rows if r.get("deleted_at") is None)
            for k, rows in dump.items() if isinstance(rows, list)}


def kill_run(server: SandboxServer, client: redis.Redis, inbox: Inbox, start: Any,
             args: argparse.Namespace) -> tuple[dict[str, Any], Worker]:
    events = cohort(args.certificates, "K-")
    worker = start()
    worker.wait_ready(client)
    t0 = time.monotonic()
    xadd(client, events)
    if not inbox.wait("K-", some_synced(args.kill_share, len(events)), args.timeout, worker):
        raise RuntimeError("the cohort did not progress before the kill")
    before = inbox.states("K-")
    t_kill = time.monotonic()
    killed = worker.kill9()
    worker = start()  # at once; its start-up counts in the time to settle
    ok = inbox.wait("K-", settled(len(events)), args.timeout, worker)
    t_end = time.monotonic()
    return {"events": len(events), "killed_processes": killed, "at_kill": before,
            "settled": ok, "settle_after_kill_s": round(t_end - t_kill, 1),
            "cohort_wall_s": round(t_end - t0, 1), "states": inbox.states("K-")}, worker


def outage_run(server: SandboxServer, client: redis.Redis, inbox: Inbox, worker: Worker,
               args: argparse.Namespace) -> dict[str, Any]:
    events = cohort(args.outage_certificates, "O-")
    admin = httpx.Client(base_url=server.url, timeout=10)
    xadd(client, events)
    if not inbox.wait("O-", some_synced(args.outage_share, len(events)), args.timeout, worker):
        raise RuntimeError("the cohort did not progress before the outage")
    before = inbox.states("O-")
    admin.delete("/_sandbox/stats")
    admin.post("/_sandbox/outage", json={"seconds": args.outage}).raise_for_status()
    t_start = time.monotonic()
    while admin.get("/_sandbox/outage").json()["active"]:
        time.sleep(0.05)
    t_end = time.monotonic()
    during = admin.get("/_sandbox/outage").json()["requests"]
    stats = admin.get("/_sandbox/stats").json()
    ok = inbox.wait("O-", settled(len(events)), args.timeout, worker)
    done = time.monotonic()
    admin.close()
    return {"events": len(events), "outage_s": round(t_end - t_start, 1), "at_outage": before,
            "outage_requests": during, "outage_requests_stats": stats.get("outage_requests"),
            "settled": ok, "settle_after_outage_s": round(done - t_end, 1),
            "states": inbox.states("O-")}


SCENARIOS = ("clean", "5xx", "dbkill")
KILL_AT = (0.2, 0.45, 0.7)


def kill_connections(inbox: Inbox) -> int:
    """Terminate every other connection to the benchmark's database (the worker's)."""
    rows = inbox.conn.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()").fetchall()
    return len(rows)


def scenario_run(scenario: str, env: dict[str, str], label: str,
                 args: argparse.Namespace) -> dict[str, Any]:
    """One cohort through a fresh worker, database, Redis database and sandbox."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    name = f"dokstamp_sync_faults_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") \
        + f"/{name}"
    logs = Path(os.environ.get("BENCH_LOG_DIR", "bench-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    worker: Worker | None = None
    try:
        base = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")}
        subprocess.run([str(args.worker_bin / "dokstamp-sync"), "db", "upgrade"],  # noqa: S603
                       env=base | env | {"DATABASE_URL": db_url, "REDIS_URL": REDIS_URL},
                       check=True, capture_output=True)
        inbox = Inbox(db_url.replace("postgresql+psycopg://", "postgresql://"))
        with SandboxServer(Sandbox(SandboxConfig(accounts=[ACCOUNT]))) as server:
            faults = Faults(rate_limit=args.rate, latency_ms=args.latency_ms, seed=args.seed)
            if scenario == "5xx":
                faults = Faults(rate_limit=args.rate, latency_ms=args.latency_ms,
                                seed=args.seed, error_rate=0.1, lost_response_share=0.5,
                                error_writes=True, error_html=True)
            server.sandbox.faults.configure(faults)
            worker = Worker(args.worker_bin, server.url, db_url, concurrency=args.concurrency,
                            rate=args.rate, log=logs / f"faults-{label}-{scenario}.log",
                            extra=env)
            worker.wait_ready(client)
            events = cohort(args.certificates, "R-")
            t0 = time.monotonic()
            xadd(client, events)
            killed = []
            if scenario == "dbkill":
                for share in KILL_AT:
                    if not inbox.wait("R-", some_synced(share, len(events)), args.timeout,
                                      worker):
                        raise RuntimeError("the cohort did not progress")
                    killed.append(kill_connections(inbox))
            ok = inbox.wait("R-", settled(len(events)), args.timeout, worker)
            wall = time.monotonic() - t0
            stats = httpx.get(f"{server.url}/_sandbox/stats", timeout=10).json()
            holds = held(server)
        states = inbox.states("R-")
        inbox.conn.close()
    finally:
        if worker is not None:
            worker.stop()
        client.flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    expected = dict(Counter(e["entity"] for e in events))
    return {"variant": label, "scenario": scenario, "wall_s": round(wall, 2), "settled": ok,
            "states": states, "killed_connections": killed,
            "requests": stats["requests"], "injected_5xx": stats["injected_5xx"],
            "lost_responses": stats["lost_responses"],
            "duplicates": {k: holds.get(f"{k}s", 0) - n for k, n in expected.items()
                           if holds.get(f"{k}s", 0) != n}}


def ratios(args: argparse.Namespace) -> int:
    """``--ratios``: each scenario beside the clean run, per variant, medians over rounds."""
    variants: list[tuple[str, dict[str, str]]] = []
    if args.before_pythonpath:
        variants.append(("before", {"PYTHONPATH": args.before_pythonpath}))
    variants.append(("after", dict(item.split("=", 1) for item in args.env)))
    runs: list[dict[str, Any]] = []
    for rnd in range(args.runs):
        for scenario in ("clean", *args.scenarios):
            for label, env in variants:
                r = scenario_run(scenario, env, label, args) | {"round": rnd}
                runs.append(r)
                print(json.dumps(r), file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for label, _ in variants:
        mine = [r for r in runs if r["variant"] == label]
        done = ["clean", *args.scenarios]
        walls = {s: sorted(r["wall_s"] for r in mine if r["scenario"] == s) for s in done}
        per_round = {s: sorted(
            round(a["wall_s"] / c["wall_s"], 2) for a in mine for c in mine
            if a["scenario"] == s and c["scenario"] == "clean" and a["round"] == c["round"])
            for s in done[1:]}
        summary[label] = {
            "median_wall_s": {s: w[len(w) // 2] for s, w in walls.items()},
            "ratio_of_medians": {s: round(walls[s][len(walls[s]) // 2]
                                          / walls["clean"][len(walls["clean"]) // 2], 2)
                                 for s in done[1:]},
            "ratios_per_round": per_round,
            "all_settled": all(r["settled"] for r in mine),
            "duplicates": [r["duplicates"] for r in mine if r["duplicates"]]}
        print(f"{label}: " + ", ".join(
            f"{s} {summary[label]['median_wall_s'][s]} s" for s in done) + "; ratios "
            + ", ".join(f"{s} {v}x" for s, v in summary[label]["ratio_of_medians"].items()),
            file=sys.stderr)
    print(json.dumps({"runs": runs, "summary": summary,
                      "settings": {"certificates": args.certificates, "rounds": args.runs,
                                   "concurrency": args.concurrency, "rate_limit": args.rate,
                                   "latency_ms": args.latency_ms, "seed": args.seed,
                                   "kill_at": KILL_AT},
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared), "
                                 f"Python {platform.python_version()}"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker-bin", type=Path, default=Path(sys.executable).parent)
    p.add_argument("--label", default="")
    p.add_argument("--certificates", type=int, default=200)
    p.add_argument("--outage-certificates", type=int, default=100)
    p.add_argument("--kill-share", type=float, default=0.3,
                   help="kill once this share of the events is synced")
    p.add_argument("--outage-share", type=float, default=0.1)
    p.add_argument("--outage", type=float, default=40.0, help="seconds of total outage")
    p.add_argument("--rate", type=float, default=100.0, help="sandbox rate limit, req/s")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=700.0, help="cap on each wait, s")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a setting for the worker (repeatable), e.g. DOKSTAMP_SYNC_LEASE=10")
    p.add_argument("--ratios", action="store_true",
                   help="issue 22: clean, 5xx and dbkill runs of one cohort, and their ratios")
    p.add_argument("--runs", type=int, default=3, help="--ratios: rounds (medians)")
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS[1:]),
                   choices=SCENARIOS[1:], help="--ratios: the faulty runs (beside clean)")
    p.add_argument("--seed", type=int, default=22, help="--ratios: the sandbox's fault seed")
    p.add_argument("--before-pythonpath", default="",
                   help="--ratios: also run a worker importing this source folder (before)")
    args = p.parse_args(argv)
    if args.ratios:
        return ratios(args)
    extra = dict(item.split("=", 1) for item in args.env)
    logs = Path(os.environ.get("BENCH_LOG_DIR", "bench-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    name = f"dokstamp_sync_faults_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") \
        + f"/{name}"
    workers: list[Worker] = []
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")}
        subprocess.run([str(args.worker_bin / "dokstamp-sync"), "db", "upgrade"],  # noqa: S603
                       env=env | {"DATABASE_URL": db_url, "REDIS_URL": REDIS_URL}, check=True,
                       capture_output=True)
        inbox = Inbox(db_url.replace("postgresql+psycopg://", "postgresql://"))
        with SandboxServer(Sandbox(SandboxConfig(accounts=[ACCOUNT]))) as server:
            server.sandbox.faults.configure(Faults(rate_limit=args.rate,
                                                   latency_ms=args.latency_ms))

            def start() -> Worker:
                workers.append(Worker(args.worker_bin, server.url, db_url,
                                      concurrency=args.concurrency, rate=args.rate,
                                      log=logs / f"faults-worker{args.label}.log",
                                      extra=extra))
                return workers[-1]

            kill, worker = kill_run(server, client, inbox, start, args)
            print(f"kill -9: settled {kill['settled']} {kill['settle_after_kill_s']} s after",
                  file=sys.stderr)
            worker.wait_ready(client)
            outage = outage_run(server, client, inbox, worker, args)
            print(f"outage: {outage['outage_requests']} requests in {outage['outage_s']} s, "
                  f"settled {outage['settled']} {outage['settle_after_outage_s']} s after",
                  file=sys.stderr)
            sandbox_holds = held(server)
        inbox.conn.close()
    finally:
        for w in workers:
            w.stop()
        client.flushdb()
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    git = ["git", "-C", str(args.worker_bin.parent.parent), "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, capture_output=True, text=True).stdout.strip()  # noqa: S603
    out = {"label": args.label, "worker_commit": commit, "kill": kill, "outage": outage,
           "sandbox_holds": sandbox_holds,
           "expected_per_kind": dict(Counter(
               e["entity"] for e in [*cohort(args.certificates, "K-"),
                                     *cohort(args.outage_certificates, "O-")])),
           "settings": {"certificates": args.certificates, "concurrency": args.concurrency,
                        "rate_limit": args.rate, "latency_ms": args.latency_ms,
                        "kill_share": args.kill_share, "outage_s": args.outage,
                        "outage_certificates": args.outage_certificates,
                        "outage_share": args.outage_share, "timeout_s": args.timeout,
                        "worker_env": extra},
           "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared with other "
                      f"agents' test runs), Python {platform.python_version()}"}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
