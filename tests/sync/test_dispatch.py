"""Dispatching events to Celery: a few consecutive events per task, run in order."""

from __future__ import annotations

import pytest

from dokstamp_sync import runtime, samples
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

    monkeypatch.setattr(runtime, "context", lambda: h.ctx)
    events = samples.graduating_class(1)
    pks = h.send(*events)
    states = sync_events.run([*pks, 10**9])
    assert states == ["synced"] * len(events) + ["missing"]
    assert set(h.states().values()) == {"synced"}
