"""The fleet's circuit breaker: opens after consecutive failures, one probe per interval
fleet-wide, closes when the API answers again; an open breaker parks events without spending
their retry budget."""

from __future__ import annotations

import time
from datetime import UTC, datetime

import httpx
import pytest

from dokstamp_sync.dokstamp.breaker import BreakerTransport, CircuitBreaker
from dokstamp_sync.dokstamp.client import build_http_client
from dokstamp_sync.dokstamp.errors import CircuitOpen, ServerError
from dokstamp_sync.dokstamp.ratelimit import RateLimiter
from dokstamp_sync.redis_keys import RedisKeys
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


def test_a_success_resets_counted_failures_and_costs_no_record_when_none_are(engine_redis):
    """Through the transport: successes with no failure counted are not recorded (one Redis
    round trip less per request); a failure is counted, the next success resets it, so
    failures that are not consecutive never open the breaker."""
    breaker = CircuitBreaker(engine_redis, "t-clean", threshold=2, interval=5)
    recorded: list[str] = []
    real = breaker.record

    def record(outcome: str) -> bool:
        recorded.append(outcome)
        return real(outcome)

    breaker.record = record  # type: ignore[method-assign]
    statuses = iter([200, 200, 500, 200, 200, 500, 200])
    transport = BreakerTransport(httpx.MockTransport(
        lambda request: httpx.Response(next(statuses))), breaker)
    with httpx.Client(transport=transport, base_url="http://127.0.0.1") as client:
        got = [client.get("/students").status_code for _ in range(7)]
    assert got == [200, 200, 500, 200, 200, 500, 200]
    assert recorded == ["failed", "ok", "failed", "ok"]
    assert breaker.open_for() is None  # two failures, never consecutive: still closed


def test_the_limiter_checks_an_empty_breaker_in_its_own_round_trip(engine_redis):
    """With both under one client: while the breaker holds nothing, a request costs one Redis
    round trip (the limiter's token, which checks the breaker in the same script). Once a
    failure is counted the breaker is asked first (and a success resets it); an open breaker
    holds the request with no token spent."""
    breaker = CircuitBreaker(engine_redis, "t-gate", threshold=2, interval=5)
    limiter = RateLimiter(engine_redis, "t-gate", rate=1000, burst=1000)
    # the first three load every script into Redis's cache (a first use costs more round
    # trips); the next seven are counted
    statuses = iter([200, 500, 200, 200, 200, 500, 200, 200, 500, 500])
    http = build_http_client("http://127.0.0.1", limiter=limiter, breaker=breaker,
                             transport=httpx.MockTransport(
                                 lambda request: httpx.Response(next(statuses))))
    sent: list[object] = []
    real = engine_redis.execute_command

    def counted(*args: object, **kw: object) -> object:
        sent.append(args[0])
        return real(*args, **kw)

    for _ in range(3):
        http.get("/students")
    engine_redis.execute_command = counted
    per_request = []
    for _ in range(7):
        sent.clear()
        http.get("/students")
        per_request.append(len(sent))
    tokens_before = float(engine_redis.hget(f"{RedisKeys().rate_limit}t-gate", "tokens"))
    with pytest.raises(CircuitOpen):  # two failures in a row: open
        http.get("/students")
    tokens_after = float(engine_redis.hget(f"{RedisKeys().rate_limit}t-gate", "tokens"))
    http.close()
    # 200, 200: one each; 500: the token, then its failure recorded; 200 with a failure
    # counted: token refused, breaker asked, token, success recorded (the count reset); 200:
    # one again; 500, 500: counted, then asked first
    assert per_request[:5] == [1, 1, 2, 4, 1]
    assert per_request[5] == 2
    assert per_request[6] == 4
    assert tokens_after <= tokens_before + 1  # the held request took no token (refill aside)
    assert breaker.open_for() is not None


def test_an_unsent_probe_does_not_leave_an_empty_breaker_behind(engine_redis):
    """A probe that was not sent after another request's success deleted the breaker's hash
    leaves no hash behind: the limiter would otherwise see a breaker that is never empty and
    ask it first on every request."""
    breaker = CircuitBreaker(engine_redis, "t-none", threshold=1, interval=5)
    breaker.record("ok")
    breaker.record("none")
    assert not engine_redis.exists(breaker.key)
