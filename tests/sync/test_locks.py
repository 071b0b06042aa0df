"""Locks held while their holder works: renewed in the background, and checked to be still ours
just before every DokStamp write (a lost lock aborts the attempt unsent)."""

from __future__ import annotations

import re
import time
from typing import cast

import pytest
import redis
from redis.backoff import NoBackoff
from redis.connection import Connection
from redis.exceptions import LockNotOwnedError
from redis.retry import Retry

from dokstamp_sync.redis_keys import RESULTS_STREAM, RedisKeys
from dokstamp_sync.sandbox import Faults
from dokstamp_sync.sync import engine
from dokstamp_sync.sync.locks import Locks
from dokstamp_sync.sync.marks import CreateMark, CreateMarks
from dokstamp_sync.testing import live, student


def test_a_lock_outlives_its_timeout_while_its_holder_works(ctx):
    """A 0.6 s lock held for 1.5 s is renewed in the background: no one else can take it
    meanwhile, and it is still ours at the end."""
    ctx.locks.timeout = 0.6
    with ctx.locks.take("entity:student:S-1", wait=0.1) as held:
        time.sleep(1.5)
        rival = ctx.locks.new("entity:student:S-1")
        assert not rival.acquire(blocking=False)
        assert held.owned()
    assert not ctx.locks.held


def test_a_lost_lock_stops_the_write_before_it_is_sent(ctx, sandbox):
    """Once the entity lock has been lost (expired and taken by another worker), the next
    POST raises before it is sent: DokStamp holds no student."""
    with ctx.locks.take("entity:student:S-1", wait=0.1):
        ctx.redis.delete(f"{ctx.locks.prefix}entity:student:S-1")
        assert ctx.locks.new("entity:student:S-1").acquire(blocking=False)  # the other worker
        with pytest.raises(LockNotOwnedError):
            ctx.client.students.create({"name": "M", "email": "m@example.edu",
                                        "date_of_birth": "1998-05-20"})
    assert live(sandbox, "students") == []


def test_the_check_before_a_write_is_one_round_trip_for_every_lock_held(ctx):
    """Three locks held: the check made before a write extends all three to their full
    timeout in one Redis round trip; once the second is lost (taken by another worker) the
    check names it, and the others are still extended."""
    ctx.locks.timeout = 5.0
    names = ["entity:student:S-1", "nk:student:x", "entity:course:C-1"]
    with ctx.locks.take(names[0], wait=0.1), ctx.locks.take(names[1], wait=0.1), \
            ctx.locks.take(names[2], wait=0.1):
        ctx.locks.check()  # warm: the script in Redis's cache
        for name in names:
            ctx.redis.pexpire(f"{ctx.locks.prefix}{name}", 1000)
        sent: list[object] = []
        real = ctx.redis.execute_command

        def counted(*args: object, **kw: object) -> object:
            sent.append(args[0])
            return real(*args, **kw)

        ctx.redis.execute_command = counted
        try:
            ctx.locks.check("POST", "/students")
        finally:
            del ctx.redis.execute_command
        assert len(sent) == 1
        assert all(ctx.redis.pttl(f"{ctx.locks.prefix}{n}") > 4000 for n in names)
        ctx.redis.delete(f"{ctx.locks.prefix}{names[1]}")
        assert ctx.locks.new(names[1]).acquire(blocking=False)  # the other worker
        for name in (names[0], names[2]):
            ctx.redis.pexpire(f"{ctx.locks.prefix}{name}", 1000)
        with pytest.raises(LockNotOwnedError, match="nk:student:x"):
            ctx.locks.check("POST", "/students")
        assert ctx.redis.pttl(f"{ctx.locks.prefix}{names[0]}") > 4000
        assert ctx.redis.pttl(f"{ctx.locks.prefix}{names[2]}") > 4000


def test_a_slow_attempt_keeps_its_lock_and_syncs(h, ctx, sandbox):
    """With a 0.5 s lock timeout and DokStamp answering in 0.3 s (search, create: longer than
    the timeout), the run keeps its lock to the end and syncs one student."""
    ctx.locks.timeout = 0.5
    sandbox.sandbox.faults.configure(Faults(latency_ms=300))
    assert h.sync(student()) == ["synced"]
    assert len(live(sandbox, "students")) == 1


