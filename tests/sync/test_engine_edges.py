"""Edge cases of ordering, deletes, delivery counting, leases and ingestion (regressions)."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.pipeline.scheduler import dispatch_due
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.sync import engine
from dokstamp_sync.testing import STREAM, T0, Harness, live, student


def test_older_upsert_after_a_synced_delete_does_not_resurrect(h, sandbox):
    """The ERP's delete (newer) ran first; the older upsert then ends superseded."""
    up, gone = student(at=T0), student(op="delete", at=T0 + timedelta(hours=1))
    pk_up, pk_del = h.send(up, gone)
    assert h.run([pk_del, pk_up]) == ["synced", "superseded"]
    assert live(sandbox, "students") == []


def test_recreate_after_delete(h, sandbox):
    """Upsert, delete, upsert again: the student exists again, as a new DokStamp entity."""
    h.sync(student(at=T0))
    first = h.mapping("student", "S-1").dokstamp_uuid
    h.sync(student(op="delete", at=T0 + timedelta(hours=1)))
    assert h.sync(student(at=T0 + timedelta(hours=2))) == ["synced"]
    m = h.mapping("student", "S-1")
    assert (m.status, len(live(sandbox, "students"))) == ("active", 1)
    assert m.dokstamp_uuid != first


def test_child_of_a_deleted_then_recreated_parent_syncs(h, sandbox):
    """A child referencing a parent whose newer upsert is queued syncs that upsert first."""
    h.sync(student(at=T0))
    h.sync(student(op="delete", at=T0 + timedelta(hours=1)))
    h.send(student(at=T0 + timedelta(hours=2)))  # queued, not run yet
    h.sync(*samples.graduating_class(0, courses=1, modules_per_course=1))
    e = event("enrollment", "E-1", {"student_key": "S-1", "course_key": "CRS-1",
                                    "enrolled_at": "2024-01-01"})
    assert h.sync(e) == ["synced"]


def test_child_of_a_parent_deleted_in_the_erp_is_dead(h, sandbox):
    """A reference to an entity the ERP deleted is dead-lettered with that reason."""
    h.sync(student(at=T0))
    h.sync(student(op="delete", at=T0 + timedelta(hours=1)))
    h.sync(*samples.graduating_class(0, courses=1, modules_per_course=1))
    e = event("enrollment", "E-1", {"student_key": "S-1", "course_key": "CRS-1",
                                    "enrolled_at": "2024-01-01"})
    assert h.sync(e) == ["dead"]
    assert "was deleted in the ERP" in h.letters()[0].reason


def test_archived_course_upserted_again_is_revived(h, sandbox):
    """A course archived by a refused delete is active again when the ERP upserts it."""
    cls = samples.graduating_class(0, courses=1, modules_per_course=1)
    h.sync(*cls)
    course = next(e for e in cls if e["entity"] == "course")
    h.sync(event("course", "CRS-1", op="delete", at=T0 + timedelta(hours=1)))
    assert live(sandbox, "courses")[0]["status"] == "archived"
    assert h.sync(event("course", "CRS-1", course["data"], at=T0 + timedelta(hours=2))) == [
        "synced"]
    assert live(sandbox, "courses")[0]["status"] == "active"
    assert h.mapping("course", "CRS-1").status == "active"


def test_changing_a_fixed_reference_is_dead_not_silently_dropped(h, sandbox):
    """An enrollment moved to another course cannot be PATCHed: dead letter naming it."""
    h.sync(*samples.graduating_class(1, courses=2, modules_per_course=1))
    enr = next(e for e in samples.graduating_class(1, courses=2, modules_per_course=1)
               if e["entity"] == "enrollment")
    moved = event("enrollment", enr["key"], dict(enr["data"], course_key="CRS-2",
                                                  cohort_key="COH-2"),
                  at=T0 + timedelta(days=1))
    assert h.sync(moved) == ["dead"]
    assert "cannot change course_uuid" in h.letters()[0].reason


def test_busy_runs_do_not_erase_lost_worker_deliveries(h, ctx):
    """A killed worker's lock still held: redeliveries are busy, and the count of runs that
    never finished is kept, so a task that keeps killing its worker is still caught."""
    e = student()
    pk = h.send(e)[0]
    with session_scope(ctx.sessions) as s:
        s.get(InboxEvent, pk).deliveries = 3  # three runs were killed
    lock = ctx.redis.lock("dokstamp:lock:entity:student:S-1", timeout=60)
    assert lock.acquire()
    assert h.run([pk]) == ["busy"]
    assert h.record(e["event_id"]).deliveries == 3
    lock.release()
    assert h.run([pk]) == ["synced"]


