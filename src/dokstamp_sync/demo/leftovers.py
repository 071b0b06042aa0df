"""What ``demo --use-configured`` leaves in the configured Redis, removed when it ends.

The demo's own names all start with its tag (``dokstamp-demo-<random>:``: its streams, and every
name under its ``DOKSTAMP_SYNC_NAMESPACE``), and so do kombu's bindings of its Celery queue
(``_kombu.binding.<tag>:...``, ``_kombu.binding_permanent.<tag>:...``): those keys are deleted.
Kombu also keeps bookkeeping shared by every Celery app of the database
(``_kombu.binding.celeryev``, ``_kombu.binding_deadlines``, ...): a set or sorted set there loses
only the members that were not in it when the demo started, so a deployment's own bindings stay
as they were.
"""

from __future__ import annotations

from typing import Any

import redis

SHARED = "_kombu.*"  # kombu's bookkeeping, shared by every Celery app of the database


class RedisLeftovers:
    """Snapshot kombu's shared keys at start; :meth:`remove` deletes what the demo added."""

    def __init__(self, client: redis.Redis, tag: str) -> None:
        self.redis, self.tag = client, tag
        self.before: dict[bytes, set[Any]] = {
            key: self._members(key) for key in client.scan_iter(match=SHARED)}

    def _members(self, key: bytes) -> set[Any]:
        kind = self.redis.type(key)
        if kind == b"set":
            return set(self.redis.smembers(key))
        if kind == b"zset":
            return set(self.redis.zrange(key, 0, -1))
        return set()

    def remove(self) -> None:
        """Delete the demo's keys and the members it added to shared ones."""
        tag = self.tag.encode()
        for key in list(self.redis.scan_iter(match=f"{self.tag}:*")):
            self.redis.delete(key)
        for key in list(self.redis.scan_iter(match=SHARED)):
            if tag in key:
                self.redis.delete(key)
                continue
            added = self._members(key) - self.before.get(key, set())
            if not added:
                continue
            if self.redis.type(key) == b"set":
                self.redis.srem(key, *added)
            else:
                self.redis.zrem(key, *added)
