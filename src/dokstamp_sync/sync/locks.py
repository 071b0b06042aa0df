"""The walk's Redis locks: taken, renewed in the background while their holder works, checked
at the last moment before every DokStamp write (:meth:`Locks.check`, called by the client's
innermost transport, :mod:`dokstamp_sync.dokstamp.fence`), released. One :class:`Locks` per
process (its renewer thread serves every lock the process holds, and the keys it was asked to
keep alive with them: an in-flight create's mark, :meth:`Locks.keep`).

Round trips are what an event's time goes to, so the walk's other Redis writes ride on the
locks' own: keys read when a lock is taken (:meth:`Locks.take` ``reads``), keys set by the check
before a write, only if every lock is still ours (:meth:`Locks.set_with_check`), and writes that
need not go at once (a natural key's lock released, its marks cleared while it is still ours,
an outcome's XADD: :meth:`Locks.later`) sent with the next release.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

import redis
from redis.client import Pipeline
from redis.exceptions import LockError, LockNotOwnedError
from redis.lock import Lock

from dokstamp_sync.dokstamp.ratelimit import Rider
from dokstamp_sync.sync.outcomes import Busy

log = logging.getLogger("dokstamp_sync.sync")

LOCK_POLL = 0.01  # seconds between tries of a lock another worker holds
# A lock extended to its full timeout this recently (at most a quarter of the timeout) is ours
# without asking Redis again (:meth:`Locks.confirm`): it cannot have expired yet, and a worker
# frozen since then has seen the time pass and asks. Measured from before the extension was
# sent, on a clock that also runs while the machine is suspended (Redis's TTLs do).
CONFIRMED_FOR = 1.0
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def now() -> float:
    return time.clock_gettime(_CLOCK)

Command = Callable[[Pipeline], object]  # adds commands to a pipeline
Done = Callable[[bool], None]  # told whether they were carried out

# KEYS the locks, then keys to set; ARGV[1] the locks' timeout (ms), ARGV[2] how many locks,
# then their tokens, then each key's time to live (ms). Extends every lock still ours to the
# timeout (what redis-py's ``Lock.reacquire`` does for one) in one round trip, and sets the
# keys to "1" only when all are ours; returns the 1-based index of the first that is not ours
# any more, 0 when all are.
# KEYS[1] a lock, KEYS[2..] keys to delete; ARGV[1] the lock's token: deletes them (and the
# lock) only while the lock is still ours, so that a run that lost it never deletes what its
# successor set.
_DELETE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', unpack(KEYS))
end
return 0
"""

_REACQUIRE_ALL = """
local n = tonumber(ARGV[2])
local lost = 0
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[i + 2] then
    redis.call('PEXPIRE', KEYS[i], ARGV[1])
  elseif lost == 0 then
    lost = i
  end
end
if lost == 0 then
  for i = n + 1, #KEYS do
    redis.call('SET', KEYS[i], '1', 'PX', ARGV[i + 2])
  end
end
return lost
"""


def releasing(name: str, token: Any) -> Command:
    """redis-py's release of lock ``name`` (only while its token is ``token``), for a
    pipeline."""
    return lambda pipe: pipe.eval(Lock.LUA_RELEASE_SCRIPT, 1, name, token)


class WalkLock(Lock):
    """redis-py's lock, but each try to take it also runs ``reads`` in its round trip (their
    answers in :attr:`read`), and its release also sends its owner's :meth:`Locks.later`
    writes."""

    def __init__(self, owner: Locks, name: str, *, wait: float | None,
                 reads: Command | None = None) -> None:
        super().__init__(owner.redis, name, timeout=owner.timeout, sleep=LOCK_POLL,
                         blocking_timeout=wait, thread_local=False)
        self.owner, self.reads = owner, reads
        self.read: list[Any] = []  # the answers to ``reads`` of the try that took it
        self.tried_at = 0.0  # when the last try was sent (:func:`now`)

    def do_acquire(self, token: str) -> bool:
        self.tried_at = now()
        if self.reads is None:
            return super().do_acquire(token)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.name, token, nx=True, px=int(self.owner.timeout * 1000))
            self.reads(pipe)
            taken, *self.read = pipe.execute()
        return bool(taken)

    def do_release(self, expected_token: str) -> None:
        self.owner.send_later(releasing(self.name, expected_token))


