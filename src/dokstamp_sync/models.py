"""The mapping store: the event inbox, the ERP -> DokStamp mapping, natural keys, dead letters.

Uniqueness that matters is a database constraint: one inbox row per ``event_id``, one mapping per
(entity, ERP key), one ERP key per DokStamp entity (entity, DokStamp UUID), one DokStamp entity
per (entity, natural key).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

from dokstamp_sync.db import Base, EnumText
from dokstamp_sync.events import entry_op
from dokstamp_sync.states import EventState, LetterStatus, MappingStatus, check_in

SHARED_FILES = "entity <> 'file'"  # the one entity whose DokStamp records keys may share
BigId = BigInteger().with_variant(Integer, "sqlite")  # SQLite autoincrements INTEGER only


def utcnow() -> datetime:
    return datetime.now(UTC)


class InboxEvent(Base):
    """The inbox: one ERP event and where it stands (docs/erp-guide.md)."""

    __tablename__ = "inbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_id: Mapped[str] = mapped_column(String(255), unique=True)
    entity: Mapped[str] = mapped_column(String(20))
    op: Mapped[str] = mapped_column(String(10))
    erp_key: Mapped[str] = mapped_column(String(255))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[EventState] = mapped_column(EnumText(EventState, 12),
                                              default=EventState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # transient failures so far
    deliveries: Mapped[int] = mapped_column(Integer, default=0)  # times a task started on it
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    waiting_for: Mapped[str | None] = mapped_column(String(300))  # "student:S-1"
    last_error: Mapped[str | None] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    first_failed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # When its final outcome was written to the outcome stream (docs/erp-guide.md); NULL until then
    # (the outbox: see :mod:`dokstamp_sync.pipeline.outbox`).
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A destructive event the change guard let through (counted within its threshold, or
    # released by an operator): never held afterwards (see :mod:`dokstamp_sync.guard`).
    admitted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_inbox_entity_key", "entity", "erp_key", "occurred_at"),
        Index("ix_inbox_due", "state", "next_attempt_at"),
        Index("ix_inbox_waiting_for", "waiting_for"),
        Index("ix_inbox_unreported", "finished_at", postgresql_where=text("reported_at IS NULL"),
              sqlite_where=text("reported_at IS NULL")),
        # Outcomes per minute (the console) and the retention's oldest final events.
        Index("ix_inbox_finished", "finished_at"),
        CheckConstraint(check_in("state", EventState), name="state"),
    )


class Mapping(Base):
    """ERP (entity, key) -> DokStamp UUID, with what was last sent and when."""

    __tablename__ = "mappings"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    entity: Mapped[str] = mapped_column(String(20))
    erp_key: Mapped[str] = mapped_column(String(255))
    dokstamp_uuid: Mapped[str] = mapped_column(String(64))
    status: Mapped[MappingStatus] = mapped_column(EnumText(MappingStatus, 12),
                                                  default=MappingStatus.ACTIVE)
    data_hash: Mapped[str | None] = mapped_column(String(64))
    sent: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # last payload sent
    occurred_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    event_id: Mapped[str | None] = mapped_column(String(255))
    synced_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # A certificate's status in DokStamp (draft, issued, revoked...) and its public
    # verification URL, as DokStamp last answered them (what the ERP prints on a diploma).
    remote_status: Mapped[str | None] = mapped_column(String(20))
    verification_url: Mapped[str | None] = mapped_column(String(500))
    # The event that produced ``dokstamp_uuid`` (created or found it), and its occurred_at:
    # kept while later events act on the same entity, replaced with the UUID. A revoke or
    # delete acts on this entity only when it was produced before it (docs/erp-guide.md); NULL
    # (mappings older than this column) is taken as produced before any event.
    produced_by: Mapped[str | None] = mapped_column(String(255))
    produced_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("uq_mappings_entity_erp_key", "entity", "erp_key", unique=True),
                      # One DokStamp entity per ERP key, but files: DokStamp deduplicates
                      # uploads, so equal contents are one file record for all their keys.
                      Index("uq_mappings_entity_dokstamp_uuid", "entity", "dokstamp_uuid",
                            unique=True, postgresql_where=text(SHARED_FILES),
                            sqlite_where=text(SHARED_FILES)),
                      Index("ix_mappings_dokstamp_uuid", "dokstamp_uuid"),  # lookups by UUID
                      CheckConstraint(check_in("status", MappingStatus), name="status"))


class NaturalKey(Base):
    """One DokStamp entity per natural key (e.g. student email): the constraint behind the lock."""

    __tablename__ = "natural_keys"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    entity: Mapped[str] = mapped_column(String(20))
    natural_key: Mapped[str] = mapped_column(String(512))
    dokstamp_uuid: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    __table_args__ = (Index("uq_natural_keys_entity_natural_key", "entity", "natural_key",
                            unique=True),
                      # Forgetting a deleted entity's keys looks them up by UUID.
                      Index("ix_natural_keys_entity_dokstamp_uuid", "entity", "dokstamp_uuid"))


class DeadLetter(Base):
    """An event that could not be synced, with everything an operator needs to fix it.

    ``event_pk`` is set for valid events; a malformed stream entry keeps its ``raw`` text,
    and with it the ``op`` it named (:attr:`entry_op`, when readable).
    Never holds a secret: the request is described by method and path only.
    """

    __tablename__ = "dead_letters"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    event_pk: Mapped[int | None] = mapped_column(ForeignKey("inbox.id"), index=True)
    event_id: Mapped[str | None] = mapped_column(String(255))
    entity: Mapped[str | None] = mapped_column(String(20))
    erp_key: Mapped[str | None] = mapped_column(String(255))
    reason: Mapped[str] = mapped_column(Text)
    http_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    request_method: Mapped[str | None] = mapped_column(String(10))
    request_path: Mapped[str | None] = mapped_column(String(500))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    raw: Mapped[str | None] = mapped_column(Text)
    stream_id: Mapped[str | None] = mapped_column(String(64), unique=True)  # malformed entries
    status: Mapped[LetterStatus] = mapped_column(EnumText(LetterStatus, 12),
                                                 default=LetterStatus.OPEN)
    first_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_failed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reported_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))  # as inbox's

    @property
    def entry_op(self) -> str | None:
        """A malformed entry's ``op`` as its raw text names it; None when unreadable (or for a
        valid event's letter, whose op is its event's)."""
        return entry_op(self.raw) if self.event_pk is None else None

    __table_args__ = (Index("ix_dead_letters_status_entity", "status", "entity"),
                      # The console's pages, newest first by keyset (id < the last shown).
                      Index("ix_dead_letters_status_id", "status", "id"),
                      Index("ix_dead_letters_entity_id", "entity", "id"),
                      Index("ix_dead_letters_unreported", "last_failed_at",
                            postgresql_where=text("reported_at IS NULL"),
                            sqlite_where=text("reported_at IS NULL")),
                      CheckConstraint(check_in("status", LetterStatus), name="status"))


class LetterHistory(Base):
    """What happened to a dead letter and who did it: every replay and discard from the
    console (or the CLI), kept with the operator's name and the time."""

    __tablename__ = "letter_history"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    letter_id: Mapped[int] = mapped_column(ForeignKey("dead_letters.id"), index=True)
    action: Mapped[str] = mapped_column(String(20))  # replayed, discarded, still_invalid
    actor: Mapped[str] = mapped_column(String(100))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
