"""The graph walk against the sandbox over HTTP, with real Postgres and Redis.

Events go through the real stream and ingester, then ``engine.run`` (what the Celery task
calls) processes them in this process, so each test controls the order exactly. Tests with a
real Celery worker are in test_worker.py.
"""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import T0, Harness, calls, dump, live, student


def test_a_whole_class_in_order_syncs_every_entity_once(h, sandbox):
    """Institution to certificates for 6 students: all synced, one DokStamp entity each."""
    events = samples.graduating_class(6)
    assert set(h.sync(*events)) <= {"synced"}
    assert set(h.states().values()) == {"synced"}
    state = dump(sandbox)
    assert (len(state["institutions"]), len(state["modules"]), len(state["courses"]),
            len(state["cohorts"])) == (1, 6, 2, 2)
    assert len(state["students"]) == len(state["enrollments"]) == 6
    assert len(state["files"]) == len(state["certificates"]) == 6
    assert all(c["status"] == "issued" for c in state["certificates"])
    assert all(len(mods) == 3 for mods in state["course_modules"].values())
    cert = h.mapping("certificate", "CERT-00001")
    assert cert.dokstamp_uuid in {c["uuid"] for c in state["certificates"]}


def test_any_order_children_first_syncs_parents_first(h, sandbox):
    """A class sent in reverse order: each child syncs its known parents first, inline."""
    events = list(reversed(samples.graduating_class(3)))
    pks = h.send(*events)
    h.run(pks)
    h.drain()
    assert set(h.states().values()) == {"synced"}
    assert len(live(sandbox, "certificates")) == 3
    assert len(live(sandbox, "students")) == 3


def test_certificate_before_its_student_waits_then_syncs(h, sandbox):
    """A certificate whose student has not arrived waits (not dead); the student's arrival
    wakes it and it syncs."""
    cls = samples.graduating_class(1)
    without_student = [e for e in cls if e["entity"] != "student"]
    the_student = next(e for e in cls if e["entity"] == "student")
    h.sync(*without_student)
    cert = next(e for e in cls if e["entity"] == "certificate")
    rec = h.record(cert["event_id"])
    assert rec.state == "waiting"
    assert rec.waiting_for == "student:S-00001"
    assert "has not arrived" in rec.last_error
    assert h.letters() == []
    h.sync(the_student)
    woken = h.record(cert["event_id"])
    assert woken.next_attempt_at <= datetime.now(UTC)  # woken, not left to its backoff
    h.drain()
    assert h.state(cert["event_id"]) == "synced"
    assert len(live(sandbox, "certificates")) == 1


def test_dependency_that_never_arrives_is_dead_lettered_after_the_timeout(h, ctx, sandbox):
    """After the dependency timeout, a waiting event dies with 'dependency ... never arrived'."""
    ctx.limits = replace(ctx.limits, dependency_timeout=0.0)
    e = event("enrollment", "E-1", {"student_key": "S-404", "course_key": "C-404",
                                    "enrolled_at": "2024-01-01"})
    assert h.sync(e) == ["dead"]
    (letter,) = h.letters()
    assert letter.reason in ("dependency student S-404 never arrived",
                             "dependency course C-404 never arrived")


def test_redelivered_event_changes_nothing(h, sandbox):
    """The same event_id twice is recorded once; running it again makes no API call."""
    e = student()
    assert h.sync(e) == ["synced"]
    before = sandbox.sandbox.stats.to_json()["requests"]
    assert h.send(e) == []  # not recorded again
    pk = h.record(e["event_id"]).id
    assert h.run([pk]) == ["synced"]
    assert sandbox.sandbox.stats.to_json()["requests"] == before
    assert len(live(sandbox, "students")) == 1


def test_unchanged_upsert_costs_zero_api_calls(h, sandbox):
    """An upsert with the same data as last sent (a new event_id) makes no API call."""
    h.sync(student(at=T0))
    before = sandbox.sandbox.stats.to_json()["requests"]
    assert h.sync(student(at=T0 + timedelta(minutes=1))) == ["synced"]
    assert sandbox.sandbox.stats.to_json()["requests"] == before


