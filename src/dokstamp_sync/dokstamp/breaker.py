"""A circuit breaker per tenant, shared by every process of the fleet through Redis.

After ``threshold`` consecutive failures (a 5xx, a timeout, a connection error) the breaker
opens: for ``interval`` seconds no process sends anything to DokStamp, and each request raises
:class:`~.errors.CircuitOpen` at once (a :class:`~.errors.TransientError` the engine treats as a
wait, not as a failed try). Then one request, fleet-wide, goes through as a probe (half-open):
its success closes the breaker for everyone, its failure opens it for another ``interval``. So a
40 s outage costs the fleet about ``threshold`` requests plus one every ``interval`` (plus those
already in flight when it opened), and sending resumes within ``interval`` of the API answering.

A write is never the probe: when a POST/PUT/PATCH/DELETE is due to probe, a GET of the same URL
(same headers, no body) goes first, and the write follows only once that GET got an answer that
is not a failure. A create that failed during the outage must wait twice the HTTP timeout
before it is searched for (it may still land), so probing with writes would keep their events
waiting long after the API is back; a GET costs nothing to repeat.

The state is one Redis hash per tenant, changed only by two Lua scripts that read Redis's own
clock (machines with skewed clocks agree). pybreaker's Redis storage keeps a counter and a state
but lets every process probe at once when the timeout passes; the single fleet-wide probe is the
point here, hence these few lines.

:class:`BreakerTransport` puts the breaker under an ``httpx.Client`` (outside the rate limiter:
an open breaker spends no token). Build it with :func:`~.client.build_http_client`'s ``breaker``.
"""

from __future__ import annotations

import httpx
import redis

from dokstamp_sync.dokstamp.errors import CircuitOpen
from dokstamp_sync.dokstamp.ratelimit import UNLESS_BREAKER, BreakerNotClean
from dokstamp_sync.redis_keys import RedisKeys

# KEYS[1] the breaker; ARGV[1] how long a probe may take (ms), ARGV[2] interval (ms).
# Returns 0: closed and clean (no failure counted), send; 2: closed, send (a success resets the
# failures counted); 1: send as the probe; negative: open, wait that many ms.
_ALLOW = """
local state = redis.call('HMGET', KEYS[1], 'open_until', 'probe', 'failures')
local open_until = tonumber(state[1]) or 0
if open_until == 0 then
  if state[3] then return 2 end
  return 0
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < open_until then return -(open_until - now) end
local probe = tonumber(state[2]) or 0
if probe > now then return -math.min(probe - now, tonumber(ARGV[2])) end
redis.call('HSET', KEYS[1], 'probe', now + tonumber(ARGV[1]))
return 1
"""

# KEYS[1] the breaker; ARGV: outcome ("ok", "failed", "none": the probe was not sent),
# threshold, interval (ms), ttl (ms). Returns 1 when the breaker is open afterwards.
_RESULT = """
if ARGV[1] == 'ok' then redis.call('DEL', KEYS[1]) return 0 end
if ARGV[1] == 'none' then
  if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'probe', 0) end
  return 0
end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until')) or 0
local opened = 0
if failures >= tonumber(ARGV[2]) or open_until > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  redis.call('HSET', KEYS[1], 'open_until', now + tonumber(ARGV[3]), 'probe', 0)
  opened = 1
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[4]))
return opened
"""

# KEYS[1] the breaker. Returns -1: closed; else ms until the next probe may go out.
_PEEK = """
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until')) or 0
if open_until == 0 then return -1 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return math.max(0, open_until - now)
"""


