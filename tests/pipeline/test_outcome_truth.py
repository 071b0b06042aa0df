"""Outcomes the ERP can trust (issue 17, items 10 and 11), read back from the real outcome
stream with a plain XRANGE, as an ERP keeping the last outcome per ``event_id`` reads it."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import redis
from sqlalchemy import update

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import DeadLetter, InboxEvent
from dokstamp_sync.pipeline import outbox
from dokstamp_sync.pipeline.results import Publisher
from dokstamp_sync.redis_keys import RESULTS_STREAM
from dokstamp_sync.testing import T0, live, student


def outcomes(client: redis.Redis) -> list[dict[str, Any]]:
    """Every entry of the outcome stream, as an ERP's own client reads it (XRANGE)."""
    return [json.loads(fields[b"result"]) for _, fields in client.xrange(RESULTS_STREAM)]


def last_per_event_id(client: redis.Redis) -> dict[str | None, dict[str, Any]]:
    """What an ERP that keeps the last outcome per event_id ends up believing."""
    return {o["event_id"]: o for o in outcomes(client)}


def age(sessions: Any) -> None:
    """Make every recorded outcome older than the sweeper's settle time."""
    ago = timedelta(minutes=1)
    with session_scope(sessions) as s:
        s.execute(update(InboxEvent).values(finished_at=InboxEvent.finished_at - ago))
        s.execute(update(DeadLetter).values(last_failed_at=DeadLetter.last_failed_at - ago,
                                            resolved_at=DeadLetter.resolved_at - ago))


def test_an_event_id_reused_for_other_content_is_reported_as_a_refused_duplicate(h, ctx,
                                                                                 sandbox):
    """The ERP sends a student (synced), then other content under the same event_id: the
    refused copy is reported with ``"refused_duplicate": true`` (state dead, its letter), so a
    consumer can tell it from the kept event's outcome; the kept event's own outcome stays
    ``synced`` without the flag, and the sweeper's rebuild of the refusal carries it too."""
    kept = student("S-1", event_id="erp-1")
    assert h.sync(kept) == ["synced"]
    clash = student("S-1", event_id="erp-1", name="Someone Else", at=T0 + timedelta(hours=1))
    assert h.send(clash) == []
    first, refused = outcomes(ctx.redis)
    assert (first["event_id"], first["state"]) == ("erp-1", "synced")
    assert "refused_duplicate" not in first
    assert (refused["event_id"], refused["state"]) == ("erp-1", "dead")
    assert refused["refused_duplicate"] is True
    assert "already used by a different event" in refused["reason"]
    assert [s["name"] for s in live(sandbox, "students")] == ["Maria Silva"]

    # The same refusal rebuilt by the sweeper (its first write lost) says so as well.
    with session_scope(ctx.sessions) as s:
        s.execute(update(DeadLetter).values(reported_at=None))
    age(ctx.sessions)
    assert outbox.sweep(ctx.sessions, Publisher(ctx.redis)) == 1
    assert outcomes(ctx.redis)[-1]["refused_duplicate"] is True


def test_the_last_outcome_is_superseded_when_the_first_dead_write_failed(h, ctx, sandbox):
    """Redis refuses the XADD of an event's ``dead`` outcome (the outcome stream's key holds a
    string: WRONGTYPE); the key is freed, a corrected event syncs and resolves the letter
    (``superseded`` written). The sweeper then finds the ``dead`` outcome unwritten: the last
    outcome on the stream for that event_id must still be ``superseded``, its current state."""
    ctx.redis.set(RESULTS_STREAM, "not a stream")  # every XADD now fails with WRONGTYPE
    bad = event("student", "S-2", {"name": "No Birthday", "email": "nb@example.edu"},
                at=T0, event_id="bad-1")
    assert h.sync(bad) == ["dead"]
    ctx.redis.delete(RESULTS_STREAM)
    assert h.sync(student("S-2", email="nb@example.edu", at=T0 + timedelta(hours=1),
                          event_id="fix-1")) == ["synced"]
    age(ctx.sessions)
    outbox.sweep(ctx.sessions, Publisher(ctx.redis))
    last = last_per_event_id(ctx.redis)
    assert last["bad-1"]["state"] == "superseded"
    assert last["fix-1"]["state"] == "synced"
    assert [s["email"] for s in live(sandbox, "students")] == ["nb@example.edu"]
    assert outbox.sweep(ctx.sessions, Publisher(ctx.redis), settle=0) == 0  # nothing owed


def test_a_malformed_entrys_dead_outcome_names_the_op_its_text_names(h, ctx):
    """A revoke entry that is no valid event (occurred_at "yesterday") is reported dead with
    op "revoke", read from its raw text, so the ERP can tell a lost revoke from a lost upsert;
    an entry whose op cannot be read is reported with op null."""
    bad = event("certificate", "CERT-1", {"revocation_reason": "fraud"}, op="revoke")
    bad["occurred_at"] = "yesterday"
    h.send(bad, "not json at all")
    dead = [r for r in outcomes(ctx.redis) if r["state"] == "dead"]
    assert [(r["event_id"], r["op"]) for r in dead] == [(bad["event_id"], "revoke"), (None, None)]
