"""Helpers for engine tests: a SyncContext on the sandbox, feeding and running events."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from dokstamp_sync.db import session_scope
from dokstamp_sync.dokstamp import PasswordLogin, RateLimiter, RedisTokenStore, TokenManager
from dokstamp_sync.dokstamp.client import DokStampClient, build_http_client
from dokstamp_sync.models import DeadLetter, InboxEvent, Mapping
from dokstamp_sync.pipeline.ingest import StreamIngester
from dokstamp_sync.sync import engine
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.files import FilePolicy

STREAM = "test:events"


def make_context(sandbox, sessions, redis_client, *, rate: float = 1000.0,
                 file_root: Path | None = None, hosts: Iterable[str] = (),
                 timeout: float = 10.0, password: str = "sandbox-password",
                 limiter_sleep: Any = None, **kw: Any) -> SyncContext:
    limiter = RateLimiter(redis_client, "demo-university", rate,
                          **({"sleep": limiter_sleep} if limiter_sleep else {}))
    http = build_http_client(sandbox.url, timeout=timeout, limiter=limiter)
    tokens = TokenManager(http, PasswordLogin("admin@demo-university.edu", password),
                          RedisTokenStore(redis_client))
    client = DokStampClient(http, tenant="demo-university", tokens=tokens)
    kw.setdefault("sleep", lambda s: None)
    return SyncContext(client=client, sessions=sessions, redis=redis_client, limiter=limiter,
                       files=FilePolicy(frozenset(hosts), file_root, 1_000_000),
                       file_http=httpx.Client(timeout=5), **kw)


class Harness:
    """Feeds events through a real stream + ingester and runs them with the engine."""

    def __init__(self, ctx: SyncContext) -> None:
        self.ctx = ctx
        self.dispatched: list[int] = []
        self.ingester = StreamIngester(ctx.redis, ctx.sessions, STREAM, consumer="test",
                                       dispatch=self.dispatched.extend, lease=600)
        self.ingester.ensure_group()

    def send(self, *events: dict[str, Any] | str) -> list[int]:
        import json

        for e in events:
            self.ctx.redis.xadd(STREAM, {"event": e if isinstance(e, str) else json.dumps(e)})
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
                    InboxEvent.state.in_(("pending", "waiting"))).order_by(InboxEvent.id)))
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
