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

import itertools
import logging
import time
from collections.abc import Callable
from contextlib import suppress
from datetime import timedelta
from typing import Any

import redis
from redis.lock import Lock
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from dokstamp_sync.dokstamp.errors import CircuitOpen, TransientError
from dokstamp_sync.events import Event, InvalidEvent
from dokstamp_sync.models import utcnow
from dokstamp_sync.redis_keys import HEARTBEAT
from dokstamp_sync.states import OPEN, EventState
from dokstamp_sync.sync import operations, references
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.outcomes import (
    BREAKER_SLACK,
    Busy,
    Dead,
    Drifted,
    InFlight,
    Next,
    Outcome,
    Verdict,
    Waiting,
    classify,
)
from dokstamp_sync.sync.store import Claimed, Decision, Facts, Letter, Park, View, data_hash

log = logging.getLogger("dokstamp_sync.sync")
BACKOFF_BASE = 2.0  # seconds
BACKOFF_CAP = 600.0
IN_CALL_RETRY_AFTER_MAX = 5.0  # longer Retry-After waits are parked, not slept through


def run(ctx: SyncContext, pk: int, *, flush: bool = True) -> str:
    """Process event ``pk`` as a task does; return its state afterwards. Never raises
    once the event is claimed. ``flush=False``: the caller sends the counters (once per
    task, see :meth:`SyncContext.flush`)."""
    # The delivery count is undone when this run completes, left behind if it is killed;
    # the lease keeps the scheduler from handing the event out again meanwhile.
    claimed = ctx.store.claim(pk, ctx.lease)
    if not isinstance(claimed, Claimed):
        return claimed
    if claimed.deliveries > ctx.max_deliveries:
        reason = (f"the worker was lost {claimed.deliveries - 1} times while processing "
                  "this event")
        state = ctx.store.conclude(pk, completed=False,
                                   decide=lambda _facts: Letter(reason=reason))
    else:
        try:
            state = process(ctx, pk, payload=claimed.payload)
        except Exception as exc:  # a bug must neither kill the worker nor lose the event
            log.exception("event %s: internal error", pk)
            state = _settle(ctx, pk, 0, classify(exc))
    ctx.count(f"events_{state}")
    if flush:
        flush_counters(ctx)
    return state


def flush_counters(ctx: SyncContext) -> None:
    """The counters, and the health check's proof that tasks are being processed."""
    ctx.flush({f"{HEARTBEAT}task": str(time.time())})


