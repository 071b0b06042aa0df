"""The change guard's acceptance run (issue 18), measured: two real workers, the sandbox.

A class of N (default 200) is synced; an ordinary single revoke is timed (the settle delay
plus normal time); then, within a few seconds, the ERP sends a delete of every student and a
revoke of every other certificate. Printed (JSON): how many of the burst were applied in
DokStamp, how many held, how many `held release --entity certificate` released and how many
certificates DokStamp then holds revoked, the students still live, and the timings.

    BENCH_REDIS_URL=redis://127.0.0.1:6379/9 python bench/guard.py --students 200 --delay 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import run  # bench/ is a folder of scripts, not a package: its worker harness

from dokstamp_sync.db import make_engine, make_sessionmaker
from dokstamp_sync.demo import samples
from dokstamp_sync.sandbox import Sandbox, SandboxConfig, SandboxServer
from dokstamp_sync.testing import scratch_database


def _live(server: SandboxServer, kind: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = server.sandbox.tenants[run.ACCOUNT.tenant].dump()[kind]
    return [r for r in rows if r["deleted_at"] is None]


def _revoked(server: SandboxServer) -> int:
    return Counter(c["status"] for c in _live(server, "certificates"))["revoked"]


def _wait(check: Any, timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"not within {timeout} s: {what}")
        time.sleep(0.1)
    return time.monotonic() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--students", type=int, default=200)
    p.add_argument("--delay", type=float, default=5.0, help="DOKSTAMP_SYNC_GUARD_DELAY, s")
    p.add_argument("--concurrency", type=int, default=2, help="per worker (two workers)")
    args = p.parse_args()
    n = args.students
    logs = Path(os.environ.get("BENCH_LOG_DIR", "bench-logs"))
    logs.mkdir(parents=True, exist_ok=True)
    client = redis.Redis.from_url(run.REDIS_URL)
    client.flushdb()
    extra = {"DOKSTAMP_SYNC_GUARD_DELAY": str(args.delay)}
    out: dict[str, Any] = {"students": n, "settle_delay_s": args.delay, "workers": 2,
                           "concurrency_each": args.concurrency}
    try:
        with scratch_database(run.PG_ADMIN, "dokstamp_sync_bench") as db_url, \
                SandboxServer(Sandbox(SandboxConfig(accounts=[run.ACCOUNT]))) as server:
            sessions = make_sessionmaker(make_engine(db_url))
            workers = [run.Worker(server.url, db_url, concurrency=args.concurrency, rate=500,
                                  log=logs / f"guard-worker-{i}.log", extra=extra)
                       for i in range(2)]
            try:
                for w in workers:
                    w.wait_ready(client)
                events = samples.graduating_class(n)
                start = time.monotonic()
                run.xadd(client, events)
                run.wait_settled(sessions, len(events), workers[0], 1800)
                out["class_synced_s"] = round(time.monotonic() - start, 1)
                now = datetime.now(UTC)
                run.xadd(client, [samples.event("certificate", "CERT-00001", {
                    "revocation_reason": "in error"}, op="revoke", at=now)])
                out["single_revoke_applied_s"] = round(
                    _wait(lambda: _revoked(server) == 1, 120, "single revoke"), 2)
                before = dict(server.sandbox.stats.to_json()["by_route"])
                burst = [samples.event("student", f"S-{s:05d}", op="delete", at=now)
                         for s in range(1, n + 1)]
                burst += [samples.event("certificate", f"CERT-{s:05d}",
                                        {"revocation_reason": "ERP bug"}, op="revoke", at=now)
                          for s in range(2, n + 1)]
                run.xadd(client, burst)
                out["burst_events"] = len(burst)
                out["burst_held_within_s"] = round(_wait(
                    lambda: run.states(sessions).get("held", 0) == len(burst), 300,
                    "burst held"), 2)
                time.sleep(args.delay + 3)  # past the settle delay: is anything applied?
                after = server.sandbox.stats.to_json()["by_route"]
                out["burst_writes_sent"] = {k: v - before.get(k, 0) for k, v in after.items()
                                            if not k.startswith("GET")
                                            and v != before.get(k, 0)}
                out["burst_applied"] = (n - len(_live(server, "students"))) + \
                    (_revoked(server) - 1)
                out["held"] = run.states(sessions).get("held", 0)
                env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
                    "DATABASE_URL": db_url, "REDIS_URL": run.REDIS_URL}
                released = subprocess.run([*run.EXE, "held", "release", "--entity",  # noqa: S603
                                           "certificate"], env=env, capture_output=True,
                                          text=True, check=True)
                out["release_output"] = released.stdout.strip()
                out["released_applied_within_s"] = round(_wait(
                    lambda: _revoked(server) == n, 300, "released revokes"), 2)
                out["certificates_revoked"] = _revoked(server)
                out["students_live"] = len(_live(server, "students"))
                out["still_held"] = run.states(sessions).get("held", 0)
                out["states"] = run.states(sessions)
            finally:
                for w in workers:
                    w.stop()
    finally:
        client.flushdb()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