def test_changed_upsert_patches_only_what_changed(h, sandbox):
    """A changed name is one PATCH with just that field."""
    h.sync(student(at=T0))
    sandbox.sandbox.stats.reset()
    seen = []
    h.ctx.client.http.event_hooks["request"].append(
        lambda r: seen.append((r.method, r.url.path, r.read())))
    h.sync(student(name="Maria F. Silva", at=T0 + timedelta(minutes=1)))
    writes = [(m, p, b) for m, p, b in seen if m != "GET"]
    assert len(writes) == 1
    method, _path, body = writes[0]
    assert method == "PATCH"
    assert b'"name"' in body
    assert b'"email"' not in body
    assert live(sandbox, "students")[0]["name"] == "Maria F. Silva"


def test_stale_update_after_a_newer_one_is_superseded(h, sandbox):
    """An older event arriving after a newer one was synced ends superseded; data unchanged."""
    h.sync(student(name="New Name", at=T0 + timedelta(hours=1)))
    old = student(name="Old Name", at=T0)
    assert h.sync(old) == ["superseded"]
    assert live(sandbox, "students")[0]["name"] == "New Name"


def test_older_unsynced_event_is_superseded_by_a_newer_queued_one(h, sandbox):
    """Two queued events for one entity: the older ends superseded, the newer applies."""
    old, new = student(name="Old", at=T0), student(name="New", at=T0 + timedelta(minutes=5))
    pks = h.send(old, new)
    assert h.run(pks) == ["superseded", "synced"]
    assert live(sandbox, "students")[0]["name"] == "New"


def test_search_before_create_adopts_an_existing_entity(h, ctx, sandbox):
    """A student already in DokStamp (same email) is found, mapped and updated, not created."""
    existing = ctx.client.students.create({"name": "Typo Nmae", "email": "maria@example.edu",
                                           "date_of_birth": "1998-05-20"})
    assert h.sync(student()) == ["synced"]
    assert h.mapping("student", "S-1").dokstamp_uuid == existing["uuid"]
    assert len(live(sandbox, "students")) == 1
    assert live(sandbox, "students")[0]["name"] == "Maria Silva"


def test_data_uuid_adopts_without_a_create(h, ctx, sandbox):
    """data.uuid maps an institution created on the dashboard; no POST /institutions."""
    inst = ctx.client.institutions.create({"name": "Dashboard U", "country": "Brazil"})
    sandbox.sandbox.stats.reset()
    e = event("institution", "INST", {"name": "Dashboard U", "country": "Brazil",
                                      "uuid": inst["uuid"]})
    assert h.sync(e) == ["synced"]
    assert h.mapping("institution", "INST").dokstamp_uuid == inst["uuid"]
    assert calls(sandbox).get("POST /institutions", 0) == 0


def test_conflicting_search_hit_is_dead_lettered_with_both_sides(h, ctx, sandbox):
    """A certificate found by file_uuid but for another student is a conflict, never adopted."""
    cls = samples.graduating_class(2)
    h.sync(*[e for e in cls if e["entity"] != "certificate"])
    file1 = h.mapping("file", "DIP-00001").dokstamp_uuid
    other = h.mapping("student", "S-00002").dokstamp_uuid
    course = h.mapping("course", "CRS-1").dokstamp_uuid
    inst = h.mapping("institution", "INST").dokstamp_uuid
    ctx.client.certificates.create({"institution_uuid": inst, "course_uuid": course,
                                    "student_uuid": other, "file_uuid": file1}, issue=True)
    cert = next(e for e in cls if e["key"] == "CERT-00001")
    assert h.sync(cert) == ["dead"]
    (letter,) = h.letters()
    assert letter.reason.startswith("conflict:")
    assert f"student_uuid={other}" in letter.reason
    assert f"student_uuid={h.mapping('student', 'S-00001').dokstamp_uuid}" in letter.reason
    assert len(live(sandbox, "certificates")) == 1


def test_5xx_after_the_write_creates_no_duplicate(h, sandbox):
    """POST /students fails with a 500 after the student was created: no re-POST; the search
    made at once after the failure finds it and maps it, in the same run (no window waited
    out). One student in DokStamp."""
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=500, after_commit=True)]))
    e = student()
    assert h.sync(e) == ["synced"]
    assert len(live(sandbox, "students")) == 1
    assert sandbox.sandbox.stats.lost_responses == 1
    assert h.mapping("student", "S-1").dokstamp_uuid == live(sandbox, "students")[0]["uuid"]


