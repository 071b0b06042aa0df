"""Processing one event: the single place that decides synced, superseded, waiting or dead.

:func:`run` is what a task calls with an event's primary key. It counts the delivery (an event
whose task keeps killing its worker is dead-lettered after ``max_deliveries``), then
:func:`process` takes the entity's lock, checks ordering (the newest ``occurred_at`` wins),
resolves dependencies (syncing known ones first), performs the operation with short in-call
retries, and records the outcome. Whatever is raised is classified once
(:func:`.outcomes.classify`): transient failures park the event (``waiting`` with a next attempt
time, exponential backoff with full jitter, ``Retry-After`` honoured) until the retry budget is
spent; permanent ones dead-letter it at once. ``run`` never raises once the event is claimed.

Every read and write of the database goes through :class:`.store.Store`, one short transaction
each, never across a DokStamp call.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import redis
from redis.lock import Lock
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from dokstamp_sync.db import connection_lost
from dokstamp_sync.dokstamp.errors import CircuitOpen, TransientError
from dokstamp_sync.events import Event, InvalidEvent
from dokstamp_sync.models import utcnow
from dokstamp_sync.states import EventState, RunState
from dokstamp_sync.sync import certificates, deletes, files, references, upserts
from dokstamp_sync.sync.certificates import Lifecycle
from dokstamp_sync.sync.context import Run, SyncContext
from dokstamp_sync.sync.entities import SPECS
from dokstamp_sync.sync.outcomes import (
    BREAKER_SLACK,
    Busy,
    Decision,
    Drifted,
    Facts,
    InFlight,
    Letter,
    Next,
    Outcome,
    Park,
    Verdict,
    classify,
)
from dokstamp_sync.sync.reads import Claimed, View
from dokstamp_sync.sync.statements import Neighbour, data_hash

log = logging.getLogger("dokstamp_sync.sync")
BACKOFF_BASE = 2.0  # seconds
BACKOFF_CAP = 600.0
IN_CALL_RETRY_AFTER_MAX = 5.0  # longer Retry-After waits are parked, not slept through


def run(ctx: SyncContext, pk: int, *, flush: bool = True) -> str:
    """Process event ``pk`` as a task does; return its state afterwards. Never raises
    once the event is claimed. ``flush=False``: the caller sends the counters (once per
    task, see :func:`flush_counters`)."""
    # The delivery count is undone when this run completes, left behind if it is killed;
    # the lease keeps the scheduler from handing the event out again meanwhile.
    claimed = ctx.store.claim(pk, ctx.limits.lease)
    if not isinstance(claimed, Claimed):
        return claimed
    if claimed.deliveries > ctx.limits.max_deliveries:
        reason = (f"the worker was lost {claimed.deliveries - 1} times while processing "
                  "this event")
        state = ctx.store.conclude(pk, completed=False,
                                   decide=lambda _facts: Letter(reason=reason))
    else:
        try:
            state = process(ctx, Run(), pk, payload=claimed.payload)
        except Exception as exc:  # a bug must neither kill the worker nor lose the event
            if connection_lost(exc):
                # The database dropped the connection (a restart, a failover, a killed
                # backend): not the event's fault. Hand it back at once, rather than leave it
                # leased until the lease runs out or spend its retry budget.
                log.warning("event %s: the database connection failed (%s): due again at once",
                            pk, type(exc).__name__)
                state = ctx.store.release(pk)
            else:
                log.exception("event %s: internal error", pk)
                state = _settle(ctx, pk, 0, classify(exc))
    ctx.count(f"events_{state}")
    if flush:
        flush_counters(ctx)
    return state


def flush_counters(ctx: SyncContext) -> None:
    """The end of a task: the outcomes written marked reported, the counters, and the health
    check's proof that tasks are being processed."""
    ctx.store.flush_reported()
    ctx.counters.flush(beat=True)


def process(ctx: SyncContext, run: Run, pk: int, depth: int = 0, *,
            payload: dict[str, Any] | None = None) -> str:
    """Sync one event under its entity's lock; returns the state it ends in (or ``busy``).

    ``depth`` > 0: called for a dependency from another event's run. ``payload``: the event,
    when the caller has just read it.
    """
    if payload is None:
        read = ctx.store.payload(pk)
        if isinstance(read, str):
            return read
        payload = read
    try:
        event = Event.model_validate(payload)
    except ValueError as exc:
        return _settle(ctx, pk, depth, classify(InvalidEvent(f"invalid event: {exc}")))
    try:
        with ctx.locks.take(f"entity:{event.entity}:{event.key}",
                            wait=5.0 if depth == 0 else 1.0) as held:
            run.walk.append((event.entity, event.key))  # a dependency leading back: a cycle
            try:
                return _process_locked(ctx, run, pk, event, depth, held)
            finally:
                run.walk.pop()
    except Busy:
        if depth == 0:
            ctx.store.conclude(pk, completed=True, decide=lambda _facts: Park(
                delay=1.0, error="another worker is syncing this entity", counted=False))
        return RunState.BUSY


