"""Building the long-lived objects of a worker process from the settings, once per process.

Celery's prefork children each build their own (:func:`context`), after the fork, so no
connection is ever shared between processes.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import redis

from dokstamp_sync.config import Settings, load_settings
from dokstamp_sync.db import make_engine, make_sessionmaker
from dokstamp_sync.dokstamp import RateLimiter, RedisTokenStore, client_from_settings
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.files import FilePolicy

_context: SyncContext | None = None


def build_context(settings: Settings) -> SyncContext:
    """A complete :class:`SyncContext`: DokStamp client with the shared token cache and rate
    limit, database sessions, Redis, file policy."""
    client_redis = redis.Redis.from_url(settings.redis_url)
    limiter = RateLimiter(client_redis, settings.dokstamp_tenant, settings.dokstamp_rate_limit)
    api = client_from_settings(settings, store=RedisTokenStore(client_redis), limiter=limiter)
    root = settings.dokstamp_sync_file_root
    return SyncContext(
        client=api,
        sessions=make_sessionmaker(make_engine(settings.database_url)),
        redis=client_redis,
        files=FilePolicy(settings.file_hosts, Path(root) if root else None,
                         settings.dokstamp_sync_file_max_bytes),
        file_http=httpx.Client(timeout=httpx.Timeout(settings.dokstamp_timeout, connect=5.0),
                               follow_redirects=False),
        dependency_timeout=settings.dokstamp_sync_dependency_timeout,
        retry_budget=settings.dokstamp_sync_retry_budget,
        max_deliveries=settings.dokstamp_sync_max_deliveries,
        lock_timeout=settings.dokstamp_sync_lock_timeout,
        lease=settings.dokstamp_sync_visibility_timeout,
        limiter=limiter,
    )


def context() -> SyncContext:
    """This process's context, built on first use."""
    global _context
    if _context is None:
        _context = build_context(load_settings())
    return _context


def reset() -> None:
    """Forget this process's context (after a fork, or in tests)."""
    global _context
    _context = None
