"""Dependents respect a failing dependency's backoff, and every wait ends: a reference cycle is
dead-lettered naming the cycle."""

from __future__ import annotations

from dataclasses import replace

from dokstamp_sync.demo.samples import event
from dokstamp_sync.sandbox import Faults
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
