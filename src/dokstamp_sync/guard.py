"""The change guard (docs/guard.md): a mass delete or revoke is held for an operator.

Destructive events are ``delete`` (any entity) and ``revoke`` (certificates). The engine asks
:meth:`Guard.admit` once per attempt, just before it would apply an event::

    the event                                        admit
    ├── a held event of the same entity is older     Waiting (parked until that one is
    │                                                released or discarded: nothing of an
    │                                                entity is applied out of the ERP's order)
    ├── not destructive, or the guard is off         None (go on)
    ├── destructive, admitted before (counted        None (go on)
    │   within the threshold, or released)
    ├── its kind's count in the window passes        Outcome(held): every open destructive
    │   the threshold                                event of the kind not admitted yet is
    │                                                held at once, reported, logged
    ├── arrived less than the settle delay ago       Waiting (parked until the delay passed,
    │                                                so the burst is seen whole first)
    └── otherwise                                    marked admitted, None (go on); held
                                                     instead if another worker held it first

The count lives in Redis, one sorted set per kind under the app's namespace
(``RedisKeys.guard`` + entity): member the ``event_id``, score its arrival time. The ingester
adds each delete and revoke as it records it (:meth:`Guard.note_arrivals`), so a burst
behind a long queue is seen whole; the older-held check comes with the store's attempt query
(``View.behind``), so an ordinary upsert costs the guard no query. One Lua script adds the
event (NX:
a second worker adding the same event changes nothing), drops what left the window and counts,
atomically, so any number of workers count one burst once; holding is one UPDATE of the open,
not-admitted events (:func:`~dokstamp_sync.held.hold_kind`), so each is held once.
The threshold is a share of the kind's active mappings, never less than the minimum; a share of
100 % turns the guard off (no count, no delay).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass

import redis
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync import held
from dokstamp_sync.config import StoreSettings
from dokstamp_sync.db import session_scope
from dokstamp_sync.events import Event, utc
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.reporting import Report, Result, mark_reported
from dokstamp_sync.states import EventState
from dokstamp_sync.sync.outcomes import Outcome, Waiting

log = logging.getLogger("dokstamp_sync.guard")

BEHIND_RECHECK = 3600.0  # s: a release or discard wakes the events behind it before that
SETTLE_SLACK = 0.05  # s past the settle delay, so the next attempt finds it passed

# KEYS[1]: the kind's window. ARGV: event_id, its arrival (epoch s), the window's start
# (epoch s), the key's lifetime (s). Returns the count in the window, this event included.
_COUNT = """
redis.call('ZADD', KEYS[1], 'NX', ARGV[2], ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return redis.call('ZCARD', KEYS[1])
"""


@dataclass(frozen=True)
class GuardPolicy:
    """The guard's settings (``DOKSTAMP_SYNC_GUARD_*``; defaults as docs/guard.md)."""

    window: float = 3600.0  # s
    threshold: float = 10.0  # % of the kind's active mappings
    minimum: int = 20
    delay: float = 60.0  # s

    @classmethod
    def from_settings(cls, settings: StoreSettings) -> GuardPolicy:
        return cls(window=settings.dokstamp_sync_guard_window,
                   threshold=settings.dokstamp_sync_guard_threshold,
                   minimum=settings.dokstamp_sync_guard_min,
                   delay=settings.dokstamp_sync_guard_delay)

    @property
    def off(self) -> bool:
        return self.threshold >= 100

    def limit(self, active: int) -> int:
        """How many destructive events of a kind the window may hold before they are held."""
        return max(self.minimum, math.ceil(active * self.threshold / 100))

    def describe(self, entity: str, count: int, active: int) -> str:
        """The reason a kind is held: how many, which threshold."""
        return (f"held by the change guard: {count} {entity} deletes/revokes within "
                f"{self.window:g} s, past the threshold of {self.limit(active)} "
                f"({self.threshold:g} % of {active} active {entity} mappings, at least "
                f"{self.minimum}); see `dokstamp-sync held list`")


def destructive(event: Event) -> bool:
    return held.destructive(event.op)


class Guard:
    """The fleet's change guard as one process sees it (see the module's docstring)."""

    def __init__(self, policy: GuardPolicy, sessions: sessionmaker[Session],
                 client: redis.Redis, report: Report | None = None, *,
                 prefix: str = RedisKeys().guard) -> None:
        self.policy, self.sessions, self.redis, self.report = policy, sessions, client, report
        self.prefix = prefix  # RedisKeys.guard: + entity, the kind's window
        self._count = client.register_script(_COUNT)

    def admit(self, pk: int, event: Event, *, behind: bool = False) -> Outcome | None:
        """None: apply event ``pk`` now; an ``Outcome`` (held): record it; raises
        :class:`Waiting` to park it (behind a held event, or until its settle delay passed).
        ``behind``: the store saw an older held event of the entity (read with the attempt,
        so an ordinary upsert costs no query here)."""
        if behind:
            self.wait_behind(pk, event)
        if not destructive(event) or self.policy.off:
            return None
        with session_scope(self.sessions) as session:
            facts = held.facts(session, pk, event.entity)
        if facts is None or facts.admitted:
            return None
        arrived = utc(facts.received_at).timestamp()
        count = self.count(event.entity, event.event_id, arrived)
        if count > self.policy.limit(facts.active):
            return self.hold(event.entity, self.policy.describe(event.entity, count,
                                                                facts.active))
        settle = arrived + self.policy.delay - time.time()
        if settle > 0:
            raise Waiting(f"settling: a {event.op} is applied {self.policy.delay:g} s after it "
                          "arrived, once its burst is seen whole (change guard)",
                          delay=settle + SETTLE_SLACK)
        with session_scope(self.sessions) as session:
            if held.admit(session, pk):
                return None
        return Outcome(state=EventState.HELD, note="held by the change guard meanwhile")

    def wait_behind(self, pk: int, event: Event) -> None:
        """Raise :class:`Waiting` naming the older held event of the entity, if one is still
        held (woken when an operator releases or discards it)."""
        with session_scope(self.sessions) as session:
            blocker = held.older_held(session, event.entity, event.key, event.occurred_at, pk)
        if blocker is not None:
            raise Waiting(f"waits behind held {blocker.op} event {blocker.event_id} of this "
                          f"entity (#{blocker.pk}: `dokstamp-sync held release` or `discard`)",
                          waiting_for=held.behind_tag(event.entity, event.key),
                          delay=BEHIND_RECHECK)

    def count(self, entity: str, event_id: str, arrived: float) -> int:
        """Add the event to its kind's window (once) and count the window."""
        start = time.time() - self.policy.window
        return int(self._count(keys=[f"{self.prefix}{entity}"],
                               args=[event_id, repr(arrived), repr(start),
                                     math.ceil(self.policy.window) + 60]))

    def note_arrivals(self, arrivals: Sequence[tuple[str, str]]) -> None:
        """Count deletes and revokes as they arrive (the ingester calls this after its
        commit), not only when first attempted: a burst behind a long queue is then seen whole
        before the first of it has waited out its settle delay. Never raises: the first
        attempt of each counts it anyway."""
        if self.policy.off:
            return
        now = time.time()
        with suppress(redis.RedisError), self.redis.pipeline(transaction=False) as pipe:
            for entity, event_id in arrivals:
                pipe.zadd(f"{self.prefix}{entity}", {event_id: now}, nx=True)
            for entity in {entity for entity, _ in arrivals}:
                pipe.expire(f"{self.prefix}{entity}", math.ceil(self.policy.window) + 60)
            pipe.execute()

    def hold(self, entity: str, reason: str) -> Outcome:
        """Hold every open destructive event of ``entity`` not admitted yet; report them."""
        with session_scope(self.sessions) as session:
            results = held.hold_kind(session, entity, reason)
        if results:
            log.warning("%d %s event(s) %s", len(results), entity, reason,
                        extra={"entity": entity, "state": EventState.HELD.value})
            self.publish(results)
        return Outcome(state=EventState.HELD, note=reason)

    def publish(self, results: list[Result]) -> None:
        """Write outcomes already committed; mark them reported (else the sweeper will)."""
        if self.report is not None and self.report(results):
            with session_scope(self.sessions) as session:
                mark_reported(session, results)


def forget(client: redis.Redis, entity: str, event_ids: list[str], *,
           prefix: str = RedisKeys().guard) -> None:
    """Take released or discarded events out of their kind's window: an operator decided on
    them, so they no longer count against the threshold (the next ordinary revoke is not held
    for a burst already dealt with)."""
    if event_ids:
        client.zrem(f"{prefix}{entity}", *event_ids)

