"""Certificates: the end state never depends on timing, and issuance is verified (issue 10).

Every behaviour is proven against the sandbox following each documentation generation (a:
password login and ``status: issued``; b: client credentials and ``finish: true``) and in
strict mode (undocumented filters ignored, as a lenient query builder does): the ``mode``
fixture runs each test three times. Faults are faults: a lost response is a write the sandbox
applied while the client saw a 5xx; a slow write lands after the client gave up. Each test
asserts what the sandbox ends up holding, not only our tables.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest

from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.ops import dlq
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.testing import T0, Harness, calls, live, sandbox_context, sandbox_settings

MODES = ("a", "b", "strict")


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, sandbox: Any) -> str:
    """The sandbox in generation a, generation b, or strict (generation a)."""
    config = sandbox.sandbox.config
    config.generation = "b" if request.param == "b" else "a"
    config.strict = request.param == "strict"
    return str(request.param)


@pytest.fixture
def make_ctx(mode: str, sandbox: Any, sessions: Any, engine_redis: Any
             ) -> Iterator[Any]:
    """Contexts on the sandbox that log in the way its generation wants."""
    made: list[SyncContext] = []

    def build(**kw: Any) -> SyncContext:
        made.append(sandbox_context(sandbox, sessions, engine_redis, **kw))
        return made[-1]

    yield build
    for c in made:
        c.client.http.close()
        c.file_http.close()


@pytest.fixture
def hh(make_ctx: Any) -> Harness:
    return Harness(make_ctx())


def graph(students: int = 1, **kw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A class's events without its certificates, and its certificates."""
    cls = samples.graduating_class(students, courses=1, modules_per_course=1, **kw)
    return ([e for e in cls if e["entity"] != "certificate"],
            [e for e in cls if e["entity"] == "certificate"])


def revoke(key: str = "CERT-00001", days: int = 1, reason: str = "Issued in error"
           ) -> dict[str, Any]:
    return event("certificate", key, {"revocation_reason": reason}, op="revoke",
                 at=T0 + timedelta(days=days))


def certificates(sandbox: Any) -> list[dict[str, Any]]:
    return live(sandbox, "certificates")


def script(sandbox: Any, *faults: ScriptedFault) -> None:
    sandbox.sandbox.faults.configure(Faults(script=list(faults)))


# -- 1. a revoke applies on top of the newest upsert, whatever the timing --------------------

def test_revoke_while_the_upsert_waits_for_its_student_ends_revoked(hh, sandbox):
    """Case 1: a revoke arriving while its certificate waits for its student does not
    supersede it: both wait for the student, then DokStamp holds the certificate, revoked,
    with the revoke's reason; nothing is dead."""
    rest, (cert,) = graph()
    student = next(e for e in rest if e["entity"] == "student")
    hh.sync(*[e for e in rest if e is not student], cert)
    assert hh.state(cert["event_id"]) == "waiting"
    r = revoke()
    assert hh.sync(r) == ["waiting"]
    assert hh.record(r["event_id"]).waiting_for == "student:S-00001"
    hh.sync(student)
    hh.drain()
    assert hh.state(cert["event_id"]) == hh.state(r["event_id"]) == "synced"
    (held,) = certificates(sandbox)
    assert (held["status"], held["revocation_reason"]) == ("revoked", "Issued in error")
    mapping = hh.mapping("certificate", "CERT-00001")
    assert (mapping.status, mapping.remote_status) == ("revoked", "revoked")
    assert hh.letters() == []


def test_an_older_upsert_after_a_synced_revoke_is_created_revoked(hh, sandbox):
    """Case 1, other order: the revoke comes first (no upsert known: nothing to revoke yet),
    then its older upsert: the certificate is created and revoked, never left issued."""
    rest, (cert,) = graph()
    hh.sync(*rest)
    assert hh.sync(revoke()) == ["synced"]
    assert hh.sync(cert) == ["synced"]
    (held,) = certificates(sandbox)
    assert held["status"] == "revoked"
    assert hh.mapping("certificate", "CERT-00001").status == "revoked"


