"""One request-rate ceiling for all worker processes on all machines, kept in Redis.

A token bucket per tenant (``rate`` tokens/s, ``burst`` at most), updated atomically by a Lua
script that reads Redis's own clock, so machines with skewed clocks still share one pace. A 429
from DokStamp pauses every process for that tenant (:meth:`RateLimiter.pause`) for the
``Retry-After`` it carried, not just the task that received it, but never longer than
``max_pause``: a server's ``Retry-After`` beyond it is read as ``max_pause`` everywhere.

:class:`RateLimitedTransport` puts the limiter under an ``httpx.Client``, as httpx's own seam
(``BaseTransport.handle_request``): every request the client sends (token requests and 401
replays included) first takes a token, and every response is counted. Build it with
:func:`~.client.build_http_client`'s ``limiter``.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import redis
from redis.commands.core import Script

from dokstamp_sync.dokstamp.errors import Paused, parse_retry_after
from dokstamp_sync.redis_keys import RedisKeys

# KEYS[1] bucket, KEYS[2] pause, KEYS[3] (optional, may be '') the circuit breaker's hash;
# ARGV: rate (tokens/s), burst. Returns ms to wait (0: a token was taken); negative: the tenant
# is paused (after a 429) for that many ms; 'breaker': the breaker holds something (failures
# counted, or open), no token taken: ask it first. The breaker is usually empty, so its check
# and the token cost one round trip together.
_BUCKET = """
if KEYS[3] and KEYS[3] ~= '' and redis.call('EXISTS', KEYS[3]) == 1 then return 'breaker' end
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
"""
_TAKE = _BUCKET + "return wait\n"
# With a rider (see :class:`Rider`): KEYS[4..] and ARGV[3..] are its own; once a token is
# taken, returns {0, the rider's answer}.
_RIDING_TAIL = """
if wait > 0 then return wait end
local keys, argv = {}, {}
for i = 4, #KEYS do keys[#keys + 1] = KEYS[i] end
for i = 3, #ARGV do argv[#argv + 1] = ARGV[i] end
return {0, rider(keys, argv)}
"""


@dataclass(frozen=True)
class Rider:
    """A check that rides on the round trip that takes a write's token: the sync walk's lock
    check (see :mod:`.fence`), which would otherwise cost a round trip of its own right after.
    ``lua`` is the body of a Lua function of its own ``KEYS`` and ``ARGV`` (``keys``,
    ``args``); the token script runs it only once it takes a token, and ``settle`` is given its
    answer. What ``settle`` raises stops the request unsent (its token spent). ``before`` is
    called right before each try of the script is sent."""

    lua: str
    keys: list[str]
    args: list[Any]
    settle: Callable[[Any], None]
    before: Callable[[], None] = lambda: None


Ride = Callable[[httpx.Request], "Rider | None"]  # the rider for a request, if any
# A request extension: the fence's check rode on the limiter's round trip (it passed).
FENCED = "dokstamp.fenced"


class RateLimiter:
    """Blocks until the shared bucket grants a request (see the module docstring)."""

    def __init__(self, client: redis.Redis, tenant: str, rate: float, *,
                 burst: float | None = None, keys: RedisKeys = RedisKeys(),
                 sleep: Callable[[float], None] = time.sleep, max_wait: float = 20.0,
                 max_pause: float = 300.0) -> None:
        self._redis = client
        self._bucket = f"{keys.rate_limit}{tenant}"  # a namespace keeps tests' keys apart
        self._pause = f"{keys.pause}{tenant}"
        self.rate = rate
        self.burst = burst if burst is not None else max(1.0, rate / 10)
        self._take = client.register_script(_TAKE)
        self._riding: dict[str, Script] = {}  # a rider's Lua -> the token script with it
        self._sleep = sleep
        self.max_wait = max_wait
        self.max_pause = max_pause  # the longest Retry-After obeyed (fleet pause, parks)
        self.unflushed: Counter[str] = Counter()  # responses, flushed by the sync context

    def acquire(self, request: httpx.Request | None = None, *,
                unless_breaker: str | None = None, rider: Rider | None = None) -> bool:
        """Wait for a token; True once taken. A tenant pause longer than ``max_wait`` raises
        :class:`Paused` (naming ``request``, which is not sent) instead, so the caller parks its
        event rather than sleep with its locks held. With ``unless_breaker`` (a breaker's
        key): False, no token taken, when that breaker holds anything. With ``rider``: run in
        the round trip that takes the token, and settled."""
        keys = [self._bucket, self._pause, unless_breaker or ""]
        args: list[Any] = [self.rate, self.burst]
        script = self._take
        if rider is not None:
            keys, args = keys + rider.keys, args + rider.args
            script = self._riding.get(rider.lua) or self._riding.setdefault(
                rider.lua, self._redis.register_script(
                    "local function rider(KEYS, ARGV)\n" + rider.lua + "\nend\n" + _BUCKET
                    + _RIDING_TAIL))
        while True:
            if rider is not None:
                rider.before()
            answer = script(keys=keys, args=args)
            if answer in (b"breaker", "breaker"):
                return False
            if isinstance(answer, list):  # a token, and the rider's answer
                assert rider is not None
                rider.settle(answer[1])
                return True
            wait_ms = int(answer)
            if wait_ms == 0:
                return True
            if wait_ms < 0 and -wait_ms / 1000 > self.max_wait:
                raise Paused("paused after a 429 from DokStamp", retry_after=-wait_ms / 1000,
                             method=request.method if request else "",
                             path=request.url.path if request else "")
            self._sleep(abs(wait_ms) / 1000)

    def count_response(self, status: int) -> None:
        """Count a response by status class (and 429s apart), for the sync context to flush."""
        self.unflushed[f"api_{status // 100}xx"] += 1
        if status == 429:
            self.unflushed["api_429"] += 1

    def pause(self, seconds: float) -> None:
        """Hold every process's requests for ``seconds`` (a 429's Retry-After), at most
        ``max_pause``."""
        ms = max(1, int(min(seconds, self.max_pause) * 1000))
        # Never shorten a longer pause another process already set.
        current = self._redis.pttl(self._pause)
        if not isinstance(current, int) or current < ms:
            self._redis.set(self._pause, "1", px=ms)


# A request extension set by the breaker's transport (above this one): the breaker's key, whose
# emptiness the limiter checks in the same round trip as it takes the token.
UNLESS_BREAKER = "dokstamp.unless_breaker"


class BreakerNotClean(Exception):  # a signal between two transports, not an error
    """Raised by :class:`RateLimitedTransport`, no token taken, when asked (``UNLESS_BREAKER``)
    and the breaker holds anything: the breaker's transport then asks the breaker itself."""


