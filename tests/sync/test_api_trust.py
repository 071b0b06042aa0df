"""Trusting only what DokStamp's docs promise (issue 13), each case against the sandbox switched
to the unkind-but-documented behaviour: filters a server ignores, entities deleted on the
dashboard, uploads answered in another order, capped pages, 409 conflicts, blocked deletes,
malformed bodies and Retry-After on a 503. Each test asserts what the sandbox ends up holding."""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import T0, calls, live, student


def _institution(key: str, name: str, at: datetime = T0) -> dict:
    return event("institution", key, {"name": name, "country": "Brazil"}, at=at)


def _enrollment(key: str, student_key: str, grade: float, at: datetime = T0) -> dict:
    return event("enrollment", key, {"student_key": student_key, "course_key": "CRS-1",
                                     "enrolled_at": "2024-02-01", "grade": grade}, at=at)


def _structure() -> list[dict]:
    """An institution, a module and a course (CRS-1), without students."""
    return list(samples.graduating_class(0, courses=1, modules_per_course=1))


# -- search hits are checked ----------------------------------------------------------------

def test_strict_server_dashboard_institution_is_not_adopted_for_another_name(h, ctx, sandbox):
    """A server that ignores every undocumented filter (institutions have none) answers with
    all its rows: the dashboard's institution is neither adopted nor renamed for the ERP's
    other institution; one with the same name is adopted (no duplicate)."""
    sandbox.sandbox.config.strict = True
    dashboard = ctx.client.institutions.create({"name": "Dashboard Institute",
                                                "country": "Brazil"})
    assert h.sync(_institution("I-1", "Federal University")) == ["synced"]
    held = {i["uuid"]: i["name"] for i in live(sandbox, "institutions")}
    assert held[dashboard["uuid"]] == "Dashboard Institute"
    assert len(held) == 2
    assert h.mapping("institution", "I-1").dokstamp_uuid != dashboard["uuid"]
    assert h.sync(_institution("I-2", "Dashboard Institute")) == ["synced"]
    assert h.mapping("institution", "I-2").dokstamp_uuid == dashboard["uuid"]
    assert len(live(sandbox, "institutions")) == 2


def test_strict_server_one_students_grade_never_lands_on_anothers_enrollment(h, sandbox):
    """Enrollments are filterable by course only: a strict server answers the course's
    enrollments, and the student is matched here, so a second student gets an enrollment of
    her own and the first keeps her grade."""
    sandbox.sandbox.config.strict = True
    h.sync(*_structure(), student("S-1", email="a@example.edu"),
           student("S-2", email="b@example.edu"))
    assert h.sync(_enrollment("E-1", "S-1", 8.0), _enrollment("E-2", "S-2", 5.0)) == [
        "synced", "synced"]
    students = {s["uuid"]: s["email"] for s in live(sandbox, "students")}
    grades = {students[e["student"]["uuid"]]: e["grade"] for e in live(sandbox, "enrollments")}
    assert grades == {"a@example.edu": 8.0, "b@example.edu": 5.0}


def test_strict_server_dashboard_student_with_the_same_email_is_adopted(h, ctx, sandbox):
    """The documented filter (students by email) still finds a student made on the dashboard:
    it is adopted, not duplicated."""
    sandbox.sandbox.config.strict = True
    made = ctx.client.students.create({"name": "Maria", "email": "maria@example.edu",
                                       "date_of_birth": "1998-05-20"})
    assert h.sync(student(email="maria@example.edu")) == ["synced"]
    assert h.mapping("student", "S-1").dokstamp_uuid == made["uuid"]
    assert len(live(sandbox, "students")) == 1


# -- drift: entities deleted outside dokstamp-sync -------------------------------------------

def test_update_of_a_student_deleted_on_the_dashboard_recreates_it(h, ctx, sandbox, caplog):
    """The next update of a student deleted on the dashboard gets a 404: the mapping is
    forgotten, the student recreated with the new data, and the log says so."""
    h.sync(student())
    gone = h.mapping("student", "S-1").dokstamp_uuid
    ctx.client.students.delete(gone)
    with caplog.at_level(logging.WARNING, logger="dokstamp_sync.sync"):
        assert h.sync(student(name="Maria S. Silva", at=T0 + timedelta(hours=1))) == ["synced"]
    (alive,) = live(sandbox, "students")
    assert alive["name"] == "Maria S. Silva"
    assert alive["uuid"] != gone
    assert h.mapping("student", "S-1").dokstamp_uuid == alive["uuid"]
    assert any("deleted in DokStamp outside dokstamp-sync" in r.getMessage()
               for r in caplog.records)


