"""Locks held while their holder works: renewed in the background, and checked to be still ours
just before every DokStamp write (a lost lock aborts the attempt unsent)."""

from __future__ import annotations

import time

import pytest
from redis.exceptions import LockNotOwnedError

from dokstamp_sync.sandbox import Faults
from dokstamp_sync.testing import live, student


def test_a_lock_outlives_its_timeout_while_its_holder_works(ctx):
    """A 0.6 s lock held for 1.5 s is renewed in the background: no one else can take it
    meanwhile, and it is still ours at the end."""
    ctx.locks.timeout = 0.6
    with ctx.locks.take("entity:student:S-1", wait=0.1) as held:
        time.sleep(1.5)
        rival = ctx.locks.new("entity:student:S-1")
        assert not rival.acquire(blocking=False)
        assert held.owned()
    assert not ctx.locks.held


def test_a_lost_lock_stops_the_write_before_it_is_sent(ctx, sandbox):
    """Once the entity lock has been lost (expired and taken by another worker), the next
    POST raises before it is sent: DokStamp holds no student."""
    with ctx.locks.take("entity:student:S-1", wait=0.1):
        ctx.redis.delete(f"{ctx.locks.prefix}entity:student:S-1")
        assert ctx.locks.new("entity:student:S-1").acquire(blocking=False)  # the other worker
        with pytest.raises(LockNotOwnedError):
            ctx.client.students.create({"name": "M", "email": "m@example.edu",
                                        "date_of_birth": "1998-05-20"})
    assert live(sandbox, "students") == []


def test_the_check_before_a_write_is_one_round_trip_for_every_lock_held(ctx):
    """Three locks held: the check made before a write extends all three to their full
    timeout in one Redis round trip; once the second is lost (taken by another worker) the
    check names it, and the others are still extended."""
    ctx.locks.timeout = 5.0
    names = ["entity:student:S-1", "nk:student:x", "entity:course:C-1"]
    with ctx.locks.take(names[0], wait=0.1), ctx.locks.take(names[1], wait=0.1), \
            ctx.locks.take(names[2], wait=0.1):
        ctx.locks.check()  # warm: the script in Redis's cache
        for name in names:
            ctx.redis.pexpire(f"{ctx.locks.prefix}{name}", 1000)
        sent: list[object] = []
        real = ctx.redis.execute_command

        def counted(*args: object, **kw: object) -> object:
            sent.append(args[0])
            return real(*args, **kw)

        ctx.redis.execute_command = counted
        try:
            ctx.locks.check("POST", "/students")
        finally:
            del ctx.redis.execute_command
        assert len(sent) == 1
        assert all(ctx.redis.pttl(f"{ctx.locks.prefix}{n}") > 4000 for n in names)
        ctx.redis.delete(f"{ctx.locks.prefix}{names[1]}")
        assert ctx.locks.new(names[1]).acquire(blocking=False)  # the other worker
        for name in (names[0], names[2]):
            ctx.redis.pexpire(f"{ctx.locks.prefix}{name}", 1000)
        with pytest.raises(LockNotOwnedError, match="nk:student:x"):
            ctx.locks.check("POST", "/students")
        assert ctx.redis.pttl(f"{ctx.locks.prefix}{names[0]}") > 4000
        assert ctx.redis.pttl(f"{ctx.locks.prefix}{names[2]}") > 4000


def test_a_slow_attempt_keeps_its_lock_and_syncs(h, ctx, sandbox):
    """With a 0.5 s lock timeout and DokStamp answering in 0.3 s (search, create: longer than
    the timeout), the run keeps its lock to the end and syncs one student."""
    ctx.locks.timeout = 0.5
    sandbox.sandbox.faults.configure(Faults(latency_ms=300))
    assert h.sync(student()) == ["synced"]
    assert len(live(sandbox, "students")) == 1


def test_a_timed_out_create_is_not_posted_again_before_the_late_write_lands(h, ctx, sandbox):
    """POST /students answers after the client's 0.5 s timeout and lands 1 s after it was
    sent. The event is parked for the create window (twice the timeout) with no second POST;
    the next attempt searches, finds the late write, and maps it: one student, one POST."""
    from dataclasses import replace

    from dokstamp_sync.sandbox import ScriptedFault
    from dokstamp_sync.testing import calls, sandbox_context

    slow = sandbox_context(sandbox, ctx.sessions, ctx.redis, timeout=0.5)
    slow.limits = replace(slow.limits, create_window=1.0)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=201, delay_s=1.0)]))
    h.ctx = slow
    e = student()
    pk = h.send(e)[0]
    try:
        assert h.run([pk]) == ["waiting"]
        rec = h.record(e["event_id"])
        assert (rec.next_attempt_at.timestamp() - time.time()) > 0.5
        assert h.run([pk]) == ["waiting"]  # still within the window: no search, no POST
        time.sleep(1.1)
        assert h.run([pk]) == ["synced"]
    finally:
        slow.close()  # its own connections (a leaked socket fails a later test's warnings)
    assert len(live(sandbox, "students")) == 1
    assert calls(sandbox).get("POST /students") == 1
