"""What the graph walk needs, passed down explicitly, in three parts:

- :class:`SyncContext`: the process-wide resources (the DokStamp client, the mapping store, the
  Redis seam: :class:`~.locks.Locks`, :class:`~.marks.CreateMarks`,
  :class:`~.marks.ListingMarks`, :class:`~.marks.Counters`), the change guard
  (:class:`~dokstamp_sync.guard.Guard`) and the frozen :class:`Limits`;
  built once per process by :func:`dokstamp_sync.wiring.build_context`;
- :class:`Run`: one event's run, created by :func:`.engine.run` (the chain of entities being
  synced, for the cycle check), passed down explicitly and dropped when the run ends.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import httpx
import redis
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.dokstamp import DokStampClient
from dokstamp_sync.dokstamp.breaker import CircuitBreaker
from dokstamp_sync.dokstamp.client import Resource
from dokstamp_sync.guard import Guard
from dokstamp_sync.models import utcnow
from dokstamp_sync.sync.locks import Locks
from dokstamp_sync.sync.marks import Counters, CreateMarks, ListingMarks
from dokstamp_sync.sync.sources import FilePolicy
from dokstamp_sync.sync.store import Store


@dataclass(frozen=True)
class Limits:
    """The engine's limits, from the settings (``DOKSTAMP_SYNC_*``)."""

    dependency_timeout: float = 86400.0
    retry_budget: float = 86400.0
    max_deliveries: int = 5
    lease: float = 20.0  # the scheduler's lease on a running event, renewed by a heartbeat
    in_call_attempts: int = 3
    create_window: float = 20.0  # s a failed create may still land (twice the HTTP timeout)


@dataclass
class SyncContext:
    client: DokStampClient
    store: Store
    locks: Locks
    creates: CreateMarks  # in-flight creates
    listings: ListingMarks
    counters: Counters
    files: FilePolicy
    file_http: httpx.Client
    # The connections the objects above use: for wiring, tests and tools; the walk itself goes
    # through the store and the Redis seam only.
    redis: redis.Redis
    sessions: sessionmaker[Session]
    guard: Guard  # the change guard (docs/guard.md): asked once per attempt
    limits: Limits = field(default_factory=Limits)
    breaker: CircuitBreaker | None = None  # the fleet's, on the client's transport
    sleep: Callable[[float], None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def close(self) -> None:
        """Close the HTTP connections (the process is done with this context)."""
        self.client.http.close()
        self.file_http.close()

    def count(self, name: str, n: int = 1) -> None:
        """Count locally; flushed to the fleet-wide counters once per task."""
        self.counters.add(name, n)

    def resource(self, name: str) -> Resource:
        """The client's resource ``name`` (``"students"``...)."""
        found: Resource = getattr(self.client, name)
        return found


@dataclass
class Run:
    """One event's run (created by :func:`.engine.run`, never shared): the (entity, key) chain
    being synced, innermost last; a dependency leading back into it is a cycle. ``started``:
    when it began (what a park waits for, recorded since, was a wake-up it missed)."""

    walk: list[tuple[str, str]] = field(default_factory=list)
    started: datetime = field(default_factory=utcnow)
