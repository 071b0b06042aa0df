"""`dokstamp-sync held ...`, `status` and `/metrics` on events the change guard holds, run as
an operator runs them (subprocesses on the test database and Redis)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import select

from dokstamp_sync import held
from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.events import utc
from dokstamp_sync.guard import BEHIND_RECHECK, GuardPolicy
from dokstamp_sync.models import InboxEvent, utcnow
from dokstamp_sync.ops.metrics import serve
from dokstamp_sync.pipeline import results
from dokstamp_sync.redis_keys import RESULTS_STREAM
from dokstamp_sync.states import EventState
from dokstamp_sync.sync.outcomes import Park
from dokstamp_sync.testing import STREAM, T0, Harness, live, student
from testenv import TEST_ENGINE_REDIS_URL

EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")


@pytest.fixture
def cli(database_url, tmp_path):
    """Runs `dokstamp-sync ...` on the test database and the engine's Redis."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DATABASE_URL": database_url, "REDIS_URL": TEST_ENGINE_REDIS_URL}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXE, *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=60, check=False)

    return run


def held_burst(make_ctx, n: int = 22) -> Harness:
    """n students synced, then a delete of each: held (threshold 20, settle delay 30 s)."""
    h = Harness(make_ctx(guard_policy=GuardPolicy(delay=30.0, minimum=20)))
    h.sync(*[student(f"S-{i:03d}", email=f"s{i:03d}@example.edu") for i in range(n)])
    h.run(h.send(*[event("student", f"S-{i:03d}", op="delete", at=T0 + timedelta(hours=1))
                   for i in range(n)]))
    return h


def test_status_and_metrics_count_held_events_per_kind(cli, make_ctx):
    """`status --json` counts held events under events.held and per kind under held; the
    text says how to see them; /metrics has dokstamp_sync_held_events{entity=...}."""
    h = held_burst(make_ctx)
    status = json.loads(cli("status", "--json").stdout)
    assert status["events"]["held"] == 22
    assert status["held"] == {"student": 22}
    assert "held by the change guard: student 22" in cli("status").stdout
    server = serve(h.ctx.sessions, h.ctx.redis, STREAM, port=0, background=True)
    try:
        port = server.server_address[1]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'dokstamp_sync_held_events{entity="student"} 22.0' in text
        # every other kind reads 0: a series that vanished would read "no data" on a panel
        assert 'dokstamp_sync_held_events{entity="certificate"} 0.0' in text
    finally:
        server.shutdown()
        server.server_close()


def test_held_list_release_and_discard_from_the_command_line(cli, make_ctx,
                                                             sandbox):
    """`held list --json` names each held event; `held discard ID` ends one discarded (on the
    outcome stream); `held release --all` releases the rest, and running them deletes the
    students in DokStamp but the discarded one; a release without a selection is refused."""
    h = held_burst(make_ctx)
    listed = json.loads(cli("held", "list", "--json").stdout)
    assert [e["key"] for e in listed] == [f"S-{i:03d}" for i in range(22)]
    assert all(e["op"] == "delete" and "threshold of 20" in e["reason"] for e in listed)
    assert cli("held", "release").returncode == 2
    # IDs with --entity (or --all) are refused, not widened to the whole kind: discard is final
    both = cli("held", "discard", str(listed[0]["id"]), "--entity", "student")
    assert both.returncode == 2
    assert "not several" in both.stderr
    assert cli("held", "release", "--entity", "student", "--all").returncode == 2
    assert len(json.loads(cli("held", "list", "--json").stdout)) == 22  # nothing was decided
    out = cli("held", "discard", str(listed[0]["id"]))
    assert (out.returncode, out.stdout.strip()) == (0, "discarded 1")
    assert cli("held", "release", "--all").stdout.strip() == "released 21"
    twice = cli("held", "release", str(listed[0]["id"]))  # decided before: named, exit 0
    assert (twice.returncode, twice.stdout.strip()) == (
        0, f"released 0; not held (decided before) [{listed[0]['id']}]")
    assert cli("held", "discard", "999999").returncode == 1  # no such event
    h.drain()
    assert [s["email"] for s in live(sandbox, "students")] == ["s000@example.edu"]
    last = {r["event_id"]: r["state"] for _, r in results.read(h.ctx.redis, RESULTS_STREAM)}
    assert last[listed[0]["event_id"]] == "discarded"
    assert sorted(set(last.values())) == ["discarded", "synced"]
    assert "nothing is held" in cli("held", "list").stdout


