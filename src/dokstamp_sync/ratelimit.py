"""One request-rate ceiling for all worker processes on all machines, kept in Redis.

A token bucket per tenant (``rate`` tokens/s, ``burst`` at most), updated atomically by a Lua
script that reads Redis's own clock, so machines with skewed clocks still share one pace. A 429
from DokStamp pauses every process for that tenant (:meth:`RateLimiter.pause`) for the
``Retry-After`` it carried, not just the task that received it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable

import httpx
import redis

from dokstamp_sync.dokstamp.errors import RateLimited, parse_retry_after

# KEYS[1] bucket, KEYS[2] pause, ARGV: rate (tokens/s), burst. Returns ms to wait (0: a token
# was taken); negative: the tenant is paused (after a 429) for that many ms.
_TAKE = """
local paused = redis.call('PTTL', KEYS[2])
if paused > 0 then return -paused end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rate = tonumber(ARGV[1]) / 1000
local burst = tonumber(ARGV[2])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(state[1]) or burst
local stamp = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - stamp) * rate)
local wait = 0
if tokens >= 1 then
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tokens, 'stamp', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst / rate) + 1000)
return wait
"""


class RateLimiter:
    """Blocks until the shared bucket grants a request (see the module docstring)."""

    def __init__(self, client: redis.Redis, tenant: str, rate: float, *,
                 burst: float | None = None, prefix: str = "dokstamp:",
                 sleep: Callable[[float], None] = time.sleep, max_wait: float = 20.0) -> None:
        self._redis = client
        self._bucket = f"{prefix}ratelimit:{tenant}"
        self._pause = f"{prefix}pause:{tenant}"
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._take = client.register_script(_TAKE)
        self._sleep = sleep
        self.max_wait = max_wait
        self.waited = 0.0  # seconds this process spent waiting (for metrics and tests)
        self.unflushed: Counter[str] = Counter()  # responses, flushed by the sync context

    def acquire(self) -> None:
        """Wait for a token. A tenant pause longer than ``max_wait`` raises
        :class:`RateLimited` instead, so the caller parks its event rather than sleep with its
        locks held."""
        while True:
            wait_ms = int(self._take(keys=[self._bucket, self._pause],
                                     args=[self.rate, self.burst]))
            if wait_ms == 0:
                return
            if wait_ms < 0 and -wait_ms / 1000 > self.max_wait:
                raise RateLimited("paused after a 429 from DokStamp",
                                  retry_after=-wait_ms / 1000, status=429, method="-", path="-")
            self._wait(abs(wait_ms) / 1000)

    def count_response(self, status: int) -> None:
        self.unflushed[f"api_{status // 100}xx"] += 1
        if status == 429:
            self.unflushed["api_429"] += 1

    def pause(self, seconds: float) -> None:
        """Hold every process's requests for ``seconds`` (a 429's Retry-After)."""
        ms = max(1, int(seconds * 1000))
        # Never shorten a longer pause another process already set.
        current = self._redis.pttl(self._pause)
        if not isinstance(current, int) or current < ms:
            self._redis.set(self._pause, "1", px=ms)

    def _wait(self, seconds: float) -> None:
        self.waited += seconds
        self._sleep(seconds)


def install(http: httpx.Client, limiter: RateLimiter) -> None:
    """Make every request of ``http`` wait for the shared bucket, and every 429 it receives
    pause all processes for its ``Retry-After``."""

    def before(_request: httpx.Request) -> None:
        limiter.acquire()

    def after(response: httpx.Response) -> None:
        limiter.count_response(response.status_code)  # flushed to Redis by the sync context
        if response.status_code == 429:
            seconds = parse_retry_after(response.headers.get("Retry-After"))
            limiter.pause(seconds if seconds is not None else 1.0)

    http.event_hooks["request"].append(before)
    http.event_hooks["response"].append(after)
