"""The fleet's circuit breaker: opens after consecutive failures, one probe per interval
fleet-wide, closes when the API answers again; an open breaker parks events without spending
their retry budget."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest

from dokstamp_sync.dokstamp.breaker import CircuitBreaker
from dokstamp_sync.dokstamp.errors import CircuitOpen, ServerError
from dokstamp_sync.testing import sandbox_context, student


@pytest.fixture
def fast(sandbox, sessions, engine_redis):
    """A context whose breaker opens after 3 failures and probes every 0.3 s."""
    context = sandbox_context(sandbox, sessions, engine_redis)
    context.breaker.threshold = 3
    context.breaker.interval = 0.3
    yield context
    context.client.http.close()
    context.file_http.close()


def test_an_outage_opens_the_breaker_and_nothing_more_is_sent(fast, sandbox):
    """During an outage, after 3 failed requests every call raises CircuitOpen without reaching
    DokStamp; one probe goes out per interval; after the outage the first probe closes it and
    calls go through again."""
    fast.client.students.find()  # a token first: the outage then hits the search itself
    outage = sandbox.sandbox.faults.start_outage()
    for _ in range(3):
        with pytest.raises(ServerError):
            fast.client.students.find()
    for _ in range(20):
        with pytest.raises(CircuitOpen) as held:
            fast.client.students.find()
    assert outage.requests == 3
    assert 0 < held.value.retry_after <= 0.3
    time.sleep(0.35)
    with pytest.raises(ServerError):  # the probe: still down, open again
        fast.client.students.find()
    with pytest.raises(CircuitOpen):
        fast.client.students.find()
    assert outage.requests == 4
    sandbox.sandbox.faults.end_outage()
    time.sleep(0.35)
    assert fast.client.students.find() == []  # the probe succeeds: closed
    assert fast.client.students.find() == []
    assert fast.breaker.open_for() is None


def test_one_probe_for_the_whole_fleet(engine_redis):
    """Two processes' breakers for one tenant share the state: once open and due, only one of
    them gets to probe; the other waits."""
    a = CircuitBreaker(engine_redis, "t", threshold=1, interval=0.1)
    b = CircuitBreaker(engine_redis, "t", threshold=1, interval=0.1)
    assert a.allow() is False
    assert a.record("failed") is True
    with pytest.raises(CircuitOpen):
        b.allow()
    time.sleep(0.15)
    assert b.allow() is True  # b probes
    with pytest.raises(CircuitOpen):
        a.allow()
    b.record("ok")
    assert a.allow() is False  # closed for everyone


def test_an_open_breaker_parks_the_event_without_spending_its_budget(h, ctx, sandbox):
    """An event run while DokStamp is down: its first run's failures count (one attempt), the
    run that opens the breaker and every run while it is open only wait for the probe (the
    outage is DokStamp's, not the event's), due within a second; it syncs once the API is
    back."""
    ctx.breaker.interval = 0.5
    ctx.client.students.find()
    sandbox.sandbox.faults.start_outage()
    e = student()
    pk = h.send(e)[0]
    for _ in range(4):
        assert h.run([pk]) == ["waiting"]
    rec = h.record(e["event_id"])
    assert rec.attempts == 1
    assert "circuit breaker" in rec.last_error
    assert (rec.next_attempt_at - datetime.now(UTC)).total_seconds() < 1.5
    assert sandbox.sandbox.faults.outage.requests <= 5 + 1
    sandbox.sandbox.faults.end_outage()
    time.sleep(0.6)
    assert h.run([pk]) == ["synced"]


def test_a_write_is_never_the_probe(fast, sandbox):
    """When a create is due to probe an open breaker, a GET of its URL probes instead: during
    the outage the POST is never sent (no create that may still land keeps its event waiting);
    once the API is back the GET closes the breaker and the one POST goes out."""
    fast.client.students.find()  # a token first
    outage = sandbox.sandbox.faults.start_outage()
    for _ in range(3):
        with pytest.raises(ServerError):
            fast.client.students.find()
    sandbox.sandbox.stats.reset()
    body = {"name": "Maria", "email": "probe@example.edu", "date_of_birth": "1998-05-20"}
    time.sleep(0.35)
    with pytest.raises(CircuitOpen):  # the GET probe failed: the POST stayed here
        fast.client.students.create(body)
    routes = sandbox.sandbox.stats.to_json()["by_route"]
    assert routes.get("GET /students") == 1
    assert "POST /students" not in routes
    assert outage.requests == 4
    sandbox.sandbox.faults.end_outage()
    time.sleep(0.35)
    created = fast.client.students.create(body)  # probe GET answers: closed, the POST goes
    routes = sandbox.sandbox.stats.to_json()["by_route"]
    assert routes.get("GET /students") == 2
    assert routes.get("POST /students") == 1
    assert fast.breaker.open_for() is None
    assert [s["uuid"] for s in sandbox.sandbox.tenants["demo-university"].dump()["students"]
            if s["deleted_at"] is None] == [created["uuid"]]
