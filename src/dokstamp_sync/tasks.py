"""Celery tasks: thin, idempotent, ids in (no personal data or secrets in Flower)."""

from __future__ import annotations

from dokstamp_sync import runtime
from dokstamp_sync.sync import engine
from dokstamp_sync.worker import app


@app.task(name="dokstamp_sync.sync_events")  # type: ignore[untyped-decorator]
def sync_events(event_pks: list[int]) -> list[str]:
    """Sync inbox events one after another, in the order given; returns their states.

    The dispatcher sends a few consecutive events per task (see ``worker.dispatch``): a
    student, its enrollment and its certificate then run in one process, in order, instead
    of three processes waiting on each other's locks, and the Celery overhead is shared.
    """
    ctx = runtime.context()
    return [engine.run(ctx, int(pk)) for pk in event_pks]


@app.task(name="dokstamp_sync.sync_event")  # type: ignore[untyped-decorator]
def sync_event(event_pk: int) -> str:
    """Sync inbox event ``event_pk``; returns the state it ended in (messages queued by
    versions before ``sync_events`` still run)."""
    return engine.run(runtime.context(), event_pk)