def test_a_run_holds_a_lease_so_the_scheduler_does_not_redispatch(h, ctx):
    """While an event runs, its next attempt time is a lease away; dispatch_due skips it."""
    pk = h.send(student())[0]
    with session_scope(ctx.sessions) as s:
        s.get(InboxEvent, pk).next_attempt_at = datetime.now(UTC) - timedelta(seconds=1)
    got: list[int] = []
    assert dispatch_due(ctx.sessions, got.extend, lease=600) == 1
    assert dispatch_due(ctx.sessions, got.extend, lease=600) == 0  # leased now
    assert got == [pk]


def test_dependency_wait_before_the_timeout_is_not_dead(h, ctx):
    """Well within the dependency timeout, a missing parent means waiting, polled again."""
    e = event("enrollment", "E-1", {"student_key": "S-404", "course_key": "C-404",
                                    "enrolled_at": "2024-01-01"})
    assert h.sync(e) == ["waiting"]
    rec = h.record(e["event_id"])
    assert rec.attempts == 0  # a wait is not a failed attempt
    assert rec.next_attempt_at > datetime.now(UTC) + timedelta(seconds=30)


def test_backoff_grows_with_attempts_and_stays_jittered(h, ctx, sandbox):
    """Each transient failure parks the event up to 2 s * 2^attempts later (full jitter)."""
    import random

    ctx.rng = random.Random(1)
    ctx.breaker.threshold = 1000  # failures of one event, not an outage (see test_breaker)
    sandbox.sandbox.faults.configure(Faults(error_rate=1.0, lost_response_share=0.0))
    e = student()
    pk = h.send(e)[0]
    delays = []
    for attempt in range(5):
        before = datetime.now(UTC)
        assert h.run([pk]) == ["waiting"]
        rec = h.record(e["event_id"])
        assert rec.attempts == attempt + 1
        delays.append((rec.next_attempt_at - before).total_seconds())
    for attempt, delay in enumerate(delays):
        assert 0 <= delay <= 2.0 * 2 ** attempt + 0.5
    assert max(delays[3:]) > 2.5  # it grows beyond the first bounds
    assert len({round(d, 3) for d in delays}) == 5  # jittered


def test_429_pause_is_honoured_by_the_shared_limiter(sandbox, make_ctx):
    """After a 429 with Retry-After 1, the next request of any process waits for the pause."""
    waits: list[float] = []
    ctx = make_ctx(limiter_sleep=waits.append)
    harness = Harness(ctx)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=429, retry_after=1)]))
    assert harness.sync(student()) == ["synced"]
    assert sum(waits) >= 0.9  # the limiter slept out the tenant pause


def test_long_pause_parks_the_event_instead_of_sleeping(engine_redis, make_ctx):
    """A tenant pause longer than the limiter's max wait parks the event (no long sleep with
    locks held)."""
    ctx = make_ctx()
    harness = Harness(ctx)
    engine_redis.set(f"{RedisKeys().pause}demo-university", "1", px=60_000)
    e = student()
    assert harness.sync(e) == ["waiting"]
    rec = harness.record(e["event_id"])
    assert "paused after a 429" in rec.last_error
    assert rec.next_attempt_at > datetime.now(UTC) + timedelta(seconds=50)


def test_entries_stay_pending_when_recording_fails(h, ctx, monkeypatch):
    """If the database write fails, nothing is acknowledged: the entry is read again later."""
    import dokstamp_sync.pipeline.ingest as ingest

    ctx.redis.xadd(STREAM, {"event": json.dumps(student())})

    def broken(*args, **kwargs):
        raise RuntimeError("database down")

    monkeypatch.setattr(ingest, "record_entries", broken)
    with pytest.raises(RuntimeError):
        h.ingester.poll(block_ms=10)
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 1
    assert ctx.redis.xlen(STREAM) == 1


@pytest.mark.parametrize("raw", [
    json.dumps(event("student", "K" * 300, {"name": "a", "email": "b@x.edu"})),
    "bad\x00text"])
def test_an_entry_the_database_refuses_does_not_block_its_batch(h, ctx, raw):
    """An over-long key or a NUL byte: a dead letter, and the good entry beside it syncs."""
    good = student()
    ctx.redis.xadd(STREAM, {"event": raw})
    pks = h.send(good)
    assert len(pks) == 1
    assert len(h.letters()) == 1
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0


