"""Celery tasks: thin, idempotent, ids in (no personal data or secrets in Flower)."""

from __future__ import annotations

import logging

from dokstamp_sync import wiring
from dokstamp_sync.models import utcnow
from dokstamp_sync.ops.flower import DeadEvents, raise_if_dead
from dokstamp_sync.states import RunState
from dokstamp_sync.sync import engine
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.lease import Heartbeat
from dokstamp_sync.worker import SYNC_EVENTS, app

log = logging.getLogger("dokstamp_sync.worker")


@app.task(name=SYNC_EVENTS, throws=(DeadEvents,))  # type: ignore[untyped-decorator]
def sync_events(event_pks: list[int]) -> list[str]:
    """Sync inbox events one after another, in the order given; returns their states, or
    raises :class:`~.ops.flower.DeadEvents` naming the dead letters when any ended dead (at
    the very end, after everything is recorded: Flower shows the task failed, the message is
    acknowledged once all the same).

    The dispatcher sends a few consecutive events per task (see ``worker.dispatch``): a
    student, its enrollment and its certificate then run in one process, in order, instead
    of three processes waiting on each other's locks, and the Celery overhead is shared.
    """
    ctx = wiring.context()
    pks = [int(pk) for pk in event_pks]
    try:  # the whole batch is this task's from now on: the scheduler must not hand it out
        floor = ctx.store.lease(pks, ctx.limits.lease)
    except Exception:  # each run below claims its own event anyway
        log.exception("events %s: could not lease the batch", pks)
        floor = utcnow()
    states = []
    # The lease is short (a lost worker's events come back within it): renewed while we work.
    with Heartbeat(ctx.store, pks, ctx.limits.lease, floor) as heartbeat:
        for pk in pks:
            try:
                states.append(engine.run(ctx, pk, flush=False))
            except Exception:  # e.g. the database away: this event waits for the scheduler,
                log.exception("event %s: not run", pk)  # the next ones are still tried
                states.append(RunState.ERROR)
            heartbeat.done(pk)
    record(ctx)
    engine.flush_counters(ctx)  # one Redis round trip for the batch
    raise_if_dead(ctx.sessions, pks, states)
    return states


def record(ctx: SyncContext) -> None:
    """Add this task's counts to the replica's (``/metrics``: they add up across replicas)."""
    recorder = wiring.recorder()
    recorder.counters(ctx.counters.unflushed)
    recorder.flush(ctx.redis, ctx.counters.keys)


@app.task(name="dokstamp_sync.sync_event")  # type: ignore[untyped-decorator]
def sync_event(event_pk: int) -> str:
    """Sync inbox event ``event_pk``; returns the state it ended in (messages queued by
    versions before ``sync_events`` still run)."""
    ctx = wiring.context()
    with Heartbeat(ctx.store, [event_pk], ctx.limits.lease, utcnow()):
        state = engine.run(ctx, event_pk, flush=False)
    record(ctx)
    engine.flush_counters(ctx)
    return state