def _process_locked(ctx: SyncContext, run: Run, pk: int, event: Event, depth: int,
                    held: Lock) -> str:
    try:
        outcome = _with_retries(
            ctx, lambda: _attempt(ctx, run, pk, event, depth))
        ctx.locks.confirm(held)  # still ours? (else another run may be on this entity now)
    except Exception as exc:
        verdict = classify(exc)
        if verdict.unexpected:
            raise  # logged with its traceback by the caller that owns the event
        return _settle(ctx, pk, depth, verdict, since=run.started)
    return _record(ctx, pk, depth, outcome, event)


@dataclass(frozen=True)
class Step:
    """One attempt at one event, as the handlers below see it."""

    run: Run
    pk: int
    event: Event
    view: View
    depth: int
    lifecycle: Lifecycle | None  # a certificate event's place among its certificate's


def _attempt(ctx: SyncContext, run: Run, pk: int, event: Event, depth: int) -> Outcome:
    refs = references.wanted(event) if event.op == "upsert" else []
    view = ctx.store.attempt(pk, (event.entity, event.key), refs)
    if isinstance(view, str):  # final already: recording leaves it alone and reports its state
        return Outcome(state=EventState.SUPERSEDED, note=f"already {view}")
    life = certificates.place(view.neighbours, pk) if view.neighbours is not None else None
    if life.superseded if life is not None else view.superseded:
        return Outcome(state=EventState.SUPERSEDED, note="a newer event for this entity came")
    # The change guard (docs/guard.md): parks it behind a held event of its entity, parks a
    # delete or revoke until its settle delay passed, or holds it; None: go on.
    if (stopped := ctx.guard.admit(pk, event, behind=view.behind)) is not None:
        return stopped
    step = Step(run, pk, event, view, depth, life)
    return HANDLERS[(event.entity, event.op)](ctx, step)


# -- what each (entity, op) does ------------------------------------------------------------

Handler = Callable[[SyncContext, Step], Outcome]


def _prepared(ctx: SyncContext, step: Step) -> tuple[dict[str, Any], dict[str, Any], str]:
    """An upsert's DokStamp payload, its references' UUIDs (a known but unsynced dependency
    synced first) and the digest that says whether anything changed since the last send."""
    uuids = references.resolve(ctx, step.run, step.event, step.depth, process, step.view.refs)
    digest = data_hash({"data": step.event.data, "refs": uuids})
    return references.payload(step.event, uuids), uuids, digest


def _upsert_entity(ctx: SyncContext, step: Step) -> Outcome:
    body, uuids, digest = _prepared(ctx, step)
    with upserts.references_rechecked(ctx, step.event, uuids):
        return upserts.upsert_entity(ctx, step.event, body, uuids, step.view.own, digest)


def _upsert_file(ctx: SyncContext, step: Step) -> Outcome:
    _, _, digest = _prepared(ctx, step)
    return files.upsert_file(ctx, step.event, step.view.own, digest)


def _upsert_certificate(ctx: SyncContext, step: Step) -> Outcome:
    if step.lifecycle is not None and step.lifecycle.after_end is not None:
        raise certificates.wait_for_end(step.event.key, step.lifecycle.after_end)
    body, uuids, digest = _prepared(ctx, step)
    end = step.lifecycle.end if step.lifecycle else None
    revocation = None if end is None else Event.model_validate(end.payload)
    with upserts.references_rechecked(ctx, step.event, uuids):
        return certificates.upsert_certificate(ctx, step.event, body, step.view.own, digest,
                                               revocation=revocation)


def _delete_entity(ctx: SyncContext, step: Step) -> Outcome:
    return deletes.delete_entity(ctx, step.event, step.view.own)


def _end_certificate(ctx: SyncContext, step: Step) -> Outcome:
    """A certificate's revoke or delete (see :func:`.certificates.end_certificate`): its open
    upsert is synced first here, under the entity lock this run holds."""
    def sync_first(upsert: Neighbour) -> None:
        data = Event.model_validate(upsert.payload)
        _record(ctx, upsert.pk, step.depth + 1,
                _attempt(ctx, step.run, upsert.pk, data, step.depth + 1), data)

    def payload_of(data: Event) -> dict[str, Any]:
        uuids = references.resolve(ctx, step.run, data, step.depth, process, {})
        return references.payload(data, uuids)

    return certificates.end_certificate(
        ctx, step.event, step.view.own, step.lifecycle.upsert if step.lifecycle else None,
        sync_first=sync_first, payload_of=payload_of)


