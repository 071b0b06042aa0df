"""Dependents respect a failing dependency's backoff, and every wait ends: a reference cycle is
dead-lettered naming the cycle."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from sqlalchemy import select

from dokstamp_sync.db import lock_tag, session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.events import utc
from dokstamp_sync.models import InboxEvent, Mapping, utcnow
from dokstamp_sync.sandbox import Faults
from dokstamp_sync.states import MappingStatus
from dokstamp_sync.sync.outcomes import Park
from dokstamp_sync.sync.statements import _wake
from dokstamp_sync.testing import calls


def _institution(key="INST"):
    return event("institution", key, {"name": "Federal University", "country": "Brazil",
                                      "status": "active"})


def _module(key, inst="INST"):
    return event("module", key, {"name": f"Module {key}", "code": key, "workload": 60,
                                 "institution_key": inst, "credits": 4,
                                 "modality": "hybrid", "level": "undergraduate"})


def test_dependents_do_not_rerun_a_parked_dependency_before_its_backoff(h, ctx, sandbox):
    """The institution answers 503 and is parked with a backoff; 20 modules that need it then
    wait for its next attempt instead of each re-running it inline: POST /institutions is
    sent only by the institution's own run."""
    ctx.breaker.threshold = 1000  # an entity failing, not an outage
    ctx.limits = replace(ctx.limits, create_window=30)
    sandbox.sandbox.faults.configure(Faults(error_rate=1.0, lost_response_share=0.0))
    (inst,) = h.send(_institution())
    assert h.run([inst]) == ["waiting"]
    before = calls(sandbox)
    states = h.sync(*[_module(f"M{i:02d}") for i in range(20)])
    assert states == ["waiting"] * 20
    after = calls(sandbox)
    assert after.get("POST /institutions", 0) == before.get("POST /institutions", 0)
    assert after.get("GET /institutions", 0) == before.get("GET /institutions", 0)


def test_a_reference_cycle_is_dead_lettered_naming_it(h):
    """A course whose cohort reference points at a cohort of that same course never waits
    forever: the run finds the cycle and dead-letters it, naming both."""
    course = event("course", "CRS-1", {"name": "B", "code": "BSC-1", "status": "active",
                                       "workload_hours": 10, "cohort_key": "COH-1",
                                       "institution_key": "INST"})
    cohort = event("cohort", "COH-1", {"code": "BSC-1-2026", "course_key": "CRS-1",
                                       "modality": "hybrid", "start_date": "2022-02-01T00:00:00Z",
                                       "end_date": "2026-12-15T00:00:00Z"})
    h.sync(_institution())
    pks = h.send(cohort, course)
    h.run(pks[1:])
    reasons = [letter.reason for letter in h.letters()]
    assert any("reference cycle" in r and "course CRS-1" in r and "cohort COH-1" in r
               for r in reasons), reasons


def _park_on(ctx, pk, tag, since=None):
    """The dependent's run (begun at ``since``) ends: it read its dependency unsynced and parks
    for a minute."""
    return ctx.store.conclude(pk, completed=False, decide=lambda _facts: Park(
        delay=60.0, error=f"dependency {tag} is waiting", waiting_for=tag, counted=False,
        since=since or utcnow()))


def _due_in(ctx, pk) -> float:
    with session_scope(ctx.sessions) as s:
        record = s.get(InboxEvent, pk)
        return (utc(record.next_attempt_at) - utcnow()).total_seconds()


def test_a_dependency_synced_while_its_dependent_ran_wakes_it(h, ctx):
    """The lost wake-up (seen as a certificate asleep 20 s after an outage): a module reads
    its institution unsynced, the institution syncs and wakes its waiters, then the module's
    park commits. The park sees the institution in DokStamp and is due at once, not in 60 s."""
    inst, module = h.send(_institution(), _module("M-LATE"))
    run_began = utcnow()
    assert h.run([inst]) == ["synced"]
    assert _park_on(ctx, module, "institution:INST", since=run_began) == "waiting"
    assert _due_in(ctx, module) < 1
    # Still unsynced: the park keeps its delay.
    other = h.send(_module("M-WAITS", inst="INST-2"))[0]
    _park_on(ctx, other, "institution:INST-2")
    assert _due_in(ctx, other) > 50


def test_a_park_racing_the_wake_waits_for_it_and_sees_the_dependency(h, ctx):
    """The wake's transaction holds the tag's lock until it commits: a park of that tag made
    meanwhile blocks, then reads the committed mapping and is due at once (without the lock it
    would read the mapping before the commit and sleep its whole delay)."""
    module = h.send(_module("M-RACE", inst="INST-R"))[0]
    run_began = utcnow()
    waker = ctx.sessions()
    try:
        _wake(waker, "institution", "INST-R")  # the wake ran, its transaction not committed
        waker.add(Mapping(entity="institution", erp_key="INST-R", dokstamp_uuid="uuid-r",
                          status=MappingStatus.ACTIVE))
        waker.flush()
        with ThreadPoolExecutor(1) as pool:
            parked = pool.submit(_park_on, ctx, module, "institution:INST-R", run_began)
            time.sleep(0.5)
            assert not parked.done()  # blocked on the tag's lock
            waker.commit()
            assert parked.result(timeout=10) == "waiting"
    finally:
        waker.close()
    assert _due_in(ctx, module) < 1


def test_a_wait_an_existing_mapping_does_not_end_keeps_its_delay(h, ctx):
    """A park whose entity is mapped already, but was recorded before the run began (a
    certificate waiting for a course with no known institution): not a missed wake-up, so it
    keeps its delay instead of running again at every scheduler tick."""
    inst, module = h.send(_institution(), _module("M-OLD"))
    assert h.run([inst]) == ["synced"]
    _park_on(ctx, module, "institution:INST", since=utcnow())  # the run began after it synced
    assert _due_in(ctx, module) > 50


def _row_locked(ctx, pk) -> bool:
    """Whether another transaction holds event ``pk``'s row lock (FOR UPDATE NOWAIT fails)."""
    from sqlalchemy.exc import OperationalError

    with session_scope(ctx.sessions) as s:
        try:
            s.execute(select(InboxEvent.id).where(InboxEvent.id == pk)
                      .with_for_update(nowait=True))
        except OperationalError:
            return True
    return False


def test_recording_an_outcome_takes_the_tags_lock_before_the_events_row(h, ctx):
    """Every writer takes a tag's lock before an event row's: a run recording its event synced
    (it wakes that entity's waiters) waits for the tag before it locks its own row, as a park
    on that tag does. Otherwise a stale second run of one event, parking on the tag while the
    first records it, would deadlock (PostgreSQL aborts one)."""
    from dokstamp_sync.sync.outcomes import Outcome

    (pk,) = h.send(_institution("INST-L"))
    holder = ctx.sessions()
    try:
        lock_tag(holder, "institution:INST-L")  # as a park on that tag, before its commit
        with ThreadPoolExecutor(1) as pool:
            done = pool.submit(ctx.store.finish_synced, pk, Outcome.synced(uuid="uuid-l"),
                               completed=False, entity="institution", key="INST-L")
            time.sleep(0.5)
            assert not done.done()  # waiting for the tag ...
            assert not _row_locked(ctx, pk)  # ... before it took its row
            holder.commit()
            assert done.result(timeout=10) == "synced"
    finally:
        holder.close()
