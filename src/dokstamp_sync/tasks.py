"""Celery tasks: thin, idempotent, ids in (no personal data or secrets in Flower)."""

from __future__ import annotations

from dokstamp_sync import runtime
from dokstamp_sync.sync import engine
from dokstamp_sync.worker import app


@app.task(name="dokstamp_sync.sync_event")  # type: ignore[untyped-decorator]
def sync_event(event_pk: int) -> str:
    """Sync inbox event ``event_pk``; returns the state it ended in."""
    return engine.run(runtime.context(), event_pk)
