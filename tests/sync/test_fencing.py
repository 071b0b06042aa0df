"""The lock check happens after every wait, inside the innermost transport (issue 17, case 4),
in one process: the rate limiter's wait is where the locks are lost (as a frozen worker loses
them), and the write that was waiting never reaches the sandbox."""

from __future__ import annotations

import time
from dataclasses import replace

from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.testing import Harness, calls, live, student


def test_a_lock_lost_during_the_rate_limiter_wait_stops_the_write(make_ctx, sandbox,
                                                                   engine_redis):
    """1 request/s: the student's POST waits for a token (after the lock check the client
    made before the fix); during that wait every lock the run holds expires (the sleep deletes
    them, as time does for a frozen worker). The POST never leaves: DokStamp holds no student,
    the event waits for a retry. Its create marks were never set (they are set by the check
    that found the locks lost, only when it passes), so the retry searches and creates exactly
    one."""
    lost: list[int] = []
    locks, marks = RedisKeys().lock, RedisKeys().inflight

    def frozen(seconds: float) -> None:
        # The create's marks wait for the check: this is the POST's own wait (not the search's).
        if not lost and h.ctx.locks.to_set:
            lost.append(sum(engine_redis.delete(k) for k in engine_redis.scan_iter(f"{locks}*")))
        time.sleep(seconds)

    h = Harness(make_ctx(rate=1.0, limiter_sleep=frozen))
    h.ctx.limits = replace(h.ctx.limits, create_window=0.2)
    h.ctx.locks.timeout = 1.0  # the mark lasts the window plus this
    assert h.sync(student()) == ["waiting"]
    assert lost
    assert lost[0] >= 1
    assert live(sandbox, "students") == []
    assert calls(sandbox).get("POST /students", 0) == 0
    assert "LockNotOwned" in (h.record(h.states().popitem()[0]).last_error or "")
    assert not any(engine_redis.scan_iter(f"{marks}*"))  # nothing was sent: nothing to wait out
    h.drain()
    assert len(live(sandbox, "students")) == 1
