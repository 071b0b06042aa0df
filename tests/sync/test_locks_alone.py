"""The walk's :class:`~dokstamp_sync.sync.locks.Locks` on its own, on a real Redis: take,
renew, check, release (no context, no sandbox)."""

from __future__ import annotations

import time

import pytest
from redis.exceptions import LockNotOwnedError

from dokstamp_sync.sync.locks import Locks
from dokstamp_sync.sync.outcomes import Busy


def test_a_taken_lock_is_held_for_the_block_and_released_after(engine_redis):
    """Inside the block the lock's key exists and another holder cannot take it (Busy after
    its wait); after the block it is released and no longer renewed."""
    locks, rival = Locks(engine_redis, "t:lock:", 5.0), Locks(engine_redis, "t:lock:", 5.0)
    with locks.take("a", wait=0.1):
        assert engine_redis.exists("t:lock:a")
        with pytest.raises(Busy), rival.take("a", wait=0.05):
            pass
        assert rival.try_take("a") is None
    assert not engine_redis.exists("t:lock:a")
    assert locks.held == []
    assert rival.try_take("a") is not None


def test_renew_brings_a_held_lock_back_to_its_full_timeout(engine_redis):
    """A 1 s lock 0.6 s after it was taken has about 0.4 s left; one renewal makes it 1 s
    again (the background renewer does this every third of the timeout)."""
    locks = Locks(engine_redis, "t:lock:", 1.0)
    lock = locks.new("b")
    assert lock.acquire(blocking=False)
    locks.held.append(lock)  # held without the background renewer, to renew by hand
    time.sleep(0.6)
    assert engine_redis.pttl("t:lock:b") < 500
    locks.renew()
    assert engine_redis.pttl("t:lock:b") > 800
    locks.release(lock)
    assert not engine_redis.exists("t:lock:b")


def test_check_fails_once_a_held_lock_is_lost_and_release_then_is_quiet(engine_redis):
    """A lock whose key expired or was taken over fails :meth:`Locks.check` (before a write);
    releasing it afterwards raises nothing (there is nothing left to release)."""
    locks = Locks(engine_redis, "t:lock:", 5.0)
    lock = locks.try_take("c")
    assert lock is not None
    locks.check("POST", "/students")
    engine_redis.delete("t:lock:c")
    with pytest.raises(LockNotOwnedError, match="POST /students"):
        locks.check("POST", "/students")
    locks.release(lock)
    locks.check()  # nothing held any more
