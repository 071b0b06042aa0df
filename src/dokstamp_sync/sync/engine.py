"""Processing one event: the single place that decides synced, superseded, waiting or dead.

:func:`run` is what a task calls with an event's primary key. It counts the delivery (an event
whose task keeps killing its worker is dead-lettered after ``max_deliveries``), then
:func:`process` takes the entity's lock, checks ordering (the newest ``occurred_at`` wins),
resolves dependencies (syncing known ones first), performs the operation with short in-call
retries, and records the outcome. Transient failures park the event (``waiting`` with a next
attempt time, exponential backoff with full jitter, ``Retry-After`` honoured) until the retry
budget is spent; permanent ones dead-letter it at once. ``run`` never raises.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from redis.exceptions import LockError
from redis.lock import Lock
from sqlalchemy.orm import Session
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_random_exponential

from dokstamp_sync.db import once_more_if_disconnected, session_scope
from dokstamp_sync.dokstamp.errors import (
    AuthenticationError,
    DokStampError,
    PermanentError,
    PermissionDenied,
    RateLimited,
    TransientError,
)
from dokstamp_sync.events import Event, InvalidEvent, utc
from dokstamp_sync.models import InboxEvent, utcnow
from dokstamp_sync.redis_keys import HEARTBEAT
from dokstamp_sync.sync import operations, references
from dokstamp_sync.sync.context import Busy, Dead, SyncContext, Waiting
from dokstamp_sync.sync.files import FileSourceError
from dokstamp_sync.sync.operations import Apply
from dokstamp_sync.sync.store import (
    FINAL,
    claim,
    data_hash,
    dead_letter,
    finish,
    finish_synced,
    forget_natural_keys,
    get_mappings,
    log_outcome,
    park,
    read_open,
    save_mapping,
)

log = logging.getLogger("dokstamp_sync.sync")
BACKOFF_BASE = 2.0  # seconds
BACKOFF_CAP = 600.0
IN_CALL_RETRY_AFTER_MAX = 5.0  # longer Retry-After waits are parked, not slept through


def run(ctx: SyncContext, pk: int, *, flush: bool = True) -> str:
    """Process event ``pk`` as a task does; return its state afterwards. Never raises
    once the event is claimed. ``flush=False``: the caller sends the counters (once per
    task, see :meth:`SyncContext.flush`)."""
    claimed = once_more_if_disconnected(lambda: _claim(ctx, pk))
    if isinstance(claimed, str):
        return claimed
    try:
        state = process(ctx, pk, payload=claimed)
    except Exception as exc:  # a bug must neither kill the worker nor lose the event
        log.exception("event %s: internal error", pk)
        state = _transient(ctx, pk, 0, f"internal error: {type(exc).__name__}: {exc}", None)
    ctx.count(f"events_{state}")
    if flush:
        flush_counters(ctx)
    return state


def flush_counters(ctx: SyncContext) -> None:
    """The counters, and the health check's proof that tasks are being processed."""
    ctx.flush({f"{HEARTBEAT}task": str(time.time())})


def _claim(ctx: SyncContext, pk: int) -> dict[str, Any] | str:
    """Count a delivery of event ``pk`` and lease it; its payload, or the state it ends in."""
    with session_scope(ctx.sessions) as session:
        # The delivery count is undone when this run completes, left behind if it is killed;
        # the lease keeps the scheduler from handing the event out again meanwhile.
        claimed = claim(session, pk, ctx.lease)
        if claimed is None:
            return _final_state(session, pk)
        deliveries, payload = claimed
        if deliveries > ctx.max_deliveries:
            record = session.get(InboxEvent, pk)
            assert record is not None
            dead_letter(session, record, f"the worker was lost {deliveries - 1} times "
                                         "while processing this event")
            log_outcome(record, "dead")
            return "dead"
        return payload


