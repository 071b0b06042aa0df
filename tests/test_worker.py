"""End to end with a real `dokstamp-sync worker` (Celery prefork, ingester, scheduler) as a
subprocess: XADD on Redis database 15 -> Postgres -> the sandbox over HTTP."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import redis
from sqlalchemy import func, select

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.states import EventState
from testenv import TEST_WORKER_REDIS_URL as WORKER_REDIS_URL

STREAM = "worker-test:events"
EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")


@pytest.fixture
def wredis():
    client = redis.Redis.from_url(WORKER_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def start_worker(sandbox, database_url, sessions, wredis, tmp_path):
    """Start `dokstamp-sync worker` subprocesses; all are killed (whole group) afterwards."""
    procs: list[subprocess.Popen] = []
    logs = []

    def start(concurrency: int = 2, rate: float = 500, **env: str) -> subprocess.Popen:
        full = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
            "DOKSTAMP_API_URL": sandbox.url, "DOKSTAMP_TENANT": "demo-university",
            "DOKSTAMP_EMAIL": "admin@demo-university.edu",
            "DOKSTAMP_PASSWORD": "sandbox-password", "REDIS_URL": WORKER_REDIS_URL,
            "DATABASE_URL": database_url, "DOKSTAMP_SYNC_STREAM": STREAM,
            "DOKSTAMP_RATE_LIMIT": str(rate), "DOKSTAMP_SYNC_VISIBILITY_TIMEOUT": "8",
            "DOKSTAMP_SYNC_LOCK_TIMEOUT": "5"} | env
        log = open(tmp_path / f"worker-{len(procs)}.log", "w")  # noqa: SIM115  # closed below
        logs.append(log)
        proc = subprocess.Popen([EXE, "worker", "--concurrency", str(concurrency)],
                                env=full, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for log in logs:
        log.close()


def xadd(client, events):
    with client.pipeline(transaction=False) as pipe:
        for e in events:
            pipe.xadd(STREAM, {"event": json.dumps(e)})
        pipe.execute()


def wait_settled(sessions, total, timeout=120.0, proc=None):
    """Wait until `total` events exist and none is pending or waiting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope(sessions) as s:
            counts = dict(s.execute(select(InboxEvent.state, func.count())
                                    .group_by(InboxEvent.state)).all())
        if sum(counts.values()) >= total and not counts.get(EventState.PENDING) \
                and not counts.get(EventState.WAITING):
            return counts
        if proc is not None:
            assert proc.poll() is None, "the worker exited"
        time.sleep(0.25)
    with session_scope(sessions) as s:
        stuck = [(e.entity, e.erp_key, e.attempts, e.next_attempt_at, e.waiting_for, e.last_error)
                 for e in s.scalars(select(InboxEvent).where(
                     InboxEvent.state.in_(("pending", "waiting"))))]
    raise AssertionError(f"not settled in {timeout}s: {counts}; still open: {stuck}")


def no_duplicates(sandbox):
    state = sandbox.sandbox.tenants["demo-university"].dump()
    live = {k: [e for e in v if e.get("deleted_at") is None]
            for k, v in state.items() if isinstance(v, list)}
    assert not [e for e, n in Counter(s["email"] for s in live["students"]).items() if n > 1]
    assert not [c for c, n in Counter(c["code"] for c in live["courses"]).items() if n > 1]
    assert not [c for c, n in Counter(c["files"][0]["uuid"]
                                      for c in live["certificates"]).items() if n > 1]
    assert not [c for c, n in Counter((e["student"]["uuid"], e["course"]["uuid"])
                                      for e in live["enrollments"]).items() if n > 1]
    return live


def test_a_graduating_class_in_any_order_ends_synced(start_worker, wredis, sessions, sandbox):
    """XADD a class of 20 (shuffled) to a running worker: every event ends synced, with exactly
    one DokStamp entity per natural key."""
    proc = start_worker()
    events = samples.graduating_class(20)
    random.Random(7).shuffle(events)
    xadd(wredis, events)
    counts = wait_settled(sessions, len(events), proc=proc)
    assert counts == {"synced": len(events)}
    live = no_duplicates(sandbox)
    assert len(live["certificates"]) == 20
    assert all(c["status"] == "issued" for c in live["certificates"])


def test_worker_killed_mid_run_loses_and_duplicates_nothing(start_worker, wredis, sessions,
                                                           sandbox):
    """SIGKILL the whole worker (parent and children) in the middle of a class; a new worker
    finishes it: every event synced, no duplicate entity."""
    sandbox.sandbox.faults.configure(Faults(latency_ms=30))
    first = start_worker()
    events = samples.graduating_class(15)
    xadd(wredis, events)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with session_scope(sessions) as s:
            done = s.scalar(select(func.count()).select_from(InboxEvent)
                            .where(InboxEvent.state == "synced"))
        if done >= 10:
            break
        time.sleep(0.1)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    with session_scope(sessions) as s:
        unfinished = s.scalar(select(func.count()).select_from(InboxEvent)
                              .where(InboxEvent.state.in_(("pending", "waiting"))))
    assert unfinished > 0, "the kill came too late to prove anything"
    second = start_worker()
    counts = wait_settled(sessions, len(events), proc=second)
    assert counts == {"synced": len(events)}
    live = no_duplicates(sandbox)
    assert len(live["certificates"]) == 15


