"""The walk's other Redis state, behind small named objects (as :class:`~.store.Store` is for
the database): in-flight create marks, listing marks and the fleet-wide counters. No other
module of the walk calls Redis itself (locks: :mod:`.locks`).
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import suppress
from hashlib import sha256

import redis

from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sync.locks import Locks


class CreateMarks:
    """"A create of this natural key was sent, or failed in a way that may still land in
    DokStamp": set before the POST (:meth:`hold`: renewed with the process's locks while the
    answer is outstanding, so it outlives them: a worker taking over after this one froze
    waits for it, then searches), kept for the create window after a failure (:meth:`mark`),
    cleared once the outcome is known (refused, or recorded under its natural key)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys, locks: Locks | None = None) -> None:
        self.redis, self.prefix, self.locks = client, keys.inflight, locks

    def _key(self, entity: str, natural_key: str) -> str:
        return f"{self.prefix}{entity}:{sha256(natural_key.encode()).hexdigest()}"

    def left(self, entity: str, natural_key: str) -> float:
        """Seconds until a create that may still land has had its time; 0 when none."""
        ms = self.redis.pttl(self._key(entity, natural_key))
        return ms / 1000 if ms > 0 else 0.0

    def hold(self, entity: str, natural_key: str, seconds: float) -> None:
        """Mark for ``seconds``, renewed to that with the locks until :meth:`mark`,
        :meth:`clear` or :meth:`let_go`."""
        key = self._key(entity, natural_key)
        self.redis.set(key, "1", px=max(1, int(seconds * 1000)))
        if self.locks is not None:
            self.locks.keep(key, seconds)

    def mark(self, entity: str, natural_key: str, seconds: float) -> None:
        """Mark for ``seconds`` from now, no longer renewed."""
        self.let_go(entity, natural_key)
        self.redis.set(self._key(entity, natural_key), "1", px=max(1, int(seconds * 1000)))

    def let_go(self, entity: str, natural_key: str) -> None:
        """Stop renewing the mark; it expires on its own."""
        if self.locks is not None:
            self.locks.drop(self._key(entity, natural_key))

    def clear(self, entity: str, natural_key: str) -> None:
        self.let_go(entity, natural_key)
        self.redis.delete(self._key(entity, natural_key))


class ListingMarks:
    """Per entity kind: a fresh full listing is in the natural-key table, or the last listing
    could not be read completely (do not list again for a while)."""

    def __init__(self, client: redis.Redis, keys: RedisKeys) -> None:
        self.redis, self.fresh_prefix = client, keys.listing
        self.untrusted_prefix = keys.listing_untrusted

    def fresh(self, entity: str) -> bool:
        return bool(self.redis.exists(f"{self.fresh_prefix}{entity}"))

    def untrusted(self, entity: str) -> bool:
        return bool(self.redis.exists(f"{self.untrusted_prefix}{entity}"))

    def mark_fresh(self, entity: str, seconds: int) -> None:
        self.redis.set(f"{self.fresh_prefix}{entity}", str(time.time()), ex=seconds)

    def mark_untrusted(self, entity: str, seconds: int) -> None:
        self.redis.set(f"{self.untrusted_prefix}{entity}", "1", ex=seconds)


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