class CircuitBreaker:
    """The fleet's breaker for one tenant (see the module docstring)."""

    def __init__(self, client: redis.Redis, tenant: str, *, threshold: int = 5,
                 interval: float = 3.0, probe_timeout: float = 35.0, keys: RedisKeys = RedisKeys(),
                 ttl: float = 600.0) -> None:
        self.key = f"{keys.breaker}{tenant}"
        self.threshold = threshold
        self.interval = interval
        self.probe_timeout = probe_timeout
        self.ttl = ttl
        self._allow = client.register_script(_ALLOW)
        self._result = client.register_script(_RESULT)
        self._peek = client.register_script(_PEEK)

    def allow(self, request: httpx.Request | None = None) -> bool:
        """May a request go out? True: yes, as the fleet's one probe; False: yes, closed.
        Raises :class:`CircuitOpen` (naming ``request``, which is not sent) while open."""
        return self.admit(request) == PROBE

    def admit(self, request: httpx.Request | None = None) -> int:
        """:meth:`allow`, telling apart :data:`CLEAN` (closed, no failure counted: a success
        has nothing to reset, so it need not be recorded), :data:`CLOSED` and :data:`PROBE`."""
        answer = int(self._allow(keys=[self.key], args=[int(self.probe_timeout * 1000),
                                                         int(self.interval * 1000)]))
        if answer < 0:
            raise CircuitOpen("DokStamp is failing: the circuit breaker holds requests",
                              retry_after=-answer / 1000,
                              method=request.method if request else "",
                              path=request.url.path if request else "")
        return answer

    def record(self, outcome: str) -> bool:
        """``ok``, ``failed`` or ``none`` (a probe that was not sent); True when open after."""
        return bool(self._result(keys=[self.key], args=[
            outcome, self.threshold, int(self.interval * 1000), int(self.ttl * 1000)]))

    def open_for(self) -> float | None:
        """None when closed; else seconds until the next probe may go out (0: now)."""
        return None if (ms := int(self._peek(keys=[self.key]))) < 0 else ms / 1000


SAFE = ("GET", "HEAD", "OPTIONS")  # requests a probe may be: they change nothing
CLEAN, PROBE, CLOSED = 0, 1, 2  # what :meth:`CircuitBreaker.admit` answers when not open


def failed(status: int) -> bool:
    """Statuses that count as the API failing (not our request's fault)."""
    return status >= 500


class BreakerTransport(httpx.BaseTransport):
    """Wraps the transport to DokStamp: nothing is sent while the breaker is open, every
    answer and transport failure is recorded (see :class:`CircuitBreaker`)."""

    def __init__(self, transport: httpx.BaseTransport, breaker: CircuitBreaker, *,
                 merged: bool = False) -> None:
        self.transport = transport
        self.breaker = breaker
        # ``transport`` is a RateLimitedTransport: while the breaker is empty (the common
        # case), its check rides on the limiter's round trip (see ``UNLESS_BREAKER``)
        self.merged = merged

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if self.merged:  # the limiter checks that the breaker is empty as it takes the token
            request.extensions[UNLESS_BREAKER] = self.breaker.key
            try:
                return self._send(request, CLEAN)
            except BreakerNotClean:
                pass  # the breaker holds something (no token was taken): ask it
            finally:
                request.extensions.pop(UNLESS_BREAKER, None)
        return self._send(request, self.breaker.admit(request))

    def _send(self, request: httpx.Request, gate: int) -> httpx.Response:
        probe = gate == PROBE
        if probe and request.method not in SAFE:
            self._probe_with_a_read(request)
            probe = False  # closed now: the write goes out as an ordinary request
        try:
            response = self.transport.handle_request(request)
        except httpx.TransportError:
            self.breaker.record("failed")
            raise
        except BreakerNotClean:
            raise  # not sent, no token taken, nothing to record: asked again at once
        except BaseException:  # not sent (the limiter's Paused...): free the probe
            if probe:
                self.breaker.record("none")
            raise
        if failed(response.status_code):
            self.breaker.record("failed")
        elif gate != CLEAN:  # a success resets what was counted; with nothing counted, one
            self.breaker.record("ok")  # round trip less per request (the common case). So a
            # success that began clean does not reset failures counted while it was out: the
            # breaker may then open on failures not quite consecutive, never stay shut longer
        return response

    def _probe_with_a_read(self, write: httpx.Request) -> None:
        """Probe with a GET of the write's URL; raise :class:`CircuitOpen` (the write unsent)
        when DokStamp still fails."""
        headers = [(k, v) for k, v in write.headers.multi_items()
                   if k.lower() not in ("content-type", "content-length", "transfer-encoding")]
        read = httpx.Request("GET", write.url, headers=headers, extensions=write.extensions)
        try:
            response = self.transport.handle_request(read)
            response.read()
            response.close()
        except httpx.TransportError:
            self.breaker.record("failed")
            raise CircuitOpen("DokStamp is failing: the breaker's probe got no answer",
                              retry_after=self.breaker.interval, method=write.method,
                              path=write.url.path) from None
        except BaseException:
            self.breaker.record("none")
            raise
        if failed(response.status_code):
            self.breaker.record("failed")
            raise CircuitOpen(f"DokStamp is failing: the breaker's probe got "
                              f"{response.status_code}", retry_after=self.breaker.interval,
                              method=write.method, path=write.url.path)
        self.breaker.record("ok")

    def close(self) -> None:
        self.transport.close()
