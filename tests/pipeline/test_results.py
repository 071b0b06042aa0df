"""The outcome stream of CONTRACT §5 read back by a plain Redis client (redis-py XRANGE), and
dead letters that resolve themselves when a newer event of their entity syncs."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.ops import dlq
from dokstamp_sync.redis_keys import RESULTS_STREAM
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import T0, live, student

FIELDS = ["event_id", "entity", "key", "op", "state", "at", "dokstamp_uuid", "mapping_status",
          "public_verification_url", "reason", "dead_letter_id", "http_status"]


def outcomes(redis_client: Any) -> list[dict[str, Any]]:
    """Every entry of the outcome stream, as an ERP's own client reads it."""
    entries = redis_client.xrange(RESULTS_STREAM)
    for _, fields in entries:
        assert list(fields) == [b"result"]
    return [json.loads(fields[b"result"]) for _, fields in entries]


def test_synced_dead_superseded_and_invalid_outcomes_on_the_stream(h, ctx, sandbox):
    """A synced student reports its DokStamp UUID; a student DokStamp refuses reports dead with
    its letter and HTTP status; a malformed entry and an invalid event with a key report dead;
    the corrected student's sync resolves both of its letters, each reported superseded."""
    h.sync(event("student", "S-2", {"name": "No Birthday", "email": "nb@example.edu"},
                 at=T0, event_id="bad-1"))
    h.send("not json", json.dumps({"event_id": "bad-2", "entity": "student", "op": "upsert",
                                   "key": "S-2", "occurred_at": "2026-11-22T10:00:00Z",
                                   "data": {"name": "x"}}))
    assert h.sync(student("S-1", event_id="good-1")) == ["synced"]
    got = outcomes(ctx.redis)
    assert all(list(o) == FIELDS for o in got)
    by_id = {o["event_id"]: o for o in got}
    synced = by_id["good-1"]
    assert synced["state"] == "synced"
    assert synced["dokstamp_uuid"] == h.mapping("student", "S-1").dokstamp_uuid
    assert synced["dokstamp_uuid"] in {s["uuid"] for s in live(sandbox, "students")}
    assert (synced["mapping_status"], synced["reason"], synced["dead_letter_id"]) == (
        "active", None, None)
    assert synced["public_verification_url"] is None
    assert synced["at"].endswith("Z")
    refused = by_id["bad-1"]
    letters = {d.event_id: d for d in h.letters()}
    assert refused["state"] == "dead"
    assert refused["http_status"] == 422
    assert refused["dead_letter_id"] == letters["bad-1"].id
    assert refused["reason"]
    invalid = by_id["bad-2"]
    assert (invalid["state"], invalid["entity"], invalid["key"]) == ("dead", "student", "S-2")
    assert invalid["dead_letter_id"] == letters["bad-2"].id
    unparsable = by_id[None]
    assert unparsable["state"] == "dead"
    assert "invalid event" in unparsable["reason"]

    # The ERP sends the corrected student: it syncs, and both letters of S-2 resolve.
    assert h.sync(student("S-2", email="nb@example.edu", at=T0 + timedelta(hours=1),
                          event_id="fix-1")) == ["synced"]
    resolved = {d.event_id: d.status for d in h.letters()}
    assert resolved == {"bad-1": "superseded", "bad-2": "superseded", None: "open"}
    later = outcomes(ctx.redis)[len(got):]
    assert [(o["event_id"], o["state"]) for o in later] == [
        ("fix-1", "synced"), ("bad-1", "superseded"), ("bad-2", "superseded")]
    assert later[1]["dead_letter_id"] == letters["bad-1"].id
    assert later[1]["op"] == "upsert"


def test_dlq_list_shows_only_open_letters_and_replaying_a_superseded_one_does_nothing(h, ctx):
    """`dlq list` is what still needs someone: a resolved letter is only in the full list;
    replaying it (by id or with --all) is skipped and leaves the event dead; the open count
    of `status` (and the metric) drops to what is open."""
    from dokstamp_sync.ops.status import report

    h.sync(event("student", "S-3", {"name": "x", "email": "x@example.edu"}, at=T0,
                 event_id="old"))
    (letter,) = h.letters()
    with session_scope(ctx.sessions) as s:
        assert report(s, None, "x")["dead_letters_open"] == 1
    assert h.sync(student("S-3", email="x@example.edu", at=T0 + timedelta(minutes=5))) == [
        "synced"]
    with session_scope(ctx.sessions) as s:
        assert dlq.list_letters(s) == []
        assert [d.status for d in dlq.list_letters(s, include_resolved=True)] == ["superseded"]
        assert report(s, None, "x")["dead_letters_open"] == 0
    rep = dlq.replay(ctx.sessions, [letter.id])
    assert (rep.replayed, rep.skipped) == ([], [letter.id])
    assert dlq.replay(ctx.sessions, everything=True).replayed == []
    assert h.state("old") == "dead"


def test_an_older_event_syncing_leaves_a_newer_letter_open(h, ctx):
    """Only a NEWER event resolves a letter: an older one that syncs later leaves it open."""
    h.sync(event("student", "S-4", {"name": "x", "email": "y@example.edu"},
                 at=T0 + timedelta(hours=2), event_id="new-bad"))
    assert h.sync(student("S-4", email="y@example.edu", at=T0)) == ["synced"]
    assert [d.status for d in h.letters()] == ["open"]


def test_a_replayed_letter_reports_its_new_outcome_again(h, ctx, sandbox):
    """Dead, replayed after the data was fixed in DokStamp: the same event_id is reported
    again, now synced."""
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=422, after_commit=False)]))
    assert h.sync(student("S-5", event_id="flaky")) == ["dead"]
    dlq.replay(ctx.sessions, everything=True)
    h.drain()
    assert [(o["event_id"], o["state"]) for o in outcomes(ctx.redis)] == [
        ("flaky", "dead"), ("flaky", "synced")]


def test_the_stream_is_trimmed_to_its_maxlen(h, ctx):
    """XADD trims approximately to DOKSTAMP_SYNC_RESULTS_MAXLEN (here 10)."""
    from dataclasses import replace

    from dokstamp_sync.pipeline.results import Publisher
    from dokstamp_sync.sync.store import Store

    small = replace(ctx, store=Store(ctx.sessions,
                                     report=Publisher(ctx.redis, RESULTS_STREAM, maxlen=10)))
    h.ctx = small
    h.ingester.report = small.store.report
    h.send(*[f"junk {i}" for i in range(300)])
    assert 10 <= ctx.redis.xlen(RESULTS_STREAM) < 300
