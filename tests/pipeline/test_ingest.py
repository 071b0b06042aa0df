"""The stream ingester: consumer group, exactly-once recording, bad events as dead letters,
no entry holding up another, a group that is gone, reclaiming, the health it reports."""

from __future__ import annotations

import json
import time
from contextlib import contextmanager

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from dokstamp_sync.db import make_engine, make_sessionmaker, session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.ops.health import check
from dokstamp_sync.pipeline.ingest import StreamIngester
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.testing import STREAM, Harness, live

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


# -- isolation: no entry holds up another (the issue "one bad entry blocks 200 good ones") ----

def student_event(key: str, **changes):
    return event("student", key, GOOD | {"email": f"{key.lower()}@example.edu"}) | changes


def _deep(key: str) -> str:
    return (f'{{"event_id": "erp-deep-{key}", "entity": "student", "op": "upsert", '
            f'"key": "{key}", "occurred_at": "2026-01-01T00:00:00Z", "data": '
            + '{"a": ' * 5000 + "1" + "}" * 5000 + "}")


# (fields of the stream entry, reason, (event_id, entity, key) the dead letter keeps)
SIX = {
    "nul-in-event-id": (
        {"event": json.dumps(student_event("S-B1", event_id="erp-\u0000-1"))},
        "invalid event: event_id contains a NUL character",
        ("erp-\\u0000-1", "student", "S-B1")),
    "lone-surrogate-in-event-id": (
        {"event": json.dumps(student_event("S-B2", event_id="erp-\ud800-2"))},
        "invalid event: event_id contains an invalid code point (a lone surrogate U+D800)",
        ("erp-\\ud800-2", "student", "S-B2")),
    "data-nested-5000-deep": (
        {"event": _deep("S-B3")}, "invalid event: data is nested deeper than 32 levels",
        ("erp-deep-S-B3", "student", "S-B3")),
    "year-9999-with-an-offset": (
        {"event": json.dumps(student_event("S-B4", event_id="erp-b4",
                                           occurred_at="9999-12-31T23:59:59-05:00"))},
        "invalid event: occurred_at 9999-12-31T23:59:59-05:00 is out of range",
        ("erp-b4", "student", "S-B4")),
    "nul-in-a-name": (
        {"event": json.dumps(student_event("S-B5", event_id="erp-b5")
                             | {"data": GOOD | {"name": "Ma\u0000ria"}})},
        "invalid event: data.name contains a NUL character", ("erp-b5", "student", "S-B5")),
    "no-event-field": (
        {"payload": json.dumps(student_event("S-B6"))},
        "invalid event: stream entry has no 'event' field", (None, None, None)),
}


def test_six_bad_entries_in_one_batch_hold_up_none_of_the_good_ones(h, ctx, sandbox):
    """The six entries a real ERP produced, between seven good events, read in ONE batch:
    every good event reaches the inbox, is dispatched and syncs; each bad one is a dead letter
    with its reason, still found by its event_id, entity and key; the stream is drained."""
    goods = [student_event(f"S-G{i}") for i in range(7)]
    ids = {}
    ctx.redis.xadd(STREAM, {"event": json.dumps(goods[0])})
    for name, good in zip(SIX, goods[1:], strict=True):
        ids[name] = ctx.redis.xadd(STREAM, SIX[name][0]).decode()
        ctx.redis.xadd(STREAM, {"event": json.dumps(good)})
    assert h.ingester.poll(block_ms=10) == 13  # one batch
    assert sorted(h.states()) == sorted(g["event_id"] for g in goods)
    assert len(h.dispatched) == 7
    assert h.run(h.dispatched) == ["synced"] * 7
    held = sorted(s["email"] for s in live(sandbox, "students"))
    assert held == sorted(g["data"]["email"] for g in goods)  # DokStamp holds the good ones
    letters = {letter.stream_id: letter for letter in h.letters()}
    assert len(letters) == 6
    for name, (_, reason, identity) in SIX.items():
        letter = letters[ids[name]]
        assert letter.reason.startswith(reason), (name, letter.reason)
        assert (letter.event_id, letter.entity, letter.erp_key) == identity, name
        assert letter.raw
        assert "\x00" not in letter.raw
    assert ctx.redis.xlen(STREAM) == 0
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0


