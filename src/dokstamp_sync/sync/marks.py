"""The walk's other Redis state, behind small named objects (as :class:`~.store.Store` is for
the database): in-flight create marks, listing marks and the fleet-wide counters. No other
module of the walk calls Redis itself (locks: :mod:`.locks`).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import suppress
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

import redis
from redis.client import Pipeline
from redis.lock import Lock

from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sync.locks import Command, Locks

# How long a complete listing stands in for searches (see :mod:`.listing`). A create's
# "unresolved" mark outlives its window by this much, so that every listing trusted while the
# mark is gone was read after the create had landed (or could no longer land).
LISTING_TRUSTED_FOR = 900


@dataclass(frozen=True)
class CreateMark:
    """What Redis says about a natural key's creates: ``left``, seconds until a failed create
    may still land (0: none); ``unresolved``, a create was sent (or may have been) and its
    outcome was never recorded: no listing proves the key absent."""

    left: float
    unresolved: bool
    scope_trusted: bool = False  # asked with ``listing``: that scope's marker was there
    kind_untrusted: bool = False  # asked with ``kind``: its last whole listing was incomplete


class CreateMarks:
    """"A create of this natural key was sent, or failed in a way that may still land in
    DokStamp": set before the POST (:meth:`hold`: renewed with the process's locks while the
    answer is outstanding, so it outlives them: a worker taking over after this one froze
    waits for it, then searches), kept for the create window after a failure (:meth:`mark`),
    cleared once the outcome is known (refused, or recorded under its natural key). Beside it,
    with the same life but :data:`LISTING_TRUSTED_FOR` longer, the unresolved mark (see
    :class:`CreateMark`)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, locks: Locks | None = None) -> None:
        self.redis, self.prefix, self.locks = client, keys.inflight, locks
        self.unresolved_prefix = keys.unresolved
        self.listing_prefix, self.untrusted_prefix = keys.listing, keys.listing_untrusted

    def _key(self, entity: str, natural_key: str) -> str:
        return f"{entity}:{sha256(natural_key.encode()).hexdigest()}"

    def reads(self, entity: str, natural_key: str, listing: str | None = None,
              kind: str | None = None) -> Command:
        """The commands that read both marks of a natural key and, with ``listing`` (a
        scope), whether that scope's listing marker is there, with ``kind`` whether that
        kind's last listing was untrusted (:class:`ListingMarks`): run in the round trip that
        takes the key's lock; :meth:`parse` reads their answers."""
        key = self._key(entity, natural_key)

        def read(pipe: Pipeline) -> None:
            pipe.pttl(f"{self.prefix}{key}")
            pipe.exists(f"{self.unresolved_prefix}{key}")
            for prefix, name in ((self.listing_prefix, listing), (self.untrusted_prefix, kind)):
                if name is not None:
                    pipe.exists(f"{prefix}{name}")
                else:
                    pipe.echo("")  # a placeholder: the answers keep their places
        return read

    @staticmethod
    def parse(answers: list[Any]) -> CreateMark:
        ms, unresolved, trusted, untrusted = answers
        return CreateMark(left=ms / 1000 if ms > 0 else 0.0, unresolved=bool(unresolved),
                          scope_trusted=trusted == 1, kind_untrusted=untrusted == 1)

    def look(self, entity: str, natural_key: str, listing: str | None = None) -> CreateMark:
        """What :meth:`reads` reads, in a round trip of its own."""
        with self.redis.pipeline(transaction=False) as pipe:
            self.reads(entity, natural_key, listing)(pipe)
            return self.parse(pipe.execute())

    def left(self, entity: str, natural_key: str) -> float:
        """Seconds until a create that may still land has had its time; 0 when none."""
        return self.look(entity, natural_key).left

    def hold(self, entity: str, natural_key: str, seconds: float) -> None:
        """Mark for ``seconds``, renewed to that with the locks until :meth:`mark`,
        :meth:`clear` or :meth:`let_go`. With locks, the marks are set by the check made
        before the create leaves (never when it does not), in its round trip."""
        key = self._key(entity, natural_key)
        if self.locks is None:
            self._send(self._setting(key, seconds))
            return
        self.locks.set_with_check(f"{self.prefix}{key}", seconds)
        self.locks.set_with_check(f"{self.unresolved_prefix}{key}", seconds + LISTING_TRUSTED_FOR)
        self.locks.keep(f"{self.prefix}{key}", seconds)

    def mark(self, entity: str, natural_key: str, seconds: float) -> None:
        """Mark for ``seconds`` from now, no longer renewed (at once: a process lost from here
        on leaves it)."""
        self.let_go(entity, natural_key)
        self._send(self._setting(self._key(entity, natural_key), seconds))

    def _ttls(self, seconds: float) -> tuple[int, int]:
        return max(1, int(seconds * 1000)), max(1, int((seconds + LISTING_TRUSTED_FOR) * 1000))

    def _setting(self, key: str, seconds: float) -> Command:
        inflight, unresolved = self._ttls(seconds)

        def set_both(pipe: Pipeline) -> None:
            pipe.set(f"{self.prefix}{key}", "1", px=inflight)
            pipe.set(f"{self.unresolved_prefix}{key}", "1", px=unresolved)
        return set_both

    def _send(self, command: Command) -> None:
        """Now (after what is queued: in order)."""
        if self.locks is not None:
            self.locks.send_later(command)
        else:
            with self.redis.pipeline(transaction=False) as pipe:
                command(pipe)
                pipe.execute()

    def let_go(self, entity: str, natural_key: str) -> None:
        """Stop renewing the mark (it expires on its own), and do not set it if not set yet."""
        if self.locks is not None:
            key = self._key(entity, natural_key)
            self.locks.drop(f"{self.prefix}{key}")
            self.locks.unset(f"{self.prefix}{key}")
            self.locks.unset(f"{self.unresolved_prefix}{key}")

    def landed(self, entity: str, natural_key: str, under: Lock | None = None) -> None:
        """The create is known to have landed, but its outcome could not be recorded (the
        database failed): nothing may land late, so no window to wait out; the unresolved
        mark stays (no listing read before it proves anything: the next attempt searches)."""
        self.let_go(entity, natural_key)
        self._delete([f"{self.prefix}{self._key(entity, natural_key)}"], under)

    def clear(self, entity: str, natural_key: str, under: Lock | None = None) -> None:
        """The outcome is known (refused, or recorded under the natural key): both marks go.
        ``under``: the natural key's lock, held: they go with the next lock release, and only
        while that lock is still ours (a run that lost it must not clear its successor's)."""
        self.let_go(entity, natural_key)
        key = self._key(entity, natural_key)
        self._delete([f"{self.prefix}{key}", f"{self.unresolved_prefix}{key}"], under)

    def _delete(self, names: list[str], under: Lock | None) -> None:
        if self.locks is not None and under is not None:
            self.locks.delete_later(names, under=under)
        else:
            self._send(lambda pipe: pipe.delete(*names))


