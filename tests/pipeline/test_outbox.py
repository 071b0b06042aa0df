"""The outcome stream's "at least once" (CONTRACT §5): outcomes the XADD could not write (Redis
refused, as a closed port refuses) stay unreported in the database, and the sweeper writes them
later to the real stream, read back here with a plain XRANGE; what the normal path wrote is
marked and never written twice; a replayed event is reported again."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, update

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import DeadLetter, InboxEvent
from dokstamp_sync.ops import dlq
from dokstamp_sync.pipeline import outbox
from dokstamp_sync.pipeline.results import Publisher
from dokstamp_sync.redis_keys import RESULTS_STREAM
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.states import FINAL
from dokstamp_sync.sync import engine
from dokstamp_sync.testing import T0, live, student

FIELDS = ["event_id", "entity", "key", "op", "state", "at", "dokstamp_uuid", "mapping_status",
          "public_verification_url", "reason", "dead_letter_id", "http_status"]


def outcomes(client: redis.Redis, stream: str = RESULTS_STREAM) -> list[dict[str, Any]]:
    """Every entry of the outcome stream, as an ERP's own client reads it (XRANGE)."""
    return [json.loads(fields[b"result"]) for _, fields in client.xrange(stream)]


@pytest.fixture
def away(h: Any) -> Iterator[Callable[[], None]]:
    """Call it to make the store and the ingester publish to a Redis that is away: a port
    nobody listens on (connection refused; no retries, so that the test stays quick)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1,
                         retry=Retry(NoBackoff(), 0))

    def switch() -> None:
        # The walk's outcomes go with its lock releases (Store.later): through it instead.
        h.ctx.store.later = None
        h.ctx.store.report = h.ingester.report = Publisher(client)

    yield switch
    client.close()


def unreported(sessions: Any) -> tuple[int, int]:
    """(final inbox events, dead letters) whose outcome is not marked reported."""
    with session_scope(sessions) as s:
        events = s.scalar(select(func.count()).select_from(InboxEvent).where(
            InboxEvent.state.in_(FINAL), InboxEvent.reported_at.is_(None)))
        letters = s.scalar(select(func.count()).select_from(DeadLetter).where(
            DeadLetter.reported_at.is_(None)))
    return int(events or 0), int(letters or 0)


def age(sessions: Any, minutes: int = 1) -> None:
    """Make every recorded outcome older than the sweeper's settle time."""
    ago = timedelta(minutes=minutes)
    with session_scope(sessions) as s:
        s.execute(update(InboxEvent).values(finished_at=InboxEvent.finished_at - ago))
        s.execute(update(DeadLetter).values(last_failed_at=DeadLetter.last_failed_at - ago,
                                            resolved_at=DeadLetter.resolved_at - ago))


def no_birthday(key: str, event_id: str, email: str) -> dict[str, Any]:
    return event("student", key, {"name": "No Birthday", "email": email}, at=T0,
                 event_id=event_id)


def test_outcomes_redis_refused_are_written_later_by_the_sweeper(h, ctx, sandbox, away):
    """Redis refuses the XADD: nothing reaches the stream and every final row (a synced event,
    an event DokStamp refused, a malformed entry) stays unreported. The sweeper leaves rows
    younger than its settle time to the normal path; once they are older it writes each outcome,
    rebuilt from the rows, in batches (here 2: the events first, then the letter), marks them,
    and a second sweep writes nothing."""
    away()
    assert h.sync(no_birthday("S-2", "bad-1", "nb@example.edu")) == ["dead"]
    h.send("not json")
    assert h.sync(student("S-1", event_id="good-1")) == ["synced"]
    assert outcomes(ctx.redis) == []
    assert unreported(ctx.sessions) == (2, 2)

    publisher = Publisher(ctx.redis)
    assert outbox.sweep(ctx.sessions, publisher) == 0  # too young: the normal path's
    age(ctx.sessions)
    assert outbox.sweep(ctx.sessions, publisher, batch=2) == 3
    got = outcomes(ctx.redis)
    assert all(list(o) == FIELDS for o in got)
    assert [(o["event_id"], o["state"]) for o in got] == [
        ("bad-1", "dead"), ("good-1", "synced"), (None, "dead")]
    bad, good, junk = got
    letters = {d.event_id: d for d in h.letters()}
    assert good["dokstamp_uuid"] == h.mapping("student", "S-1").dokstamp_uuid
    assert good["dokstamp_uuid"] in {s["uuid"] for s in live(sandbox, "students")}
    assert (good["mapping_status"], good["reason"], good["op"]) == ("active", None, "upsert")
    assert (bad["http_status"], bad["dead_letter_id"]) == (422, letters["bad-1"].id)
    assert bad["reason"] == letters["bad-1"].reason
    assert junk["dead_letter_id"] == letters[None].id
    assert "invalid event" in junk["reason"]
    assert unreported(ctx.sessions) == (0, 0)
    assert outbox.sweep(ctx.sessions, publisher, settle=0) == 0
    assert ctx.redis.xlen(RESULTS_STREAM) == 3


