"""The named states of an inbox event, a mapping and a dead letter (docs/erp-guide.md).

Each is a ``StrEnum``: stored as its plain value, compared equal to it, and checked by a CHECK
constraint in the database. The groups the code asks about (open events, final events, mapped
entities that still exist in DokStamp) are defined here once.
"""

from __future__ import annotations

from enum import StrEnum


class EventState(StrEnum):
    PENDING = "pending"  # received, not tried yet
    WAITING = "waiting"  # parked: a dependency, or a retry after a transient failure
    SYNCED = "synced"
    SUPERSEDED = "superseded"  # a newer event for the same entity took its place
    DEAD = "dead"  # a dead letter says why
    HELD = "held"  # a destructive change the guard holds for an operator (docs/guard.md)
    DISCARDED = "discarded"  # an operator dropped it while it was held


OPEN: tuple[EventState, ...] = (EventState.PENDING, EventState.WAITING)
FINAL: tuple[EventState, ...] = (EventState.SYNCED, EventState.SUPERSEDED, EventState.DEAD,
                                 EventState.DISCARDED)
# States reported on the outcome stream (docs/erp-guide.md): the final ones, and ``held``
# (not final: its final outcome follows once an operator released or discarded it).
REPORTED: tuple[EventState, ...] = (*FINAL, EventState.HELD)


class MappingStatus(StrEnum):
    """What the mapped DokStamp entity is, as far as dokstamp-sync knows."""

    ACTIVE = "active"
    ARCHIVED = "archived"  # a delete was refused (dependents), so it was archived instead
    REVOKED = "revoked"  # a certificate
    EXPIRED = "expired"  # a certificate DokStamp expired (its validity ended), not revocable
    DELETED = "deleted"


# Mapped entities that still exist in DokStamp (others may refer to them).
EXISTING: tuple[MappingStatus, ...] = (MappingStatus.ACTIVE, MappingStatus.ARCHIVED,
                                       MappingStatus.REVOKED, MappingStatus.EXPIRED)


class LetterStatus(StrEnum):
    """A dead letter: ``open`` needs someone; the others are resolved."""

    OPEN = "open"
    REPLAYED = "replayed"
    DISCARDED = "discarded"
    SUPERSEDED = "superseded"  # a newer event of the same entity synced


def check_in(column: str, values: type[StrEnum]) -> str:
    """The SQL of a CHECK constraint keeping ``column`` to the enum's values."""
    return f"{column} IN ({', '.join(repr(v.value) for v in values)})"


class RunState(StrEnum):
    """What a run reports when it did not (or could not) record a state of the event's own:
    never stored in the database."""

    BUSY = "busy"  # another worker holds the entity's lock: tried again shortly
    MISSING = "missing"  # no inbox event with that primary key
    ERROR = "error"  # the run failed before it could record anything (the database away)


class CertificateStatus(StrEnum):
    """A certificate's ``status`` as DokStamp answers it (the API's words, not ours)."""

    DRAFT = "draft"
    ISSUED = "issued"
    REVOKED = "revoked"
    EXPIRED = "expired"
    DELETED = "deleted"  # ours: a draft we deleted (DokStamp keeps no such certificate)


# Where a certificate ends: nothing is left to revoke.
ENDED: tuple[CertificateStatus, ...] = (CertificateStatus.REVOKED, CertificateStatus.EXPIRED)
