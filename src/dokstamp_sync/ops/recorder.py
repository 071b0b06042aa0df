"""Per-replica counters: what the processes of one worker replica did, so that Prometheus's
``sum()`` over replicas adds up.

Each prefork child counts locally (API responses by route, method and status, their latency
in a histogram, event outcomes, retries, the engine's operations) and adds them to its
replica's Redis hash at the end of each task (:meth:`Recorder.flush`, one round trip). The
replica's metrics endpoint exports that hash only; a restarted replica starts a new hash
(Prometheus sees a counter reset, which ``rate()`` handles). Hashes of replicas gone for a day
expire.

The replica is named once in the worker's main process before the pool forks
(:func:`name_replica`); the children inherit the name.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import suppress

import httpx
import redis

from dokstamp_sync.redis_keys import RedisKeys

BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)  # s
TTL = 86400  # s a replica's hash outlives its last flush or scrape
SEP = "|"  # between a field's parts: kind|label|label...
_ID = re.compile(r"^(?:[0-9a-fA-F-]{16,}|\d+)$")  # a UUID or a number: an entity's id

_replica: str | None = None


def name_replica(name: str | None = None) -> str:
    """Name this process's replica (the worker's main process, before the pool forks)."""
    global _replica
    _replica = name or f"{socket.gethostname()}-{os.getpid()}"
    return _replica


def replica() -> str:
    """The replica this process belongs to (named on first use when nobody named it)."""
    return _replica or name_replica()


def route(path: str) -> str:
    """A request path with ids replaced (``/api/students/{id}``): bounded label values."""
    return "/".join("{id}" if _ID.match(part) else part for part in path.split("/"))


class Recorder:
    """This process's counts, not yet in Redis."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.sums: dict[str, float] = {}
        self._guard = threading.Lock()  # the lock renewer and the task share the process

    def count(self, kind: str, *labels: str, n: int = 1) -> None:
        with self._guard:
            self.counts[SEP.join((kind, *labels))] += n

    def counters(self, counts: Mapping[str, int]) -> None:
        """Take the sync context's counters (``events_synced``, ``retries``, ``creates``...)."""
        for name, n in counts.items():
            if name.startswith("events_"):
                self.count("outcome", name.removeprefix("events_"), n=n)
            elif not name.startswith("api_"):  # responses are counted by the transport
                self.count("op", name, n=n)

    def response(self, method: str, path: str, status: int, seconds: float) -> None:
        labels = (route(path), method)
        with self._guard:
            self.counts[SEP.join(("api", *labels, str(status)))] += 1
            for le in BUCKETS:
                if seconds <= le:
                    self.counts[SEP.join(("latency", *labels, str(le)))] += 1
            self.counts[SEP.join(("latency", *labels, "+Inf"))] += 1
            field = SEP.join(("latency_sum", *labels))
            self.sums[field] = self.sums.get(field, 0.0) + seconds

    def flush(self, client: redis.Redis, keys: RedisKeys = RedisKeys()) -> None:
        """Add the counts to this replica's hash (kept if Redis is away: next time)."""
        with self._guard:
            counts, sums = Counter(self.counts), dict(self.sums)
            self.counts.clear()
            self.sums.clear()
        if not counts and not sums:
            return
        key = f"{keys.replica_counters}{replica()}"
        try:
            with client.pipeline(transaction=False) as pipe:
                for field, n in counts.items():
                    pipe.hincrby(key, field, n)
                for field, total in sums.items():
                    pipe.hincrbyfloat(key, field, total)
                pipe.expire(key, TTL)
                pipe.execute()
        except redis.RedisError:
            with self._guard:
                self.counts.update(counts)
                for field, total in sums.items():
                    self.sums[field] = self.sums.get(field, 0.0) + total


def read(client: redis.Redis, name: str,
         keys: RedisKeys = RedisKeys()) -> Iterator[tuple[list[str], float]]:
    """The replica's fields as (parts, value), keeping its hash alive while it is scraped."""
    key = f"{keys.replica_counters}{name}"
    raw = client.hgetall(key)
    with suppress(redis.RedisError):
        client.expire(key, TTL)
    for field, value in raw.items():
        text = field.decode() if isinstance(field, bytes) else str(field)
        yield text.split(SEP), float(value)


class MeasuredTransport(httpx.BaseTransport):
    """Innermost around the network: each response counted by route, method and status, and
    its time (sending the request, reading the headers) observed, without the limiter's waits."""

    def __init__(self, transport: httpx.BaseTransport, recorder: Recorder) -> None:
        self.transport = transport
        self.recorder = recorder

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        start = time.perf_counter()
        response = self.transport.handle_request(request)
        self.recorder.response(request.method, request.url.path, response.status_code,
                               time.perf_counter() - start)
        return response

    def close(self) -> None:
        self.transport.close()
