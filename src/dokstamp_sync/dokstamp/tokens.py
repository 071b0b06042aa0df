"""Where access tokens are cached, so that many worker processes share one login.

A :class:`TokenStore` keeps one :class:`CachedToken` per key and offers a lock per key, used to
make renewal single-flight: of N processes that find the token stale at the same moment, one logs
in and the others wait, then read what it stored. :class:`MemoryTokenStore` serves one process
(tests, the CLI); :class:`RedisTokenStore` serves every process on every machine sharing a Redis.

Tokens are secrets: :class:`CachedToken` hides them from ``repr`` so a log line or a traceback
that shows the object never shows the token.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import redis

from dokstamp_sync.dokstamp.errors import TransportError
from dokstamp_sync.redis_keys import RedisKeys

T = TypeVar("T")


@dataclass(frozen=True)
class CachedToken:
    """An access token, its absolute expiry (epoch seconds) and the refresh token, if any."""

    access_token: str = field(repr=False)
    expires_at: float
    refresh_token: str | None = field(default=None, repr=False)
    obtained_at: float = 0.0

    def to_json(self) -> str:
        return json.dumps({"access_token": self.access_token, "expires_at": self.expires_at,
                           "refresh_token": self.refresh_token,
                           "obtained_at": self.obtained_at})

    @classmethod
    def from_json(cls, raw: str | bytes) -> CachedToken:
        data = json.loads(raw)
        return cls(str(data["access_token"]), float(data["expires_at"]),
                   data.get("refresh_token"), float(data.get("obtained_at") or 0.0))


class TokenStore(Protocol):
    """A shared cache of tokens with a lock per key (see the module docstring)."""

    def get(self, key: str) -> CachedToken | None: ...

    def set(self, key: str, token: CachedToken) -> None: ...

    def delete(self, key: str) -> None: ...

    def lock(self, key: str) -> AbstractContextManager[None]: ...


class MemoryTokenStore:
    """A per-process store, thread-safe."""

    def __init__(self) -> None:
        self._tokens: dict[str, CachedToken] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, key: str) -> CachedToken | None:
        return self._tokens.get(key)

    def set(self, key: str, token: CachedToken) -> None:
        self._tokens[key] = token

    def delete(self, key: str) -> None:
        self._tokens.pop(key, None)

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        with self._guard:
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            yield


class RedisTokenStore:
    """Tokens in Redis under ``{prefix}{key}``; renewal serialised by a redis-py ``Lock``.

    The lock expires (``lock_timeout``, longer than a worst-case renewal: a refused refresh plus
    a login, each up to a connect and a read timeout) so that a process killed mid-login cannot
    block the others for longer than that; the cached token expires in Redis when it does
    upstream. Redis failures surface as the client's transient :class:`TransportError`.
    """

    def __init__(self, client: redis.Redis, *, prefix: str = RedisKeys().token,
                 lock_timeout: float = 120.0, wait_timeout: float = 130.0) -> None:
        self._redis = client
        self._prefix = prefix
        self._lock_timeout = lock_timeout
        self._wait_timeout = wait_timeout

    @staticmethod
    def _call(fn: Callable[[], T]) -> T:
        try:
            return fn()
        except redis.RedisError as exc:
            raise TransportError(f"token cache unavailable: {type(exc).__name__}",
                                 sent=False) from None

    def get(self, key: str) -> CachedToken | None:
        raw = self._call(lambda: self._redis.get(self._prefix + key))
        return CachedToken.from_json(raw) if raw else None

    def set(self, key: str, token: CachedToken) -> None:
        ttl = max(1, int(token.expires_at - time.time()))
        self._call(lambda: self._redis.set(self._prefix + key, token.to_json(), ex=ttl))

    def delete(self, key: str) -> None:
        self._call(lambda: self._redis.delete(self._prefix + key))

    @contextmanager
    def lock(self, key: str) -> Iterator[None]:
        lock = self._redis.lock(f"{self._prefix}{key}:lock", timeout=self._lock_timeout,
                                blocking_timeout=self._wait_timeout)
        if not self._call(lock.acquire):
            raise TransportError("token cache lock not acquired in time", sent=False)
        try:
            yield
        finally:
            # It may have expired while held, or Redis is gone: it frees itself either way.
            with suppress(redis.RedisError):
                lock.release()
