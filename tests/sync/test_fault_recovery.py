"""Faults cost seconds, not minutes (issue 22): a failed create searches at once (a lost
response is adopted in the same run, its dependents synced behind it), waits out the create
window only when that search finds nothing (a slow write that lands later is still found, never
created twice), and a run that failed on a dropped database connection hands its event back at
once. Real sandbox over HTTP, real PostgreSQL and Redis; DokStamp's state is asserted."""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import psycopg

from dokstamp_sync.demo import samples
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import Harness, calls, dump, live, student


def adopted_once_the_window_is_over(h: Harness, sandbox: Any, e: dict[str, Any], *,
                                    within: float) -> None:
    """Wait until the create window's mark is gone (however loaded the machine), run what is
    left, and check the student's late write was adopted: one student, POSTed once."""
    deadline = time.monotonic() + within
    while list(h.ctx.redis.scan_iter(f"{RedisKeys().inflight}*")) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)
    h.drain()
    assert h.state(e["event_id"]) == "synced"
    (held,) = live(sandbox, "students")
    assert calls(sandbox)["POST /students"] == 1
    assert h.mapping("student", "S-1").dokstamp_uuid == held["uuid"]


def test_a_lost_response_on_a_course_create_is_adopted_at_once(h, sandbox):
    """POST /courses is applied but answered 500: the search made right after finds the
    course and adopts it in the same run (the create window, set to a minute here, is not
    waited out), and every dependent (cohort, enrollments, certificates) syncs in the same
    pass behind it. DokStamp holds one course, POSTed once, with its modules attached."""
    h.ctx.limits = replace(h.ctx.limits, create_window=60.0)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/courses", status=500, after_commit=True)]))
    events = samples.graduating_class(3, courses=1, modules_per_course=2)
    started = time.monotonic()
    assert set(h.sync(*events)) == {"synced"}
    assert time.monotonic() - started < 30  # nothing waited for the 60 s window
    assert set(h.states().values()) == {"synced"}
    assert sandbox.sandbox.stats.lost_responses == 1
    (course,) = live(sandbox, "courses")
    assert calls(sandbox)["POST /courses"] == 1
    assert h.mapping("course", "CRS-1").dokstamp_uuid == course["uuid"]
    assert h.record(next(e["event_id"] for e in events if e["entity"] == "course")).attempts == 0
    assert len(dump(sandbox)["course_modules"][course["uuid"]]) == 2
    assert len(live(sandbox, "cohorts")) == 1
    assert len(live(sandbox, "enrollments")) == len(live(sandbox, "certificates")) == 3
    assert not list(h.ctx.redis.scan_iter(f"{RedisKeys().inflight}*"))  # recorded: no window left


def test_a_slow_write_landing_after_the_immediate_search_yields_one_entity(make_ctx, sandbox):
    """POST /students lands 1.5 s late, after the client's 0.5 s timeout: the search made at
    once finds nothing, so the event waits out the create window (no second POST, even when
    run again while the window lasts, after the write has landed); once the window is over
    the retry searches, finds the late student and adopts it. Exactly one student."""
    h = Harness(make_ctx(timeout=0.5))
    h.ctx.limits = replace(h.ctx.limits, in_call_attempts=1, create_window=3.0)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=201, delay_s=1.5)]))
    e = student()
    searches_before = calls(sandbox).get("GET /students", 0)
    started = time.monotonic()
    assert h.sync(e) == ["waiting"]
    assert "may still land" in h.record(e["event_id"]).last_error
    time.sleep(max(0.0, started + 1.7 - time.monotonic()))  # the write lands
    assert len(live(sandbox, "students")) == 1
    # searched once before the create and once right after it failed
    assert calls(sandbox)["GET /students"] - searches_before == 2
    assert h.run([h.record(e["event_id"]).id]) == ["waiting"]  # the window still lasts
    # Once the window is over (its mark gone, however loaded the machine), the retry runs.
    adopted_once_the_window_is_over(h, sandbox, e, within=15)


