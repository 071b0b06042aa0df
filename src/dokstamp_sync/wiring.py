"""The one place a process's long-lived objects are built from its settings.

Settings are read once per process (:func:`settings`, or handed over with :func:`use`); Celery's
prefork children inherit them at the fork and build their own connections (:func:`context`,
after :func:`reset`), so no connection is ever shared between processes. Tests and the
benchmark build their context with :func:`build_context` too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import redis
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.config import (
    ConfigError,
    Settings,
    StoreSettings,
    load_settings,
    load_store_settings,
)
from dokstamp_sync.db import make_engine, make_sessionmaker
from dokstamp_sync.dokstamp import RateLimiter, RedisTokenStore, client_from_settings
from dokstamp_sync.dokstamp.breaker import CircuitBreaker
from dokstamp_sync.guard import GuardPolicy
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.files import FilePolicy

_settings: StoreSettings | None = None
_context: SyncContext | None = None


def use(settings: StoreSettings) -> None:
    """Make ``settings`` this process's settings (the CLI read them already)."""
    global _settings
    _settings = settings


def settings() -> Settings:
    """This process's complete settings, read on first use."""
    global _settings
    if not isinstance(_settings, Settings):
        _settings = load_settings()
    return _settings


def store_settings() -> StoreSettings:
    """The settings as far as they are usable without DokStamp credentials (Flower, logs)."""
    global _settings
    if _settings is None:
        try:
            _settings = load_settings()
        except ConfigError:
            _settings = load_store_settings()
    return _settings


def build_context(settings: Settings, *, sessions: sessionmaker[Session] | None = None,
                  redis_client: redis.Redis | None = None,
                  limiter_sleep: Callable[[float], None] = time.sleep,
                  **overrides: Any) -> SyncContext:
    """A complete :class:`SyncContext`: the DokStamp client with the shared token cache and
    rate limit, database sessions, Redis, the file policy and the engine's limits.

    ``sessions`` and ``redis_client`` reuse connections the caller already has (tests, the
    benchmark); ``overrides`` replace any of the context's fields (``sleep``, ``rng``...).
    """
    client_redis = redis_client or redis.Redis.from_url(settings.redis_url)
    limiter = RateLimiter(client_redis, settings.dokstamp_tenant, settings.dokstamp_rate_limit,
                          sleep=limiter_sleep)
    breaker = CircuitBreaker(client_redis, settings.dokstamp_tenant,
                             threshold=settings.dokstamp_sync_breaker_failures,
                             interval=settings.dokstamp_sync_breaker_interval,
                             probe_timeout=settings.dokstamp_timeout + 5)
    api = client_from_settings(settings, store=RedisTokenStore(client_redis), limiter=limiter,
                               breaker=breaker)
    root = settings.dokstamp_sync_file_root
    ctx = SyncContext(
        client=api,
        sessions=sessions or make_sessionmaker(make_engine(settings.database_url)),
        redis=client_redis,
        files=FilePolicy(settings.file_hosts, Path(root) if root else None,
                         settings.dokstamp_sync_file_max_bytes),
        file_http=httpx.Client(timeout=httpx.Timeout(settings.dokstamp_timeout, connect=5.0),
                               follow_redirects=False),
        dependency_timeout=settings.dokstamp_sync_dependency_timeout,
        retry_budget=settings.dokstamp_sync_retry_budget,
        max_deliveries=settings.dokstamp_sync_max_deliveries,
        lock_timeout=settings.dokstamp_sync_lock_timeout,
        create_window=2 * settings.dokstamp_timeout,
        lease=settings.dokstamp_sync_lease,
        limiter=limiter,
        results_stream=settings.dokstamp_sync_results_stream,
        results_maxlen=settings.dokstamp_sync_results_maxlen,
        breaker=breaker,
        guard_policy=GuardPolicy.from_settings(settings),
    )
    ctx = replace(ctx, **overrides) if overrides else ctx
    api.before_write = ctx.check_locks  # a run that lost a lock never writes
    return ctx


def context() -> SyncContext:
    """This process's context, built on first use."""
    global _context
    if _context is None:
        _context = build_context(settings())
    return _context


def reset() -> None:
    """Forget this process's context (after a fork, or in tests); the settings stay."""
    global _context
    _context = None
