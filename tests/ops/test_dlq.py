"""Dead letters for operators: list, show, replay (idempotent), discard."""

from __future__ import annotations

from datetime import timedelta

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.ops import dlq
from dokstamp_sync.testing import T0, live


def test_replay_succeeds_after_the_data_is_fixed_in_dokstamp(h, ctx, sandbox):
    """A certificate refused because its file was used by a stray certificate succeeds on
    replay once the operator has removed the stray one; replaying twice changes nothing."""
    cls = samples.graduating_class(1)
    h.sync(*[e for e in cls if e["entity"] != "certificate"])
    m = {k: h.mapping(*k).dokstamp_uuid for k in [("file", "DIP-00001"),
                                                 ("student", "S-00001"), ("course", "CRS-1"),
                                                 ("institution", "INST")]}
    stray = ctx.client.certificates.create({
        "institution_uuid": m[("institution", "INST")], "course_uuid": m[("course", "CRS-1")],
        "student_uuid": m[("student", "S-00001")], "file_uuid": m[("file", "DIP-00001")]})
    # Made by hand on the dashboard with our diploma, then deleted: the file stays used.
    ctx.client.certificates.delete(stray["uuid"])
    cert = next(e for e in cls if e["entity"] == "certificate")
    assert h.sync(cert) == ["dead"]
    (letter,) = h.letters()
    assert letter.http_status == 422
    assert "file_uuid" in letter.response_body["errors"]
    # The operator fixes the data: a new diploma file for this certificate.
    new_file = samples.event("file", "DIP-00001", {"filename": "diploma-v2.pdf",
                                                   "content_base64": "JVBERi0xLjQKJSB2Mgo="},
                             at=T0 + timedelta(hours=1))
    assert h.sync(new_file) == ["synced"]
    first = dlq.replay(ctx.sessions, [letter.id])
    second = dlq.replay(ctx.sessions, [letter.id])
    assert (first.replayed, second.replayed, second.skipped) == ([letter.id], [], [letter.id])
    h.drain()
    assert h.state(cert["event_id"]) == "synced"
    issued = [c for c in live(sandbox, "certificates") if c["status"] == "issued"]
    assert len(issued) == 1
    assert h.letters()[0].status == "replayed"


def test_replay_by_entity_and_all(h, ctx):
    """--entity replays only that entity's letters; --all the rest."""
    bad_student = event("student", "S-1", {"name": "x", "email": "x@example.edu"})
    bad_course = event("course", "C-1", {"name": "x", "code": "C", "institution_key": "I",
                                         "uuid": "00000000-0000-4000-8000-000000000000"})
    h.sync(event("institution", "I", {"name": "I", "country": "BR"}), bad_student, bad_course)
    assert {d.entity for d in h.letters()} == {"student", "course"}
    assert len(dlq.replay(ctx.sessions, entity="course").replayed) == 1
    assert len(dlq.replay(ctx.sessions, everything=True).replayed) == 1


def test_replay_of_a_still_malformed_entry_keeps_it_open(h, ctx):
    """Replaying a malformed stream entry parses it again; still invalid, it stays open."""
    h.send("not json")
    (letter,) = h.letters()
    report = dlq.replay(ctx.sessions, [letter.id])
    assert report.still_invalid == [letter.id]
    assert h.letters()[0].status == "open"
    assert h.letters()[0].attempts == 2


def test_discard(h, ctx):
    """Discarded letters leave the open list; the event stays dead."""
    e = event("student", "S-1", {"name": "x", "email": "x@example.edu"})
    h.sync(e)
    (letter,) = h.letters()
    done = dlq.discard(ctx.sessions, [letter.id, 999])
    assert (done.discarded, done.skipped, done.missing) == ([letter.id], [], [999])
    with session_scope(ctx.sessions) as s:
        assert dlq.list_letters(s) == []
    assert h.state(e["event_id"]) == "dead"


def _bad_students(h, n):
    h.sync(*[event("student", f"S-{i}", {"name": "x", "email": f"x{i}@example.edu"})
             for i in range(n)])


def test_replay_and_discard_run_in_short_batches(h, ctx):
    """Each batch of letters is its own transaction (committed before the next starts), so a
    worker waits for one batch at most: 5 letters in batches of 2 commit 3 times (+1 read)."""
    from sqlalchemy import event as sa_event

    _bad_students(h, 5)
    commits = []
    engine = ctx.sessions.kw["bind"]
    listener = lambda conn: commits.append(1)  # noqa: E731
    sa_event.listen(engine, "commit", listener)
    try:
        report = dlq.replay(ctx.sessions, everything=True, batch=2)
    finally:
        sa_event.remove(engine, "commit", listener)
    assert len(report.replayed) == 5
    assert len(commits) == 1 + 3
    assert [d.status for d in h.letters()] == ["replayed"] * 5


def test_dry_run_counts_by_entity_and_reason_and_writes_nothing(h, ctx):
    """preview() (`--dry-run`) counts the open letters a replay/discard would take, by entity
    and reason, names ids it would skip, and leaves every letter open."""
    _bad_students(h, 3)
    (first, *_) = h.letters()
    with session_scope(ctx.sessions) as s:
        preview = dlq.preview(s, everything=True)
        by_id = dlq.preview(s, [first.id, 424242])
    (entity, reason, n), = preview.counts
    assert (entity, n, preview.total) == ("student", 3, 3)
    assert "422" in reason
    assert (by_id.total, by_id.missing) == (1, [424242])
    assert [d.status for d in h.letters()] == ["open"] * 3


def test_discard_by_entity_and_all(h, ctx):
    """`discard --entity` takes only that entity's open letters; `--all` the rest."""
    bad_course = event("course", "C-1", {"name": "x", "code": "C", "institution_key": "I",
                                         "uuid": "00000000-0000-4000-8000-000000000000"})
    h.sync(event("institution", "I", {"name": "I", "country": "BR"}), bad_course)
    _bad_students(h, 2)
    assert len(dlq.discard(ctx.sessions, entity="course").discarded) == 1
    assert {d.entity for d in h.letters() if d.status == "open"} == {"student"}
    assert len(dlq.discard(ctx.sessions, everything=True).discarded) == 2
    with session_scope(ctx.sessions) as s:
        assert dlq.list_letters(s) == []