def test_a_create_refused_with_an_answered_5xx_is_created_again_at_once(h, sandbox):
    """POST /courses and one POST /certificates are refused before the write, answered 502 and
    503 as a proxy's HTML page: an answered request is over, so when the search made right
    after finds nothing, nothing can land late and the create is sent again in the same run
    (the 60 s window is not waited out). DokStamp holds one course and one certificate per
    student: nothing duplicated."""
    h.ctx.limits = replace(h.ctx.limits, create_window=60.0)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/courses", status=502),
        ScriptedFault("POST", "/certificates", status=503)], error_html=True))
    events = samples.graduating_class(3, courses=1, modules_per_course=2)
    started = time.monotonic()
    assert set(h.sync(*events)) == {"synced"}
    assert time.monotonic() - started < 30  # nothing waited for the 60 s window
    assert set(h.states().values()) == {"synced"}
    (course,) = live(sandbox, "courses")
    assert calls(sandbox)["POST /courses"] == 2
    assert calls(sandbox)["POST /certificates"] == 4
    assert h.mapping("course", "CRS-1").dokstamp_uuid == course["uuid"]
    certificates = live(sandbox, "certificates")
    assert len(certificates) == 3
    assert len({c["student"]["uuid"] for c in certificates}) == 3
    assert not list(h.ctx.redis.scan_iter(f"{RedisKeys().inflight}*"))


def test_a_gateway_timeout_whose_write_lands_later_waits_and_yields_one_entity(h, sandbox):
    """POST /students answered 504 at once while the API still applies it 1.5 s later: the
    search made at once finds nothing, but a gateway's timeout may still land, so the event
    waits out the create window (no second POST); then it searches, finds the late student and
    adopts it. Exactly one student."""
    h.ctx.limits = replace(h.ctx.limits, in_call_attempts=1, create_window=3.0)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=504, land_after_s=1.5)]))
    e = student()
    started = time.monotonic()
    assert h.sync(e) == ["waiting"]
    assert "may still land" in h.record(e["event_id"]).last_error
    time.sleep(max(0.0, started + 1.8 - time.monotonic()))  # the write lands
    assert len(live(sandbox, "students")) == 1
    adopted_once_the_window_is_over(h, sandbox, e, within=15)


def test_a_slow_503_whose_write_lands_later_waits_and_yields_one_entity(make_ctx, sandbox):
    """A proxy's HTML 503 that comes 2.5 s after the POST (a gateway that gave up waiting, as
    a PaaS router does) while the API applies the write a second later: it is no prompt
    answer, so the event waits out the window instead of creating again, then adopts the late
    student. Exactly one student, POSTed once."""
    h = Harness(make_ctx(timeout=6))
    h.ctx.limits = replace(h.ctx.limits, in_call_attempts=1, create_window=4.0)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=503, delay_s=2.5, land_after_s=1.0)],
        error_html=True))
    e = student()
    assert h.sync(e) == ["waiting"]
    assert "may still land" in h.record(e["event_id"]).last_error
    adopted_once_the_window_is_over(h, sandbox, e, within=20)


def test_a_dropped_database_connection_hands_the_event_back_at_once(h, sandbox, database_url,
                                                                   monkeypatch):
    """Every PostgreSQL connection is terminated between the student's create and its
    recording: the run hands the event back (due at once, no delivery or attempt counted,
    not leased until its lease ends), and leaves no in-flight window (the create is known
    to have landed). The next run finds the student and records it: one student."""
    real = h.ctx.store.remember_natural_key
    url = database_url.replace("postgresql+psycopg://", "postgresql://")
    killed: list[int] = []

    def after_a_kill(*args):
        if not killed:
            with psycopg.connect(url, autocommit=True) as admin:
                killed.append(len(admin.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchall()))
        return real(*args)

    monkeypatch.setattr(h.ctx.store, "remember_natural_key", after_a_kill)
    e = student()
    state = h.sync(e)
    assert killed == [killed[0]]
    assert killed[0] >= 1
    assert state == ["pending"]
    rec = h.record(e["event_id"])
    assert rec.next_attempt_at <= datetime.now(UTC)
    assert (rec.attempts, rec.deliveries) == (0, 0)
    assert not list(h.ctx.redis.scan_iter(f"{RedisKeys().inflight}*"))
    assert len(live(sandbox, "students")) == 1
    assert h.run([rec.id]) == ["synced"]
    (held,) = live(sandbox, "students")
    assert calls(sandbox)["POST /students"] == 1
    assert h.mapping("student", "S-1").dokstamp_uuid == held["uuid"]