class RateLimitedTransport(httpx.BaseTransport):
    """Wraps the transport that talks to DokStamp: every request waits for the shared bucket
    (or raises :class:`Paused`), every response is counted, and a 429 pauses every process of
    the tenant for its ``Retry-After`` (1 s when it sent none).

    A ``Retry-After`` (on any answer: a 429, a 503) longer than the limiter's ``max_pause`` is
    rewritten to ``max_pause`` on the response itself, so the error the client raises, and the
    park the engine decides from it, ask for no longer wait than the fleet's pause."""

    def __init__(self, transport: httpx.BaseTransport, limiter: RateLimiter,
                 ride: Ride | None = None) -> None:
        self.transport = transport
        self.limiter = limiter
        self.ride = ride  # the fence's check, to run in the token's round trip (a write's)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        breaker = request.extensions.pop(UNLESS_BREAKER, None)
        rider = self.ride(request) if self.ride is not None else None
        if not self.limiter.acquire(request, unless_breaker=breaker, rider=rider):
            raise BreakerNotClean  # the breaker transport above asks the breaker, then again
        if rider is not None:  # checked as the token was taken: nothing waits between
            request.extensions[FENCED] = True
        response = self.transport.handle_request(request)
        self.limiter.count_response(response.status_code)
        seconds = parse_retry_after(response.headers.get("Retry-After"))
        if seconds is not None and seconds > self.limiter.max_pause:
            response.headers["Retry-After"] = str(int(self.limiter.max_pause))
            seconds = self.limiter.max_pause
        if response.status_code == 429:
            self.limiter.pause(seconds if seconds is not None else 1.0)
        return response

    def close(self) -> None:
        self.transport.close()