def test_an_outcome_whose_write_with_the_lock_release_fails_is_left_to_the_sweeper(h, ctx):
    """The walk's outcomes go out with its entity lock's release (one round trip). When that
    XADD fails (here the stream's key holds a string: WRONGTYPE), the rows stay unreported, and
    once the key is a stream again the sweeper writes each outcome once."""
    ctx.redis.set(RESULTS_STREAM, "not a stream")
    assert h.sync(student("S-1", event_id="good-1")) == ["synced"]
    assert h.sync(no_birthday("S-2", "bad-1", "nb@example.edu")) == ["dead"]
    engine.flush_counters(ctx)  # a task's end: nothing written, so nothing marked
    assert unreported(ctx.sessions) == (2, 1)
    ctx.redis.delete(RESULTS_STREAM)
    age(ctx.sessions)
    assert outbox.sweep(ctx.sessions, Publisher(ctx.redis)) == 2  # a letter's with its event's
    assert sorted((o["event_id"], o["state"]) for o in outcomes(ctx.redis)) == [
        ("bad-1", "dead"), ("good-1", "synced")]
    assert unreported(ctx.sessions) == (0, 0)


def test_the_normal_path_marks_its_rows_and_the_sweeper_writes_nothing_twice(h, ctx):
    """Written right after the commit, every outcome (synced, dead, malformed, a resolved
    letter's superseded) is marked reported: a sweep of everything, however old, adds nothing."""
    assert h.sync(no_birthday("S-2", "bad-1", "nb@example.edu")) == ["dead"]
    h.send("not json")
    assert h.sync(student("S-1", event_id="good-1")) == ["synced"]
    assert h.sync(student("S-2", email="nb@example.edu", at=T0 + timedelta(hours=1),
                          event_id="fix-1")) == ["synced"]
    written = ctx.redis.xlen(RESULTS_STREAM)
    assert written == 5  # bad-1 dead, junk dead, good-1, fix-1, bad-1 superseded
    assert unreported(ctx.sessions) == (0, 0)
    age(ctx.sessions)
    assert outbox.sweep(ctx.sessions, Publisher(ctx.redis), settle=0) == 0
    assert ctx.redis.xlen(RESULTS_STREAM) == written


def test_a_letter_resolved_while_redis_was_away_is_reported_superseded_after_its_death(
        h, ctx, away):
    """Redis away while an event dies and a corrected event resolves its letter: the sweeper
    writes the event as what it is now (``superseded``: a death resolved since is never
    written), the fix, and then the letter's ``superseded`` (the last per event_id)."""
    away()
    assert h.sync(no_birthday("S-2", "bad-1", "nb@example.edu")) == ["dead"]
    assert h.sync(student("S-2", email="nb@example.edu", at=T0 + timedelta(hours=1),
                          event_id="fix-1")) == ["synced"]
    age(ctx.sessions)
    assert outbox.sweep(ctx.sessions, Publisher(ctx.redis)) == 3
    got = outcomes(ctx.redis)
    assert [(o["event_id"], o["state"]) for o in got] == [
        ("bad-1", "superseded"), ("fix-1", "synced"), ("bad-1", "superseded")]
    assert got[2]["dead_letter_id"] == got[0]["dead_letter_id"]
    assert got[2]["op"] == "upsert"
    assert unreported(ctx.sessions) == (0, 0)


def test_a_replayed_letter_is_reported_again_even_when_redis_is_away(h, ctx, sandbox, away):
    """Dead and reported; replayed, its event is unreported again; it syncs while Redis is away,
    and the sweeper writes its new outcome: the same event_id, now synced."""
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=422, after_commit=False)]))
    assert h.sync(student("S-5", event_id="flaky")) == ["dead"]
    assert unreported(ctx.sessions) == (0, 0)
    assert dlq.replay(ctx.sessions, everything=True).replayed
    assert h.record("flaky").reported_at is None
    away()
    h.drain()
    assert h.state("flaky") == "synced"
    assert unreported(ctx.sessions) == (1, 0)
    age(ctx.sessions)
    assert outbox.sweep(ctx.sessions, Publisher(ctx.redis)) == 1
    assert [(o["event_id"], o["state"]) for o in outcomes(ctx.redis)] == [
        ("flaky", "dead"), ("flaky", "synced")]
    assert outcomes(ctx.redis)[1]["dokstamp_uuid"] == h.mapping("student", "S-5").dokstamp_uuid


