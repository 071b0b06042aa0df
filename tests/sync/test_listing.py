"""The listing shortcut: one paged listing instead of a search per entity for a large backlog,
diplomas uploaded many per request, with search-before-create kept for retries."""

from __future__ import annotations

import time
from hashlib import sha256

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.sync.marks import LISTING_TRUSTED_FOR, CreateMark
from dokstamp_sync.testing import calls, live


def students(n: int, prefix: str = "S") -> list[dict]:
    return [event("student", f"{prefix}-{i}", {"name": f"Student {i}",
                                               "email": f"{prefix.lower()}{i}@example.edu",
                                               "date_of_birth": "2000-01-01"})
            for i in range(n)]


def test_a_large_backlog_is_listed_once_instead_of_searched_one_by_one(h, sandbox):
    """60 new students: a few list calls, no search each, one create each."""
    pks = h.send(*students(60))
    sandbox.sandbox.stats.reset()
    assert set(h.run(pks)) == {"synced"}
    calls = sandbox.sandbox.stats.to_json()["by_route"]
    assert calls["POST /students"] == 60
    assert calls["GET /students"] <= 3  # total + one page of 200, not 60 searches


def test_a_small_backlog_still_searches_each(h, sandbox):
    """Below the backlog threshold, each create is preceded by its own search."""
    pks = h.send(*students(5))
    sandbox.sandbox.stats.reset()
    h.run(pks)
    assert sandbox.sandbox.stats.to_json()["by_route"]["GET /students"] == 5


def _lost_create(ctx, entity: str, natural_key: str, make) -> None:
    """What a create whose outcome was never recorded leaves behind (a lost response, a killed
    worker): the marks set before its POST, its window over, and the entity in DokStamp."""
    ctx.creates.mark(entity, natural_key, 0.001)  # the window ends at once; unresolved stays
    make()
    time.sleep(0.01)


def test_an_event_tried_before_trusts_the_listing_when_no_create_was_sent(h, ctx, sandbox):
    """A retried event whose earlier attempt sent no create (no mark left) is as safe as a new
    one: the trusted listing stands in for its search."""
    pks = h.send(*students(60))
    h.run(pks[:1])  # lists, then creates S-0
    with session_scope(ctx.sessions) as s:
        s.get(InboxEvent, pks[1]).attempts = 1  # as if its first try had failed before a POST
    sandbox.sandbox.stats.reset()
    assert h.run(pks[1:2]) == ["synced"]
    assert calls(sandbox) == {"POST /students": 1}


def test_a_create_never_recorded_is_searched_for_despite_a_trusted_listing(h, ctx, sandbox):
    """A create whose response was lost (its mark outlived the create window) landed after the
    listing: the retry searches, adopts it and sends no create; one student in DokStamp."""
    pks = h.send(*students(60))
    h.run(pks[:1])  # lists, then creates S-0
    _lost_create(ctx, "student", "email=s1@example.edu", lambda: ctx.client.students.create(
        {"name": "Student 1", "email": "s1@example.edu", "date_of_birth": "2000-01-01"}))
    sandbox.sandbox.stats.reset()
    assert h.run(pks[1:2]) == ["synced"]
    assert calls(sandbox) == {"GET /students": 1}
    assert sum(1 for s in live(sandbox, "students") if s["email"] == "s1@example.edu") == 1
    assert not ctx.creates.look("student", "email=s1@example.edu").unresolved  # recorded


def test_created_elsewhere_after_the_listing_is_adopted_not_duplicated(h, ctx, sandbox):
    """If another system created the student after the listing, the refused create falls back
    to a search, the existing student is adopted and the listing is no longer trusted."""
    pks = h.send(*students(60))
    h.run(pks[:1])
    ctx.client.students.create({"name": "Made on the dashboard", "email": "s1@example.edu",
                                "date_of_birth": "2000-01-01"})
    assert h.run(pks[1:2]) == ["synced"]
    assert sum(1 for s in live(sandbox, "students") if s["email"] == "s1@example.edu") == 1
    assert not ctx.listings.fresh("student")  # the listing proved wrong: read it again


def test_diplomas_are_uploaded_many_per_request(h, sandbox):
    """A class of 12: the first file task uploads all 12 diplomas in one POST /files; the
    other file tasks make no call; every certificate is issued."""
    events = samples.graduating_class(12, courses=1, modules_per_course=1)
    pks = h.send(*events)
    h.run(pks)
    h.drain()
    calls = sandbox.sandbox.stats.to_json()["by_route"]
    assert calls["POST /files"] == 1
    assert set(h.states().values()) == {"synced"}
    assert len(live(sandbox, "certificates")) == 12
    assert len({c["files"][0]["uuid"] for c in live(sandbox, "certificates")}) == 12


