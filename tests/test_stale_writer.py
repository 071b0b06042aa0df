"""A worker that lost its locks never writes (issue 17, case 4), with two real workers.

Worker A is frozen (SIGSTOP on its whole process group) while its course create waits in the
rate limiter, for longer than the lock, lease and create-window times; worker B takes the event
over and syncs it; then A resumes (SIGCONT). The lock check happens inside the innermost
transport, after every wait, so A's POST never leaves; DokStamp holds exactly one course.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from sqlalchemy import select

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.testing import T0, calls, live
from test_worker import start_worker, wait_settled, wredis, xadd  # noqa: F401  # fixtures

# Short times, so the whole take-over fits in seconds: the lock expires 1.5 s after A froze,
# its lease 2 s after, a failed create's window is 2 s (twice the HTTP timeout).
FAST = {"DOKSTAMP_SYNC_LOCK_TIMEOUT": "1.5", "DOKSTAMP_SYNC_LEASE": "2",
        "DOKSTAMP_TIMEOUT": "1", "DOKSTAMP_SYNC_VISIBILITY_TIMEOUT": "4"}
INSTITUTION = event("institution", "INST", {"name": "Federal University", "country": "Brazil"},
                    at=T0)
COURSE = event("course", "CRS-1", {"name": "Bachelor", "code": "BSC-1",
                                   "institution_key": "INST"}, at=T0)


def state(sessions: Any, event_id: str) -> str | None:
    with session_scope(sessions) as s:
        return s.scalar(select(InboxEvent.state).where(InboxEvent.event_id == event_id))


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.005)
    raise AssertionError(f"not in {timeout}s: {what}")


def test_a_worker_frozen_in_the_rate_limiter_never_posts_after_a_take_over(
        start_worker, wredis, sessions, sandbox):  # noqa: F811  # the imported fixtures
    """A freezes with its course POST waiting for a rate-limiter token (0.5 requests/s
    fleet-wide, so each request waits ~2 s), stays frozen past its lock, lease and create
    window while B syncs the course, then resumes: B's course is the only one DokStamp holds
    and A sends no POST /courses after it resumed."""
    a = start_worker(concurrency=1, rate=0.5, **FAST)
    xadd(wredis, [INSTITUTION])
    wait_settled(sessions, 1, timeout=60, proc=a)
    marks = RedisKeys().inflight
    xadd(wredis, [COURSE])
    # A marks the create in flight, then waits for its POST's token: freeze it right there.
    wait_until(lambda: any(wredis.scan_iter(f"{marks}course:*")), 60, "A's create mark")
    posts_before = calls(sandbox).get("POST /courses", 0)
    os.killpg(a.pid, signal.SIGSTOP)
    try:
        b = start_worker(concurrency=1, rate=0.5, **FAST)
        wait_until(lambda: state(sessions, COURSE["event_id"]) == "synced", 60,
                   "B synced the course")
        assert calls(sandbox).get("POST /courses", 0) == posts_before + 1  # B's only
    finally:
        os.killpg(a.pid, signal.SIGCONT)
    # A's limiter wait ends within seconds, and its POST went then (before the fix): watch.
    deadline = time.monotonic() + 12
    while time.monotonic() < deadline and len(live(sandbox, "courses")) == 1:
        time.sleep(0.1)
    assert a.poll() is None
    assert b.poll() is None
    courses = live(sandbox, "courses")
    assert [c["code"] for c in courses] == ["BSC-1"]
    assert calls(sandbox).get("POST /courses", 0) == posts_before + 1
    assert state(sessions, COURSE["event_id"]) == "synced"
