"""The fleet-wide limiter as the client's httpx transport, on a real Redis."""

from __future__ import annotations

import time

import httpx
import pytest

from dokstamp_sync.config import load_settings
from dokstamp_sync.dokstamp import (
    DokStampClient,
    MemoryTokenStore,
    PasswordLogin,
    RateLimiter,
    TokenManager,
    build_http_client,
    client_from_settings,
    errors,
)
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sandbox import Faults, ScriptedFault
from testenv import MAIN


def _limited(redis_client, key_prefix, handler, *, rate=1000.0, burst=None, sleep=None,
             max_wait=20.0):
    limiter = RateLimiter(redis_client, "t", rate, burst=burst, keys=RedisKeys(key_prefix),
                          max_wait=max_wait, **({"sleep": sleep} if sleep else {}))
    http = build_http_client("https://api.example", limiter=limiter,
                             transport=httpx.MockTransport(handler))
    return limiter, http


def test_every_request_waits_for_the_bucket_first(redis_client, key_prefix):
    """At 20 requests/s with a burst of 1, the 2nd and 3rd requests reach the network only
    after the limiter waited for a token."""
    events: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        events.append("sent")
        return httpx.Response(200, json={})

    def sleep(seconds: float) -> None:
        events.append("wait")
        time.sleep(seconds)

    _, http = _limited(redis_client, key_prefix, handler, rate=20, burst=1, sleep=sleep)
    with http:
        for _ in range(3):
            http.get("/students")
    assert events.count("sent") == 3
    assert events[0] == "sent"
    assert events[1] == "wait"
    assert events[-1] == "sent"
    assert "wait" in events[events.index("sent", 1) + 1:]


def test_a_429_pauses_the_tenant_for_its_retry_after(redis_client, key_prefix):
    """A 429 with Retry-After 3 sets the tenant's pause in Redis for about 3 s, and the
    responses are counted by class for the sync context to flush."""
    answers = iter([httpx.Response(200, json={}),
                    httpx.Response(429, headers={"Retry-After": "3"})])
    limiter, http = _limited(redis_client, key_prefix, lambda r: next(answers))
    with http:
        http.get("/students")
        http.get("/students")
    assert 2500 < redis_client.pttl(f"{RedisKeys(key_prefix).pause}t") <= 3000
    assert limiter.unflushed == {"api_2xx": 1, "api_4xx": 1, "api_429": 1}


def test_a_pause_longer_than_max_wait_raises_paused_without_sending(redis_client, key_prefix):
    """While the tenant is paused for 60 s (max_wait 20), a call raises Paused: transient,
    a RateLimited with the pause left as retry_after and the held request's method and path,
    no HTTP status; nothing reaches the network."""
    sent: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})

    _, http = _limited(redis_client, key_prefix, handler)
    redis_client.set(f"{RedisKeys(key_prefix).pause}t", "1", px=60_000)
    c = DokStampClient(http, tenant="t", tokens=TokenManager(
        http, PasswordLogin("a@b.c", "pw"), MemoryTokenStore()))
    with pytest.raises(errors.Paused) as info:
        c.students.page()
    exc = info.value
    assert isinstance(exc, errors.RateLimited)
    assert isinstance(exc, errors.TransientError)
    assert not isinstance(exc, errors.HTTPStatusError)
    assert 55 < exc.retry_after <= 60
    assert (exc.method, exc.path) == ("POST", "/auth/login")  # the first request it held
    assert sent == []
    http.close()


def test_client_from_settings_paces_through_the_limiter(sandbox, redis_client, key_prefix):
    """client_from_settings(limiter=...) puts the limiter under the client: a scripted 429
    from the sandbox pauses the tenant, so the next call waits out the Retry-After."""
    waits: list[float] = []
    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    limiter = RateLimiter(redis_client, MAIN.tenant, 1000, keys=RedisKeys(key_prefix), sleep=sleep)
    settings = load_settings(dokstamp_api_url=sandbox.url, dokstamp_tenant=MAIN.tenant,
                             dokstamp_email=MAIN.email, dokstamp_password=MAIN.password,
                             dokstamp_client_id=None, dokstamp_client_secret=None)
    c = client_from_settings(settings, limiter=limiter)
    c.students.page()
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=429, retry_after=1)]))
    with pytest.raises(errors.TooManyRequests):
        c.students.page()
    c.students.page()
    assert 0.9 <= sum(waits) <= 1.1
    c.http.close()


def test_a_given_http_client_and_a_limiter_are_refused_together(sandbox):
    """client_from_settings cannot put a limiter under an httpx.Client it did not build."""
    settings = load_settings(dokstamp_api_url=sandbox.url, dokstamp_tenant=MAIN.tenant,
                             dokstamp_email=MAIN.email, dokstamp_password=MAIN.password)
    with httpx.Client() as http, pytest.raises(TypeError):
        client_from_settings(settings, http=http, limiter=object())  # type: ignore[arg-type]
