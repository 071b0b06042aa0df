"""A server's ``Retry-After`` is bounded (issue 17, item 6): a 429 with a huge one pauses the
fleet for at most ``DOKSTAMP_SYNC_MAX_PAUSE``, and no event is ever parked past the end of its
retry budget; once the budget is spent it is dead-lettered with the reason."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import live, student

HUGE = 999_999_999  # s: about 31 years


def test_a_429_with_a_huge_retry_after_pauses_the_fleet_only_up_to_the_cap(h, ctx, sandbox):
    """A 429 answering ``Retry-After: 999999999`` pauses the tenant (every process) for at most
    the fleet-pause cap (300 s by default), and its event is parked no longer than that either;
    once the pause is over, it syncs."""
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=429, retry_after=HUGE)]))
    e = student()
    before = datetime.now(UTC)
    assert h.sync(e) == ["waiting"]
    pause_ms = ctx.redis.pttl(f"{RedisKeys().pause}{ctx.client.tenant}")
    assert 0 < pause_ms <= 300_000
    parked = h.record(e["event_id"]).next_attempt_at
    assert parked <= before + timedelta(seconds=301)
    ctx.redis.delete(f"{RedisKeys().pause}{ctx.client.tenant}")  # the pause is over
    h.drain()
    assert h.state(e["event_id"]) == "synced"
    assert len(live(sandbox, "students")) == 1


def test_a_503_with_a_huge_retry_after_never_parks_past_the_retry_budget(h, ctx, sandbox):
    """With a 2 s retry budget, a 503 with ``Retry-After: 999999999`` parks the event at most
    until the budget's end; when DokStamp answers the same again after the budget is spent, the
    event is dead-lettered saying its retries are exhausted (not parked for decades)."""
    ctx.limits = replace(ctx.limits, retry_budget=2.0, in_call_attempts=1)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=503, retry_after=HUGE, times=2)]))
    e = student()
    before = datetime.now(UTC)
    assert h.sync(e) == ["waiting"]
    assert h.record(e["event_id"]).next_attempt_at <= before + timedelta(seconds=3)
    time.sleep(2.1)
    h.drain(rounds=1)
    assert h.state(e["event_id"]) == "dead"
    (letter,) = h.letters()
    assert letter.reason.startswith("retries exhausted")
    assert "503" in letter.reason
    assert live(sandbox, "students") == []
