"""Shared fixtures: a real sandbox over HTTP on 127.0.0.1, clients for it, a real Redis.

The sandbox server is started once per session; every test that asks for ``sandbox`` gets it
with its data, tokens, faults, stats and configuration reset (generation a, lenient), so tests
never see each other's state; ``sandbox_b`` is the same server following the newer docs.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import redis

from dokstamp_sync.dokstamp import (
    ClientCredentials,
    Credentials,
    DokStampClient,
    MemoryTokenStore,
    PasswordLogin,
    TokenManager,
    TokenStore,
    build_http_client,
)
from dokstamp_sync.sandbox import Account, Faults, Sandbox, SandboxConfig, SandboxServer
from dokstamp_sync.testing import Harness, sandbox_context
from testenv import MAIN, OTHER, PG_ADMIN_URL, TEST_ENGINE_REDIS_URL, TEST_REDIS_URL


@pytest.fixture(scope="session")
def sandbox_server() -> Iterator[SandboxServer]:
    with SandboxServer(Sandbox(SandboxConfig(accounts=[MAIN, OTHER]))) as server:
        yield server


@pytest.fixture
def sandbox(sandbox_server: SandboxServer) -> SandboxServer:
    """The running sandbox, freshly reset."""
    sb = sandbox_server.sandbox
    sb.config.token_ttl = 3600.0
    sb.config.generation = "a"
    sb.config.strict = False
    sb.config.error_style = None
    sb.reset()
    sb.stats.reset()
    sb.faults.configure(Faults())
    return sandbox_server


@pytest.fixture
def sandbox_b(sandbox: SandboxServer) -> SandboxServer:
    """The running sandbox, freshly reset, following the newer docs (generation b: client
    credentials at /oauth/token, ``finish: true`` issues, ``success: false`` in errors)."""
    sandbox.sandbox.config.generation = "b"
    return sandbox


ClientFactory = Callable[..., DokStampClient]


@pytest.fixture
def make_client(sandbox: SandboxServer) -> Iterator[ClientFactory]:
    """Build clients against the sandbox; every one is closed after the test. The login
    ``scheme`` defaults to the one the sandbox's generation has ("password" in a, "client" in
    b), read when the client is built."""
    opened: list[httpx.Client] = []

    def factory(*, account: Account = MAIN, scheme: str | None = None,
                store: TokenStore | None = None, timeout: float = 10.0,
                issue_style: str = "status", tenant: str | None = None,
                clock: Callable[[], float] | None = None) -> DokStampClient:
        http = build_http_client(sandbox.url, timeout=timeout)
        opened.append(http)
        if scheme is None:
            scheme = "client" if sandbox.sandbox.config.generation == "b" else "password"
        credentials: Credentials = (
            PasswordLogin(account.email, account.password) if scheme == "password"
            else ClientCredentials(account.client_id, account.client_secret))
        kw: dict[str, Any] = {"clock": clock} if clock else {}
        tokens = TokenManager(http, credentials, store or MemoryTokenStore(), **kw)
        return DokStampClient(http, tenant=tenant or account.tenant, tokens=tokens,
                              issue_style=issue_style)  # type: ignore[arg-type]

    yield factory
    for http in opened:
        http.close()


@pytest.fixture
def client(make_client: ClientFactory) -> DokStampClient:
    """A password-login client of the main tenant."""
    return make_client()


@pytest.fixture
def raw(sandbox: SandboxServer) -> Iterator[httpx.Client]:
    """A plain httpx client on the sandbox, for testing the sandbox's own answers."""
    with httpx.Client(base_url=sandbox.url, timeout=10) as http:
        yield http


@pytest.fixture
def redis_client() -> Iterator[redis.Redis]:
    """A real Redis connection; the test's keys live under ``key_prefix`` and are removed."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.ping()
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client: redis.Redis) -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex}:"
    yield prefix
    for key in redis_client.scan_iter(f"{prefix}*"):
        redis_client.delete(key)


# -- the mapping store: a real PostgreSQL database of our own, created and dropped -------------



@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test run, migrated with Alembic, dropped at the end."""
    from dokstamp_sync.testing import scratch_database

    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_test") as url:
        yield url


@pytest.fixture(scope="session")
def db_engine(database_url):
    from dokstamp_sync.db import make_engine

    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(db_engine):
    """A session factory on an emptied mapping store."""
    from sqlalchemy import text

    from dokstamp_sync.db import make_sessionmaker

    with db_engine.begin() as conn:
        conn.execute(text("TRUNCATE dead_letters, inbox, mappings, natural_keys "
                          "RESTART IDENTITY CASCADE"))
    return make_sessionmaker(db_engine)


@pytest.fixture
def engine_redis() -> Iterator[redis.Redis]:
    """Redis database 14, emptied: the engine's locks, rate limit, token cache and stream."""
    client = redis.Redis.from_url(TEST_ENGINE_REDIS_URL)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def make_ctx(sandbox, sessions, engine_redis):
    """Builds sync contexts on the sandbox, the test database and Redis database 14 (options
    as :func:`~dokstamp_sync.testing.sandbox_context`); closes them after the test."""
    made = []

    def factory(**kw):
        made.append(sandbox_context(sandbox, sessions, engine_redis, **kw))
        return made[-1]

    yield factory
    for context in made:
        context.close()


@pytest.fixture
def ctx(make_ctx):
    """A sync context on the sandbox, the test database and Redis database 14."""
    return make_ctx()


@pytest.fixture
def h(ctx):
    """Feeds events through a real stream and ingester and runs them in this process."""
    return Harness(ctx)