def process(ctx: SyncContext, pk: int, depth: int = 0, *,
            payload: dict[str, Any] | None = None) -> str:
    """Sync one event under its entity's lock; returns the state it ends in (or ``busy``).

    ``depth`` > 0: called for a dependency from another event's run. ``payload``: the event,
    when the caller has just read it.
    """
    if payload is None:
        with session_scope(ctx.sessions) as session:
            record = _open(session, pk)
            if record is None:
                return _final_state(session, pk)
            payload = record.payload
    try:
        event = Event.model_validate(payload)
    except ValueError as exc:
        return _dead(ctx, pk, depth, f"invalid event: {exc}", None)
    try:
        with ctx.lock(f"entity:{event.entity}:{event.key}",
                      wait=5.0 if depth == 0 else 1.0) as held:
            return _process_locked(ctx, pk, event, depth, held)
    except Busy:
        if depth == 0:
            with session_scope(ctx.sessions) as session:
                record = _open(session, pk)
                if record is not None:
                    _completed(record, depth)
                    park(record, delay=1.0, error="another worker is syncing this entity",
                         count=False)
        return "busy"


def _process_locked(ctx: SyncContext, pk: int, event: Event, depth: int,
                    held: Lock) -> str:
    tries = itertools.count()
    try:
        outcome = _with_retries(
            ctx, lambda: _attempt(ctx, pk, event, depth, retry=next(tries) > 0))
        held.reacquire()  # still ours? (else another run may be on this entity now)
    except Waiting as w:
        return _wait(ctx, pk, depth, w)
    except Dead as d:
        return _dead(ctx, pk, depth, d.reason, d.error)
    except (AuthenticationError, PermissionDenied) as exc:
        # CONTRACT §3: a 4xx other than 429 is dead. Say plainly that the credentials, not
        # the event, are at fault: after fixing them, `dlq replay --all` sends it again.
        return _dead(ctx, pk, depth, f"credentials refused (fix them, then replay): "
                                     f"{_describe(exc)}", exc)
    except PermanentError as exc:
        return _dead(ctx, pk, depth, _describe(exc), exc)
    except (FileSourceError, InvalidEvent) as exc:
        return _dead(ctx, pk, depth, str(exc), None)
    except (TransientError, Busy, LockError) as exc:
        retry_after = exc.retry_after if isinstance(exc, RateLimited) else None
        error = str(exc) if isinstance(exc, DokStampError) else f"lock: {exc!r}"
        return _transient(ctx, pk, depth, error, retry_after)
    return _record(ctx, pk, depth, outcome)


def _attempt(ctx: SyncContext, pk: int, event: Event, depth: int, *, retry: bool) -> Apply:
    with session_scope(ctx.sessions) as session:
        record = read_open(session, pk)
        if record is None:
            return Apply(_final_state(session, pk))
        # Never tried before, never delivered before: no lost response can have created it.
        fresh = not retry and record.attempts == 0 and record.deliveries <= 1
        if record.superseded:
            return Apply("superseded", note="a newer event for this entity came")
        own = (event.entity, event.key)
        # The entity's own mapping and those of everything it refers to, in one query.
        mappings = get_mappings(session, [own, *(references.wanted(event)
                                                 if event.op == "upsert" else [])])
        snapshot = mappings.pop(own, None)
    if event.op == "revoke" or (event.op == "delete" and event.entity == "certificate"):
        return operations.revoke(ctx, event, snapshot)
    if event.op == "delete":
        return operations.delete(ctx, event, snapshot)
    refs = references.resolve(ctx, event, depth, process, mappings)
    body = references.payload(event, refs)
    digest = data_hash({"data": event.data, "refs": refs})
    return operations.upsert(ctx, event, body, refs, snapshot, digest, fresh=fresh)


def _retry_now(exc: BaseException) -> bool:
    if isinstance(exc, RateLimited):
        return (exc.retry_after or 0) <= IN_CALL_RETRY_AFTER_MAX
    return isinstance(exc, TransientError | Busy)


def _retry_wait(state: RetryCallState) -> float:
    exc = state.outcome.exception() if state.outcome else None
    if isinstance(exc, RateLimited) and exc.retry_after:
        return exc.retry_after
    return float(wait_random_exponential(multiplier=0.25, max=2.0)(state))


def _with_retries(ctx: SyncContext, fn: Callable[[], Apply]) -> Apply:
    """Short in-call retries of a whole attempt: safe, since every attempt searches again."""
    retrying = Retrying(stop=stop_after_attempt(ctx.in_call_attempts), wait=_retry_wait,
                        retry=retry_if_exception(_retry_now), reraise=True, sleep=ctx.sleep)
    return retrying(fn)