HANDLERS: dict[tuple[str, str], Handler] = {
    **{(entity, "upsert"): _upsert_entity for entity in SPECS},
    **{(entity, "delete"): _delete_entity for entity in SPECS},
    ("file", "upsert"): _upsert_file,
    ("certificate", "upsert"): _upsert_certificate,
    ("certificate", "delete"): _end_certificate,
    ("certificate", "revoke"): _end_certificate,
}


def _retry_now(exc: BaseException) -> bool:
    if isinstance(exc, CircuitOpen | InFlight):
        return False  # park (and free the locks) until the breaker's probe / the window ends
    # Any server's Retry-After (a 429's, a 503's) is honoured: a short one is slept through
    # here, a longer one parks the event for at least that long (see _decide).
    if isinstance(exc, TransientError) and exc.retry_after:
        return exc.retry_after <= IN_CALL_RETRY_AFTER_MAX
    return isinstance(exc, TransientError | Busy | Drifted)


def _retry_wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, TransientError) and exc.retry_after:
        return exc.retry_after
    return float(wait_random_exponential(multiplier=0.25, max=2.0)(state))


def _with_retries(ctx: SyncContext, fn: Callable[[], Outcome]) -> Outcome:
    """Short in-call retries of a whole attempt: safe, since every attempt searches again."""
    retrying = Retrying(stop=stop_after_attempt(ctx.limits.in_call_attempts), wait=_retry_wait,
                        retry=retry_if_exception(_retry_now), reraise=True, sleep=ctx.sleep)
    return retrying(fn)


def _record(ctx: SyncContext, pk: int, depth: int, outcome: Outcome, event: Event) -> str:
    """Record an attempt's outcome (of ``event``, the inbox's event ``pk``), and those of the
    file events uploaded along with it (in the same transaction)."""
    if outcome.state == EventState.SYNCED:  # the common case, in as few statements as it takes
        return ctx.store.finish_synced(pk, outcome, completed=depth == 0, entity=event.entity,
                                       key=event.key)
    return ctx.store.conclude(pk, completed=depth == 0, decide=lambda _facts: outcome)


def _settle(ctx: SyncContext, pk: int, depth: int, verdict: Verdict, *,
            since: datetime | None = None) -> str:
    """Record what a verdict means for the event (see the tree in :mod:`.outcomes`)."""
    if verdict.next == Next.RETRY and not verdict.unexpected and ctx.breaker is not None:
        # The failure opened the fleet's breaker (or it was open by then): DokStamp's, not the
        # event's. Wait for the probe rather than spend the retry budget and back off long.
        with suppress(redis.RedisError):
            if (opened := ctx.breaker.open_for()) is not None:
                verdict = Verdict(next=Next.WAIT,
                                  delay=max(opened + BREAKER_SLACK, verdict.retry_after or 0),
                                  reason=f"DokStamp is failing (circuit breaker open): "
                                         f"{verdict.reason}")
    return ctx.store.conclude(pk, completed=depth == 0,
                              decide=lambda facts: _decide(ctx, verdict, facts, since))


def _decide(ctx: SyncContext, verdict: Verdict, facts: Facts,
            since: datetime | None = None) -> Decision:
    if verdict.next == Next.DEAD:
        return Letter(reason=verdict.reason, error=verdict.error)
    now = utcnow()
    if verdict.next == Next.WAIT:
        waited = now - facts.received_at
        if verdict.never_arrived and waited > timedelta(seconds=ctx.limits.dependency_timeout):
            return Letter(reason=verdict.reason.replace("has not arrived", "never arrived"))
        return Park(delay=verdict.delay, error=verdict.reason,
                    waiting_for=verdict.waiting_for, counted=False, since=since)
    first = facts.first_failed_at or now
    budget_left = ctx.limits.retry_budget - (now - first).total_seconds()
    if budget_left < 0:
        return Letter(reason=f"retries exhausted after {facts.attempts + 1} attempts: "
                             f"{verdict.reason}")
    ctx.count("retries")
    backoff = ctx.rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** facts.attempts))
    delay = max(backoff, verdict.retry_after or 0.0)
    # Never parked past the budget's end (a huge Retry-After): tried once more then, and
    # dead-lettered if that fails too.
    return Park(delay=min(delay, budget_left), error=verdict.reason, now=now)