def test_5xx_that_persists_parks_the_event_with_backoff(h, sandbox):
    """Three 503s in a row exhaust the in-call retries: the event waits, counted, not dead."""
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=503, times=3)]))
    e = student()
    assert h.sync(e) == ["waiting"]
    rec = h.record(e["event_id"])
    assert (rec.attempts, rec.state) == (1, "waiting")
    assert "503" in rec.last_error
    assert rec.next_attempt_at > datetime.now(UTC) - timedelta(seconds=1)
    h.drain()
    assert h.state(e["event_id"]) == "synced"


def test_retries_exhausted_after_the_budget(h, ctx, sandbox):
    """Once the retry budget is spent, a transient failure dead-letters 'retries exhausted'."""
    ctx.limits = replace(ctx.limits, retry_budget=0.0)
    ctx.breaker.threshold = 1000  # failures of one event, not an outage (see test_breaker)
    sandbox.sandbox.faults.configure(Faults(error_rate=1.0, lost_response_share=0.0))
    e = student()
    assert h.sync(e) == ["waiting"]  # the first failure starts the clock
    h.run([h.record(e["event_id"]).id])
    assert h.state(e["event_id"]) == "dead"
    (letter,) = h.letters()
    assert letter.reason.startswith("retries exhausted after 2 attempts")


def test_429_sets_the_tenant_pause_and_is_retried(h, ctx, sandbox, engine_redis):
    """A 429 with Retry-After sets the shared tenant pause (seen by every process), the
    in-call retry waits the Retry-After, and the event still syncs."""
    sleeps = []
    ctx.sleep = sleeps.append
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=429, retry_after=2)]))
    seen_pause = []
    ctx.client.http.event_hooks["response"].append(
        lambda r: seen_pause.append(engine_redis.pttl(f"{RedisKeys().pause}demo-university"))
        if r.status_code == 429 else None)
    assert h.sync(student()) == ["synced"]
    assert 1000 < seen_pause[0] <= 2000  # set by the 429 itself
    assert 2 in sleeps


def test_permanent_4xx_is_dead_lettered_at_once_with_dokstamp_reason(h, sandbox):
    """A 422 dead-letters immediately with status, message, field errors, method and path."""
    e = event("student", "S-X", {"name": "No Birthday", "email": "nobday@example.edu"})
    assert h.sync(e) == ["dead"]
    (letter,) = h.letters()
    assert letter.http_status == 422
    assert (letter.request_method, letter.request_path) == ("POST", "/students")
    assert letter.response_body["errors"] == {
        "date_of_birth": ["The date of birth field is required."]}
    assert "date of birth field is required" in letter.reason
    assert letter.event_id == e["event_id"]


def test_token_expiry_mid_run(h, sandbox):
    """Tokens expiring between events are renewed transparently; nothing fails."""
    cls = samples.graduating_class(2)
    half = len(cls) // 2
    h.sync(*cls[:half])
    sandbox.sandbox.authority.expire_all()
    h.sync(*cls[half:])
    h.drain()
    assert set(h.states().values()) == {"synced"}
    assert sandbox.sandbox.stats.to_json()["by_route"].get("POST /auth/refresh", 0) == 1