def _killed(ctx, pk: int) -> None:
    """What a kill -9 mid-delivery leaves in the inbox: a delivery counted, never undone."""
    with session_scope(ctx.sessions) as s:
        s.get(InboxEvent, pk).deliveries = 1


def _course_with_enrollments(h, ctx, n: int = 60) -> tuple[list[int], dict[str, str]]:
    """An institution, a course and ``n`` students synced; ``n`` enrollment events sent (a
    backlog large enough for the listing shortcut). Their pks, and the students' UUIDs."""
    h.sync(event("institution", "INST", {"name": "Listing University", "country": "Brazil",
                                             "status": "active"}),
           event("course", "CRS", {"name": "Course", "code": "CRS-L", "status": "active",
                                   "institution_key": "INST"}))
    assert set(h.run(h.send(*students(n)))) == {"synced"}
    pks = h.send(*[event("enrollment", f"ENR-{i}", {"student_key": f"S-{i}", "course_key": "CRS",
                                                     "enrolled_at": "2024-02-01"})
                   for i in range(n)])
    return pks, {f"S-{i}": h.mapping("student", f"S-{i}").dokstamp_uuid for i in range(n)}


def _enrollments_of(sandbox, student_uuid: str) -> int:
    return sum(1 for e in live(sandbox, "enrollments")
               if e["student"]["uuid"] == student_uuid)


def test_a_dependency_created_by_a_killed_delivery_is_searched_for(h, ctx, sandbox):
    """A dependency synced inline from another event's run, whose own delivery sent a create
    and was killed after the listing: its unresolved mark makes the inline run search and
    adopt; no create is sent."""
    pks = h.send(*students(60))
    h.run(pks[:1])  # lists the students, creates S-0
    course = [event("institution", "INST", {"name": "Dep University", "country": "Brazil",
                                                "status": "active"}),
              event("course", "CRS", {"name": "Course", "code": "CRS-D", "status": "active",
                                      "institution_key": "INST"})]
    h.sync(*course)
    # S-5's delivery created it in DokStamp, then its worker was killed.
    _lost_create(ctx, "student", "email=s5@example.edu", lambda: ctx.client.students.create(
        {"name": "Student 5", "email": "s5@example.edu", "date_of_birth": "2000-01-01"}))
    _killed(ctx, pks[5])
    sandbox.sandbox.stats.reset()
    enrollment = event("enrollment", "ENR-5", {"student_key": "S-5", "course_key": "CRS",
                                               "enrolled_at": "2024-02-01"})
    assert h.sync(enrollment) == ["synced"]
    by_route = calls(sandbox)
    assert by_route.get("POST /students", 0) == 0
    assert by_route["GET /students"] == 1
    assert sum(1 for s in live(sandbox, "students") if s["email"] == "s5@example.edu") == 1


def test_a_redelivered_event_searches_even_after_a_listing(h, ctx, sandbox):
    """An enrollment whose first delivery created it and was killed: the redelivery searches
    and adopts it; DokStamp (no uniqueness for enrollments) keeps one."""
    pks, uuids = _course_with_enrollments(h, ctx)
    h.run(pks[:1])  # reads the course's enrollments (none), creates ENR-0
    course_uuid = h.mapping("course", "CRS").dokstamp_uuid
    _lost_create(ctx, "enrollment", f"student_uuid={uuids['S-1']}|course_uuid={course_uuid}",
                 lambda: ctx.client.enrollments.create({
                     "student_uuid": uuids["S-1"], "course_uuid": course_uuid,
                     "enrolled_at": "2024-02-01"}))  # the killed delivery's write
    _killed(ctx, pks[1])
    assert h.run(pks[1:2]) == ["synced"]
    assert _enrollments_of(sandbox, uuids["S-1"]) == 1


