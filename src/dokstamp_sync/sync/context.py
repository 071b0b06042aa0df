"""What the graph walk needs, passed down explicitly: the DokStamp client, the mapping store,
Redis (locks, counters) and the engine's limits. Built by
:func:`dokstamp_sync.wiring.build_context`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field

import httpx
import redis
from redis.exceptions import LockNotOwnedError
from redis.lock import Lock
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.dokstamp import DokStampClient, RateLimiter
from dokstamp_sync.dokstamp.breaker import CircuitBreaker
from dokstamp_sync.guard import Guard, GuardPolicy
from dokstamp_sync.pipeline.results import RESULTS_MAXLEN, Publisher
from dokstamp_sync.redis_keys import COUNTERS, LOCK, RESULTS_STREAM
from dokstamp_sync.sync.files import FilePolicy
from dokstamp_sync.sync.outcomes import Busy
from dokstamp_sync.sync.store import Store

LOCK_POLL = 0.01  # seconds between tries of a lock another worker holds


@dataclass
class SyncContext:
    client: DokStampClient
    sessions: sessionmaker[Session]
    redis: redis.Redis
    files: FilePolicy
    file_http: httpx.Client
    dependency_timeout: float = 86400.0
    retry_budget: float = 86400.0
    max_deliveries: int = 5
    lock_timeout: float = 15.0
    lease: float = 20.0  # the scheduler's lease on a running event, renewed by a heartbeat
    lock_prefix: str = LOCK
    in_call_attempts: int = 3
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)
    unflushed: Counter[str] = field(default_factory=Counter)  # not yet in Redis
    limiter: RateLimiter | None = None  # its response counters are flushed with ours
    results_stream: str = RESULTS_STREAM  # the outcome stream (CONTRACT §5)
    results_maxlen: int = RESULTS_MAXLEN
    breaker: CircuitBreaker | None = None  # the fleet's, on the client's transport
    guard_policy: GuardPolicy = field(default_factory=GuardPolicy)  # CONTRACT §6

    held: list[Lock] = field(default_factory=list)  # the locks this process's run holds
    walk: list[tuple[str, str]] = field(default_factory=list)  # (entity, key) being synced
    create_window: float = 20.0  # s a failed create may still land (twice the HTTP timeout)

    def __post_init__(self) -> None:
        # The store reports each final outcome after its commit; the publisher writes it.
        self.store = Store(self.sessions, report=Publisher(self.redis, self.results_stream,
                                                           self.results_maxlen))
        self.guard = Guard(self.guard_policy, self.sessions, self.redis, self.store.report)
        self._renewer: threading.Thread | None = None
        self._guard = threading.Lock()

    def close(self) -> None:
        """Close the HTTP connections (the process is done with this context)."""
        self.client.http.close()
        self.file_http.close()

    def count(self, name: str, n: int = 1) -> None:
        """Count locally; :meth:`flush` adds it to the fleet-wide counters in Redis."""
        self.unflushed[name] += n

    def flush(self, values: dict[str, str] | None = None) -> None:
        """One round trip: pending counters (ours and the limiter's), plus ``values`` to SET."""
        counts = self.unflushed + (self.limiter.unflushed if self.limiter else Counter())
        with suppress(redis.RedisError), self.redis.pipeline(transaction=False) as pipe:
            for name, n in counts.items():
                pipe.hincrby(COUNTERS, name, n)
            for key, value in (values or {}).items():
                pipe.set(key, value)
            pipe.execute()
            self.unflushed.clear()
            if self.limiter:
                self.limiter.unflushed.clear()

    @contextmanager
    def lock(self, name: str, *, wait: float) -> Iterator[Lock]:
        """A Redis lock that expires (``lock_timeout``) so a dead worker cannot hold it, and is
        renewed in the background while its holder works (see :meth:`hold`)."""
        # Poll every 10 ms while it is held elsewhere (redis-py's default is 100 ms): an
        # enrollment waiting for its student's create would otherwise idle most of that.
        lock = self.new_lock(name, wait=wait)
        if not lock.acquire():
            raise Busy(name)
        self.hold(lock)
        try:
            yield lock
        finally:
            self.drop(lock)
            with suppress(redis.RedisError):
                lock.release()

    def new_lock(self, name: str, *, wait: float | None = None) -> Lock:
        """A lock of ours, not yet acquired; its token is shared by this process's threads so
        the renewer can extend it (redis-py keeps it thread-local by default)."""
        lock: Lock = self.redis.lock(f"{self.lock_prefix}{name}", timeout=self.lock_timeout,
                                     blocking_timeout=wait, sleep=LOCK_POLL, thread_local=False)
        return lock

    def hold(self, lock: Lock) -> None:
        """Keep ``lock`` ours while we work: renewed every third of ``lock_timeout``, and
        checked before every DokStamp write (:meth:`check_locks`)."""
        with self._guard:
            self.held.append(lock)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew, name="dokstamp-locks",
                                                 daemon=True)
                self._renewer.start()

    def drop(self, lock: Lock) -> None:
        with self._guard:
            if lock in self.held:
                self.held.remove(lock)

    def check_locks(self, method: str = "", path: str = "") -> None:
        """Raise :class:`LockNotOwnedError` unless every lock we hold is still ours: called
        just before each DokStamp write, so a run that lost its lock (expired, taken over)
        stops before it writes, never after."""
        with self._guard:
            held = list(self.held)
        for lock in held:
            if not lock.owned():
                raise LockNotOwnedError(f"lock {lock.name!r} lost before {method} {path}")

    def _renew(self) -> None:
        while True:
            time.sleep(self.lock_timeout / 3)
            with self._guard:
                held = list(self.held)
            for lock in held:
                # reacquire: back to the full timeout if still ours; a lost one is left for
                # check_locks to report before the next write
                with suppress(redis.RedisError):
                    lock.reacquire()
