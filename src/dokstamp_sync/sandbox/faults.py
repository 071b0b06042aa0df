"""Fault injection and request statistics for the sandbox.

:class:`Faults` is set by command-line flags or ``PUT /_sandbox/faults``:

* ``rate_limit`` (requests/s per tenant) and ``burst``: a token bucket; an empty bucket answers
  429 with ``Retry-After`` (whole seconds, at least 1, as HTTP requires);
* ``error_rate``: the share of requests answered 5xx; ``lost_response_share`` of those fail
  AFTER the request was applied (the entity exists, the client saw a 500); ``error_writes``:
  only writes (not GET) are answered so; ``error_html``: the 5xx is an HTML page, as a proxy in
  front of the API answers (502 Bad Gateway and the like);
* ``latency_ms``: added to every request; ``slow_rate``/``slow_seconds``: some requests hang
  past a client's timeout (the write, if any, is applied after the hang);
* ``script``: deterministic one-shot faults for tests, e.g.
  ``{"method": "POST", "route": "/students", "status": 500, "after_commit": true}``;
  each matches the next request of that method and route, then is spent. A scripted fault may
  also be slow (``delay_s``: the request is applied only after the delay, so a client that gave
  up sees nothing yet), arm more faults once spent (``then``), carry ``retry_after`` (sent as
  ``Retry-After`` with any status, 429 or 5xx), or replace a success answer's body (``body``,
  see :class:`ScriptedFault`), or answer its error at once and apply the request later
  (``land_after_s``: a gateway's 504 while the API still works on it);
* unkind but documented-compatible behaviours: ``reorder_uploads`` (``POST /files`` answers
  its records in reverse order), ``page_cap`` (list pages hold at most N rows while
  ``meta.per_page`` echoes the asked size), ``conflict_409`` (a broken uniqueness rule is a 409,
  not a 422).

An :class:`Outage` (``POST /_sandbox/outage``) makes every API request, auth included, answer
503 for a while; it is state of the injector, kept across :meth:`FaultInjector.configure`.

:class:`Stats` counts requests per ``METHOD /route/{template}``, per status, 429s, injected
5xx, lost responses, malformed bodies and requests answered by an outage, for
``GET /_sandbox/stats``.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

# A scripted malformed success answer: "empty" (same status, no body), "wrong_shape" (``data``
# a list where an object belongs or the reverse), "html" (a 200 HTML page instead of the API),
# "huge" (the real answer padded past ``HUGE_BODY_BYTES``), "deep" (the real answer with a
# value nested ``DEEP_BODY_LEVELS`` levels deep: a parser that recurses per level fails).
MalformedBody = Literal["empty", "wrong_shape", "html", "huge", "deep"]
MALFORMED_BODIES: tuple[str, ...] = ("empty", "wrong_shape", "html", "huge", "deep")
HUGE_BODY_BYTES = 12 * 1024 * 1024
DEEP_BODY_LEVELS = 100_000


@dataclass
class ScriptedFault:
    """One deterministic fault for the next request matching ``method`` and ``route``.

    ``status`` >= 400 answers that error (after applying the request when ``after_commit``);
    below 400 it answers normally. ``retry_after`` is sent as ``Retry-After`` whatever the
    error status. ``delay_s`` holds the request that long BEFORE applying it (a slow write: it
    lands after a client's timeout). ``body`` (``status`` is then ignored) replaces a success
    answer: ``"empty"``, ``"wrong_shape"``, ``"huge"`` and ``"deep"`` apply the request and
    keep its status,
    ``"html"`` answers a 200 HTML page without reaching the API (as a proxy or portal would).
    """

    method: str
    route: str
    status: int = 500
    after_commit: bool = False
    retry_after: int | None = None
    times: int = 1
    delay_s: float = 0.0
    body: MalformedBody | None = None
    # answer ``status`` (after ``delay_s``), and apply the request this many seconds after
    # that: a gateway that gave up waiting (a 504, or a slow 502/503) while the API still works
    land_after_s: float = 0.0
    # faults armed once this one is spent: ``then=[{"method": "GET", "route": "/students",
    # "status": 503}]`` fails the search a client makes right after a lost create
    then: list[ScriptedFault] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.then = [t if isinstance(t, ScriptedFault) else ScriptedFault(**t)
                     for t in self.then]
        if self.body is not None and self.body not in MALFORMED_BODIES:
            raise ValueError(f"body must be one of {', '.join(MALFORMED_BODIES)}")


@dataclass
class Faults:
    """The current fault configuration (see the module docstring)."""

    rate_limit: float | None = None
    burst: float | None = None
    error_rate: float = 0.0
    lost_response_share: float = 0.5
    error_writes: bool = False
    error_html: bool = False
    latency_ms: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.0
    seed: int | None = None
    script: list[ScriptedFault] = field(default_factory=list)
    reorder_uploads: bool = False
    page_cap: int | None = None
    conflict_409: bool = False

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Faults:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        known["script"] = [ScriptedFault(**s) for s in known.get("script") or []]
        faults = cls(**known)
        for name in ("error_rate", "lost_response_share", "slow_rate"):
            if not 0.0 <= getattr(faults, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if faults.rate_limit is not None and faults.rate_limit <= 0:
            raise ValueError("rate_limit must be positive")
        if faults.page_cap is not None and faults.page_cap < 1:
            raise ValueError("page_cap must be at least 1")
        return faults

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Decision:
    """What to do to one request."""

    status: int | None = None  # an error status to answer with, or None
    after_commit: bool = False  # apply the request first, then answer ``status``
    retry_after: int | None = None
    delay_s: float = 0.0
    body: MalformedBody | None = None  # replace a success answer's body
    html: bool = False  # an error answered as a proxy's HTML page, not the API's JSON
    land_after_s: float = 0.0  # with ``status``: answered now, applied this much later


@dataclass
class Outage:
    """Every API request answers 503 until ``until`` (``time.monotonic()``; inf: until ended).

    ``requests`` counts the requests it answered, also after it has ended (the last outage).
    """

    until: float
    retry_after: int | None = None
    requests: int = 0

    def active(self) -> bool:
        return time.monotonic() < self.until

    def to_json(self) -> dict[str, Any]:
        remaining = self.until - time.monotonic()
        return {"active": remaining > 0, "requests": self.requests,
                "retry_after": self.retry_after,
                "remaining_s": None if math.isinf(remaining) else max(0.0, round(remaining, 3))}


class TokenBucket:
    """``rate`` tokens/s up to ``capacity``; ``take`` says how long until one is available."""

    def __init__(self, rate: float, capacity: float) -> None:
        self.rate, self.capacity = rate, capacity
        self.tokens, self.stamp = capacity, time.monotonic()

    def take(self) -> float:
        """Take a token: 0.0 on success, else the seconds until one will be there."""
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class FaultInjector:
    """Decides each request's fate from the current :class:`Faults`."""

    def __init__(self, faults: Faults | None = None) -> None:
        self._lock = threading.Lock()
        self.outage: Outage | None = None
        self.configure(faults or Faults())

    def start_outage(self, seconds: float | None = None,
                     retry_after: int | None = None) -> Outage:
        """Answer every API request 503 for ``seconds`` (None: until :meth:`end_outage`)."""
        until = math.inf if seconds is None else time.monotonic() + seconds
        with self._lock:
            self.outage = Outage(until, retry_after)
            return self.outage

    def end_outage(self) -> None:
        with self._lock:
            if self.outage is not None:
                self.outage.until = 0.0

    def in_outage(self) -> Outage | None:
        """The outage answering this request (and counts it), or None."""
        with self._lock:
            if self.outage is None or not self.outage.active():
                return None
            self.outage.requests += 1
            return self.outage

    def configure(self, faults: Faults) -> None:
        with self._lock:
            self.faults = faults
            self._random = random.Random(faults.seed)
            self._buckets: dict[str, TokenBucket] = {}

    def decide(self, method: str, route: str, tenant: str) -> Decision:
        with self._lock:
            f = self.faults
            for scripted in f.script:
                if scripted.method == method and scripted.route == route and scripted.times > 0:
                    scripted.times -= 1
                    if scripted.times == 0:
                        f.script.remove(scripted)
                        f.script[0:0] = scripted.then
                    error = scripted.status >= 400 and scripted.body is None
                    return Decision(scripted.status if error else None,
                                    scripted.after_commit, scripted.retry_after,
                                    scripted.delay_s, scripted.body,
                                    land_after_s=scripted.land_after_s)
            if f.rate_limit:
                bucket = self._buckets.get(tenant)
                if bucket is None:
                    capacity = f.burst or max(1.0, f.rate_limit)
                    bucket = self._buckets[tenant] = TokenBucket(f.rate_limit, capacity)
                wait = bucket.take()
                if wait > 0:
                    return Decision(429, retry_after=max(1, math.ceil(wait)))
            delay = f.slow_seconds if f.slow_rate and self._random.random() < f.slow_rate \
                else 0.0
            if f.error_rate and (method != "GET" or not f.error_writes) \
                    and self._random.random() < f.error_rate:
                lost = self._random.random() < f.lost_response_share
                status = self._random.choice((500, 502, 503))
                return Decision(status, after_commit=lost, delay_s=delay, html=f.error_html)
            return Decision(delay_s=delay)


class Stats:
    """Request counters (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.by_route: Counter[str] = Counter()
            self.by_status: Counter[int] = Counter()
            self.http_429 = 0
            self.injected_5xx = 0
            self.lost_responses = 0
            self.malformed_bodies = 0
            self.outage_requests = 0
            self.started = time.time()

    def record(self, key: str, status: int, *, injected: bool = False,
               lost: bool = False, malformed: bool = False, outage: bool = False) -> None:
        """Count one answered request. ``injected``: a 5xx came from fault injection;
        ``lost``: it was applied but answered with an error; ``malformed``: its success body
        was replaced; ``outage``: an outage answered it (not counted as injected)."""
        with self._lock:
            self.by_route[key] += 1
            self.by_status[status] += 1
            if status == 429:
                self.http_429 += 1
            if injected and status >= 500:
                self.injected_5xx += 1
            if lost:
                self.lost_responses += 1
            if malformed:
                self.malformed_bodies += 1
            if outage:
                self.outage_requests += 1

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": sum(self.by_route.values()), "by_route": dict(self.by_route),
                    "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                    "http_429": self.http_429, "injected_5xx": self.injected_5xx,
                    "lost_responses": self.lost_responses,
                    "malformed_bodies": self.malformed_bodies,
                    "outage_requests": self.outage_requests,
                    "since_s": round(time.time() - self.started, 3)}