# -- several things at once: a release while the event behind it ran, two operators, an id
# named twice, an id never held

def _held_pk(h, key):
    with session_scope(h.ctx.sessions) as s:
        return next(e.id for e in held.list_held(s, "student") if e.erp_key == key)


def _due_in(ctx, pk) -> float:
    with session_scope(ctx.sessions) as s:
        record = s.get(InboxEvent, pk)
        return (utc(record.next_attempt_at) - utcnow()).total_seconds()


def test_a_release_committed_while_the_event_behind_ran_is_not_lost(make_ctx):
    """A newer upsert of S-000 reads the held delete (it must wait behind it); the operator
    releases the delete and commits (the wake finds no row waiting yet); then the upsert's park
    commits: it sees nothing held any more and is due at once, not in an hour."""
    h = held_burst(make_ctx)
    e = h.send(student("S-000", email="new@example.edu", at=T0 + timedelta(hours=2)))[0]
    began = utcnow()
    with session_scope(h.ctx.sessions) as s:
        held.release(s, held.Selection(ids=[_held_pk(h, "S-000")]))
    state = h.ctx.store.conclude(e, completed=False, decide=lambda _f: Park(
        delay=BEHIND_RECHECK, error="waits behind held delete",
        waiting_for=held.behind_tag("student", "S-000"), counted=False, since=began))
    assert state == EventState.WAITING
    assert _due_in(h.ctx, e) < 1, "parked for an hour behind an event no longer held"


def test_the_same_id_twice_is_decided_and_reported_once(make_ctx):
    """`held discard 7 7`: one event decided, one outcome."""
    h = held_burst(make_ctx)
    pk = _held_pk(h, "S-001")
    with session_scope(h.ctx.sessions) as s:
        decided = held.discard(s, held.Selection(ids=[pk, pk]))
        assert [e.id for e in decided.done] == [pk]
        assert len(decided.results) == 1


def test_an_id_never_held_is_not_called_decided_before(make_ctx):
    """An id of an ordinary synced upsert (a typo) is named as never held (exit 1 in the
    CLI), not as "decided before"; a discarded one is decided before."""
    h = held_burst(make_ctx)
    with session_scope(h.ctx.sessions) as s:
        synced = s.scalars(select(InboxEvent.id).where(InboxEvent.state == EventState.SYNCED)
                           .limit(1)).one()
        discarded = held.discard(s, held.Selection(ids=[_held_pk(h, "S-002")])).done[0].id
    with session_scope(h.ctx.sessions) as s:
        decided = held.release(s, held.Selection(ids=[synced, discarded]))
    assert (decided.missing, decided.not_held) == ([synced], [discarded])


def test_two_operators_at_once_do_not_deadlock(make_ctx):
    """Deletes that arrived in the reverse of the ERP's order; operator A releases all (rows
    locked in the ERP's order) while operator B discards two ids, and a third session holds
    one row for a moment so that they meet: both finish (one sees the other's events decided),
    neither is aborted by a deadlock."""
    h = Harness(make_ctx(guard_policy=GuardPolicy(delay=30.0, minimum=20)))
    h.sync(*[student(f"S-{i:03d}", email=f"s{i:03d}@example.edu") for i in range(22)])
    h.run(h.send(*[event("student", f"S-{i:03d}", op="delete",
                         at=T0 + timedelta(hours=100 - i)) for i in range(22)]))
    with session_scope(h.ctx.sessions) as s:
        ordered = [e.id for e in held.list_held(s)]
    assert len(ordered) == 22
    assert ordered == sorted(ordered, reverse=True)
    y, x = ordered[0], ordered[-1]  # y: oldest in the ERP's order (highest id); x: lowest id
    blocker = h.ctx.sessions()
    blocker.execute(select(InboxEvent.id).where(InboxEvent.id == y).with_for_update())
    errors: list[str] = []

    def act(fn, which):
        try:
            with session_scope(h.ctx.sessions) as s:
                fn(s, which)
        except Exception as exc:  # collected, asserted below
            errors.append(f"{type(exc).__name__}: {str(exc).splitlines()[0]}")

    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(act, held.release, held.Selection(everything=True))
        time.sleep(0.5)
        b = pool.submit(act, held.discard, held.Selection(ids=[x, y]))
        time.sleep(0.5)
        blocker.commit()
        blocker.close()
        a.result(timeout=30)
        b.result(timeout=30)
    assert errors == []
    with session_scope(h.ctx.sessions) as s:
        assert held.list_held(s) == []
