"""Helpers for tests and benchmarks, shipped with the package (as structlog ships its own).

* :func:`scratch_database`: a migrated PostgreSQL database of its own, dropped afterwards;
* :func:`sandbox_settings` and :func:`sandbox_context`: the settings and the per-process context
  (built by :func:`dokstamp_sync.wiring.build_context`, as a worker builds its own) for a
  sandbox on loopback;
* :class:`Harness`: feeds events through a real stream and ingester and runs them with the
  engine in this process, so a test controls the order exactly;
* :func:`dump`, :func:`live`, :func:`calls`: what the sandbox holds, and the calls it received.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import psycopg
import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.config import Settings
from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.migrate import upgrade
from dokstamp_sync.models import DeadLetter, InboxEvent, Mapping
from dokstamp_sync.pipeline.ingest import StreamIngester
from dokstamp_sync.sandbox import Account
from dokstamp_sync.states import OPEN
from dokstamp_sync.sync import engine
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.wiring import build_context

STREAM = "test:events"
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


class Served(Protocol):
    """A running sandbox (``SandboxServer``): its URL and the sandbox itself."""

    url: str
    sandbox: Any


@contextmanager
def scratch_database(admin_url: str, prefix: str = "dokstamp_sync_scratch", *,
                     migrated: bool = True) -> Iterator[str]:
    """A new PostgreSQL database, migrated (unless told not to), as a SQLAlchemy URL; dropped on
    the way out.

    ``admin_url`` is a libpq URL of a database to connect to for CREATE/DROP DATABASE.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        if migrated:
            upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def sandbox_settings(url: str, *, account: Account | None = None, password: str | None = None,
                     scheme: str = "password", **overrides: Any) -> Settings:
    """Settings for a sandbox at ``url``, with the account's password login (``scheme=
    "client"``: its client credentials, as generation b wants); no ``.env`` is read and the
    environment only fills what is not given."""
    account = account or Account()
    login: dict[str, Any] = {
        "dokstamp_email": account.email,
        "dokstamp_password": password if password is not None else account.password,
    } if scheme == "password" else {
        "dokstamp_client_id": account.client_id, "dokstamp_client_secret": account.client_secret,
        "dokstamp_email": "", "dokstamp_password": ""}
    values: dict[str, Any] = {
        "dokstamp_api_url": url, "dokstamp_tenant": account.tenant, **login,
        "dokstamp_rate_limit": 1000.0, "dokstamp_timeout": 10.0,
        "dokstamp_sync_file_max_bytes": 1_000_000,
        # No settle delay: a test's delete or revoke is applied at once (tests of the change
        # guard set their own); the production default is 60 s.
        "dokstamp_sync_guard_delay": 0.0} | overrides
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def sandbox_context(sandbox: Served, sessions: sessionmaker[Session], redis_client: redis.Redis,
                    *, rate: float = 1000.0, file_root: Path | None = None,
                    hosts: Iterable[str] = (), timeout: float = 10.0,
                    password: str | None = None,
                    limiter_sleep: Callable[[float], None] | None = None,
                    scheme: str | None = None, issue_style: str | None = None,
                    **kw: Any) -> SyncContext:
    """A context on the sandbox, the caller's database and Redis; in-call retries do not
    sleep unless ``sleep`` is given. ``scheme``: "password" or "client" login, by default the
    one the sandbox's generation has (b: client credentials); ``issue_style``: the setting
    (default: it follows the scheme)."""
    if scheme is None:
        scheme = "client" if sandbox.sandbox.config.generation == "b" else "password"
    extra: dict[str, Any] = {"dokstamp_issue_style": issue_style} if issue_style else {}
    settings = sandbox_settings(
        sandbox.url, password=password, scheme=scheme, **extra,
        dokstamp_rate_limit=rate, dokstamp_timeout=timeout,
        dokstamp_sync_file_root=str(file_root or ""),
        dokstamp_sync_file_hosts=",".join(hosts))
    kw.setdefault("sleep", lambda _s: None)
    if limiter_sleep is not None:
        kw["limiter_sleep"] = limiter_sleep
    return build_context(settings, sessions=sessions, redis_client=redis_client, **kw)