class ListingMarks:
    """Per scope (an entity kind, ``student``, or one listing filter of it,
    ``enrollment:course_uuid=...``): a complete listing of it is in the natural-key table and
    still trusted, or the last listing could not be read completely (do not list again for a
    while)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.redis, self.fresh_prefix = client, keys.listing
        self.untrusted_prefix = keys.listing_untrusted

    def fresh(self, scope: str) -> bool:
        return bool(self.redis.exists(f"{self.fresh_prefix}{scope}"))

    def untrusted(self, scope: str) -> bool:
        return bool(self.redis.exists(f"{self.untrusted_prefix}{scope}"))

    def mark_fresh(self, scope: str, seconds: float) -> None:
        self.redis.set(f"{self.fresh_prefix}{scope}", str(time.time()),
                       px=max(1, int(seconds * 1000)))

    def mark_untrusted(self, scope: str, seconds: int) -> None:
        self.redis.set(f"{self.untrusted_prefix}{scope}", "1", ex=seconds)

    def drop(self, scope: str) -> None:
        """Trust the scope's listing no more (a conflict showed it wrong): read it again."""
        self.redis.delete(f"{self.fresh_prefix}{scope}")


class Counters:
    """Counted locally (:meth:`add`), sent to the fleet-wide hash in one round trip
    (:meth:`flush`) together with the rate limiter's response counters, ``extra``."""

    def __init__(self, client: redis.Redis, keys: RedisKeys,
                 extra: Counter[str] | None = None) -> None:
        self.redis, self.keys = client, keys
        self.unflushed: Counter[str] = Counter()
        self.extra = extra

    def add(self, name: str, n: int = 1) -> None:
        self.unflushed[name] += n

    def flush(self, *, beat: bool = False) -> None:
        """Pending counters; ``beat``: also the health check's proof that tasks run."""
        counts = self.unflushed + (self.extra if self.extra is not None else Counter())
        with suppress(redis.RedisError), self.redis.pipeline(transaction=False) as pipe:
            for name, n in counts.items():
                pipe.hincrby(self.keys.counters, name, n)
            if beat:
                pipe.set(f"{self.keys.heartbeat}task", str(time.time()))
            pipe.execute()
            self.unflushed.clear()
            if self.extra is not None:
                self.extra.clear()