def test_an_erp_key_with_two_open_events_searches_even_after_a_listing(h, ctx, sandbox):
    """A newer event for an ERP key whose older event is still open (its delivery created the
    enrollment, then was killed) searches rather than trusting the listing made before that
    create: one enrollment in DokStamp, not two."""
    pks, uuids = _course_with_enrollments(h, ctx)
    h.run(pks[:1])  # reads the course's enrollments (none), creates ENR-0
    course_uuid = h.mapping("course", "CRS").dokstamp_uuid
    _lost_create(ctx, "enrollment", f"student_uuid={uuids['S-1']}|course_uuid={course_uuid}",
                 lambda: ctx.client.enrollments.create({
                     "student_uuid": uuids["S-1"], "course_uuid": course_uuid,
                     "enrolled_at": "2024-02-01"}))  # ENR-1's first event's write
    _killed(ctx, pks[1])
    newer = h.send(event("enrollment", "ENR-1", {"student_key": "S-1", "course_key": "CRS",
                                                 "enrolled_at": "2024-02-01", "grade": 9}))
    assert h.run(newer) == ["synced"]
    assert _enrollments_of(sandbox, uuids["S-1"]) == 1


def test_a_course_s_enrollments_are_read_once_for_all_its_enrollments(h, ctx, sandbox):
    """20 enrollments in one course: the first search reads the course's enrollments (one
    page), records them and marks the course trusted; the other 19 create without a search.
    DokStamp ends with exactly one enrollment per student."""
    pks, uuids = _course_with_enrollments(h, ctx, 20)
    sandbox.sandbox.stats.reset()
    assert set(h.run(pks)) == {"synced"}
    assert calls(sandbox) == {"GET /enrollments": 1, "POST /enrollments": 20}
    assert all(_enrollments_of(sandbox, uuid) == 1 for uuid in uuids.values())
    course_uuid = h.mapping("course", "CRS").dokstamp_uuid
    ttl = ctx.redis.pttl(f"{ctx.listings.fresh_prefix}enrollment:course_uuid={course_uuid}")
    assert 0 < ttl <= LISTING_TRUSTED_FOR * 1000


def test_an_old_course_listing_is_read_again_and_holds_our_creates(h, ctx, sandbox):
    """Once the course's marker has expired the next enrollment reads the course again (which
    now holds the enrollments we created, recorded already); the rest trust the new read."""
    pks, _ = _course_with_enrollments(h, ctx, 10)
    h.run(pks[:5])
    course_uuid = h.mapping("course", "CRS").dokstamp_uuid
    ctx.redis.delete(f"{ctx.listings.fresh_prefix}enrollment:course_uuid={course_uuid}")
    sandbox.sandbox.stats.reset()
    assert set(h.run(pks[5:])) == {"synced"}
    assert calls(sandbox) == {"GET /enrollments": 1, "POST /enrollments": 5}
    assert len(live(sandbox, "enrollments")) == 10


def test_a_search_that_finds_its_enrollment_records_the_whole_course(h, ctx, sandbox):
    """An enrollment that exists already (made outside, before any listing) is found and
    adopted; the search read the whole course, so the other enrollments create without one."""
    pks, uuids = _course_with_enrollments(h, ctx, 6)
    course_uuid = h.mapping("course", "CRS").dokstamp_uuid
    ctx.client.enrollments.create({"student_uuid": uuids["S-0"], "course_uuid": course_uuid,
                                   "enrolled_at": "2024-02-01"})
    sandbox.sandbox.stats.reset()
    assert set(h.run(pks)) == {"synced"}
    by_route = calls(sandbox)
    assert by_route["GET /enrollments"] == 1
    assert by_route["POST /enrollments"] == 5
    assert all(_enrollments_of(sandbox, uuid) == 1 for uuid in uuids.values())


def test_the_unresolved_mark_outlives_the_create_window_by_the_trust_period(ctx):
    """A create's in-flight mark lasts its window; its unresolved mark lasts the window plus
    the listing trust period (every listing trusted after it is gone was read after that create
    could land); recording the outcome clears both."""
    ctx.creates.mark("student", "email=x@example.edu", 0.05)
    assert ctx.creates.look("student", "email=x@example.edu").left > 0
    time.sleep(0.1)
    mark = ctx.creates.look("student", "email=x@example.edu")
    assert mark.left == 0
    assert mark.unresolved
    ttl = ctx.redis.pttl(f"{ctx.creates.unresolved_prefix}student:"
                         f"{sha256(b'email=x@example.edu').hexdigest()}")
    assert (LISTING_TRUSTED_FOR - 1) * 1000 < ttl <= (LISTING_TRUSTED_FOR + 0.05) * 1000
    ctx.creates.clear("student", "email=x@example.edu")
    assert ctx.creates.look("student", "email=x@example.edu") == CreateMark(0.0, False)