def test_429_storm_loses_nothing_and_the_pace_is_respected(start_worker, wredis, sessions,
                                                          sandbox):
    """DokStamp allows 20 req/s but the workers are set to 100: 429s come, every event still
    syncs, nothing is duplicated, and the API's pace holds. The first three student creates
    are answered 429 as well, so that 429s come even when a loaded machine slows the workers
    below DokStamp's pace (they then sometimes never went past it)."""
    sandbox.sandbox.faults.configure(Faults(rate_limit=20, burst=5, script=[
        ScriptedFault("POST", "/students", status=429, retry_after=1, times=3)]))
    proc = start_worker(concurrency=3, rate=100)
    events = samples.graduating_class(8)
    start = time.monotonic()
    xadd(wredis, events)
    counts = wait_settled(sessions, len(events), proc=proc)
    elapsed = time.monotonic() - start
    assert counts == {"synced": len(events)}
    no_duplicates(sandbox)
    stats = sandbox.sandbox.stats.to_json()
    assert stats["http_429"] > 0
    accepted = stats["requests"] - stats["http_429"]
    assert accepted / elapsed <= 20 * 1.1 + 5 / elapsed


def test_shared_rate_limit_prevents_429s_across_processes(start_worker, wredis, sessions,
                                                          sandbox):
    """With DOKSTAMP_RATE_LIMIT below DokStamp's limit, 3 processes together stay under it:
    no 429 at all."""
    sandbox.sandbox.faults.configure(Faults(rate_limit=25, burst=5))
    proc = start_worker(concurrency=3, rate=20)
    events = samples.graduating_class(6)
    xadd(wredis, events)
    counts = wait_settled(sessions, len(events), proc=proc)
    assert counts == {"synced": len(events)}
    assert sandbox.sandbox.stats.http_429 == 0


def synced_count(sessions):
    with session_scope(sessions) as s:
        return s.scalar(select(func.count()).select_from(InboxEvent)
                        .where(InboxEvent.state == "synced"))


def wait_synced(sessions, n, timeout=60.0):
    deadline = time.monotonic() + timeout
    while synced_count(sessions) < n:
        assert time.monotonic() < deadline, f"fewer than {n} synced in {timeout}s"
        time.sleep(0.05)


def test_events_of_a_killed_worker_come_back_within_a_lease(start_worker, wredis, sessions,
                                                            sandbox):
    """kill -9 of every worker process mid-run, with Celery's visibility timeout long (600 s)
    and a 2 s lease: a new worker settles everything within seconds (the killed worker's
    leases are no longer renewed, the scheduler hands its events out again), no duplicate."""
    sandbox.sandbox.faults.configure(Faults(latency_ms=40))
    env = {"DOKSTAMP_SYNC_VISIBILITY_TIMEOUT": "600", "DOKSTAMP_SYNC_LEASE": "2"}
    first = start_worker(**env)
    events = samples.graduating_class(12)
    xadd(wredis, events)
    wait_synced(sessions, 8)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed = time.monotonic()
    with session_scope(sessions) as s:
        unfinished = s.scalar(select(func.count()).select_from(InboxEvent)
                              .where(InboxEvent.state.in_(("pending", "waiting"))))
    assert unfinished > 0, "the kill came too late to prove anything"
    second = start_worker(**env)
    counts = wait_settled(sessions, len(events), timeout=30, proc=second)
    assert counts == {"synced": len(events)}
    assert time.monotonic() - killed < 30
    assert len(no_duplicates(sandbox)["certificates"]) == 12


def test_events_whose_task_messages_were_lost_are_dispatched_again(start_worker, wredis,
                                                                   sessions, sandbox):
    """Every Celery key deleted from the broker mid-run (a failover without persistence):
    the events whose messages were lost are dispatched again once their 2 s lease runs out,
    and everything settles within seconds, with no duplicate in DokStamp."""
    sandbox.sandbox.faults.configure(Faults(latency_ms=40))
    proc = start_worker(concurrency=1, DOKSTAMP_SYNC_VISIBILITY_TIMEOUT="600",
                        DOKSTAMP_SYNC_LEASE="2")
    events = samples.graduating_class(12)
    xadd(wredis, events)
    wait_synced(sessions, 4)
    ours = (b"dokstamp:", STREAM.encode())
    lost = [k for k in wredis.scan_iter() if not k.startswith(ours)]
    assert lost, "no broker keys to delete"
    wredis.delete(*lost)
    gone = time.monotonic()
    counts = wait_settled(sessions, len(events), timeout=30, proc=proc)
    assert counts == {"synced": len(events)}
    assert time.monotonic() - gone < 30
    assert len(no_duplicates(sandbox)["certificates"]) == 12


def test_an_outage_costs_few_requests_and_sync_resumes_after_it(start_worker, wredis, sessions,
                                                                sandbox):
    """A 6 s total outage mid-run (every request 503): the fleet's breaker opens after 5
    failures and probes once every 1 s, so the dead API gets a handful of requests instead of
    hundreds; every event settles within seconds after the API is back, none dead."""
    sandbox.sandbox.faults.configure(Faults(latency_ms=20))
    # A create refused 503 waits twice the HTTP timeout before it searches (no blind retry):
    # a 2 s timeout keeps that window short here.
    proc = start_worker(concurrency=2, DOKSTAMP_SYNC_BREAKER_INTERVAL="1", DOKSTAMP_TIMEOUT="2")
    events = samples.graduating_class(10)
    xadd(wredis, events)
    wait_synced(sessions, 3)
    outage = sandbox.sandbox.faults.start_outage(seconds=6)
    time.sleep(6)
    back = time.monotonic()
    counts = wait_settled(sessions, len(events), timeout=20, proc=proc)
    assert counts == {"synced": len(events)}
    assert time.monotonic() - back < 15
    assert outage.requests <= 5 + 6 + 4  # threshold + one probe a second + those in flight
    assert len(no_duplicates(sandbox)["certificates"]) == 10
