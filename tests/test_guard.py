"""The change guard (CONTRACT §6) in one process: the engine, the sandbox over HTTP, real
Postgres and Redis; what DokStamp (the sandbox) holds is asserted, not only our tables."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest

from dokstamp_sync import held
from dokstamp_sync.demo.samples import event
from dokstamp_sync.guard import GuardPolicy
from dokstamp_sync.models import utcnow
from dokstamp_sync.ops.held import decide
from dokstamp_sync.pipeline import results
from dokstamp_sync.redis_keys import RESULTS_STREAM
from dokstamp_sync.testing import T0, Harness, calls, live, student

LATER = T0 + timedelta(hours=1)


def students(n: int) -> list[dict]:
    return [student(f"S-{i:03d}", email=f"s{i:03d}@example.edu", name=f"Student {i}")
            for i in range(n)]


def deletes(n: int, at=LATER) -> list[dict]:
    return [event("student", f"S-{i:03d}", op="delete", at=at) for i in range(n)]


def outcomes(ctx) -> list[dict]:
    return [r for _, r in results.read(ctx.redis, RESULTS_STREAM)]


def guarded(make_ctx, **policy) -> Harness:
    return Harness(make_ctx(guard_policy=GuardPolicy(**policy)))


def release(h: Harness, which: held.Selection):
    return decide(h.ctx.sessions, h.ctx.redis, h.ctx.store.report, held.release, which)


def discard(h: Harness, which: held.Selection):
    return decide(h.ctx.sessions, h.ctx.redis, h.ctx.store.report, held.discard, which)


def test_a_burst_past_the_threshold_is_held_and_nothing_reaches_dokstamp(make_ctx, sandbox):
    """25 deletes arrive at once, threshold 20: counted as they arrive, so the first attempt
    already sees 25 and every one of them is held: DokStamp still holds all 25 students and
    saw no DELETE; each is reported once as held, with how many and which threshold."""
    h = guarded(make_ctx, delay=30.0, minimum=20)
    h.sync(*students(25))
    states = h.run(h.send(*deletes(25)))
    assert states == ["held"] * 25
    assert set(h.states().values()) == {"synced", "held"}
    assert sum(s == "held" for s in h.states().values()) == 25
    assert len(live(sandbox, "students")) == 25
    assert not [r for r in calls(sandbox) if r.startswith("DELETE")]
    held_out = [r for r in outcomes(h.ctx) if r["state"] == "held"]
    assert len(held_out) == len({r["event_id"] for r in held_out}) == 25
    assert "25 student deletes/revokes" in held_out[0]["reason"]
    assert "threshold of 20" in held_out[0]["reason"]


def test_within_the_threshold_a_delete_waits_out_the_settle_delay_then_applies(make_ctx,
                                                                               sandbox):
    """One delete, settle delay 1 s: the first attempt parks it (DokStamp untouched) until
    1 s after it arrived; the attempt after that deletes the student in DokStamp."""
    h = guarded(make_ctx, delay=1.0, minimum=20)
    h.sync(*students(2))
    [pk] = h.send(*deletes(1))
    assert h.run([pk]) == ["waiting"]
    assert len(live(sandbox, "students")) == 2
    time.sleep(1.1)
    assert h.run([pk]) == ["synced"]
    assert [s["email"] for s in live(sandbox, "students")] == ["s001@example.edu"]


def test_release_applies_the_held_events_and_they_are_not_held_again(make_ctx, sandbox):
    """After a held burst, `held release --entity student` makes them pending and admitted:
    running them deletes every student in DokStamp (none is held again, though the window
    still counts past the threshold), and a later ordinary delete is not held for the burst
    already dealt with."""
    h = guarded(make_ctx, delay=30.0, minimum=20)
    h.sync(*students(26))
    h.run(h.send(*deletes(25)))
    done = release(h, held.Selection(entity="student"))
    assert len(done.ids) == 25
    assert not done.not_held
    h.drain()
    assert set(h.states().values()) == {"synced"}
    assert [s["email"] for s in live(sandbox, "students")] == ["s025@example.edu"]
    # The next ordinary delete: counted alone (the released ones left the window).
    quick = guarded(make_ctx, delay=0.0, minimum=20)
    assert quick.run(quick.send(event("student", "S-025", op="delete", at=LATER))) == \
        ["synced"]
    assert live(sandbox, "students") == []


def test_discard_ends_them_discarded_reported_and_never_applied(make_ctx, sandbox):
    """`held discard` by id ends those events `discarded` (final, on the outcome stream) and
    DokStamp keeps the students; an id that is not held is named and changes nothing."""
    h = guarded(make_ctx, delay=30.0, minimum=20)
    h.sync(*students(25))
    h.run(h.send(*deletes(25)))
    ids = [e["id"] for e in _held(h)][:3]
    done = discard(h, held.Selection(ids=[*ids, 999999]))
    assert done.ids == ids
    assert (done.not_held, done.missing) == ([], [999999])
    again = discard(h, held.Selection(ids=ids[:1]))  # twice: decided before, named, not missing
    assert (again.ids, again.not_held, again.missing) == ([], ids[:1], [])
    h.drain()
    assert list(h.states().values()).count("discarded") == 3
    assert list(h.states().values()).count("held") == 22
    assert len(live(sandbox, "students")) == 25
    last = {r["event_id"]: r["state"] for r in outcomes(h.ctx)}
    assert list(last.values()).count("discarded") == 3


def _held(h: Harness) -> list[dict]:
    from dokstamp_sync.db import session_scope

    with session_scope(h.ctx.sessions) as s:
        return [held.as_dict(e) for e in held.list_held(s)]


def test_a_newer_upsert_of_a_held_entity_waits_behind_it(make_ctx, sandbox):
    """A student's delete is held; a newer upsert of that student waits (DokStamp keeps the
    old name) until the delete is discarded, then applies: nothing of the entity is applied
    out of the ERP's order. Another student's upsert is not held up."""
    h = guarded(make_ctx, delay=30.0, minimum=20)
    h.sync(*students(25))
    h.run(h.send(*deletes(25)))
    later = LATER + timedelta(minutes=1)
    renamed = student("S-000", email="s000@example.edu", name="Renamed", at=later)
    other = student("S-900", email="s900@example.edu", name="Newcomer", at=later)
    assert h.run(h.send(renamed, other)) == ["waiting", "synced"]
    assert h.record(renamed["event_id"]).waiting_for == "held:student:S-000"
    names = {s["email"]: s["name"] for s in live(sandbox, "students")}
    assert names["s000@example.edu"] == "Student 0"
    [blocker] = [e["id"] for e in _held(h) if e["key"] == "S-000"]
    discard(h, held.Selection(ids=[blocker]))
    assert h.record(renamed["event_id"]).next_attempt_at <= utcnow()  # due at once
    h.run([h.record(renamed["event_id"]).id])
    names = {s["email"]: s["name"] for s in live(sandbox, "students")}
    assert names["s000@example.edu"] == "Renamed"


def test_threshold_100_percent_turns_the_guard_off(make_ctx, sandbox):
    """Threshold 100 %: 25 deletes are applied at once, no settle delay, none held."""
    h = guarded(make_ctx, delay=30.0, minimum=20, threshold=100.0)
    h.sync(*students(25))
    assert set(h.run(h.send(*deletes(25)))) == {"synced"}
    assert live(sandbox, "students") == []


def test_two_guards_counting_one_burst_hold_each_event_once(make_ctx, sandbox):
    """Two contexts (as two workers) take turns counting one burst at its attempts (the
    ingester's count at arrival left out): the fleet-wide count in Redis sees each event once
    (21 > 20 at the 21st, whichever counts it), the first 20 wait out the settle delay, and
    each event is held and reported exactly once."""
    a = guarded(make_ctx, delay=30.0, minimum=20)
    a.ingester.arrivals = None
    b = Harness(make_ctx(guard_policy=GuardPolicy(delay=30.0, minimum=20)), stream="b")
    a.sync(*students(25))
    pks = a.send(*deletes(25))
    states = [(a if n % 2 else b).run([pk])[0] for n, pk in enumerate(pks)]
    assert states == ["waiting"] * 20 + ["held"] * 5
    assert list(a.states().values()).count("held") == 25
    held_out = [r["event_id"] for r in outcomes(a.ctx) if r["state"] == "held"]
    assert len(held_out) == len(set(held_out)) == 25
    assert len(live(sandbox, "students")) == 25


@pytest.mark.parametrize("value", ["10%", "10", " 10 % "])
def test_the_threshold_setting_reads_a_percentage(value):
    """DOKSTAMP_SYNC_GUARD_THRESHOLD takes "10" or "10%": both mean ten per cent."""
    from dokstamp_sync.testing import sandbox_settings

    settings = sandbox_settings("http://127.0.0.1:1", dokstamp_sync_guard_threshold=value)
    assert GuardPolicy.from_settings(settings).threshold == 10.0
    assert GuardPolicy.from_settings(settings).limit(1000) == 100


def test_a_burst_behind_a_long_queue_is_counted_as_it_arrived(make_ctx, sandbox):
    """The ingester counts deletes as they arrive: a burst whose first attempts come only
    after its settle delay has passed (a long queue before it) is still seen whole, and the
    very first attempt holds all of it; none reaches DokStamp."""
    h = guarded(make_ctx, delay=0.5, minimum=20)
    h.sync(*students(25))
    pks = h.send(*deletes(25))
    time.sleep(0.6)  # the queue: nothing attempted until every settle delay has passed
    assert h.run(pks) == ["held"] * 25
    assert len(live(sandbox, "students")) == 25
    assert not [r for r in calls(sandbox) if r.startswith("DELETE")]


def test_a_release_applies_the_held_delete_before_the_newer_upsert_behind_it(make_ctx, sandbox):
    """A student's delete is held and a newer rename waits behind it; `held release --entity
    student` applies them in the ERP's order: the delete first (superseded by the newer upsert,
    so no DELETE is sent), then the rename; DokStamp holds the student renamed."""
    h = guarded(make_ctx, delay=30.0, minimum=20)
    h.sync(*students(25))
    h.run(h.send(*deletes(25)))
    renamed = student("S-000", email="s000@example.edu", name="Renamed",
                      at=LATER + timedelta(minutes=1))
    assert h.run(h.send(renamed)) == ["waiting"]
    done = release(h, held.Selection(entity="student"))
    assert len(done.ids) == 25
    assert h.record(renamed["event_id"]).next_attempt_at <= utcnow()  # woken by the release
    h.drain()
    names = {s["email"]: s["name"] for s in live(sandbox, "students")}
    assert names == {"s000@example.edu": "Renamed"}  # the other 24 deleted, S-000 renamed
    assert h.state(renamed["event_id"]) == "synced"


def test_a_held_burst_is_logged_as_a_warning(make_ctx, caplog):
    """Holding a kind writes one warning line naming how many and the threshold."""
    h = guarded(make_ctx, delay=30.0, minimum=20)
    h.sync(*students(21))
    with caplog.at_level("WARNING", logger="dokstamp_sync"):
        h.run(h.send(*deletes(21)))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(line.startswith("21 student event(s) held by the change guard") and
               "threshold of 20" in line for line in lines), lines


def test_a_discard_run_again_after_redis_failed_takes_its_events_out_of_the_window(make_ctx):
    """Redis fails just after a discard committed: its events stay in the guard's window. The
    same command run again (the ids now decided before) takes them out, so the window does not
    count a burst already dealt with."""
    import redis as redis_module

    h = guarded(make_ctx, delay=30.0, minimum=20)
    h.sync(*students(25))
    h.run(h.send(*deletes(25)))
    ids = [e["id"] for e in _held(h)]
    window = f"{h.ctx.guard.prefix}student"
    assert h.ctx.redis.zcard(window) == 25
    broken = redis_module.Redis(host="127.0.0.1", port=9, socket_connect_timeout=1)
    with pytest.raises(redis_module.RedisError):
        decide(h.ctx.sessions, broken, h.ctx.store.report, held.discard,
               held.Selection(ids=ids), prefix=h.ctx.guard.prefix)
    assert h.ctx.redis.zcard(window) == 25  # committed, but still counted
    again = decide(h.ctx.sessions, h.ctx.redis, h.ctx.store.report, held.discard,
                   held.Selection(ids=ids), prefix=h.ctx.guard.prefix)
    assert (again.ids, sorted(again.not_held)) == ([], sorted(ids))
    assert h.ctx.redis.zcard(window) == 0