def _describe(exc: PermanentError) -> str:
    fields = "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.errors.items())
    return f"DokStamp refused {exc.method} {exc.path} ({exc.status}): {exc.message}" + (
        f" [{fields}]" if fields else "")


def _open(session: Session, pk: int) -> InboxEvent | None:
    """The event, if it exists and is not final yet."""
    record = session.get(InboxEvent, pk)
    return None if record is None or record.state in FINAL else record


def _final_state(session: Session, pk: int) -> str:
    record = session.get(InboxEvent, pk)
    return record.state if record is not None else "missing"


def _completed(record: InboxEvent, depth: int) -> None:
    """This run ended normally: undo its delivery count (only task runs counted one)."""
    if depth == 0:
        record.deliveries = max(0, record.deliveries - 1)


def _conclude(ctx: SyncContext, pk: int, depth: int,
              decide: Callable[[Session, InboxEvent], str]) -> str:
    """Record how this run ended, in one transaction: ``decide`` writes the outcome and
    returns the state. An event already final is left alone (its state is returned)."""
    with session_scope(ctx.sessions) as session:
        record = _open(session, pk)
        if record is None:
            return _final_state(session, pk)
        _completed(record, depth)
        return decide(session, record)


def _record(ctx: SyncContext, pk: int, depth: int, outcome: Apply) -> str:
    if outcome.state == "synced":  # the common case, in as few statements as it takes
        with session_scope(ctx.sessions) as session:
            done = finish_synced(session, pk, note=outcome.note, completed=depth == 0)
            if done is None:
                return _final_state(session, pk)
            if outcome.uuid is not None:
                save_mapping(session, done, outcome.uuid, status=outcome.status,
                             sent=outcome.sent, digest=outcome.digest)
                if outcome.status == "deleted":
                    forget_natural_keys(session, done.entity, outcome.uuid)
            log_outcome(done, "synced", outcome.note)
            return "synced"

    def decide(session: Session, record: InboxEvent) -> str:
        finish(session, record, outcome.state, outcome.note)
        log_outcome(record, outcome.state, outcome.note)
        return outcome.state

    return _conclude(ctx, pk, depth, decide)


def _dead(ctx: SyncContext, pk: int, depth: int, reason: str,
          error: PermanentError | None) -> str:
    def decide(session: Session, record: InboxEvent) -> str:
        dead_letter(session, record, reason, error)
        log_outcome(record, "dead", reason)
        return "dead"

    return _conclude(ctx, pk, depth, decide)


def _wait(ctx: SyncContext, pk: int, depth: int, w: Waiting) -> str:
    def decide(session: Session, record: InboxEvent) -> str:
        waited = utcnow() - utc(record.received_at)
        if w.never_arrived and waited > timedelta(seconds=ctx.dependency_timeout):
            reason = w.reason.replace("has not arrived", "never arrived")
            dead_letter(session, record, reason)
            log_outcome(record, "dead", reason)
            return "dead"
        park(record, delay=w.delay, error=w.reason, waiting_for=w.waiting_for, count=False)
        log_outcome(record, "waiting", w.reason)
        return "waiting"

    return _conclude(ctx, pk, depth, decide)


def _transient(ctx: SyncContext, pk: int, depth: int, error: str,
               retry_after: float | None) -> str:
    def decide(session: Session, record: InboxEvent) -> str:
        now = utcnow()
        first = utc(record.first_failed_at) if record.first_failed_at else now
        if (now - first).total_seconds() > ctx.retry_budget:
            reason = f"retries exhausted after {record.attempts + 1} attempts: {error}"
            dead_letter(session, record, reason)
            log_outcome(record, "dead", reason)
            return "dead"
        ctx.count("retries")
        backoff = ctx.rng.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** record.attempts))
        park(record, delay=max(backoff, retry_after or 0.0), error=error, now=now)
        log_outcome(record, "waiting", error)
        return "waiting"

    return _conclude(ctx, pk, depth, decide)