def test_created_but_unmapped_after_a_lost_response_is_found_and_revoked(hh, sandbox):
    """Case 1: POST /certificates applied but answered 500 and the search right after it
    answered 503 (so no mapping), the upsert parked for a retry; the revoke then syncs the
    upsert (which finds it, no second certificate) and revokes it."""
    rest, (cert,) = graph()
    hh.sync(*rest)
    hh.ctx.limits = replace(hh.ctx.limits, in_call_attempts=1)
    # the failed create may still land: searched after this
    hh.ctx.limits = replace(hh.ctx.limits, create_window=0.2)
    script(sandbox, ScriptedFault("POST", "/certificates", status=500, after_commit=True,
                                  then=[ScriptedFault("GET", "/certificates", status=503)]))
    assert hh.sync(cert) == ["waiting"]
    assert hh.mapping("certificate", "CERT-00001") is None
    time.sleep(0.25)
    assert hh.sync(revoke()) == ["synced"]
    (held,) = certificates(sandbox)
    assert held["status"] == "revoked"
    assert hh.state(cert["event_id"]) == "synced"


def test_slow_create_landing_after_the_timeout_is_found_and_revoked(make_ctx, sandbox):
    """Case 1: POST /certificates lands 1.5 s late, after the client's 0.5 s timeout (no
    mapping); a revoke arriving later finds that certificate and revokes it."""
    h = Harness(make_ctx(timeout=0.5))
    h.ctx.limits = replace(h.ctx.limits, in_call_attempts=1)
    rest, (cert,) = graph()
    h.sync(*rest)
    script(sandbox, ScriptedFault("POST", "/certificates", status=201, delay_s=1.5))
    assert h.sync(cert) == ["waiting"]
    time.sleep(1.5)  # the write lands
    assert len(certificates(sandbox)) == 1
    assert h.sync(revoke()) == ["synced"]
    (held,) = certificates(sandbox)
    assert held["status"] == "revoked"


# -- 2. revoke and issue are idempotent ------------------------------------------------------

def test_revoke_whose_answer_is_lost_ends_synced_on_retry_and_replay(hh, sandbox):
    """Case 2: PUT .../revoke applied but answered 500: the retry reads the certificate,
    sees it revoked and ends synced (not "already revoked" dead); the mapping says revoked."""
    rest, (cert,) = graph()
    hh.sync(*rest, cert)
    hh.ctx.limits = replace(hh.ctx.limits, in_call_attempts=1)
    script(sandbox, ScriptedFault("PUT", "/certificates/{uuid}/revoke", status=500,
                                  after_commit=True))
    r = revoke()
    assert hh.sync(r) == ["waiting"]
    hh.drain()
    assert hh.state(r["event_id"]) == "synced"
    assert hh.mapping("certificate", "CERT-00001").status == "revoked"
    assert certificates(sandbox)[0]["status"] == "revoked"


def test_issue_whose_answer_is_lost_is_synced_and_a_revoke_then_revokes(hh, sandbox):
    """Case 2: a draft issued by PATCH whose answer is lost: the retry reads it issued and
    ends synced; a later revoke revokes it (never deletes an issued certificate)."""
    rest, (cert,) = graph(issue=False)
    hh.sync(*rest, cert)
    assert certificates(sandbox)[0]["status"] == "draft"
    hh.ctx.limits = replace(hh.ctx.limits, in_call_attempts=1)
    script(sandbox, ScriptedFault("PATCH", "/certificates/{uuid}", status=500,
                                  after_commit=True))
    issue = event("certificate", cert["key"], dict(cert["data"], issue=True),
                  at=T0 + timedelta(hours=1))
    assert hh.sync(issue) == ["waiting"]
    hh.drain()
    assert hh.state(issue["event_id"]) == "synced"
    assert hh.sync(revoke()) == ["synced"]
    (held,) = certificates(sandbox)  # still there: revoked, not deleted
    assert held["status"] == "revoked"


def test_delete_of_an_issued_certificate_with_a_stale_draft_mapping_revokes(hh, sandbox):
    """Case 2: the mapping says draft (stale) while DokStamp holds it issued: a delete reads
    it first and revokes; an issued certificate is never deleted."""
    rest, (cert,) = graph(issue=False)
    hh.sync(*rest, cert)
    uuid = hh.mapping("certificate", "CERT-00001").dokstamp_uuid
    hh.ctx.client.certificates.update(uuid, hh.ctx.client.certificates.issue_fields())
    d = event("certificate", "CERT-00001", op="delete", at=T0 + timedelta(days=1))
    assert hh.sync(d) == ["synced"]
    (held,) = certificates(sandbox)
    assert (held["status"], held["revocation_reason"]) == ("revoked", "deleted in the ERP")


