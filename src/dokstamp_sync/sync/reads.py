"""What the store's reads hand the walk: a run's claim, an attempt's view, an entity's newest
event (the mapping rows themselves are :class:`.statements.Snapshot`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from dokstamp_sync.sync.statements import Neighbour, Snapshot


@dataclass(frozen=True)
class Claimed:
    """A task's run has started on an open event: its delivery count and payload."""

    deliveries: int
    payload: dict[str, Any]


@dataclass(frozen=True)
class View:
    """What one attempt needs to know, read in one transaction."""

    attempts: int
    deliveries: int
    superseded: bool  # a newer event for the same entity exists
    own: Snapshot | None  # the entity's own mapping
    refs: dict[tuple[str, str], Snapshot]  # the mappings of what it refers to
    # a certificate's: its events, oldest first (the ordering rule: :func:`.certificates.place`)
    neighbours: tuple[Neighbour, ...] | None = None
    behind: bool = False  # an older event of this entity is held (docs/guard.md): wait for it


@dataclass(frozen=True)
class Latest:
    """The newest event for an entity that was not superseded."""

    pk: int
    state: str
    op: str
    next_attempt_at: datetime | None = None  # when it is parked: its next attempt time
