"""The listing shortcut: one paged listing instead of a search per entity for a large backlog,
diplomas uploaded many per request, with search-before-create kept for retries."""

from __future__ import annotations

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.testing import live


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


def test_a_retried_event_searches_even_after_a_listing(h, ctx, sandbox):
    """A fresh listing never stands in for the search of an event tried before."""
    pks = h.send(*students(60))
    h.run(pks[:1])  # lists, then creates S-0
    with session_scope(ctx.sessions) as s:
        s.get(InboxEvent, pks[1]).attempts = 1  # as if its first try had failed
    sandbox.sandbox.stats.reset()
    h.run(pks[1:2])
    assert sandbox.sandbox.stats.to_json()["by_route"]["GET /students"] == 1


def test_created_elsewhere_after_the_listing_is_adopted_not_duplicated(h, ctx, sandbox):
    """If another system created the student after the listing, the refused create falls back
    to a search and the existing student is adopted."""
    pks = h.send(*students(60))
    h.run(pks[:1])
    ctx.client.students.create({"name": "Made on the dashboard", "email": "s1@example.edu",
                                "date_of_birth": "2000-01-01"})
    assert h.run(pks[1:2]) == ["synced"]
    assert sum(1 for s in live(sandbox, "students") if s["email"] == "s1@example.edu") == 1


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
