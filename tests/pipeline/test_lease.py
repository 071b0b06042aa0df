"""The short lease on a running task's events: renewed by its heartbeat, never over a park;
the scheduler holds back while Celery's queue is long."""

from __future__ import annotations

from datetime import timedelta

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.models import InboxEvent, utcnow
from dokstamp_sync.pipeline.scheduler import dispatch_due
from dokstamp_sync.sync.lease import Heartbeat


def _next(h, pk):
    with session_scope(h.ctx.sessions) as s:
        return s.get(InboxEvent, pk).next_attempt_at


def test_a_heartbeat_renews_running_events_but_not_one_parked_meanwhile(h):
    """Each beat moves the lease of the batch's unfinished events a lease ahead; an event parked
    for a short wait in between keeps its own next attempt time, one taken out with done() is
    no longer touched, and an event leased past the beat's end is not shortened."""
    running, parked, finished = h.send(*samples.graduating_class(1)[:3])
    floor = h.ctx.store.lease([running, parked, finished], 3)
    beat = Heartbeat(h.ctx.store, [running, parked, finished], 3, floor)
    soon = utcnow() + timedelta(seconds=1)
    with session_scope(h.ctx.sessions) as s:
        s.get(InboxEvent, parked).next_attempt_at = soon  # a run parked it for 1 s
    beat.done(finished)
    h.ctx.store.lease([finished], 3)
    before = _next(h, finished)
    beat.beat()
    assert _next(h, running) > floor
    assert _next(h, parked) == soon
    assert _next(h, finished) == before


def test_the_scheduler_sends_nothing_while_the_queue_is_long(h):
    """Due events are not dispatched while Celery's queue holds max_queued tasks or more (they
    may still be in it); once it is shorter they are."""
    pks = h.send(*samples.graduating_class(1)[:2])
    with session_scope(h.ctx.sessions) as s:
        for pk in pks:
            s.get(InboxEvent, pk).next_attempt_at = utcnow() - timedelta(seconds=1)
    got: list[int] = []
    assert dispatch_due(h.ctx.sessions, got.extend, lease=30, queued=lambda: 100) == 0
    assert dispatch_due(h.ctx.sessions, got.extend, lease=30, queued=lambda: 3) == 2
    assert got == pks
