"""What the walk does next, and what it records.

Anything raised while an event is processed is turned by :func:`classify` into one
:class:`Verdict`, split by what the engine must do::

    raised in the walk                              verdict  the engine
    ├── Waiting (a dependency missing or busy)      WAIT     parks the event, not counted against
    │                                                        the retry budget; dead once the
    │                                                        dependency timeout passed, if it
    │                                                        never arrived
    ├── dokstamp CircuitOpen (the fleet's breaker   WAIT     parks until the breaker's next
    │   holds requests: DokStamp keeps failing)              probe, not counted
    ├── retry later                                 RETRY    parks with backoff (full jitter,
    │   ├── dokstamp TransientError                          ``retry_after`` honoured), counted;
    │   │     (transport, timeout, 429, 5xx, the             dead when the retry budget is spent;
    │   │      rate limiter's pause)                         but a WAIT until the next probe when
    │   │                                                    the breaker is open by then (the
    │   │                                                    API's failure, not the event's)
    │   ├── files SourceUnavailable (a TransientError: the document server's 5xx, 429,
    │   │     timeout or refused connection, for this event's own file; a companion's
    │   │     failure is never raised here, its own task meets it)
    │   ├── InFlight (a create that failed may still land:   parked for the whole window (twice the
    │   │     timeout, 5xx, malformed answer; raised by      HTTP timeout), never retried in call;
    │   │     that create's retry, or by a delete that       the next attempt searches first
    │   │     must search for it)
    │   ├── Drifted (a referenced entity was deleted outside dokstamp-sync: its mapping
    │   │     is forgotten and its latest upsert reopened; the next try recreates it)
    │   ├── Busy (a lock this step needs is held elsewhere)
    │   ├── redis LockError (a lock lost under us)
    │   └── anything unexpected ("internal error: ...", logged with its traceback)
    └── never as it is                              DEAD     files a dead letter with the reason
        ├── Dead (raised by the walk, with its reason)
        ├── dokstamp AuthenticationError / PermissionDenied ("credentials refused ...")
        ├── dokstamp PermanentError (another 4xx: method, path, status, DokStamp's message)
        ├── FileSourceError (the file cannot be obtained: the document server's 4xx, a URL
        │     that does not parse, a host not allowed, a path missing or escaping the root)
        └── InvalidEvent

An attempt that returns ends with an :class:`Outcome`, built with keyword arguments: synced (with
the mapping's new values), superseded, or the state the event already had. The handlers build
outcomes; :mod:`.engine` alone turns them and verdicts into event states, through :mod:`.store`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from redis.exceptions import LockError

from dokstamp_sync.dokstamp.errors import (
    AuthenticationError,
    CircuitOpen,
    DokStampError,
    PermanentError,
    PermissionDenied,
    TransientError,
)
from dokstamp_sync.events import InvalidEvent
from dokstamp_sync.states import EventState, MappingStatus
from dokstamp_sync.sync.sources import FileSourceError

BREAKER_SLACK = 0.5  # s after the breaker's next probe time: the probe's answer is in by then


class Waiting(Exception):
    """The event cannot proceed yet: a dependency is missing or busy."""

    def __init__(self, reason: str, *, waiting_for: str | None = None, delay: float = 60.0,
                 never_arrived: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.waiting_for = waiting_for
        self.delay = delay
        self.never_arrived = never_arrived  # dead-letter once the dependency timeout passes


# The end of a certificate upsert's refusal to change an issued certificate: once an older
# revoke or delete of that certificate syncs, the refused upsert is replayed (store.py).
REISSUE_REFUSED = "revoke it and issue a new one"


class Dead(Exception):
    """The event can never succeed as it is: dead-letter it with ``reason``."""

    def __init__(self, reason: str, error: PermanentError | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.error = error


class InFlight(Exception):
    """A create that failed may still land in DokStamp (a timeout, a 5xx, a malformed answer):
    no attempt may create that natural key again for ``retry_after`` seconds; then it
    searches first and finds the late write."""

    def __init__(self, reason: str, *, retry_after: float) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class Busy(Exception):
    """Another worker holds the lock this step needs; try again shortly."""


class Drifted(Exception):
    """DokStamp no longer has an entity our mapping points at (deleted on the dashboard): the
    mapping was forgotten and the entity's latest upsert reopened, so trying the event again
    syncs (recreates) it first. Retried at once, like a transient failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Next(StrEnum):
    WAIT = "wait"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True, kw_only=True)
class Verdict:
    """What happens to an event after an exception (see the tree above)."""

    next: Next
    reason: str
    retry_after: float | None = None  # RETRY: the server's Retry-After, seconds
    error: PermanentError | None = None  # DEAD: DokStamp's refusal, kept in the dead letter
    waiting_for: str | None = None  # WAIT: "student:S-1", woken when it syncs
    delay: float = 60.0  # WAIT: seconds until the next look
    never_arrived: bool = False  # WAIT: dead once the dependency timeout passes
    unexpected: bool = False  # RETRY: a bug, logged with its traceback


