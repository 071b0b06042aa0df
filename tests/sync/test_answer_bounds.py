"""DokStamp's answers are bounded (issue 17, item 8): an answer larger than the body cap, or
nested deeper than the JSON depth cap, is a malformed answer (transient, the reason recorded),
never a crash; a create answered so keeps its in-flight mark, so the retry searches and adopts
the student the create made instead of making a second one."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import calls, live, student


@pytest.mark.parametrize(("body", "reason"), [
    ("huge", "larger than"),
    ("deep", "nested deeper than"),
])
def test_an_oversized_or_deeply_nested_create_answer_keeps_the_in_flight_mark(
        h, ctx, sandbox, body, reason):
    """POST /students is applied and answered 201 with a 12 MiB body (cap 8 MiB) or JSON
    nested 100,000 levels, and the search right after it answers 503: the event waits with the
    reason in its error, the in-flight mark of the create is kept, and once the window is over
    the retry adopts the student that was created: DokStamp holds exactly one student, POSTed
    once."""
    ctx.limits = replace(ctx.limits, in_call_attempts=1, create_window=0.5)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", body=body,
                      then=[ScriptedFault("GET", "/students", status=503)])]))
    e = student()
    assert h.sync(e) == ["waiting"]
    error = h.record(e["event_id"]).last_error
    assert "POST /students -> 201" in error
    assert reason in error
    assert "internal error" not in error
    assert list(ctx.redis.scan_iter(f"{RedisKeys().inflight}student:*"))  # the mark is kept
    assert len(live(sandbox, "students")) == 1  # the create did land
    time.sleep(0.6)
    h.drain()
    assert h.state(e["event_id"]) == "synced"
    assert len(live(sandbox, "students")) == 1
    assert calls(sandbox)["POST /students"] == 1
    assert h.mapping("student", "S-1").dokstamp_uuid == live(sandbox, "students")[0]["uuid"]