def process(ctx: SyncContext, pk: int, depth: int = 0, *,
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
        with ctx.lock(f"entity:{event.entity}:{event.key}",
                      wait=5.0 if depth == 0 else 1.0) as held:
            ctx.walk.append((event.entity, event.key))  # a dependency leading back: a cycle
            try:
                return _process_locked(ctx, pk, event, depth, held)
            finally:
                ctx.walk.pop()
    except Busy:
        if depth == 0:
            ctx.store.conclude(pk, completed=True, decide=lambda _facts: Park(
                delay=1.0, error="another worker is syncing this entity", counted=False))
        return "busy"


def _process_locked(ctx: SyncContext, pk: int, event: Event, depth: int,
                    held: Lock) -> str:
    tries = itertools.count()
    try:
        outcome = _with_retries(
            ctx, lambda: _attempt(ctx, pk, event, depth, retry=next(tries) > 0))
        held.reacquire()  # still ours? (else another run may be on this entity now)
    except Exception as exc:
        verdict = classify(exc)
        if verdict.unexpected:
            raise  # logged with its traceback by the caller that owns the event
        return _settle(ctx, pk, depth, verdict)
    return _record(ctx, pk, depth, outcome)


def _attempt(ctx: SyncContext, pk: int, event: Event, depth: int, *, retry: bool) -> Outcome:
    refs = references.wanted(event) if event.op == "upsert" else []
    view = ctx.store.attempt(pk, (event.entity, event.key), refs)
    if isinstance(view, str):  # final already: recording leaves it alone and reports its state
        return Outcome(state=EventState.SUPERSEDED, note=f"already {view}")
    if view.superseded:
        return Outcome(state=EventState.SUPERSEDED, note="a newer event for this entity came")
    # The change guard (CONTRACT §6): parks it behind a held event of its entity, parks a
    # delete or revoke until its settle delay passed, or holds it; None: go on.
    if (stopped := ctx.guard.admit(pk, event, behind=view.behind)) is not None:
        return stopped
    # Never tried before, never delivered before: no lost response can have created it. Only
    # at the top level: a dependency run inline may be another task's killed delivery.
    fresh = depth == 0 and not retry and view.attempts == 0 and view.deliveries <= 1
    if event.entity == "certificate" and event.op != "upsert":
        return _end_certificate(ctx, event, depth, view)
    if event.op == "delete":
        return operations.delete(ctx, event, view.own)
    uuids = references.resolve(ctx, event, depth, process, view.refs)
    body = references.payload(event, uuids)
    digest = data_hash({"data": event.data, "refs": uuids})
    if event.entity == "certificate":
        end = view.lifecycle.end if view.lifecycle else None
        revocation = None if end is None else Event.model_validate(end.payload)
        return operations.upsert_certificate(ctx, event, body, view.own, digest, fresh=fresh,
                                             revocation=revocation)
    return operations.upsert(ctx, event, body, uuids, view.own, digest, fresh=fresh)


def _end_certificate(ctx: SyncContext, event: Event, depth: int, view: View) -> Outcome:
    """A certificate's revoke or delete, applied on top of its newest upsert (CONTRACT §2).

    When that upsert is still open (waiting for its student, a retry parked), it is synced
    here first, under this entity lock we hold, as a dependency would be: it sees this event
    after it and revokes what it creates. Whatever stops it (a dependency missing) stops this
    event too, so both wait for the same thing. Otherwise the certificate is found by its
    mapping or, without one, searched for with the newest upsert's data: a missing mapping
    is not proof of absence.
    """
    own = view.own
    upsert = view.lifecycle.upsert if view.lifecycle else None
    if upsert is not None and upsert.state in OPEN:
        data = Event.model_validate(upsert.payload)
        _record(ctx, upsert.pk, depth + 1,
                _attempt(ctx, upsert.pk, data, depth + 1, retry=True))
        own = ctx.store.mapping(event.entity, event.key)
    fields = None
    if own is None and upsert is not None:  # its upsert synced or dead, yet no mapping
        data = Event.model_validate(upsert.payload)
        try:
            fields = references.payload(data, references.resolve(ctx, data, depth, process, {}))
        except (Waiting, Dead):
            fields = None  # what it names was never synced: neither can the certificate be
    return operations.revoke(ctx, event, own, fields)


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
    retrying = Retrying(stop=stop_after_attempt(ctx.in_call_attempts), wait=_retry_wait,
                        retry=retry_if_exception(_retry_now), reraise=True, sleep=ctx.sleep)
    return retrying(fn)


def _record(ctx: SyncContext, pk: int, depth: int, outcome: Outcome) -> str:
    """Record an attempt's outcome, and those of the file events uploaded along with it."""
    for companion in outcome.companions:
        ctx.store.finish_companion(companion, "uploaded in a batch")
    if outcome.state == EventState.SYNCED:  # the common case, in as few statements as it takes
        return ctx.store.finish_synced(pk, outcome, completed=depth == 0)
    return ctx.store.conclude(pk, completed=depth == 0, decide=lambda _facts: outcome)


def _settle(ctx: SyncContext, pk: int, depth: int, verdict: Verdict) -> str:
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
                              decide=lambda facts: _decide(ctx, verdict, facts))


def _decide(ctx: SyncContext, verdict: Verdict, facts: Facts) -> Decision:
    if verdict.next == Next.DEAD:
        return Letter(reason=verdict.reason, error=verdict.error)
    now = utcnow()
    if verdict.next == Next.WAIT:
        waited = now - facts.received_at
        if verdict.never_arrived and waited > timedelta(seconds=ctx.dependency_timeout):
            return Letter(reason=verdict.reason.replace("has not arrived", "never arrived"))
        return Park(delay=verdict.delay, error=verdict.reason,
                    waiting_for=verdict.waiting_for, counted=False)
    first = facts.first_failed_at or now
    if (now - first).total_seconds() > ctx.retry_budget:
        return Letter(reason=f"retries exhausted after {facts.attempts + 1} attempts: "
                             f"{verdict.reason}")
    ctx.count("retries")
    backoff = ctx.rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** facts.attempts))
    return Park(delay=max(backoff, verdict.retry_after or 0.0), error=verdict.reason, now=now)