class _Redirect(BaseHTTPRequestHandler):
    def do_GET(self):  # the stdlib's handler method name
        body = b"<html>moved</html>"
        self.send_response(302)
        self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_redirect_is_never_uploaded_as_the_file(sandbox, make_ctx):
    """A 302 from the document server is refused, not uploaded as a PDF."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ctx = make_ctx(hosts=["127.0.0.1"])
    e = event("file", "F-1", {"url": f"http://127.0.0.1:{server.server_address[1]}/d.pdf",
                              "filename": "d.pdf"})
    assert Harness(ctx).sync(e) == ["dead"]
    assert sandbox.sandbox.tenants["demo-university"].dump()["files"] == []
    server.shutdown()
    server.server_close()


def test_credentials_refused_is_dead_with_a_reason_that_says_so(make_ctx):
    """CONTRACT §3: a 401 is dead; the reason names the credentials, so an operator fixes
    them and replays."""
    ctx = make_ctx(password="wrong")
    harness = Harness(ctx)
    assert harness.sync(student()) == ["dead"]
    (letter,) = harness.letters()
    assert letter.reason.startswith("credentials refused (fix them, then replay)")
    assert letter.http_status == 401
    assert "wrong" not in letter.reason


def test_an_event_id_reused_with_other_content_is_kept_as_a_dead_letter(h):
    """The same event_id with different data is not applied, and not dropped silently."""
    first = student(name="First")
    assert h.sync(first) == ["synced"]
    clash = dict(student(name="Second"), event_id=first["event_id"])
    assert h.send(clash) == []
    (letter,) = h.letters()
    assert "was already used by a different event" in letter.reason
    assert h.mapping("student", "S-1") is not None


def test_connections_dropped_by_postgresql_cost_no_event(h, ctx):
    """No pre-ping on checkout: when PostgreSQL drops the pool's connections (a restart, a
    failover), the next run claims its event on a new connection and syncs it."""
    from sqlalchemy import create_engine, text

    from testenv import PG_ADMIN_URL

    assert h.sync(student(key="S-1", email="one@example.edu")) == ["synced"]
    pks = h.send(student(key="S-2", email="two@example.edu"))
    database = ctx.sessions.kw["bind"].url.database
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        killed = conn.scalar(text(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = :db AND pid <> pg_backend_pid()"), {"db": database})
    admin.dispose()
    assert killed >= 1
    assert h.run(pks) == ["synced"]


def test_ingest_survives_connections_dropped_by_postgresql(h, ctx):
    """The ingester's first batch after PostgreSQL dropped its connections is written on a
    new connection; nothing becomes a dead letter."""
    from sqlalchemy import create_engine, text

    from testenv import PG_ADMIN_URL

    assert h.sync(student(key="S-1", email="one@example.edu")) == ["synced"]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :db AND pid <> pg_backend_pid()"),
                     {"db": ctx.sessions.kw["bind"].url.database})
    admin.dispose()
    pks = h.send(student(key="S-2", email="two@example.edu"))
    assert len(pks) == 1
    assert h.letters() == []


def test_a_synced_run_gives_back_its_delivery_and_keeps_the_last_error(h):
    """A module first waits for its institution, then syncs: its delivery count is back to 0
    and its last error (why it waited) is kept for the operator."""
    institution, module = samples.graduating_class(1)[:2]
    (pk,) = h.send(module)
    assert h.run([pk]) == ["waiting"]
    assert "has not arrived" in h.record(module["event_id"]).last_error
    h.send(institution)
    assert h.run([pk]) == ["synced"]
    after = h.record(module["event_id"])
    assert after.deliveries == 0
    assert "has not arrived" in after.last_error


def test_a_create_whose_worker_died_before_recording_it_is_waited_for_then_found(h, sandbox,
                                                                              monkeypatch):
    """The in-flight mark is set before the POST: when the run dies after the create landed
    but before its natural key was recorded (as a kill -9 would leave it), the next event of
    that entity waits out the create window and then finds the student: no second one. (A
    mark set before a POST lasts the window plus the lock timeout: it outlives the locks.)"""
    h.ctx.limits = replace(h.ctx.limits, create_window=0.3)
    h.ctx.locks.timeout = 1.0
    real = h.ctx.store.remember_natural_key
    calls = []

    def dies_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise SystemExit("killed after the POST")  # nothing of ours catches it
        return real(*args)

    monkeypatch.setattr(h.ctx.store, "remember_natural_key", dies_once)
    first = student()
    pk = h.send(first)[0]
    with pytest.raises(SystemExit):
        engine.run(h.ctx, pk)
    assert len(live(sandbox, "students")) == 1
    newer = student(name="Maria F. Silva", at=T0 + timedelta(minutes=1))
    assert h.sync(newer) == ["waiting"]  # the mark: a late write may land, not created again
    assert "may still land" in h.record(newer["event_id"]).last_error
    time.sleep(1.35)
    h.drain()
    assert h.state(newer["event_id"]) == "synced"
    (held,) = live(sandbox, "students")
    assert held["name"] == "Maria F. Silva"