class Harness:
    """Feeds events through a real stream + ingester and runs them with the engine."""

    def __init__(self, ctx: SyncContext, stream: str = STREAM) -> None:
        self.ctx = ctx
        self.stream = stream
        self.dispatched: list[int] = []
        self.ingester = StreamIngester(ctx.redis, ctx.sessions, stream, consumer="test",
                                       dispatch=self.dispatched.extend, lease=600,
                                       report=ctx.store.report,
                                       arrivals=ctx.guard.note_arrivals)
        self.ingester.ensure_group()

    def send(self, *events: dict[str, Any] | str) -> list[int]:
        """XADD the events, ingest them; the new inbox events' primary keys."""
        for e in events:
            self.ctx.redis.xadd(self.stream, {"event": e if isinstance(e, str)
                                              else json.dumps(e)})
        before = len(self.dispatched)
        while self.ingester.poll(block_ms=10):
            pass
        return self.dispatched[before:]

    def run(self, pks: Iterable[int]) -> list[str]:
        return [engine.run(self.ctx, pk) for pk in pks]

    def sync(self, *events: dict[str, Any]) -> list[str]:
        return self.run(self.send(*events))

    def drain(self, rounds: int = 20) -> None:
        """Run every pending/waiting event until none is left to do (due or not)."""
        for _ in range(rounds):
            with session_scope(self.ctx.sessions) as s:
                pks = list(s.scalars(select(InboxEvent.id).where(
                    InboxEvent.state.in_(OPEN)).order_by(InboxEvent.id)))
            if not pks:
                return
            self.run(pks)

    def states(self) -> dict[str, str]:
        with session_scope(self.ctx.sessions) as s:
            return {r.event_id: r.state for r in s.scalars(select(InboxEvent))}

    def state(self, event_id: str) -> str:
        return self.states()[event_id]

    def record(self, event_id: str) -> InboxEvent:
        with session_scope(self.ctx.sessions) as s:
            rec = s.scalar(select(InboxEvent).where(InboxEvent.event_id == event_id))
            assert rec is not None
            s.expunge(rec)
            return rec

    def mapping(self, entity: str, key: str) -> Mapping | None:
        with session_scope(self.ctx.sessions) as s:
            m = s.scalar(select(Mapping).where(Mapping.entity == entity, Mapping.erp_key == key))
            if m is not None:
                s.expunge(m)
            return m

    def letters(self) -> list[DeadLetter]:
        with session_scope(self.ctx.sessions) as s:
            out = list(s.scalars(select(DeadLetter).order_by(DeadLetter.id)))
            for d in out:
                s.expunge(d)
            return out


def dump(sandbox: Served, tenant: str = "demo-university") -> dict[str, Any]:
    """Everything the sandbox holds for ``tenant``, deleted rows included."""
    held: dict[str, Any] = sandbox.sandbox.tenants[tenant].dump()
    return held


def live(sandbox: Served, kind: str) -> list[dict[str, Any]]:
    """The rows of one kind (``students``...) that are not deleted."""
    return [e for e in dump(sandbox)[kind] if e["deleted_at"] is None]


def calls(sandbox: Served) -> dict[str, int]:
    """API calls the sandbox received, by ``METHOD /route``."""
    by_route: dict[str, int] = sandbox.sandbox.stats.to_json()["by_route"]
    return by_route


def student(key: str = "S-1", email: str = "maria@example.edu", name: str = "Maria Silva",
            at: datetime = T0, **kw: Any) -> dict[str, Any]:
    """A student upsert event."""
    return event("student", key, {"name": name, "email": email,
                                  "date_of_birth": "1998-05-20"}, at=at, **kw)