@contextmanager
def refused_by_postgres(ctx, table: str, condition: str):
    """A CHECK constraint for the duration of a test: what the database refuses on its own
    (the parser lets nothing through that PostgreSQL would refuse by itself)."""
    engine = ctx.sessions.kw["bind"]
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE {table} ADD CONSTRAINT test_refuse CHECK ({condition})"))
    try:
        yield
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE {table} DROP CONSTRAINT test_refuse"))


def test_an_entry_the_database_refuses_in_a_bulk_batch_is_the_only_dead_letter(h, ctx):
    """The bulk INSERT is refused because of one entry: the batch is written again entry by
    entry, that entry is a dead letter with the database's reason and its identity, the others
    are recorded and dispatched, and the whole batch leaves the stream."""
    before, refused, after = (student_event("S-1"), student_event("S-REFUSED"),
                              student_event("S-2"))
    with refused_by_postgres(ctx, "inbox", "erp_key <> 'S-REFUSED'"):
        pks = h.send(before, refused, after)
    assert len(pks) == 2
    assert sorted(h.states()) == sorted([before["event_id"], after["event_id"]])
    (letter,) = h.letters()
    assert letter.reason.startswith("refused by the database: CheckViolation"), letter.reason
    assert (letter.event_id, letter.entity, letter.erp_key) == (refused["event_id"],
                                                                 "student", "S-REFUSED")
    assert json.loads(letter.raw) == refused
    assert ctx.redis.xlen(STREAM) == 0
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0


def test_a_dead_letter_the_database_refuses_is_kept_as_an_excerpt(h, ctx):
    """Writing the dead letter itself fails: the last resort keeps the reason and the first
    200 characters, and the good entry beside it is recorded all the same."""
    long_garbage = "not json " + "x" * 500
    with refused_by_postgres(ctx, "dead_letters", "raw IS NULL OR length(raw) <= 200"):
        pks = h.send(long_garbage, student_event("S-1"))
    assert len(pks) == 1
    (letter,) = h.letters()
    assert letter.raw == long_garbage[:200]
    assert letter.reason.startswith("invalid event: not JSON")
    assert "could not be stored whole: CheckViolation" in letter.reason
    assert ctx.redis.xlen(STREAM) == 0


def test_an_entry_not_even_a_dead_letter_can_hold_stays_pending_alone(h, ctx):
    """If not even the last resort can be written, that one entry is left pending (not lost)
    and the failure noted for the health check; the rest of its batch is recorded and leaves
    the stream. Once the database takes it, the entry is reclaimed and filed."""
    with refused_by_postgres(ctx, "dead_letters", "reason NOT LIKE '%no ''event'' field%'"):
        ctx.redis.xadd(STREAM, {"payload": "{}"})
        pks = h.send(student_event("S-1"))
    assert len(pks) == 1
    assert h.letters() == []
    assert ctx.redis.xlen(STREAM) == 1
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 1
    note = json.loads(ctx.redis.get(RedisKeys().ingest_failure))
    assert note["reason"].startswith("1 stream entries could not be recorded")
    later = StreamIngester(ctx.redis, ctx.sessions, STREAM, consumer="later",
                           dispatch=h.dispatched.extend, lease=600, claim_idle_ms=0)
    assert later.poll(block_ms=10) == 1
    (letter,) = h.letters()
    assert "no 'event' field" in letter.reason
    assert ctx.redis.xlen(STREAM) == 0


def test_a_deleted_stream_and_group_are_created_again_without_a_restart(h, ctx):
    """The stream key is deleted (or Redis restarted empty) while the ingester runs: the next
    poll creates the group again from the stream's start, and entries added since, before the
    group existed, are all ingested by the same ingester."""
    assert len(h.send(student_event("S-1"))) == 1
    ctx.redis.delete(STREAM)
    assert h.ingester.poll(block_ms=10) == 0  # NOGROUP: the group is back, empty
    ctx.redis.delete(STREAM)
    ctx.redis.xadd(STREAM, {"event": json.dumps(student_event("S-2"))})
    ctx.redis.xadd(STREAM, {"event": json.dumps(student_event("S-3"))})
    assert len(h.send()) == 2
    assert len(h.states()) == 3
    assert [g["name"] for g in ctx.redis.xinfo_groups(STREAM)] == [b"dokstamp-sync"]
    assert ctx.redis.xlen(STREAM) == 0


