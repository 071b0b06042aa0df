"""Dispatching events to Celery: a few consecutive events per task, run in order."""

from __future__ import annotations

import pytest

from dokstamp_sync import wiring
from dokstamp_sync.demo import samples
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.worker import EVENTS_PER_TASK, task_batches


@pytest.mark.parametrize(("n", "sizes"), [
    (0, []), (1, [1]), (8, [1] * 8), (9, [2] * 4 + [1]), (16, [2] * 8),
    (64, [8] * 8), (100, [8] * 12 + [4])])
def test_batches_keep_order_and_spread_short_bursts(n, sizes):
    """Every event once, in order; a burst of 8 or fewer runs one per task (in parallel)."""
    batches = task_batches(list(range(n)))
    assert [len(b) for b in batches] == sizes
    assert [pk for b in batches for pk in b] == list(range(n))
    assert all(len(b) <= EVENTS_PER_TASK for b in batches)


def test_a_task_syncs_its_events_in_order_and_survives_a_missing_one(h, monkeypatch):
    """`sync_events` runs a student's chain in one process; an id that no longer exists is
    reported as missing and the others still sync."""
    from dokstamp_sync.tasks import sync_events

    monkeypatch.setattr(wiring, "context", lambda: h.ctx)
    events = samples.graduating_class(1)
    pks = h.send(*events)
    h.ctx.redis.delete(RedisKeys().counters)
    states = sync_events.run([*pks, 10**9])
    assert states == ["synced"] * len(events) + ["missing"]
    assert set(h.states().values()) == {"synced"}
    # the batch's counters reach Redis once the task ends
    assert int(h.ctx.redis.hget(RedisKeys().counters, "events_synced")) == states.count("synced")


def test_an_event_that_raises_does_not_stop_its_batch(h, monkeypatch):
    """If one run raises (say its claim hits a database error), the task logs it, reports
    `error` for it and still runs the rest of the batch."""
    from dokstamp_sync.sync import engine
    from dokstamp_sync.tasks import sync_events

    monkeypatch.setattr(wiring, "context", lambda: h.ctx)
    pks = h.send(*samples.graduating_class(1)[:3])  # institution and two modules
    real = engine.run

    def flaky(ctx, pk, **kw):
        if pk == pks[1]:
            raise RuntimeError("database away")
        return real(ctx, pk, **kw)

    monkeypatch.setattr(engine, "run", flaky)
    assert sync_events.run(pks) == ["synced", "error", "synced"]


def test_a_task_leases_its_whole_batch(h):
    """The events of a batch are leased when its task starts, so the scheduler does not hand
    out the later ones again while the first ones run."""
    from datetime import UTC, datetime, timedelta

    from dokstamp_sync.db import session_scope
    from dokstamp_sync.models import InboxEvent
    from dokstamp_sync.pipeline.scheduler import dispatch_due

    pks = h.send(*samples.graduating_class(1)[:3])
    with session_scope(h.ctx.sessions) as s:
        for pk in pks:
            s.get(InboxEvent, pk).next_attempt_at = datetime.now(UTC) - timedelta(seconds=1)
    h.ctx.store.lease(pks[1:], 600)
    due: list[int] = []
    dispatch_due(h.ctx.sessions, due.extend, lease=600)
    assert due == pks[:1]