def test_a_timed_out_create_is_not_posted_again_before_the_late_write_lands(h, ctx, sandbox):
    """POST /students answers after the client's 0.5 s timeout and lands 1 s after it was
    sent. The event is parked for the create window (twice the timeout) with no second POST;
    the next attempt searches, finds the late write, and maps it: one student, one POST."""
    from dataclasses import replace

    from dokstamp_sync.sandbox import ScriptedFault
    from dokstamp_sync.testing import calls, sandbox_context

    slow = sandbox_context(sandbox, ctx.sessions, ctx.redis, timeout=0.5)
    slow.limits = replace(slow.limits, create_window=1.0)
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("POST", "/students", status=201, delay_s=1.0)]))
    h.ctx = slow
    e = student()
    pk = h.send(e)[0]
    try:
        assert h.run([pk]) == ["waiting"]
        rec = h.record(e["event_id"])
        assert (rec.next_attempt_at.timestamp() - time.time()) > 0.5
        assert h.run([pk]) == ["waiting"]  # still within the window: no search, no POST
        time.sleep(1.1)
        assert h.run([pk]) == ["synced"]
    finally:
        slow.close()  # its own connections (a leaked socket fails a later test's warnings)
    assert len(live(sandbox, "students")) == 1
    assert calls(sandbox).get("POST /students") == 1


COMMAND = re.compile(rb"\*\d+\r\n\$\d+\r\n([A-Z]+)\r\n")  # a command's name, RESP-encoded


@pytest.fixture
def round_trips(monkeypatch):
    """Every round trip to Redis from now on (a pipeline is one), as its commands' names."""
    sent: list[list[str]] = []
    real = Connection.send_packed_command

    def counted(self: Connection, command: object, check_health: bool = True) -> None:
        blob = cast(bytes, b"".join(command) if isinstance(command, list) else command)
        sent.append([m.decode() for m in COMMAND.findall(blob)])
        real(self, command, check_health)

    monkeypatch.setattr(Connection, "send_packed_command", counted)
    return sent


def test_a_lock_taken_with_reads_answers_them_in_the_same_round_trip(ctx, round_trips):
    """The natural key's lock is taken and the key's marks read in one round trip; the reads'
    answers come from the try that took the lock."""
    ctx.redis.set("probe", "1", px=60_000)
    round_trips.clear()
    with ctx.locks.take("nk:student:x", wait=0.1,
                        reads=lambda pipe: (pipe.pttl("probe"), pipe.exists("absent"))) as held:
        assert len(round_trips) == 1
        assert 50_000 < held.read[0] <= 60_000
        assert held.read[1] == 0
    again = ctx.locks.new("nk:student:x")
    assert again.acquire(blocking=False)  # released
    again.release()


def test_keys_set_with_the_check_are_set_only_when_every_lock_is_still_ours(ctx, round_trips):
    """A create's marks ride on the check before its POST: set in that round trip when the
    locks are ours; never set when one was lost (the POST does not leave then)."""
    with ctx.locks.take("entity:student:S-1", wait=0.1):
        ctx.locks.set_with_check("mark:a", 30)
        round_trips.clear()
        ctx.locks.check("POST", "/students")
        assert len(round_trips) == 1
        assert ctx.redis.pttl("mark:a") > 29_000
        ctx.locks.set_with_check("mark:b", 30)
        ctx.redis.delete(f"{ctx.locks.prefix}entity:student:S-1")  # lost (expired)
        with pytest.raises(LockNotOwnedError):
            ctx.locks.check("POST", "/students")
        assert not ctx.redis.exists("mark:b")
        assert ctx.locks.to_set == {"mark:b": 30_000}  # until its owner takes it back
        ctx.locks.unset("mark:b")
    assert ctx.locks.to_set == {}


def test_the_check_before_a_write_rides_on_the_rate_limiters_round_trip(ctx, sandbox,
                                                                          round_trips):
    """A write through the client: its token, the lock check and the keys set with it go in
    one round trip; a lock lost meanwhile stops the write unsent, and its keys are not set."""
    ctx.client.me()  # a token, the scripts loaded
    with ctx.locks.take("entity:student:S-1", wait=0.1):
        ctx.locks.set_with_check("mark:a", 30)
        round_trips.clear()
        ctx.client.students.create({"name": "M", "email": "m@example.edu",
                                    "date_of_birth": "1998-05-20"})
        assert len(round_trips) == 1
        assert ctx.redis.pttl("mark:a") > 29_000
        assert ctx.locks.to_set == {}
        ctx.locks.set_with_check("mark:b", 30)
        ctx.redis.delete(f"{ctx.locks.prefix}entity:student:S-1")  # lost (expired)
        with pytest.raises(LockNotOwnedError):
            ctx.client.students.create({"name": "N", "email": "n@example.edu",
                                        "date_of_birth": "1998-05-20"})
        assert not ctx.redis.exists("mark:b")
        ctx.locks.unset("mark:b")
    assert [s["email"] for s in live(sandbox, "students")] == ["m@example.edu"]


