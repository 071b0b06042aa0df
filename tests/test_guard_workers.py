"""The change guard with real workers: two `dokstamp-sync worker` processes (Celery prefork,
ingester, scheduler) share one burst, the sandbox's state is asserted (the issue's acceptance
run, scaled to 40 students and a settle delay of 2 s)."""

from __future__ import annotations

import os
import subprocess
import time
from collections import Counter
from datetime import UTC, datetime

from sqlalchemy import func, select

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.pipeline import results
from test_worker import EXE, start_worker, wait_settled, wredis, xadd  # noqa: F401  # fixtures
from testenv import TEST_WORKER_REDIS_URL

GUARD = {"DOKSTAMP_SYNC_GUARD_DELAY": "2", "DOKSTAMP_SYNC_GUARD_MIN": "20"}
STUDENTS = 40


def certificates(sandbox):
    return [c for c in sandbox.sandbox.tenants["demo-university"].dump()["certificates"]
            if c["deleted_at"] is None]


def live_students(sandbox):
    return [s for s in sandbox.sandbox.tenants["demo-university"].dump()["students"]
            if s["deleted_at"] is None]


def states(sessions):
    with session_scope(sessions) as s:
        return Counter(dict(s.execute(select(InboxEvent.state, func.count())
                                      .group_by(InboxEvent.state)).all()))


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def cli(database_url, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DATABASE_URL": database_url, "REDIS_URL": TEST_WORKER_REDIS_URL}
    return subprocess.run([EXE, *args], env=env, capture_output=True, text=True, timeout=60,
                          check=False)


def test_two_workers_hold_a_mass_delete_and_revoke_and_release_applies_only_it(
        start_worker, wredis, sessions, sandbox, database_url):  # noqa: F811
    """A class of 40 is synced; an ordinary single revoke is applied within the settle delay
    plus normal time; then, within a second, a delete of every student and a revoke of every
    other certificate: none is applied in DokStamp, all 79 are held once (one `held` outcome
    each, though two workers counted the burst); `held release --entity certificate` revokes
    exactly those 39 certificates and no student is deleted."""
    first = start_worker(concurrency=2, **GUARD)
    start_worker(concurrency=2, **GUARD)
    events = samples.graduating_class(STUDENTS)
    xadd(wredis, events)
    wait_settled(sessions, len(events), timeout=240, proc=first)
    assert len(certificates(sandbox)) == STUDENTS

    now = datetime.now(UTC)
    single = samples.event("certificate", "CERT-00001", {"revocation_reason": "in error"},
                           op="revoke", at=now)
    sent = time.monotonic()
    xadd(wredis, [single])
    wait_for(lambda: {c["status"] for c in certificates(sandbox)} >= {"revoked"}, 30,
             "the single revoke applied")
    took = time.monotonic() - sent
    assert 2.0 <= took < 2.0 + 8.0  # the settle delay, plus normal time on a busy machine

    burst = [samples.event("student", f"S-{s:05d}", op="delete", at=now)
             for s in range(1, STUDENTS + 1)]
    burst += [samples.event("certificate", f"CERT-{s:05d}", {"revocation_reason": "ERP bug"},
                            op="revoke", at=now) for s in range(2, STUDENTS + 1)]
    xadd(wredis, burst)
    wait_for(lambda: states(sessions)["held"] == len(burst), 60, "the burst held")
    time.sleep(3.0)  # past the settle delay: still nothing applied
    assert states(sessions)["held"] == len(burst)
    assert len(live_students(sandbox)) == STUDENTS
    assert Counter(c["status"] for c in certificates(sandbox))["revoked"] == 1
    outcomes = [r for _, r in results.read(wredis, "dokstamp:results") if r["state"] == "held"]
    assert sorted(r["event_id"] for r in outcomes) == sorted(e["event_id"] for e in burst)

    released = cli(database_url, "held", "release", "--entity", "certificate")
    assert released.returncode == 0, released.stderr
    assert released.stdout.strip() == f"released {STUDENTS - 1}"
    wait_for(lambda: Counter(c["status"] for c in certificates(sandbox))["revoked"] == STUDENTS,
             60, "the released revokes applied")
    assert len(live_students(sandbox)) == STUDENTS
    assert states(sessions)["held"] == STUDENTS  # the student deletes still wait
    listed = cli(database_url, "held", "list", "--entity", "student")
    assert listed.stdout.count(" delete ") == STUDENTS
