"""The one place a process's long-lived objects are built from its settings.

Settings are read once per process (:func:`settings`, or handed over with :func:`use`); Celery's
prefork children inherit them at the fork and build their own connections (:func:`context`,
after :func:`reset`), so no connection is ever shared between processes. Tests and the
benchmark build their context with :func:`build_context` too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from functools import partial
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
from dokstamp_sync.guard import Guard, GuardPolicy
from dokstamp_sync.ops.recorder import MeasuredTransport, Recorder
from dokstamp_sync.pipeline.results import Publisher, Result
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sync.context import Limits, SyncContext
from dokstamp_sync.sync.locks import Locks
from dokstamp_sync.sync.marks import Counters, CreateMarks, ListingMarks
from dokstamp_sync.sync.sources import FilePolicy
from dokstamp_sync.sync.store import Store

_settings: StoreSettings | None = None
_context: SyncContext | None = None
_recorder: Recorder | None = None


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


def database(url: str) -> sessionmaker[Session]:
    """Sessions on ``url`` (a ``DATABASE_URL``; one engine: ``sessions.kw["bind"].dispose()``
    ends it). Every process part that is not the walk gets its database here."""
    return make_sessionmaker(make_engine(url))


def redis_keys(settings: StoreSettings) -> RedisKeys:
    """The deployment's Redis names, from ``DOKSTAMP_SYNC_NAMESPACE`` (the only place they are
    built from the settings: every process part that touches Redis is handed these)."""
    return RedisKeys(settings.dokstamp_sync_namespace.strip())


def redis_client(url: str, **options: Any) -> redis.Redis:
    """A client of ``url`` (a ``REDIS_URL``; ``options``: redis-py's, e.g. timeouts)."""
    return redis.Redis.from_url(url, **options)


def build_context(settings: Settings, *, sessions: sessionmaker[Session] | None = None,
                  redis_client: redis.Redis | None = None,
                  limiter_sleep: Callable[[float], None] = time.sleep,
                  guard_policy: GuardPolicy | None = None, **overrides: Any) -> SyncContext:
    """A complete :class:`SyncContext`: the DokStamp client with the shared token cache and
    rate limit, database sessions, Redis, the file policy and the engine's limits.

    ``sessions`` and ``redis_client`` reuse connections the caller already has (tests, the
    benchmark); ``guard_policy`` replaces the settings' change guard (tests); ``overrides``
    replace any of the context's fields (``sleep``, ``rng``...). The Redis names are built
    here, from ``dokstamp_sync_namespace``.
    """
    client_redis = redis_client or redis.Redis.from_url(settings.redis_url)
    keys = redis_keys(settings)
    limiter = RateLimiter(client_redis, settings.dokstamp_tenant, settings.dokstamp_rate_limit,
                          sleep=limiter_sleep, max_pause=settings.dokstamp_sync_max_pause,
                          keys=keys)
    breaker = CircuitBreaker(client_redis, settings.dokstamp_tenant,
                             threshold=settings.dokstamp_sync_breaker_failures,
                             interval=settings.dokstamp_sync_breaker_interval,
                             probe_timeout=settings.dokstamp_timeout + 5, keys=keys)
    locks = Locks(client_redis, keys.lock, settings.dokstamp_sync_lock_timeout)
    # A run that lost a lock never writes: checked in the innermost transport, after every wait.
    # Innermost, around the network: what each request costs, not the limiter's waits.
    network = MeasuredTransport(httpx.HTTPTransport(limits=httpx.Limits(
        max_connections=20, max_keepalive_connections=20)), recorder())
    api = client_from_settings(settings, store=RedisTokenStore(client_redis, prefix=keys.token),
                               limiter=limiter, breaker=breaker, transport=network,
                               fence=locks.check, riding=locks.rider)
    root = settings.dokstamp_sync_file_root
    sessions = sessions or make_sessionmaker(make_engine(settings.database_url))
    # The store reports each final outcome after its commit; the publisher writes it.
    publisher = Publisher(client_redis, settings.dokstamp_sync_results_stream,
                          settings.dokstamp_sync_results_maxlen)

    def report_later(results: Sequence[Result], written: Callable[[], None]) -> None:
        # Written with the entity lock's release, which follows the commit at once: one round
        # trip for both. A process lost between leaves them to the sweeper, as before the XADD.
        def done(ok: bool) -> None:
            publisher.written(results, ok)
            if ok:
                written()
        locks.later(partial(publisher.add, results=results), done)

    ctx = SyncContext(
        client=api,
        store=Store(sessions, report=publisher, later=report_later),
        locks=locks,
        creates=CreateMarks(client_redis, keys, locks),
        listings=ListingMarks(client_redis, keys),
        counters=Counters(client_redis, keys, extra=limiter.unflushed),
        files=FilePolicy(settings.file_hosts, Path(root) if root else None,
                         settings.dokstamp_sync_file_max_bytes),
        file_http=httpx.Client(timeout=httpx.Timeout(settings.dokstamp_timeout, connect=5.0),
                               follow_redirects=False),
        redis=client_redis,
        sessions=sessions,
        limits=Limits(dependency_timeout=settings.dokstamp_sync_dependency_timeout,
                      retry_budget=settings.dokstamp_sync_retry_budget,
                      max_deliveries=settings.dokstamp_sync_max_deliveries,
                      create_window=2 * settings.dokstamp_timeout,
                      lease=settings.dokstamp_sync_lease),
        breaker=breaker,
        guard=Guard(guard_policy or GuardPolicy.from_settings(settings), sessions, client_redis,
                    publisher, prefix=keys.guard),
    )
    return replace(ctx, **overrides) if overrides else ctx


def context() -> SyncContext:
    """This process's context, built on first use."""
    global _context
    if _context is None:
        _context = build_context(settings())
    return _context


def recorder() -> Recorder:
    """This process's metrics recorder (:mod:`.ops.recorder`)."""
    global _recorder
    if _recorder is None:
        _recorder = Recorder()
    return _recorder


def reset() -> None:
    """Forget this process's context and counts (after a fork, or in tests); the settings
    stay."""
    global _context, _recorder
    _context, _recorder = None, None
