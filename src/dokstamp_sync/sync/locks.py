"""The walk's Redis locks: taken, renewed in the background while their holder works, checked
at the last moment before every DokStamp write (:meth:`Locks.check`, called by the client's
innermost transport, :mod:`dokstamp_sync.dokstamp.fence`), released. One :class:`Locks` per
process (its renewer thread serves every lock the process holds, and the keys it was asked to
keep alive with them: an in-flight create's mark, :meth:`Locks.keep`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress

import redis
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from dokstamp_sync.sync.outcomes import Busy

LOCK_POLL = 0.01  # seconds between tries of a lock another worker holds

# KEYS the locks; ARGV[1] their timeout (ms), ARGV[2..] their tokens. Extends every lock still
# ours to the timeout (what redis-py's ``Lock.reacquire`` does for one) in one round trip;
# returns the 1-based index of the first that is not ours any more, 0 when all are.
_REACQUIRE_ALL = """
local lost = 0
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[i + 1] then
    redis.call('PEXPIRE', key, ARGV[1])
  elseif lost == 0 then
    lost = i
  end
end
return lost
"""


class Locks:
    """Locks named ``prefix + name`` that expire after ``timeout`` seconds (a dead worker
    cannot hold one) and are renewed every third of it while held."""

    def __init__(self, client: redis.Redis, prefix: str, timeout: float = 15.0) -> None:
        self.redis = client
        self.prefix = prefix
        self.timeout = timeout
        self.held: list[Lock] = []  # the locks this process holds now
        self.kept: dict[str, int] = {}  # other keys renewed with them: name -> ttl in ms
        self._renewer: threading.Thread | None = None
        self._guard = threading.Lock()
        self._reacquire_all = client.register_script(_REACQUIRE_ALL)

    @contextmanager
    def take(self, name: str, *, wait: float) -> Iterator[Lock]:
        """Hold lock ``name`` for the block, waiting up to ``wait`` seconds; :class:`Busy`
        when another holder keeps it that long."""
        # Poll every 10 ms while it is held elsewhere (redis-py's default is 100 ms): an
        # enrollment waiting for its student's create would otherwise idle most of that.
        lock = self.new(name, wait=wait)
        if not lock.acquire():
            raise Busy(name)
        self.hold(lock)
        try:
            yield lock
        finally:
            self.release(lock)

    def try_take(self, name: str) -> Lock | None:
        """Lock ``name`` without waiting (held and renewed until :meth:`release`), or None."""
        lock = self.new(name)
        if not lock.acquire(blocking=False):
            return None
        self.hold(lock)
        return lock

    def new(self, name: str, *, wait: float | None = None) -> Lock:
        """A lock, not yet acquired; its token is shared by this process's threads so the
        renewer can extend it (redis-py keeps it thread-local by default)."""
        lock: Lock = self.redis.lock(f"{self.prefix}{name}", timeout=self.timeout,
                                     blocking_timeout=wait, sleep=LOCK_POLL, thread_local=False)
        return lock

    def hold(self, lock: Lock) -> None:
        """Keep ``lock`` ours while we work: renewed, and checked by :meth:`check`."""
        with self._guard:
            self.held.append(lock)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_forever,
                                                 name="dokstamp-locks", daemon=True)
                self._renewer.start()

    def release(self, lock: Lock) -> None:
        """Stop renewing ``lock`` and release it; one lost or expired meanwhile is no error
        (there is nothing left to release)."""
        with self._guard:
            if lock in self.held:
                self.held.remove(lock)
        with suppress(LockError, redis.RedisError):
            lock.release()

    def release_all(self, locks: Iterable[Lock | None]) -> None:
        for lock in locks:
            if lock is not None:
                self.release(lock)

    def confirm(self, lock: Lock) -> None:
        """Raise :class:`LockNotOwnedError` unless ``lock`` is still ours (then it is renewed
        to its full timeout): an attempt's result is recorded only by the run that held the
        entity's lock throughout."""
        lock.reacquire()

    def check(self, method: str = "", path: str = "") -> None:
        """Raise :class:`LockNotOwnedError` unless every lock we hold is still ours, renewing
        each to its full timeout: called as the last step before a DokStamp write leaves
        (after the rate limiter's wait, a token renewal, the breaker's probe), so a run that
        lost a lock while it waited or stood frozen (expired, taken over) never writes, and
        one that kept them holds them for a whole timeout while its request is out."""
        with self._guard:
            held = list(self.held)
        lost = self._reacquire(held)
        if lost is not None:
            raise LockNotOwnedError(f"lock {lost.name!r} lost before {method} {path}")

    def _reacquire(self, held: list[Lock]) -> Lock | None:
        """Extend every lock in ``held`` still ours (atomic per lock, one round trip for
        all); the first that is not ours any more, or None."""
        if not held:
            return None
        tokens = [lock.local.token for lock in held]
        if any(token is None for token in tokens):  # never acquired (or released): not ours
            return held[tokens.index(None)]
        lost = int(self._reacquire_all(keys=[lock.name for lock in held],
                                       args=[int(self.timeout * 1000), *tokens]))
        return held[lost - 1] if lost else None

    def keep(self, key: str, seconds: float) -> None:
        """Renew Redis key ``key`` to ``seconds`` with every renewal of the locks, until
        :meth:`drop`: it lives as long as this process does, plus ``seconds``."""
        with self._guard:
            self.kept[key] = max(1, int(seconds * 1000))

    def drop(self, key: str) -> None:
        """Stop renewing ``key`` (it expires on its own, or its owner deletes it)."""
        with self._guard:
            self.kept.pop(key, None)

    def renew(self) -> None:
        """One renewal of every held lock (the renewer's step; callable directly in tests):
        back to the full timeout if still ours; a lost one is left for :meth:`check`."""
        with self._guard:
            held, kept = list(self.held), dict(self.kept)
        with suppress(redis.RedisError):  # one released meanwhile is skipped, not all
            self._reacquire([lock for lock in held if lock.local.token is not None])
        for key, ms in kept.items():
            with suppress(redis.RedisError):
                self.redis.pexpire(key, ms)  # a key deleted meanwhile stays deleted

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.timeout / 3)
            self.renew()