def test_dependent_of_a_student_deleted_on_the_dashboard_recreates_it(h, ctx, sandbox):
    """An enrollment whose student was deleted on the dashboard gets a 422 "The selected
    student uuid is invalid.": the student is looked up (404), recreated from its latest upsert,
    and the enrollment then synced onto it."""
    h.sync(*_structure(), student())
    gone = h.mapping("student", "S-1").dokstamp_uuid
    ctx.client.students.delete(gone)
    e = _enrollment("E-1", "S-1", 9.0)
    assert h.sync(e) == ["synced"]
    (alive,) = live(sandbox, "students")
    assert alive["uuid"] != gone
    (enrollment,) = live(sandbox, "enrollments")
    assert enrollment["student"]["uuid"] == alive["uuid"]
    assert h.mapping("student", "S-1").dokstamp_uuid == alive["uuid"]


def test_delete_of_an_entity_deleted_on_the_dashboard_is_synced(h, ctx, sandbox):
    """The ERP deletes a student already deleted on the dashboard: 404, already gone, synced
    and mapped as deleted."""
    h.sync(student())
    ctx.client.students.delete(h.mapping("student", "S-1").dokstamp_uuid)
    assert h.sync(student(op="delete", at=T0 + timedelta(hours=1))) == ["synced"]
    assert h.mapping("student", "S-1").status == "deleted"
    assert live(sandbox, "students") == []


# -- uploads ----------------------------------------------------------------------------------

def test_reordered_upload_records_give_each_certificate_its_own_pdf(h, ctx, sandbox):
    """The server answers a batched upload's records in reverse order, one of them renamed by
    deduplication (its content was uploaded before under another name): the answer cannot be
    matched, so the files are sent one per request and each certificate gets its own PDF."""
    sandbox.sandbox.faults.configure(Faults(reorder_uploads=True))
    cls = samples.graduating_class(2, courses=1, modules_per_course=1)
    files = {e["key"]: base64.b64decode(e["data"]["content_base64"])
             for e in cls if e["entity"] == "file"}
    from dokstamp_sync.dokstamp import Upload
    ctx.client.files.upload([Upload("scanned-earlier.pdf", files["DIP-00001"])])
    h.sync(*cls)
    assert set(h.states().values()) == {"synced"}
    blobs = sandbox.sandbox.tenants["demo-university"].blobs
    for key, content in files.items():
        assert blobs[h.mapping("file", key).dokstamp_uuid] == content
    for cert in live(sandbox, "certificates"):
        key = "DIP-" + next(s for s in ("00001", "00002")
                            if h.mapping("student", f"S-{s}").dokstamp_uuid
                            == cert["student"]["uuid"])
        assert [f["uuid"] for f in cert["files"]] == [h.mapping("file", key).dokstamp_uuid]


def test_two_identical_files_in_one_batch_map_to_one_record(h, sandbox):
    """Two file events with the same content, uploaded in one batch: both synced, both mapped
    to the one record DokStamp keeps."""
    content = base64.b64encode(b"%PDF-1.4 the same diploma").decode()
    a = event("file", "F-1", {"filename": "a.pdf", "content_base64": content}, at=T0)
    b = event("file", "F-2", {"filename": "b.pdf", "content_base64": content}, at=T0)
    assert h.sync(a, b) == ["synced", "synced"]
    assert h.mapping("file", "F-1").dokstamp_uuid == h.mapping("file", "F-2").dokstamp_uuid
    assert len(live(sandbox, "files")) == 1
    assert calls(sandbox)["POST /files"] == 1


# -- pages ------------------------------------------------------------------------------------

def test_capped_pages_listing_is_not_trusted_and_creates_no_duplicate(h, ctx, sandbox, caplog):
    """Pages capped at 7 rows while meta echoes per_page 200 (and total 60): the rows between
    are never served, so the listing shortcut's listing is incomplete and not trusted (listed
    once, not again for every event); every event searches and adopts its student, none is
    created again."""
    sandbox.sandbox.faults.configure(Faults(page_cap=7))
    n = 60
    for i in range(n):
        ctx.client.students.create({"name": f"S {i}", "email": f"s{i}@example.edu",
                                    "date_of_birth": "2000-01-01"})
    pks = h.send(*[student(f"S-{i}", email=f"s{i}@example.edu", name=f"S {i}")
                   for i in range(n)])
    with caplog.at_level(logging.WARNING, logger="dokstamp_sync.sync"):
        h.run(pks)
    assert set(h.states().values()) == {"synced"}
    assert not ctx.redis.exists(f"{RedisKeys().listing}student")
    assert sum("incomplete" in r.getMessage() for r in caplog.records) == 1
    assert len(live(sandbox, "students")) == n
    assert calls(sandbox).get("POST /students", 0) == n  # the dashboard's creates only