def test_two_workers_racing_on_the_same_student_create_one(h, ctx, sandbox, make_ctx):
    """Two ERP keys with the same email, processed at the same moment by two threads (each its
    own worker context), create one DokStamp student; it belongs to one key, the other is a
    conflict naming both (issue 17: one DokStamp entity per ERP key)."""
    sandbox.sandbox.faults.configure(Faults(latency_ms=100))  # widen the race window

    other = Harness(make_ctx())
    pk_a = h.send(student(key="S-A"))[0]
    pk_b = h.send(student(key="S-B"))[0]
    barrier = threading.Barrier(2)
    results = {}

    def go(harness, pk, name):
        barrier.wait()
        results[name] = harness.run([pk])[0]

    threads = [threading.Thread(target=go, args=(h, pk_a, "a")),
               threading.Thread(target=go, args=(other, pk_b, "b"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == ["dead", "synced"]
    assert len(dump(sandbox)["students"]) == 1
    assert calls(sandbox)["POST /students"] == 1
    (letter,) = h.letters()
    assert "S-A" in letter.reason
    assert "S-B" in letter.reason
    owner = "S-A" if results["a"] == "synced" else "S-B"
    assert h.mapping("student", owner).dokstamp_uuid == dump(sandbox)["students"][0]["uuid"]


def test_course_modules_attach_only_the_missing_ones(h, sandbox):
    """Adding a module to a course's list attaches just that one."""
    cls = samples.graduating_class(0, courses=1, modules_per_course=2)
    h.sync(*cls)
    course = next(e for e in cls if e["entity"] == "course")
    extra = event("module", "MOD-EXTRA", {"name": "Extra", "code": "MX",
                                          "institution_key": "INST"})
    data = dict(course["data"])
    data["modules"] = [*data["modules"], {"module_key": "MOD-EXTRA", "order": 3}]
    sandbox.sandbox.stats.reset()
    seen = []
    h.ctx.client.http.event_hooks["request"].append(
        lambda r: seen.append(r.read()) if r.url.path.endswith("/attach/modules")
        and r.method == "POST" else None)
    h.sync(extra, event("course", course["key"], data, at=T0 + timedelta(minutes=1)))
    extra_uuid = h.mapping("module", "MOD-EXTRA").dokstamp_uuid
    assert len(seen) == 1
    assert extra_uuid.encode() in seen[0]
    assert seen[0].count(b'"uuid"') == 1
    course_uuid = h.mapping("course", course["key"]).dokstamp_uuid
    assert len(dump(sandbox)["course_modules"][course_uuid]) == 3


def test_delete_course_with_dependents_archives_it(h, sandbox):
    """Deleting a course that has cohorts is refused by DokStamp: the course is archived and
    the mapping marked archived, not forgotten."""
    cls = samples.graduating_class(0, courses=1, modules_per_course=1)
    h.sync(*cls)
    assert h.sync(event("course", "CRS-1", op="delete", at=T0 + timedelta(hours=1))) == [
        "synced"]
    assert live(sandbox, "courses")[0]["status"] == "archived"
    m = h.mapping("course", "CRS-1")
    assert m.status == "archived"


def test_delete_without_dependents_deletes_and_marks_the_mapping(h, sandbox):
    """A student with nothing attached is deleted in DokStamp; the mapping says deleted."""
    h.sync(student())
    assert h.sync(student(op="delete", at=T0 + timedelta(hours=1))) == ["synced"]
    assert live(sandbox, "students") == []
    assert h.mapping("student", "S-1").status == "deleted"


def test_delete_module_attached_to_a_course_is_dead_lettered(h, sandbox):
    """A module cannot be deleted while attached and has no archive status: dead letter."""
    h.sync(*samples.graduating_class(0, courses=1, modules_per_course=1))
    e = event("module", "MOD-101", op="delete", at=T0 + timedelta(hours=1))
    assert h.sync(e) == ["dead"]
    assert "cannot be deleted" in h.letters()[0].reason


def test_revoke_certificate_with_reason(h, sandbox):
    """op revoke revokes the issued certificate with the ERP's reason."""
    h.sync(*samples.graduating_class(1))
    e = event("certificate", "CERT-00001", {"revocation_reason": "Issued in error"},
              op="revoke", at=T0 + timedelta(days=1))
    assert h.sync(e) == ["synced"]
    cert = live(sandbox, "certificates")[0]
    assert (cert["status"], cert["revocation_reason"]) == ("revoked", "Issued in error")
    assert h.mapping("certificate", "CERT-00001").status == "revoked"


def test_draft_then_issue(h, sandbox):
    """A certificate sent as a draft, then with issue: true, is issued by one PATCH."""
    cls = samples.graduating_class(1, issue=False)
    h.sync(*cls)
    assert live(sandbox, "certificates")[0]["status"] == "draft"
    cert = next(e for e in cls if e["entity"] == "certificate")
    h.sync(event("certificate", cert["key"], dict(cert["data"], issue=True),
                 at=T0 + timedelta(days=1)))
    assert live(sandbox, "certificates")[0]["status"] == "issued"
    assert calls(sandbox)["PATCH /certificates/{uuid}"] == 1


def test_worker_lost_too_many_times_is_dead_lettered(h, ctx, sandbox):
    """An event whose task started max_deliveries times without finishing is dead-lettered."""
    from dokstamp_sync.db import session_scope
    from dokstamp_sync.models import InboxEvent

    e = student()
    pk = h.send(e)[0]
    with session_scope(ctx.sessions) as s:
        s.get(InboxEvent, pk).deliveries = ctx.limits.max_deliveries  # as if killed that many times
    assert h.run([pk]) == ["dead"]
    assert "worker was lost" in h.letters()[0].reason
    assert live(sandbox, "students") == []
