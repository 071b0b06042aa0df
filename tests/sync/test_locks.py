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
    ctx.lock_timeout = 0.6
    with ctx.lock("entity:student:S-1", wait=0.1) as held:
        time.sleep(1.5)
        rival = ctx.new_lock("entity:student:S-1")
        assert not rival.acquire(blocking=False)
        assert held.owned()
    assert not ctx.held


def test_a_lost_lock_stops_the_write_before_it_is_sent(ctx, sandbox):
    """Once the entity lock has been lost (expired and taken by another worker), the next
    POST raises before it is sent: DokStamp holds no student."""
    with ctx.lock("entity:student:S-1", wait=0.1):
        ctx.redis.delete(f"{ctx.lock_prefix}entity:student:S-1")
        assert ctx.new_lock("entity:student:S-1").acquire(blocking=False)  # the other worker
        with pytest.raises(LockNotOwnedError):
            ctx.client.students.create({"name": "M", "email": "m@example.edu",
                                        "date_of_birth": "1998-05-20"})
    assert live(sandbox, "students") == []


def test_a_slow_attempt_keeps_its_lock_and_syncs(h, ctx, sandbox):
    """With a 0.5 s lock timeout and DokStamp answering in 0.3 s (search, create: longer than
    the timeout), the run keeps its lock to the end and syncs one student."""
    ctx.lock_timeout = 0.5
    sandbox.sandbox.faults.configure(Faults(latency_ms=300))
    assert h.sync(student()) == ["synced"]
    assert len(live(sandbox, "students")) == 1
