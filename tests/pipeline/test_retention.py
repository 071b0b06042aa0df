"""The inbox's retention deletes old final events but keeps what deduplication needs."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import InboxEvent, utcnow
from dokstamp_sync.pipeline.retention import prune
from dokstamp_sync.testing import T0, live, student


def test_retention_deletes_old_final_events_and_a_resent_one_is_never_applied_again(
        h, ctx, sandbox):
    """Old final events are deleted except the newest of each key and those with a dead
    letter; an event the ERP sends again after its row was deleted ends superseded, and
    DokStamp keeps the newer data."""
    h.sync(student("S-1", name="Old Name", event_id="e-old"))
    h.sync(student("S-1", name="New Name", at=T0 + timedelta(hours=1), event_id="e-new"))
    h.sync(student("S-2", email="b@example.edu", event_id="e-only"))
    bad = event("student", "S-3", {"name": "No Birthday", "email": "c@example.edu"},
                at=T0, event_id="e-bad")
    assert h.sync(bad) == ["dead"]
    h.sync(student("S-3", email="c@example.edu", at=T0 + timedelta(hours=1),
                   event_id="e-fixed"))
    with session_scope(ctx.sessions) as s:
        s.execute(update(InboxEvent).values(finished_at=utcnow() - timedelta(days=10)))
        assert s.scalar(select(InboxEvent.reported_at).where(
            InboxEvent.event_id == "e-old")) is not None
    assert prune(ctx.sessions, 30) == 0  # younger than the retention
    assert prune(ctx.sessions, 7) == 1
    with session_scope(ctx.sessions) as s:
        kept = set(s.scalars(select(InboxEvent.event_id)))
    assert kept == {"e-new", "e-only", "e-bad", "e-fixed"}
    assert h.sync(student("S-1", name="Old Name", event_id="e-old")) == ["superseded"]
    names = {st["name"] for st in live(sandbox, "students")}
    assert "New Name" in names
    assert "Old Name" not in names