def describe(exc: PermanentError) -> str:
    """A refusal in one line: request, status, DokStamp's message and field errors."""
    fields = "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.errors.items())
    return f"DokStamp refused {exc.method} {exc.path} ({exc.status}): {exc.message}" + (
        f" [{fields}]" if fields else "")


def classify(exc: BaseException) -> Verdict:
    """The one mapping from any exception to what the engine does next."""
    if isinstance(exc, Waiting):
        return Verdict(next=Next.WAIT, reason=exc.reason, waiting_for=exc.waiting_for,
                       delay=exc.delay, never_arrived=exc.never_arrived)
    if isinstance(exc, Dead):
        return Verdict(next=Next.DEAD, reason=exc.reason, error=exc.error)
    if isinstance(exc, AuthenticationError | PermissionDenied):
        # docs/erp-guide.md: a 4xx other than 429 is dead. Say plainly that the credentials, not the
        # event, are at fault: after fixing them, `dlq replay --all` sends it again.
        return Verdict(next=Next.DEAD, error=exc,
                       reason=f"credentials refused (fix them, then replay): {describe(exc)}")
    if isinstance(exc, PermanentError):
        return Verdict(next=Next.DEAD, reason=describe(exc), error=exc)
    if isinstance(exc, FileSourceError | InvalidEvent):
        return Verdict(next=Next.DEAD, reason=str(exc))
    if isinstance(exc, InFlight):
        return Verdict(next=Next.RETRY, reason=str(exc), retry_after=exc.retry_after)
    if isinstance(exc, CircuitOpen):
        return Verdict(next=Next.WAIT, reason=str(exc),
                       delay=(exc.retry_after or 0.0) + BREAKER_SLACK)
    if isinstance(exc, TransientError):
        return Verdict(next=Next.RETRY, reason=str(exc),
                       retry_after=getattr(exc, "retry_after", None))
    if isinstance(exc, Drifted):
        return Verdict(next=Next.RETRY, reason=exc.reason)
    if isinstance(exc, Busy | LockError):
        return Verdict(next=Next.RETRY, reason=f"lock: {exc!r}")
    what = str(exc) if isinstance(exc, DokStampError) else f"{type(exc).__name__}: {exc}"
    return Verdict(next=Next.RETRY, reason=f"internal error: {what}", unexpected=True)


@dataclass(frozen=True, kw_only=True)
class Companion:
    """Another file event uploaded in the same request as this one: synced when still open."""

    pk: int
    uuid: str
    sent: dict[str, Any]
    digest: str


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How an attempt ended: the event's final state and, when synced, the mapping's values."""

    state: EventState
    uuid: str | None = None
    status: MappingStatus = MappingStatus.ACTIVE
    sent: dict[str, Any] | None = None  # None keeps the mapping's last payload
    digest: str | None = None  # None makes the next upsert send again
    note: str | None = None
    companions: tuple[Companion, ...] = ()
    # A certificate: DokStamp's status and public verification URL as it last answered
    # (None keeps what the mapping holds).
    remote_status: str | None = None
    verification_url: str | None = None
    # This event wrote the entity (created, changed or issued it): it becomes the mapping's
    # producer even when the UUID stays the same (a draft updated in place and issued).
    produced: bool = False

    @classmethod
    def synced(cls, *, uuid: str | None = None, status: MappingStatus = MappingStatus.ACTIVE,
               sent: dict[str, Any] | None = None, digest: str | None = None,
               note: str | None = None, companions: tuple[Companion, ...] = (),
               remote_status: str | None = None,
               verification_url: str | None = None, produced: bool = False) -> Outcome:
        return cls(state=EventState.SYNCED, uuid=uuid, status=status, sent=sent, digest=digest,
                   note=note, companions=companions, remote_status=remote_status,
                   verification_url=verification_url, produced=produced)


# -- how a run that did not sync ends: the engine decides, the store applies -----------------

@dataclass(frozen=True)
class Facts:
    """An open event as :meth:`.store.Store.conclude` hands it to the engine's decision."""

    attempts: int
    received_at: datetime
    first_failed_at: datetime | None


@dataclass(frozen=True, kw_only=True)
class Park:
    """Put the event back to ``waiting`` for ``delay`` seconds."""

    delay: float
    error: str
    waiting_for: str | None = None
    counted: bool = True  # a transient failure, counted against the retry budget
    now: datetime | None = None
    since: datetime | None = None  # the run's start: what it waits for, recorded since, ends it


@dataclass(frozen=True, kw_only=True)
class Letter:
    """Mark the event dead and file (or refresh) its open dead letter."""

    reason: str
    error: PermanentError | None = None


Decision = Outcome | Park | Letter
