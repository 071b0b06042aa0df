"""Fault injection and request statistics for the sandbox.

:class:`Faults` is set by command-line flags or ``PUT /_sandbox/faults``:

* ``rate_limit`` (requests/s per tenant) and ``burst``: a token bucket; an empty bucket answers
  429 with ``Retry-After`` (whole seconds, at least 1, as HTTP requires);
* ``error_rate``: the share of requests answered 5xx; ``lost_response_share`` of those fail
  AFTER the request was applied (the entity exists, the client saw a 500);
* ``latency_ms``: added to every request; ``slow_rate``/``slow_seconds``: some requests hang
  past a client's timeout (the write, if any, is applied after the hang);
* ``script``: deterministic one-shot faults for tests, e.g.
  ``{"method": "POST", "route": "/students", "status": 500, "after_commit": true}``;
  each matches the next request of that method and route, then is spent.

:class:`Stats` counts requests per ``METHOD /route/{template}``, per status, 429s and injected
5xx, for ``GET /_sandbox/stats``.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class ScriptedFault:
    """One deterministic fault for the next request matching ``method`` and ``route``."""

    method: str
    route: str
    status: int = 500
    after_commit: bool = False
    retry_after: int | None = None  # for a scripted 429
    times: int = 1
    delay_s: float = 0.0  # a slow answer (e.g. past the client's timeout)


@dataclass
class Faults:
    """The current fault configuration (see the module docstring)."""

    rate_limit: float | None = None
    burst: float | None = None
    error_rate: float = 0.0
    lost_response_share: float = 0.5
    latency_ms: float = 0.0
    slow_rate: float = 0.0
    slow_seconds: float = 0.0
    seed: int | None = None
    script: list[ScriptedFault] = field(default_factory=list)

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
        self.configure(faults or Faults())

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
                    return Decision(scripted.status if scripted.status >= 400 else None,
                                    scripted.after_commit, scripted.retry_after,
                                    scripted.delay_s)
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
            if f.error_rate and self._random.random() < f.error_rate:
                lost = self._random.random() < f.lost_response_share
                status = self._random.choice((500, 502, 503))
                return Decision(status, after_commit=lost, delay_s=delay)
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
            self.started = time.time()

    def record(self, key: str, status: int, *, injected: bool = False,
               lost: bool = False) -> None:
        with self._lock:
            self.by_route[key] += 1
            self.by_status[status] += 1
            if status == 429:
                self.http_429 += 1
            if injected and status >= 500:
                self.injected_5xx += 1
            if lost:
                self.lost_responses += 1

    def to_json(self) -> dict[str, Any]:
        with self._lock:
            return {"requests": sum(self.by_route.values()), "by_route": dict(self.by_route),
                    "by_status": {str(k): v for k, v in sorted(self.by_status.items())},
                    "http_429": self.http_429, "injected_5xx": self.injected_5xx,
                    "lost_responses": self.lost_responses,
                    "since_s": round(time.time() - self.started, 3)}
