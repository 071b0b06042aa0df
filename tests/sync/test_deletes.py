"""Deletes: a missing mapping is not proof of absence (issue 10).

A delete with no mapping (or one marked deleted that a later create may have made stale) ends
with nothing to do only once a natural-key search, by the data of the entity's upserts known in
the inbox, confirms that DokStamp holds no such entity; found, it is deleted like a mapped one.
Faults are faults: a lost response is a write the sandbox applied while the client saw a 5xx.
Each test asserts what the sandbox ends up holding.
"""

from __future__ import annotations

import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

from dokstamp_sync.demo.samples import event
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import T0, Harness, calls, live, student


def script(sandbox: Any, *faults: ScriptedFault) -> None:
    sandbox.sandbox.faults.configure(Faults(script=list(faults)))


def short_window(h: Harness) -> None:
    """A failed create parks its event for 0.2 s (not twice the HTTP timeout), tried once."""
    h.ctx.limits = replace(h.ctx.limits, create_window=0.2)
    h.ctx.limits = replace(h.ctx.limits, in_call_attempts=1)


def settle(h: Harness) -> None:
    """Let the create window pass, then run everything still open."""
    time.sleep(0.3)
    h.drain()


def deletes(sandbox: Any) -> dict[str, int]:
    return {route: n for route, n in calls(sandbox).items() if route.startswith("DELETE")}


def institution(key: str, name: str, at: Any = T0, **kw: Any) -> dict[str, Any]:
    return event("institution", key, {"name": name, "country": "Brazil", "status": "active"},
                 at=at, **kw)


def test_a_created_but_unmapped_student_is_found_and_deleted(h, sandbox):
    """POST /students applied but answered 500 and the search right after it answered 503
    (no mapping recorded, the upsert parked); the
    delete arriving before any retry searches by the upsert's email, finds the student and
    deletes it: the sandbox ends with no live student, the mapping says deleted. (The old
    code ended this delete "nothing to delete: not in DokStamp" and left the student.)"""
    short_window(h)
    script(sandbox, ScriptedFault("POST", "/students", status=500, after_commit=True,
                                  then=[ScriptedFault("GET", "/students", status=503)]))
    up = student()
    assert h.sync(up) == ["waiting"]
    assert len(live(sandbox, "students")) == 1
    assert h.mapping("student", "S-1") is None
    gone = student(op="delete", at=T0 + timedelta(hours=1))
    h.sync(gone)
    settle(h)
    assert h.state(gone["event_id"]) == "synced"
    assert h.state(up["event_id"]) == "superseded"
    assert live(sandbox, "students") == []
    assert h.mapping("student", "S-1").status == "deleted"
    assert h.letters() == []


def test_a_delete_of_a_key_never_sent_makes_no_call(h, sandbox):
    """A delete of a key no upsert ever named: nothing to search by, so it ends synced with
    the "never sent by the ERP" note, and no DELETE reaches DokStamp (another student is
    untouched)."""
    h.sync(student("S-2", email="other@example.edu"))
    sandbox.sandbox.stats.reset()
    gone = student(op="delete", at=T0 + timedelta(hours=1))
    assert h.sync(gone) == ["synced"]
    assert h.record(gone["event_id"]).last_error == \
        "nothing to delete: never sent by the ERP"
    assert deletes(sandbox) == {}
    assert len(live(sandbox, "students")) == 1


def test_a_delete_after_an_upsert_that_never_landed_searches_and_finds_none(h, sandbox):
    """The upsert was refused (422, nothing written: dead); the delete then searches DokStamp
    by the upsert's email, finds none, and ends synced "a search by email=... found none",
    with no DELETE sent; a student with another email is untouched."""
    h.sync(student("S-2", email="other@example.edu"))
    script(sandbox, ScriptedFault("POST", "/students", status=422))
    up = student()
    assert h.sync(up) == ["dead"]
    sandbox.sandbox.stats.reset()
    gone = student(op="delete", at=T0 + timedelta(hours=1))
    assert h.sync(gone) == ["synced"]
    assert h.record(gone["event_id"]).last_error == \
        "nothing to delete: a search by email=maria@example.edu found none"
    assert calls(sandbox).get("GET /students", 0) >= 1
    assert deletes(sandbox) == {}
    (left,) = live(sandbox, "students")
    assert left["email"] == "other@example.edu"


def test_strict_an_unmapped_institution_is_matched_by_name_and_deleted(h, sandbox):
    """Strict mode (filters the docs do not show are ignored; institutions have none): an
    institution created but unmapped (lost response, the search after it failed) is found by
    listing every institution and matching its name in the client, then deleted; another
    institution, listed first, is untouched."""
    sandbox.sandbox.config.strict = True
    short_window(h)
    assert h.sync(institution("OTHER", "Beta University")) == ["synced"]
    script(sandbox, ScriptedFault("POST", "/institutions", status=500, after_commit=True,
                                  then=[ScriptedFault("GET", "/institutions", status=503)]))
    assert h.sync(institution("INST", "Alpha University")) == ["waiting"]
    assert len(live(sandbox, "institutions")) == 2
    gone = event("institution", "INST", op="delete", at=T0 + timedelta(hours=1))
    h.sync(gone)
    settle(h)
    assert h.state(gone["event_id"]) == "synced"
    (left,) = live(sandbox, "institutions")
    assert left["name"] == "Beta University"
    assert h.mapping("institution", "INST").status == "deleted"
    assert h.mapping("institution", "OTHER").status == "active"


def test_an_unmapped_module_is_located_through_its_institution(h, sandbox):
    """A module's natural key includes its institution: the reference is taken from the
    institution's mapping, the module (created, answer lost, the search after it failed) is
    searched by code and
    institution, and deleted."""
    short_window(h)
    assert h.sync(institution("INST", "Alpha University")) == ["synced"]
    script(sandbox, ScriptedFault("POST", "/modules", status=500, after_commit=True,
                                  then=[ScriptedFault("GET", "/modules", status=503)]))
    module = event("module", "MOD-1", {"name": "Algebra", "code": "ALG",
                                       "institution_key": "INST"}, at=T0)
    assert h.sync(module) == ["waiting"]
    assert len(live(sandbox, "modules")) == 1
    gone = event("module", "MOD-1", op="delete", at=T0 + timedelta(hours=1))
    h.sync(gone)
    settle(h)
    assert h.state(gone["event_id"]) == "synced"
    assert live(sandbox, "modules") == []
    assert len(live(sandbox, "institutions")) == 1


def test_a_stale_deleted_mapping_does_not_hide_a_recreated_student(h, sandbox):
    """Created, deleted (mapping: deleted), upserted anew with its answer lost and the search
    after it failed (the mapping
    still says deleted): a second delete does not trust that mapping, searches, and deletes
    the recreated student."""
    short_window(h)
    h.sync(student())
    h.sync(student(op="delete", at=T0 + timedelta(hours=1)))
    assert live(sandbox, "students") == []
    script(sandbox, ScriptedFault("POST", "/students", status=500, after_commit=True,
                                  then=[ScriptedFault("GET", "/students", status=503)]))
    assert h.sync(student(at=T0 + timedelta(hours=2))) == ["waiting"]
    assert len(live(sandbox, "students")) == 1
    assert h.mapping("student", "S-1").status == "deleted"
    gone = student(op="delete", at=T0 + timedelta(hours=3))
    h.sync(gone)
    settle(h)
    assert h.state(gone["event_id"]) == "synced"
    assert live(sandbox, "students") == []