def test_xautoclaim_follows_its_cursor_past_a_busy_consumers_entries(ctx):
    """More abandoned entries than one batch, behind more in-flight entries of a live consumer
    than one XAUTOCLAIM call looks at (10 x COUNT): the cursor is followed, so every abandoned
    entry is reclaimed and recorded, and the live consumer's entries are left alone."""
    got: list[int] = []
    busy = StreamIngester(ctx.redis, ctx.sessions, STREAM, consumer="busy",
                          dispatch=got.extend, lease=600)
    busy.ensure_group()
    for i in range(30):
        ctx.redis.xadd(STREAM, {"event": json.dumps(student_event(f"S-{i}"))})
    read = ctx.redis.xreadgroup("dokstamp-sync", "busy", {STREAM: ">"}, count=100)
    ids = [entry_id for entry_id, _ in read[0][1]]
    # The last 6 belonged to a consumer that died two minutes ago.
    ctx.redis.xclaim(STREAM, "dokstamp-sync", "dead", 0, ids[24:], idle=120_000)
    alive = StreamIngester(ctx.redis, ctx.sessions, STREAM, consumer="alive",
                           dispatch=got.extend, lease=600, batch=2)
    while alive.poll(block_ms=10):
        pass
    assert len(got) == 6
    pending = ctx.redis.xpending(STREAM, "dokstamp-sync")
    assert pending["pending"] == 24
    assert {c["name"] for c in pending["consumers"]} == {b"busy"}


def test_an_entry_deleted_while_pending_only_leaves_the_pending_list(h, ctx):
    """An entry someone deleted from the stream after it was read (and before it was
    acknowledged) comes back without fields: it is acknowledged, nothing is recorded."""
    entry_id = ctx.redis.xadd(STREAM, {"event": json.dumps(student_event("S-1"))})
    ctx.redis.xreadgroup("dokstamp-sync", "test", {STREAM: ">"}, count=10)  # then a crash
    ctx.redis.xdel(STREAM, entry_id)
    restarted = StreamIngester(ctx.redis, ctx.sessions, STREAM, consumer="test",
                               dispatch=h.dispatched.extend, lease=600)
    assert restarted.poll(block_ms=10) == 0
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0
    assert h.states() == {}
    assert h.letters() == []


def _health(ctx, **kw):
    with session_scope(ctx.sessions) as s:
        return check(s, ctx.redis, STREAM, **kw)


def test_health_turns_red_when_ingestion_keeps_failing(h, ctx):
    """With the database unreachable the ingester writes no heartbeat and notes why (each poll
    tries its own pending batch again): the health check says "stream ingestion failing:
    <reason>" (no password) and the entry stays pending; once the database is back, the same
    ingester records it and the check is green."""
    unreachable = make_sessionmaker(make_engine(
        "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/nowhere",
        connect_args={"connect_timeout": 2}))
    broken = StreamIngester(ctx.redis, unreachable, STREAM, consumer="broken",
                            dispatch=h.dispatched.extend, lease=600)
    ctx.redis.xadd(STREAM, {"event": json.dumps(student_event("S-1"))})
    for _ in range(2):
        with pytest.raises(OperationalError):
            broken.poll(block_ms=10)
    health = _health(ctx)
    assert not health.ok
    (problem,) = health.problems
    assert problem.startswith("stream ingestion failing: OperationalError: "), problem
    assert "s3cret" not in problem
    assert health.facts["consumer_heartbeat_age_s"] is None
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 1
    broken.sessions = ctx.sessions  # the database is back: its own entry is recorded first
    assert broken.poll(block_ms=10) == 1
    assert len(h.dispatched) == 1
    assert ctx.redis.xlen(STREAM) == 0
    assert _health(ctx).ok


def test_health_tells_a_failing_ingester_from_a_stopped_one(h, ctx):
    """Red either way once the last heartbeat is older than the grace period: "failing" when a
    failure was noted after it, "no stream consumer has read recently" when none was."""
    h.ingester.poll(block_ms=10)
    ctx.redis.set(f"{RedisKeys().heartbeat}ingest:test", str(time.time() - 100))
    assert _health(ctx, consumer_grace=30).problems[0].startswith(
        "no stream consumer has read recently")
    ctx.redis.set(RedisKeys().ingest_failure, json.dumps({"at": time.time() - 5, "consumer": "test",
                                              "reason": "OperationalError: gone"}))
    assert _health(ctx, consumer_grace=30).problems == [
        "stream ingestion failing: OperationalError: gone"]
    ctx.redis.set(f"{RedisKeys().heartbeat}ingest:test", str(time.time()))
    assert _health(ctx, consumer_grace=30).ok