# -- edges ------------------------------------------------------------------------------------

def test_409_on_create_searches_and_adopts_the_exact_match(h, ctx, sandbox, engine_redis):
    """A fresh listing said the student was absent, but the dashboard created her meanwhile:
    the create answers 409, the search finds her and she is adopted."""
    sandbox.sandbox.faults.configure(Faults(conflict_409=True))
    made = ctx.client.students.create({"name": "Maria", "email": "maria@example.edu",
                                       "date_of_birth": "1998-05-20"})
    engine_redis.set(f"{RedisKeys().listing}student", "1")  # a listing from before her creation
    assert h.sync(student()) == ["synced"]
    assert h.mapping("student", "S-1").dokstamp_uuid == made["uuid"]
    assert len(live(sandbox, "students")) == 1
    assert calls(sandbox)["POST /students"] == 2  # the dashboard's, and our refused one


def test_409_without_an_exact_match_is_dead_naming_the_conflict(h, ctx, sandbox, engine_redis):
    """A cohort code taken by another course's cohort: 409, the hit belongs to another course,
    so it is never adopted; the dead letter names the conflict."""
    sandbox.sandbox.faults.configure(Faults(conflict_409=True))
    h.sync(*samples.graduating_class(0, courses=2, modules_per_course=1))
    engine_redis.set(f"{RedisKeys().listing}cohort", "1")
    taken = event("cohort", "COH-X", {"code": "BSC-1-2026", "course_key": "CRS-2"}, at=T0)
    assert h.sync(taken) == ["dead"]
    (letter,) = h.letters()
    assert letter.reason.startswith("conflict")
    assert "course_uuid" in letter.reason
    assert len(live(sandbox, "cohorts")) == 2


def test_blocked_delete_is_counted_first_and_archived(h, sandbox):
    """A course with enrollments: its dependents are counted as the docs show (per_page=1,
    meta.total) and it is archived without a DELETE being sent."""
    cls = samples.graduating_class(1, courses=1, modules_per_course=1, issue=False)
    h.sync(*cls)
    assert h.sync(event("course", "CRS-1", op="delete", at=T0 + timedelta(hours=1))) == [
        "synced"]
    assert live(sandbox, "courses")[0]["status"] == "archived"
    assert h.mapping("course", "CRS-1").status == "archived"
    assert calls(sandbox).get("DELETE /courses/{uuid}", 0) == 0


def test_blocked_delete_without_archive_status_is_dead_naming_the_dependents(h, sandbox):
    """A student with a certificate cannot be deleted nor archived: dead letter naming the
    counted dependents; no DELETE sent, the student lives on."""
    h.sync(*samples.graduating_class(1, courses=1, modules_per_course=1))
    assert h.sync(student("S-00001", op="delete", at=T0 + timedelta(hours=1))) == ["dead"]
    (letter,) = h.letters()
    assert "referenced by 1 certificates" in letter.reason
    assert calls(sandbox).get("DELETE /students/{uuid}", 0) == 0
    assert len(live(sandbox, "students")) == 1


def test_malformed_success_body_is_retried_with_status_and_excerpt(h, ctx, sandbox, caplog):
    """An empty 201 to a create (the student was created), the search right after it answered
    503: the event waits with the status
    and reason in its error, no traceback is logged, and the retry adopts the student."""
    ctx.limits = replace(ctx.limits, in_call_attempts=1)
    # a malformed answer to a create may hide a write: wait, then search
    ctx.limits = replace(ctx.limits, create_window=0.2)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", body="empty",
                      then=[ScriptedFault("GET", "/students", status=503)])]))
    e = student()
    with caplog.at_level(logging.INFO):
        assert h.sync(e) == ["waiting"]
    error = h.record(e["event_id"]).last_error
    assert "POST /students -> 201" in error
    assert "internal error" not in error
    assert not any(r.exc_info for r in caplog.records)
    time.sleep(0.25)
    h.drain()
    assert h.state(e["event_id"]) == "synced"
    assert len(live(sandbox, "students")) == 1


def test_retry_after_on_a_503_is_honoured(h, ctx, sandbox):
    """A 503 with Retry-After: 2 is slept through in the call; one with Retry-After: 120 parks
    the event for at least that long."""
    sleeps: list[float] = []
    ctx.sleep = sleeps.append
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=503, retry_after=2)]))
    assert h.sync(student()) == ["synced"]
    assert 2 in sleeps
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=503, retry_after=120)]))
    e = student("S-2", email="b@example.edu")
    before = datetime.now(UTC)
    assert h.sync(e) == ["waiting"]
    assert h.record(e["event_id"]).next_attempt_at >= before + timedelta(seconds=119)