# -- 3. issuance is verified -----------------------------------------------------------------

def test_default_issue_style_follows_the_credential_scheme(hh, sandbox, mode):
    """Case 3: with DOKSTAMP_ISSUE_STYLE unset, the scheme the generation logs in with picks
    the style (client credentials -> finish, password -> status), and certificates are
    issued, with a verification URL."""
    rest, certs = graph(2)
    hh.sync(*rest, *certs)
    expected = "finish" if mode == "b" else "status"
    assert hh.ctx.client.certificates.issue_style == expected
    assert {c["status"] for c in certificates(sandbox)} == {"issued"}


def test_a_create_that_did_not_issue_is_dead_lettered_naming_the_style(make_ctx, sandbox,
                                                                       mode):
    """Case 3: with the other generation's style forced, DokStamp creates a draft; the event
    is dead-lettered naming the style and how to change it, no mapping records it issued;
    after fixing the style a replay issues that same certificate."""
    right = "finish" if mode == "b" else "status"
    wrong = "status" if right == "finish" else "finish"
    h = Harness(make_ctx(issue_style=wrong))
    rest, (cert,) = graph()
    h.sync(*rest)
    assert h.sync(cert) == ["dead"]
    (letter,) = h.letters()
    assert f"DOKSTAMP_ISSUE_STYLE={wrong}" in letter.reason
    assert f"set DOKSTAMP_ISSUE_STYLE={right}" in letter.reason
    assert h.mapping("certificate", "CERT-00001") is None
    assert certificates(sandbox)[0]["status"] == "draft"
    h.ctx.client.certificates.issue_style = right  # type: ignore[assignment]
    dlq.replay(h.ctx.sessions, everything=True)
    h.drain()
    assert h.state(cert["event_id"]) == "synced"
    (held,) = certificates(sandbox)
    assert held["status"] == "issued"


def test_settings_resolve_the_issue_style_from_the_scheme():
    """Case 3: "auto" (the default) resolves to finish with client credentials, status with
    a password login; an explicit DOKSTAMP_ISSUE_STYLE wins."""
    url = "http://127.0.0.1:1"
    assert sandbox_settings(url, scheme="client").dokstamp_issue_style == "finish"
    assert sandbox_settings(url).dokstamp_issue_style == "status"
    assert sandbox_settings(url, scheme="client",
                            dokstamp_issue_style="status").dokstamp_issue_style == "status"


# -- 4. found again by documented filters only -----------------------------------------------

def test_lost_creates_are_found_again_by_student_and_course(hh, sandbox):
    """Case 4: every certificate create is applied but answered 500; each retry searches by
    student and course and matches its file in files[]: one certificate per student, each
    issued for the right student, nothing dead (in strict mode too, where a file filter
    would be ignored and every retry would "find" the first certificate)."""
    rest, certs = graph(4)
    hh.sync(*rest)
    # each failed create may still land: searched after this
    hh.ctx.limits = replace(hh.ctx.limits, create_window=0.2)
    script(sandbox, ScriptedFault("POST", "/certificates", status=500, after_commit=True,
                                  times=4))
    hh.sync(*certs)
    time.sleep(0.25)
    hh.drain()
    assert {hh.state(c["event_id"]) for c in certs} == {"synced"}
    held = {c["uuid"]: c for c in certificates(sandbox)}
    assert len(held) == 4
    for i in range(1, 5):
        m = hh.mapping("certificate", f"CERT-{i:05d}")
        student = hh.mapping("student", f"S-{i:05d}").dokstamp_uuid
        assert held[m.dokstamp_uuid]["student"]["uuid"] == student
        assert held[m.dokstamp_uuid]["status"] == "issued"


def test_a_certificate_of_another_student_with_our_file_is_never_adopted(hh, sandbox):
    """Case 4: DokStamp holds a certificate with our file for another student: it is not
    adopted; the event is dead-lettered as a conflict naming both students."""
    rest, certs = graph(2)
    hh.sync(*rest)
    c = hh.ctx.client
    other = hh.mapping("student", "S-00002").dokstamp_uuid
    c.certificates.create({"institution_uuid": hh.mapping("institution", "INST").dokstamp_uuid,
                           "course_uuid": hh.mapping("course", "CRS-1").dokstamp_uuid,
                           "student_uuid": other,
                           "file_uuid": hh.mapping("file", "DIP-00001").dokstamp_uuid},
                          issue=True)
    assert hh.sync(certs[0]) == ["dead"]
    assert hh.letters()[0].reason.startswith("conflict:")
    assert hh.mapping("certificate", "CERT-00001") is None


