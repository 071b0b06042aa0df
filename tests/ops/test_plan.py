"""`dokstamp-sync plan`: what a batch would do, judged against the mappings (and, with
--check-dokstamp, the sandbox over HTTP), and proof that it writes nothing anywhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import DeadLetter, InboxEvent, Mapping, NaturalKey
from dokstamp_sync.testing import STREAM, T0, calls, student
from testenv import MAIN, TEST_ENGINE_REDIS_URL

EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")
LATER = T0 + timedelta(hours=1)


@pytest.fixture
def plan(database_url, sandbox, tmp_path):
    """Runs `dokstamp-sync plan` on a file of the given lines; returns the process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DATABASE_URL": database_url, "REDIS_URL": TEST_ENGINE_REDIS_URL,
        "DOKSTAMP_SYNC_STREAM": STREAM, "DOKSTAMP_API_URL": sandbox.url,
        "DOKSTAMP_TENANT": MAIN.tenant, "DOKSTAMP_EMAIL": MAIN.email,
        "DOKSTAMP_PASSWORD": MAIN.password, "DOKSTAMP_RATE_LIMIT": "50"}

    def run(lines: list[str | dict], *args: str) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "batch.jsonl"
        path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines))
        return subprocess.run([EXE, "plan", str(path), *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path, timeout=60, check=False)

    return run


def by_line(out: subprocess.CompletedProcess[str]) -> dict[int, dict]:
    assert out.returncode == 0, out.stderr
    return {e["line"]: e for e in json.loads(out.stdout)["events"]}


def synced_class(h) -> list[dict]:
    cls = samples.graduating_class(2, prefix="P")
    h.sync(*cls)
    return cls


def test_plan_says_what_each_event_would_do(plan, h):
    """Against a synced class of two: an invalid line (its reason), an unchanged student (no
    call), a renamed one (update: name), an older rename superseded by it, a new student
    created and its enrollment created after it, an enrollment waiting for a student nobody
    sends, a revoke, a course delete (archived: certificates depend on it); then the
    summary per entity and action and the API calls at the rate limit."""
    synced_class(h)
    same = student("PS-00001", email="graduatep00001@example.edu", name="Graduate P00001",
                   at=LATER)
    same["data"]["date_of_birth"] = "2001-05-20"
    old_rename = student("PS-00002", email="graduatep00002@example.edu", name="Older",
                         at=LATER)
    rename = student("PS-00002", email="graduatep00002@example.edu", name="Renamed",
                     at=LATER + timedelta(minutes=1))
    rename["data"]["date_of_birth"] = "2001-05-20"
    new = student("PS-9", email="new@example.edu", name="Newcomer", at=LATER)
    enrol = event("enrollment", "PENR-9", {"student_key": "PS-9", "course_key": "PCRS-1",
                                           "enrolled_at": "2026-01-01"}, at=LATER)
    orphan = event("enrollment", "PENR-X", {"student_key": "PS-X", "course_key": "PCRS-1",
                                            "enrolled_at": "2026-01-01"}, at=LATER)
    revoke = event("certificate", "PCERT-00001", {"revocation_reason": "error"}, op="revoke",
                   at=LATER)
    drop = event("course", "PCRS-2", op="delete", at=LATER)
    out = plan(["{bad", same, old_rename, rename, new, enrol, orphan, revoke, drop], "--json")
    steps = by_line(out)
    assert steps[1]["actions"] == ["invalid"]
    assert "JSON" in steps[1]["detail"] or "json" in steps[1]["detail"]
    assert steps[2]["actions"] == ["unchanged"]
    assert steps[2]["api_calls"] == 0
    assert steps[3]["actions"] == ["superseded"]
    assert steps[3]["detail"] == "by line 4"
    assert steps[4]["actions"] == ["update"]
    assert steps[4]["detail"] == "name"
    assert steps[5]["actions"] == ["create"]
    assert steps[6]["actions"] == ["create"]
    assert steps[7]["actions"] == ["waits"]
    assert steps[7]["detail"] == "student PS-X"
    assert steps[8]["actions"] == ["revoke"]
    assert steps[9]["actions"] == ["archive"]
    body = json.loads(out.stdout)
    assert body["summary"]["student"] == {"create": 1, "superseded": 1, "unchanged": 1,
                                          "update": 1}
    assert body["api_calls"] == sum(s["api_calls"] for s in steps.values()) == 1 + 2 + 2 + 2 + 1
    assert body["seconds"] == round(body["api_calls"] / 50, 1)
    text = plan(["{bad", same, rename], ).stdout
    assert "update (name)" in text
    assert "student      superseded" not in text
    assert "API calls" in text


def test_plan_shows_what_the_guard_would_hold(plan, h):
    """25 student deletes against 25 mapped students: past the threshold of 20, every one
    'held'; 3 deletes are deletes."""
    h.sync(*[student(f"S-{i:03d}", email=f"s{i:03d}@example.edu") for i in range(25)])
    deletes = [event("student", f"S-{i:03d}", op="delete", at=LATER) for i in range(25)]
    steps = by_line(plan(deletes, "--json"))
    assert {s["actions"][0] for s in steps.values()} == {"held"}
    assert "25 student deletes/revokes" in steps[1]["detail"]
    assert {s["actions"][0] for s in by_line(plan(deletes[:3], "--json")).values()} == \
        {"delete"}


def sizes(h) -> dict:
    with session_scope(h.ctx.sessions) as s:
        rows = {m.__tablename__: s.scalar(select(func.count()).select_from(m))
                for m in (InboxEvent, Mapping, NaturalKey, DeadLetter)}
    streams = {k.decode(): h.ctx.redis.xlen(k) for k in h.ctx.redis.scan_iter(_type="stream")}
    return rows | streams


def test_plan_writes_nothing_and_check_dokstamp_only_reads(plan, h, ctx, sandbox):
    """With --check-dokstamp, a student created on the DokStamp dashboard is an adoption and
    a mapped one deleted there is recreated; the sandbox saw only GET requests, and no table
    row count or Redis stream length changed, with or without the searches."""
    synced_class(h)
    ctx.client.students.create({"name": "Dashboard", "email": "dash@example.edu",
                                "date_of_birth": "1998-05-20"})
    h.sync(student("PS-LONE", email="lone@example.edu", name="Lone"))
    gone = h.mapping("student", "PS-LONE")
    ctx.client.students.delete(gone.dokstamp_uuid)
    before = sizes(h)
    sandbox.sandbox.stats.reset()
    lines = [student("PS-D", email="dash@example.edu", name="Dashboard", at=LATER),
             student("PS-LONE", email="lone@example.edu", name="Back", at=LATER),
             event("certificate", "PCERT-00001", op="revoke", at=LATER)]
    plain = by_line(plan(lines, "--json"))
    assert [plain[n]["actions"][0] for n in (1, 2, 3)] == ["create", "update", "revoke"]
    assert calls(sandbox) == {}
    checked = by_line(plan(lines, "--json", "--check-dokstamp"))
    assert checked[1]["actions"] == ["adopt"]
    assert "exists in DokStamp" in checked[1]["detail"]
    assert checked[2]["actions"] == ["create"]
    assert "gone from DokStamp" in checked[2]["detail"]
    assert checked[3]["actions"] == ["revoke"]
    assert calls(sandbox)
    assert all(route.startswith("GET ") for route in calls(sandbox))
    assert sizes(h) == before