class Locks:
    """Locks named ``prefix + name`` that expire after ``timeout`` seconds (a dead worker
    cannot hold one) and are renewed every third of it while held."""

    def __init__(self, client: redis.Redis, prefix: str, timeout: float = 15.0) -> None:
        self.redis = client
        self.prefix = prefix
        self.timeout = timeout
        self.held: list[Lock] = []  # the locks this process holds now
        self.kept: dict[str, int] = {}  # other keys renewed with them: name -> ttl in ms
        self.to_set: dict[str, int] = {}  # keys the next check sets: name -> ttl in ms
        self.queued: list[tuple[Command, Done | None]] = []  # sent with the next release
        self.verified: dict[str, float] = {}  # lock name -> when last extended (now())
        self.releasing: dict[str, Any] = {}  # locks whose release is queued: name -> token
        self._renewer: threading.Thread | None = None
        self._guard = threading.Lock()
        self._reacquire_all = client.register_script(_REACQUIRE_ALL)

    @contextmanager
    def take(self, name: str, *, wait: float, reads: Command | None = None,
             release_later: bool = False) -> Iterator[WalkLock]:
        """Hold lock ``name`` for the block, waiting up to ``wait`` seconds; :class:`Busy`
        when another holder keeps it that long. ``reads``: commands run in the round trip
        that takes it (their answers: the lock's ``read``). ``release_later``: when the block
        ends while this process holds another lock, released with that one (see
        :meth:`release`)."""
        # Poll every 10 ms while it is held elsewhere (redis-py's default is 100 ms): an
        # enrollment waiting for its student's create would otherwise idle most of that.
        lock = self.new(name, wait=wait, reads=reads)
        if not lock.acquire():
            raise Busy(name)
        self.hold(lock)
        try:
            yield lock
        finally:
            self.release(lock, later=release_later)

    def try_take(self, name: str) -> WalkLock | None:
        """Lock ``name`` without waiting (held and renewed until :meth:`release`), or None."""
        lock = self.new(name)
        if not lock.acquire(blocking=False):
            return None
        self.hold(lock)
        return lock

    def new(self, name: str, *, wait: float | None = None,
            reads: Command | None = None) -> WalkLock:
        """A lock, not yet acquired; its token is shared by this process's threads so the
        renewer can extend it (redis-py keeps it thread-local by default)."""
        full = f"{self.prefix}{name}"
        if full in self.releasing:  # ours still, its release queued: let it go first
            self.send_later()
        return WalkLock(self, full, wait=wait, reads=reads)

    def hold(self, lock: Lock) -> None:
        """Keep ``lock`` ours while we work: renewed, and checked by :meth:`check`."""
        with self._guard:
            self.held.append(lock)
            # taken for a whole timeout by the try sent then
            self.verified[lock.name] = getattr(lock, "tried_at", 0.0)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_forever,
                                                 name="dokstamp-locks", daemon=True)
                self._renewer.start()

    def release(self, lock: Lock, *, later: bool = False) -> None:
        """Stop renewing ``lock`` and release it; one lost or expired meanwhile is no error
        (there is nothing left to release). ``later``: while this process holds another
        lock, the release is queued (:meth:`later`) and goes with that one's, a round trip
        saved; the lock is not ours to use any more meanwhile (neither renewed nor checked),
        and it is not taken again before its release has gone."""
        with self._guard:
            if lock in self.held:
                self.held.remove(lock)
            self.verified.pop(lock.name, None)
            token = lock.local.token
            if later and self.held and token is not None:
                lock.local.token = None
                self.releasing[lock.name] = token  # renewed, not checked, until released
                self.queued.append((releasing(lock.name, token), None))
                return
        with suppress(LockError, redis.RedisError):  # released before; Redis away: it expires
            lock.release()
        with self._guard:
            left = bool(self.queued) and not self.held
        if left:  # not sent by that release (it was released before): nothing else will
            with suppress(redis.RedisError):
                self.send_later()

    def release_all(self, locks: Iterable[Lock | None]) -> None:
        for lock in locks:
            if lock is not None:
                self.release(lock)

    def confirm(self, lock: Lock) -> None:
        """Raise :class:`LockNotOwnedError` unless ``lock`` is still ours (then it is renewed
        to its full timeout): an attempt's result is recorded only by the run that held the
        entity's lock throughout. One taken or extended in the last :data:`CONFIRMED_FOR`
        seconds is ours without a round trip."""
        with self._guard:
            since = now() - self.verified.get(lock.name, float("-inf"))
        if since < min(CONFIRMED_FOR, self.timeout / 4):
            return
        sent = now()
        lock.reacquire()
        self._verified([lock], sent)

    def check(self, method: str = "", path: str = "") -> None:
        """Raise :class:`LockNotOwnedError` unless every lock we hold is still ours, renewing
        each to its full timeout: called as the last step before a DokStamp write leaves
        (after the rate limiter's wait, a token renewal, the breaker's probe), so a run that
        lost a lock while it waited or stood frozen (expired, taken over) never writes, and
        one that kept them holds them for a whole timeout while its request is out. The rate
        limiter runs it in the round trip that takes the write's token instead (:meth:`rider`),
        when it is right above the fence."""
        rider = self.rider(method, path)
        if rider is not None:
            rider.before()
            rider.settle(self._reacquire_all(keys=rider.keys, args=rider.args))

    def rider(self, method: str = "", path: str = "") -> Rider | None:
        """:meth:`check` as a :class:`~dokstamp_sync.dokstamp.ratelimit.Rider` of the rate
        limiter's token script; None when no lock is held and no key waits to be set."""
        with self._guard:
            held, to_set = list(self.held), dict(self.to_set)
        if not held and not to_set:
            return None
        tokens = [lock.local.token for lock in held]
        if any(token is None for token in tokens):  # never acquired (or released): not ours
            raise LockNotOwnedError(f"lock {held[tokens.index(None)].name!r} lost before "
                                    f"{method} {path}")

        sent = [0.0]

        def before() -> None:  # the script is sent now: what it extends is ours from here
            sent[0] = now()

        def settle(answer: Any) -> None:
            lost = int(answer)
            self._verified(held[:lost - 1 if lost else len(held)], sent[0])
            if lost:
                raise LockNotOwnedError(f"lock {held[lost - 1].name!r} lost before {method} "
                                        f"{path}")
            with self._guard:  # set now: no longer to be set by the next check
                for key, ms in to_set.items():
                    if self.to_set.get(key) == ms:
                        del self.to_set[key]

        return Rider(_REACQUIRE_ALL, [*(lock.name for lock in held), *to_set],
                     [int(self.timeout * 1000), len(held), *tokens, *to_set.values()], settle,
                     before)

    def set_with_check(self, key: str, seconds: float) -> None:
        """Set Redis key ``key`` (to expire in ``seconds``) in the round trip of the next
        :meth:`check`, the one made before the next write leaves, and only if every lock is
        still ours then: what a request must leave behind once sent, set before it is sent and
        never when it is not. Until then :meth:`unset` takes it back."""
        with self._guard:
            self.to_set[key] = max(1, int(seconds * 1000))

    def unset(self, key: str) -> None:
        with self._guard:
            self.to_set.pop(key, None)

    def _verified(self, locks: list[Lock], sent: float) -> None:
        """``locks`` were extended to their full timeout by a script sent at ``sent``."""
        with self._guard:
            for lock in locks:
                if lock in self.held:
                    self.verified[lock.name] = max(sent, self.verified.get(lock.name, sent))

    def delete_later(self, keys: list[str], *, under: Lock) -> None:
        """Delete ``keys`` with the next release (:meth:`later`), only if lock ``under`` is
        still ours then (a run that lost it meanwhile must not delete its successor's)."""
        token = under.local.token
        if token is None:  # not ours any more
            return
        self.later(lambda pipe: pipe.eval(_DELETE_IF_OURS, 1 + len(keys), under.name, *keys,
                                          token))

    def later(self, command: Command, done: Done | None = None) -> None:
        """Redis writes that need not go at once, sent in the round trip of the next release
        of a lock (at once when this process holds none); ``done`` is told whether they were
        carried out. A process lost meanwhile never sends them: only what may be lost so
        (an outcome the sweeper writes again, a mark left to expire) is sent this way. Never
        raises (a failure is logged and told)."""
        with self._guard:
            self.queued.append((command, done))
            if self.held:
                return
        with suppress(redis.RedisError):
            self.send_later()

    def send_later(self, last: Command | None = None) -> Any:
        """Send what :meth:`later` queued, and ``last``, in one round trip; ``last``'s answer
        (an error raised)."""
        with self._guard:
            queued, self.queued = self.queued, []
            self.releasing.clear()
        if not queued and last is None:
            return None
        try:
            with self.redis.pipeline(transaction=False) as pipe:
                spans = []
                for command, _done in queued:
                    start = len(pipe)
                    command(pipe)
                    spans.append((start, len(pipe)))
                if last is not None:
                    last(pipe)
                answers = pipe.execute(raise_on_error=False)
        except redis.RedisError as exc:
            log.warning("could not send %d queued Redis write(s) (%s)", len(queued),
                        type(exc).__name__)
            for _command, done in queued:
                if done is not None:
                    done(False)
            raise
        for (start, end), (_command, done) in zip(spans, queued, strict=True):
            if done is not None:
                done(not any(isinstance(a, Exception) for a in answers[start:end]))
        if last is None:
            return None
        if isinstance(answers[-1], Exception):
            raise answers[-1]
        return answers[-1]

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
            held, kept, releasing = list(self.held), dict(self.kept), dict(self.releasing)
        tokens = [(lock, lock.local.token) for lock in held]
        ours = [(lock, token) for lock, token in tokens if token is not None]  # not released
        names = [lock.name for lock, _ in ours] + list(releasing)
        if names:
            sent = now()
            with suppress(redis.RedisError):
                lost = int(self._reacquire_all(
                    keys=names, args=[int(self.timeout * 1000), len(names),
                                      *(token for _, token in ours), *releasing.values()]))
                self._verified([lock for lock, _ in ours][:lost - 1 if lost else len(ours)],
                               sent)
        for key, ms in kept.items():
            with suppress(redis.RedisError):
                self.redis.pexpire(key, ms)  # a key deleted meanwhile stays deleted

    def _renew_forever(self) -> None:
        while True:
            time.sleep(self.timeout / 3)
            self.renew()
