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

import redis

from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sync.locks import Locks

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
        self.listing_prefix = keys.listing

    def _key(self, entity: str, natural_key: str) -> str:
        return f"{entity}:{sha256(natural_key.encode()).hexdigest()}"

    def look(self, entity: str, natural_key: str, listing: str | None = None) -> CreateMark:
        """Both marks of a natural key and, with ``listing`` (a scope), whether that scope's
        listing marker is there (:class:`ListingMarks`), in one round trip."""
        key = self._key(entity, natural_key)
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.pttl(f"{self.prefix}{key}")
            pipe.exists(f"{self.unresolved_prefix}{key}")
            if listing is not None:
                pipe.exists(f"{self.listing_prefix}{listing}")
            ms, unresolved, *trusted = pipe.execute()
        return CreateMark(left=ms / 1000 if ms > 0 else 0.0, unresolved=bool(unresolved),
                          scope_trusted=bool(trusted and trusted[0]))

    def left(self, entity: str, natural_key: str) -> float:
        """Seconds until a create that may still land has had its time; 0 when none."""
        return self.look(entity, natural_key).left

    def hold(self, entity: str, natural_key: str, seconds: float) -> None:
        """Mark for ``seconds``, renewed to that with the locks until :meth:`mark`,
        :meth:`clear` or :meth:`let_go`."""
        key = self._key(entity, natural_key)
        self._set(key, seconds)
        if self.locks is not None:
            self.locks.keep(f"{self.prefix}{key}", seconds)

    def mark(self, entity: str, natural_key: str, seconds: float) -> None:
        """Mark for ``seconds`` from now, no longer renewed."""
        self.let_go(entity, natural_key)
        self._set(self._key(entity, natural_key), seconds)

    def _set(self, key: str, seconds: float) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(f"{self.prefix}{key}", "1", px=max(1, int(seconds * 1000)))
            pipe.set(f"{self.unresolved_prefix}{key}", "1",
                     px=max(1, int((seconds + LISTING_TRUSTED_FOR) * 1000)))
            pipe.execute()

    def let_go(self, entity: str, natural_key: str) -> None:
        """Stop renewing the mark; it expires on its own."""
        if self.locks is not None:
            self.locks.drop(f"{self.prefix}{self._key(entity, natural_key)}")

    def landed(self, entity: str, natural_key: str) -> None:
        """The create is known to have landed, but its outcome could not be recorded (the
        database failed): nothing may land late, so no window to wait out; the unresolved
        mark stays (no listing read before it proves anything: the next attempt searches)."""
        self.let_go(entity, natural_key)
        self.redis.delete(f"{self.prefix}{self._key(entity, natural_key)}")

    def clear(self, entity: str, natural_key: str) -> None:
        self.let_go(entity, natural_key)
        key = self._key(entity, natural_key)
        self.redis.delete(f"{self.prefix}{key}", f"{self.unresolved_prefix}{key}")


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