# -- 5. the verification URL is kept ---------------------------------------------------------

def test_mapping_keeps_status_and_verification_url(hh, sandbox):
    """Case 5: the mapping keeps DokStamp's status and public_verification_url, and follows
    the revoke."""
    rest, (cert,) = graph()
    hh.sync(*rest, cert)
    (held,) = certificates(sandbox)
    m = hh.mapping("certificate", "CERT-00001")
    assert held["public_verification_url"]
    assert (m.remote_status, m.verification_url) == ("issued", held["public_verification_url"])
    hh.sync(revoke())
    assert hh.mapping("certificate", "CERT-00001").remote_status == "revoked"


# -- a whole class, end to end ---------------------------------------------------------------

def test_whole_class_with_a_revoke_waiting_for_its_student(hh, sandbox):
    """A class of 4 in reverse order, one student late and its certificate revoked before
    the student arrives: every event ends synced; DokStamp holds 4 certificates, that one
    revoked, the others issued, each mapping with its status and URL."""
    cls = samples.graduating_class(4, courses=1, modules_per_course=2)
    late = next(e for e in cls if e["entity"] == "student" and e["key"] == "S-00002")
    r = revoke("CERT-00002")
    hh.run(hh.send(*reversed([e for e in cls if e is not late]), r))
    hh.drain()
    assert hh.state(r["event_id"]) == "waiting"
    hh.sync(late)
    hh.drain()
    assert set(hh.states().values()) == {"synced"}
    held = {c["uuid"]: c for c in certificates(sandbox)}
    assert len(held) == 4
    for i in range(1, 5):
        m = hh.mapping("certificate", f"CERT-{i:05d}")
        want = "revoked" if i == 2 else "issued"
        assert held[m.dokstamp_uuid]["status"] == m.remote_status == want
        assert m.verification_url == held[m.dokstamp_uuid]["public_verification_url"]


# -- 6. issue 16: a certificate re-checks its references; a search counts once ---------------

def test_a_certificate_whose_student_was_deleted_in_dokstamp_recreates_the_student(hh, sandbox):
    """The certificate's student was deleted in DokStamp behind our back (its mapping still
    points at it): the create is refused 422 "The selected student uuid is invalid.", the
    student is looked up (404), forgotten and recreated from its latest upsert, and the
    certificate is created on the new student, as for any other entity; nothing is dead."""
    rest, (cert,) = graph()
    hh.sync(*rest)
    gone = hh.mapping("student", "S-00001").dokstamp_uuid
    for enrollment in live(sandbox, "enrollments"):  # the dashboard deletes them too
        hh.ctx.client.enrollments.delete(enrollment["uuid"])
    hh.ctx.client.students.delete(gone)
    assert hh.sync(cert) == ["synced"]
    (alive,) = live(sandbox, "students")
    assert alive["uuid"] != gone
    (held,) = certificates(sandbox)
    assert held["student"]["uuid"] == alive["uuid"]
    assert hh.mapping("student", "S-00001").dokstamp_uuid == alive["uuid"]
    assert hh.mapping("certificate", "CERT-00001").dokstamp_uuid == held["uuid"]
    assert hh.letters() == []


def test_a_revoke_that_searches_counts_one_search(hh, sandbox):
    """A revoke without a mapping searches DokStamp once with its upsert's data (one
    GET /certificates): the ``searches`` counter goes up by one, not two."""
    rest, (cert,) = graph()
    hh.sync(*rest)
    script(sandbox, ScriptedFault("POST", "/certificates", status=422, after_commit=False))
    assert hh.sync(cert) == ["dead"]
    counters = hh.ctx.counters.keys.counters

    def searches() -> int:
        return int(hh.ctx.redis.hget(counters, "searches") or 0)

    before, gets = searches(), calls(sandbox).get("GET /certificates", 0)
    assert hh.sync(revoke()) == ["synced"]
    assert calls(sandbox).get("GET /certificates", 0) - gets == 1
    assert searches() - before == 1
    assert certificates(sandbox) == []