def test_queued_writes_go_with_the_next_release_and_their_fate_is_told(ctx, round_trips):
    """Writes queued while a lock is held go out in the round trip of its release, in order,
    and each is told it was carried out; with no lock held they go at once; when Redis cannot
    be reached they are told they were not (an outcome then stays for the sweeper)."""
    told: list[tuple[str, bool]] = []
    with ctx.locks.take("entity:student:S-1", wait=0.1):
        ctx.locks.later(lambda pipe: pipe.set("q:1", "a"), lambda ok: told.append(("1", ok)))
        ctx.locks.later(lambda pipe: pipe.delete("q:1"), lambda ok: told.append(("2", ok)))
        ctx.locks.later(lambda pipe: pipe.xadd("q:s", {"f": "v"}),
                        lambda ok: told.append(("3", ok)))
        assert told == []
        assert not ctx.redis.exists("q:s")
        round_trips.clear()
    assert len(round_trips) == 1
    assert round_trips[0][-1] == "EVAL"
    assert told == [("1", True), ("2", True), ("3", True)]
    assert not ctx.redis.exists("q:1")
    assert ctx.redis.xlen("q:s") == 1
    assert not ctx.redis.exists(f"{ctx.locks.prefix}entity:student:S-1")
    ctx.locks.later(lambda pipe: pipe.set("q:2", "b"), lambda ok: told.append(("4", ok)))
    assert ctx.redis.get("q:2") == b"b"
    assert told[-1] == ("4", True)

    away = Locks(redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2,
                             retry=Retry(NoBackoff(), 0)), "x:")
    away.later(lambda pipe: pipe.set("q:3", "c"), lambda ok: told.append(("5", ok)))
    assert told[-1] == ("5", False)


def test_a_release_queued_behind_the_entity_lock_goes_with_it(ctx, round_trips):
    """The natural key's lock, released later, goes in the entity lock's release round trip;
    until then no one else can take it, and this process taking it again sends the release
    first rather than wait for itself."""
    with ctx.locks.take("entity:student:S-1", wait=0.1):
        with ctx.locks.take("nk:student:x", wait=0.1, release_later=True):
            pass
        other = Locks(ctx.redis, ctx.locks.prefix)  # another worker
        assert not other.new("nk:student:x").acquire(blocking=False)  # still held
        with ctx.locks.take("nk:student:x", wait=0.1, release_later=True):
            assert ctx.locks.held[-1].name.endswith("nk:student:x")
        round_trips.clear()
    assert len(round_trips) == 1
    assert round_trips[0] == ["EVAL", "EVAL"]  # both releases in one
    assert not ctx.redis.keys(f"{ctx.locks.prefix}*")


def test_a_lock_verified_just_now_is_confirmed_without_asking_redis(ctx, round_trips):
    """A lock taken (or extended) under a second ago is confirmed with no round trip; one
    verified longer ago (a worker frozen since) is asked for, and a lost one fails."""
    with ctx.locks.take("entity:student:S-1", wait=0.1) as held:
        round_trips.clear()
        ctx.locks.confirm(held)
        assert round_trips == []
        ctx.locks.verified[held.name] -= 2  # as if frozen for 2 s since
        ctx.locks.confirm(held)
        assert len(round_trips) == 1
        ctx.locks.verified[held.name] -= 2
        ctx.redis.delete(held.name)
        with pytest.raises(LockNotOwnedError):
            ctx.locks.confirm(held)


