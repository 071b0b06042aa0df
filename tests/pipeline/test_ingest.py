"""The stream ingester: consumer group, exactly-once recording, bad events as dead letters."""

from __future__ import annotations

import json

import pytest

from dokstamp_sync.demo.samples import event
from dokstamp_sync.pipeline.ingest import StreamIngester
from dokstamp_sync.testing import STREAM, Harness

GOOD = {"name": "Maria", "email": "m@example.edu", "date_of_birth": "1998-05-20"}
BAD = [
    ("not json at all", "invalid event: not JSON"),
    ('["a", "list"]', "invalid event: an event must be a JSON object, not list"),
    (json.dumps(event("diploma", "X-1", {})), "invalid event: entity: input should be"),
    (json.dumps({k: v for k, v in event("student", "S-1", GOOD).items() if k != "key"}),
     "invalid event: missing field key"),
    (json.dumps(event("student", "S-1", GOOD) | {"key": 1001}),
     "invalid event: wrong value for key"),
    (json.dumps(event("student", "S-1", {"name": "No email"})),
     "invalid event: data.email is required for a student"),
    (json.dumps(event("student", "S-1", GOOD) | {"occurred_at": "yesterday"}),
     "invalid event: wrong value for occurred_at"),
    (json.dumps(event("file", "F-1", {"filename": "a.pdf"})),
     "invalid event: a file needs exactly one of"),
    (json.dumps(event("enrollment", "E-1", {"student_key": 5, "course_key": "C",
                                            "enrolled_at": "2024-01-01"})),
     "invalid event: data.student_key must be a string"),
    (json.dumps(event("student", "S-1", GOOD, op="revoke")),
     "invalid event: op 'revoke' is only for certificates"),
]


@pytest.mark.parametrize(("raw", "reason"), BAD, ids=[r for _, r in BAD])
def test_each_kind_of_bad_event_is_a_dead_letter_with_its_reason(h, raw, reason):
    """A malformed entry is kept with its raw text and a clear reason; the next entry of the
    stream is still processed."""
    good = event("student", "S-OK", GOOD)
    pks = h.send(raw, good)
    (letter,) = h.letters()
    assert letter.reason.lower().startswith(reason.lower()), letter.reason
    assert letter.raw == raw
    assert letter.event_pk is None
    assert h.run(pks) == ["synced"]


def test_entry_without_event_field_is_a_dead_letter(h, ctx):
    """An XADD with another field name is kept, not dropped."""
    ctx.redis.xadd(STREAM, {"payload": "{}"})
    h.send()
    (letter,) = h.letters()
    assert "no 'event' field" in letter.reason


def test_entries_are_acknowledged_and_removed_only_after_recording(h, ctx):
    """After a poll the group has nothing pending and the stream is empty (durable in the db)."""
    h.send(event("student", "S-1", GOOD), "garbage")
    assert ctx.redis.xlen(STREAM) == 0
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0


def test_a_dead_consumers_entries_are_reclaimed(ctx):
    """Entries read by a consumer that died before acknowledging are taken over (XAUTOCLAIM)."""
    got = []
    dead = StreamIngester(ctx.redis, ctx.sessions, STREAM, consumer="dead", dispatch=got.extend,
                          lease=600)
    dead.ensure_group()
    ctx.redis.xadd(STREAM, {"event": json.dumps(event("student", "S-1", GOOD))})
    ctx.redis.xreadgroup("dokstamp-sync", "dead", {STREAM: ">"}, count=10)  # then it "dies"
    alive = StreamIngester(ctx.redis, ctx.sessions, STREAM, consumer="alive",
                           dispatch=got.extend, lease=600, claim_idle_ms=0)
    assert alive.poll(block_ms=10) == 1
    assert len(got) == 1
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0


def test_same_entry_delivered_twice_is_recorded_once(h, ctx):
    """A crash between commit and XACK redelivers the entry: it changes nothing."""
    e = json.dumps(event("student", "S-1", GOOD))
    entry = (b"1-1", {b"event": e.encode()})
    ctx.redis.xadd(STREAM, {"event": e}, id="1-1")
    first = h.ingester.handle([entry])
    second = h.ingester.handle([entry])
    assert len(first) == 1
    assert second == []
    assert len(h.states()) == 1


def test_python_enqueue_and_cli_lines_reach_the_stream(ctx):
    """enqueue() and enqueue_lines() XADD the JSON under the field `event`; a bad line is
    reported and still sent (to end as a dead letter)."""
    from dokstamp_sync import enqueue
    from dokstamp_sync.pipeline.producer import enqueue_lines

    entry = enqueue(event("student", "S-1", GOOD), client=ctx.redis, stream=STREAM)
    assert entry
    report = enqueue_lines([json.dumps(event("student", "S-2", GOOD)), "", "{oops"],
                           client=ctx.redis, stream=STREAM)
    assert report.sent == 2
    assert [n for n, _ in report.invalid] == [3]
    entries = ctx.redis.xrange(STREAM)
    assert len(entries) == 3
    assert json.loads(entries[0][1][b"event"])["key"] == "S-1"


def test_xadd_from_any_language_is_ingested(ctx, sandbox):
    """A raw XADD with the event JSON (as redis-cli would send it) syncs."""
    ctx.redis.xadd(STREAM, {"event": json.dumps(event("student", "S-9", GOOD))})
    harness = Harness(ctx)
    assert harness.run(harness.send()) == ["synced"]


def test_a_batch_is_recorded_whole_with_repeats_and_a_reused_id(h, ctx):
    """One read of many entries: every new event is recorded once, in stream order; a repeat
    of an entry in the same batch changes nothing; the same event_id with other content in the
    same batch becomes a dead letter and the first one is kept."""
    events = [event("student", f"S-{i}", GOOD | {"email": f"s{i}@example.edu"})
              for i in range(30)]
    clash = dict(events[3], data=GOOD | {"email": "other@example.edu"})
    pks = h.send(*events, events[5], clash, "garbage")
    assert len(pks) == 30
    assert pks == sorted(pks)
    assert len(h.states()) == 30
    reasons = sorted(letter.reason for letter in h.letters())
    assert len(reasons) == 2
    assert reasons[0].startswith(f"invalid event: event_id {events[3]['event_id']} was "
                                 "already used by a different event")
    assert reasons[1].startswith("invalid event: not JSON")
    assert h.record(events[3]["event_id"]).payload["data"]["email"] == "s3@example.edu"
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0


def test_a_repeat_is_compared_with_the_stored_event(h):
    """The database holds A; a batch brings B (same event_id, other content) and then A
    again: only B is a dead letter, A is kept and changes nothing."""
    a = event("student", "S-1", GOOD)
    assert len(h.send(a)) == 1
    b = dict(a, data=GOOD | {"email": "other@example.edu"})
    assert h.send(b, a) == []
    (letter,) = h.letters()
    assert "other@example.edu" in letter.raw
    assert h.record(a["event_id"]).payload["data"]["email"] == GOOD["email"]