def test_the_pumps_sweeper_thread_writes_what_was_left(h, ctx, sandbox, database_url,
                                                       engine_redis, monkeypatch, away):
    """The worker's pump runs the sweeper on its own: an outcome left unreported (Redis away
    at the time) reaches the pump's outcome stream within a few sweeps."""
    from dokstamp_sync import wiring
    from dokstamp_sync.pipeline.pump import Pump
    from dokstamp_sync.testing import sandbox_settings
    from testenv import TEST_ENGINE_REDIS_URL

    away()
    assert h.sync(student("S-1", event_id="late-1")) == ["synced"]
    age(ctx.sessions)
    monkeypatch.setattr(outbox, "INTERVAL", 0.2)
    settings = sandbox_settings(sandbox.url, database_url=database_url,
                                redis_url=TEST_ENGINE_REDIS_URL,
                                dokstamp_sync_results_stream="test:outbox:results")
    pump = Pump(settings, dispatch=lambda pks: None, sessions=wiring.database(database_url),
                redis_client=wiring.redis_client(TEST_ENGINE_REDIS_URL), poll_interval=0.2)
    pump.start()
    try:
        deadline = time.monotonic() + 10
        while not engine_redis.xlen("test:outbox:results") and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        pump.stop()
        pump.sessions.kw["bind"].dispose()
        pump.ingester.redis.close()
    (entry,) = outcomes(engine_redis, "test:outbox:results")
    assert (entry["event_id"], entry["state"]) == ("late-1", "synced")
    assert unreported(ctx.sessions) == (0, 0)



def test_outcomes_are_marked_by_the_next_outcomes_transaction_and_at_a_tasks_end(h, ctx):
    """Within a task (runs without the end-of-task flush), an outcome written to the stream is
    marked reported in the transaction that records the next outcome, not in one of its own;
    the task's end marks the last. A row that ended again since its outcome was written
    (replayed, synced again) is not marked: its new outcome is still to be written."""
    first, second, third = h.send(student("S-1", event_id="e-1"),
                                  student("S-2", event_id="e-2", email="s2@example.edu"),
                                  student("S-3", event_id="e-3", email="s3@example.edu"))
    bind = ctx.sessions.kw["bind"]
    statements: list[str] = []
    committed: list[list[str]] = []  # each committed transaction's statements

    def executed(_conn: object, _cursor: object, statement: str, *_a: object) -> None:
        marks = "SETreported_at=%(now)s" in statement.replace(" ", "")  # a reported mark
        statements.append("mark" if marks else statement.split()[0])

    def commit(_conn: object) -> None:
        committed.append(statements[:])
        statements.clear()

    sa_event.listen(bind, "before_cursor_execute", executed)
    sa_event.listen(bind, "commit", commit)
    try:
        assert engine.run(ctx, first, flush=False) == "synced"
        assert unreported(ctx.sessions) == (1, 0)  # written, not marked yet
        assert [o["event_id"] for o in outcomes(ctx.redis)] == ["e-1"]
        committed.clear()
        assert engine.run(ctx, second, flush=False) == "synced"
        marking = [tx for tx in committed if "mark" in tx]
        assert len(marking) == 1  # e-1 marked in one transaction...
        assert set(marking[0]) != {"mark"}  # ...that recorded e-2's outcome
        assert unreported(ctx.sessions) == (1, 0)  # e-1 marked, e-2 not yet
        with session_scope(ctx.sessions) as s:
            assert s.scalar(select(InboxEvent.reported_at).where(
                InboxEvent.event_id == "e-1")) is not None
            # e-2 is replayed and syncs again before the first outcome is marked, and that
            # second outcome was never written (its worker died before the XADD)
            s.execute(update(InboxEvent).where(InboxEvent.event_id == "e-2").values(
                finished_at=func.now() + timedelta(seconds=1)))
        assert engine.run(ctx, third, flush=False) == "synced"
        engine.flush_counters(ctx)  # the task's end
    finally:
        sa_event.remove(bind, "before_cursor_execute", executed)
        sa_event.remove(bind, "commit", commit)
    with session_scope(ctx.sessions) as s:
        marked = dict(s.execute(select(InboxEvent.event_id, InboxEvent.reported_at)).all())
    assert marked["e-1"] is not None
    assert marked["e-3"] is not None  # marked at the task's end
    assert marked["e-2"] is None  # ended again since its outcome was written: left unmarked