def test_a_new_entitys_event_costs_five_redis_round_trips(h, ctx, sandbox, round_trips):
    """A new student (search, create, record), counted from the claim to the end: its entity
    lock taken; its natural key's lock taken with its marks read; a rate-limiter token for the
    search; one for the create, with the check before it, which sets its marks; and one
    release of both locks that also clears the marks and writes the outcome. Before issue 21
    this took 13."""
    assert h.sync(student("S-0", email="warm@example.edu")) == ["synced"]  # token, scripts
    pk = h.send(student("S-1", email="s1@example.edu"))[0]
    round_trips.clear()
    assert engine.run(ctx, pk, flush=False) == "synced"
    assert len(round_trips) == 5, round_trips
    assert round_trips[-1][-1] == "EVAL"  # the entity lock's release, last
    assert "XADD" in round_trips[-1]  # with the outcome
    assert ctx.redis.xlen(RESULTS_STREAM) == 2
    assert len(live(sandbox, "students")) == 2


def test_the_renewer_extends_the_other_locks_when_one_was_released_meanwhile(ctx):
    """The renewer works from a copy of the held locks: one released by its run between the
    copy and the renewal (its token gone) is skipped, and every other is still extended."""
    ctx.locks.timeout = 5.0
    with ctx.locks.take("entity:student:S-1", wait=0.1) as first, \
            ctx.locks.take("entity:student:S-2", wait=0.1) as second:
        ctx.redis.pexpire(second.name, 1000)
        token = first.local.token
        first.local.token = None  # released meanwhile, still in the renewer's copy
        try:
            ctx.locks.renew()
        finally:
            first.local.token = token
        assert ctx.redis.pttl(second.name) > 4000


def test_marks_cleared_with_the_release_stay_when_the_natural_keys_lock_was_lost(ctx):
    """A run clears its create's marks with its locks' release, but only while it still holds
    the natural key's lock: one frozen past it, whose successor took the lock and set marks
    of its own (its create out), deletes nothing of the successor's when it resumes."""
    ctx.locks.timeout = 5.0
    marks, key = ctx.creates, "email=s1@example.edu"
    with ctx.locks.take("entity:student:S-1", wait=0.1):
        with ctx.locks.take("nk:student:x", wait=0.1, release_later=True) as nk:
            marks.clear("student", key, nk)  # queued: goes with the entity lock's release
        ctx.redis.delete(nk.name)  # frozen past it: expired ...
        successor = Locks(ctx.redis, ctx.locks.prefix)
        assert successor.new("nk:student:x").acquire(blocking=False)  # ... and taken over
        CreateMarks(ctx.redis, RedisKeys()).mark("student", key, 30)  # the successor's create
    assert marks.look("student", key).left > 25
    assert marks.look("student", key).unresolved
    assert ctx.redis.exists(nk.name)  # the successor's lock, not released by the old run

    with ctx.locks.take("entity:student:S-2", wait=0.1):  # the normal case: cleared
        with ctx.locks.take("nk:student:y", wait=0.1, release_later=True) as nk:
            marks.mark("student", "email=y@example.edu", 30)
            marks.clear("student", "email=y@example.edu", nk)
        assert marks.look("student", "email=y@example.edu").left > 25  # not yet
    assert marks.look("student", "email=y@example.edu") == CreateMark(0.0, False)


def test_a_login_is_not_fenced_and_sets_no_create_marks(ctx, sandbox):
    """A token request changes nothing DokStamp holds: it is not checked against the locks,
    and it does not set the create's marks waiting for the check. Here the lock is lost
    before a create that first needs a login: the login goes out, the create does not, and no
    mark is set (checked, the login would have been refused, or would have set them)."""
    renewals = ctx.client.tokens.renewals  # this process has no token yet: the create logs in
    with ctx.locks.take("entity:student:S-1", wait=0.1) as held:
        ctx.locks.set_with_check("mark:a", 30)
        ctx.redis.delete(held.name)  # lost
        with pytest.raises(LockNotOwnedError):
            ctx.client.students.create({"name": "M", "email": "m@example.edu",
                                        "date_of_birth": "1998-05-20"})
        ctx.locks.unset("mark:a")
    assert ctx.client.tokens.renewals == renewals + 1
    assert not ctx.redis.exists("mark:a")
    assert live(sandbox, "students") == []


def test_what_is_queued_goes_even_when_the_last_lock_was_released_before(ctx):
    """A lock released twice (its token gone at the second) still lets the writes queued
    behind it go: with no lock left to carry them, they are sent at once."""
    with ctx.locks.take("entity:student:S-1", wait=0.1) as held:
        ctx.locks.later(lambda pipe: pipe.set("q:1", "a"))
        held.local.token = None  # as if released already
    assert ctx.redis.get("q:1") == b"a"
    assert ctx.locks.queued == []
