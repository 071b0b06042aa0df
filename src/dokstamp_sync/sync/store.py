"""Queries and writes on the mapping store used by the graph walk. Functions take a session and
never commit: the caller (the engine's short transactions) does."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timedelta
from hashlib import sha256
from typing import Any

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.orm import Session

from dokstamp_sync.db import insert_ignore
from dokstamp_sync.dokstamp.errors import PermanentError
from dokstamp_sync.models import DeadLetter, EventRecord, Mapping, NaturalKey, utcnow

log = logging.getLogger("dokstamp_sync.sync")
ACTIVE = ("active", "archived", "revoked")  # mapped entities that still exist in DokStamp


def data_hash(payload: Any) -> str:
    return sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def get_mappings(session: Session, keys: list[tuple[str, str]]) -> dict[tuple[str, str], Mapping]:
    """Several mappings in one query, by (entity, ERP key)."""
    if not keys:
        return {}
    rows = session.scalars(select(Mapping).where(
        tuple_(Mapping.entity, Mapping.erp_key).in_(keys)))
    return {(m.entity, m.erp_key): m for m in rows}


def get_mapping(session: Session, entity: str, key: str) -> Mapping | None:
    return session.scalar(select(Mapping).where(Mapping.entity == entity,
                                                Mapping.erp_key == key))


def latest_event(session: Session, entity: str, key: str) -> EventRecord | None:
    """The newest event for an entity that has not been superseded."""
    return session.scalar(
        select(EventRecord)
        .where(EventRecord.entity == entity, EventRecord.erp_key == key,
               EventRecord.state != "superseded")
        .order_by(EventRecord.occurred_at.desc(), EventRecord.id.desc()).limit(1))


def newer_event_exists(session: Session, record: EventRecord) -> bool:
    """Is there a newer event for the same entity, already synced or still to be synced?

    Newer means a later ``occurred_at``, or the same one received later (a higher id). A synced
    delete counts too, so an older upsert arriving after it cannot bring the entity back.
    """
    return session.scalar(
        select(EventRecord.id).where(
            EventRecord.entity == record.entity, EventRecord.erp_key == record.erp_key,
            EventRecord.state.in_(("pending", "waiting", "synced")),
            EventRecord.id != record.id,
            (EventRecord.occurred_at > record.occurred_at)
            | ((EventRecord.occurred_at == record.occurred_at)
               & (EventRecord.id > record.id))).limit(1)) is not None


def known_uuid(session: Session, entity: str, key: str) -> str | None:
    return session.scalar(select(NaturalKey.dokstamp_uuid).where(
        NaturalKey.entity == entity, NaturalKey.natural_key == key))


def forget_natural_keys(session: Session, entity: str, uuid: str) -> None:
    """A deleted entity's natural keys are free again: a later upsert searches and creates."""
    session.execute(delete(NaturalKey).where(NaturalKey.entity == entity,
                                             NaturalKey.dokstamp_uuid == uuid))


def remember_natural_key(session: Session, entity: str, key: str, uuid: str) -> str:
    """Record natural key -> UUID; return the UUID the database holds for it (maybe another)."""
    inserted = insert_ignore(session, NaturalKey.__table__,  # type: ignore[arg-type]
                             {"entity": entity, "natural_key": key, "dokstamp_uuid": uuid,
                              "created_at": utcnow()}, ["entity", "natural_key"])
    return uuid if inserted is not None else (known_uuid(session, entity, key) or uuid)


def save_mapping(session: Session, record: EventRecord, uuid: str, *, status: str = "active",
                 sent: dict[str, Any] | None = None, digest: str | None = None) -> Mapping:
    mapping = get_mapping(session, record.entity, record.erp_key)
    if mapping is None:
        mapping = Mapping(entity=record.entity, erp_key=record.erp_key, dokstamp_uuid=uuid)
        session.add(mapping)
    mapping.dokstamp_uuid = uuid
    mapping.status = status
    if sent is not None:
        mapping.sent = sent
    mapping.data_hash = digest  # None after a delete or archive: the next upsert is sent
    mapping.occurred_at = record.occurred_at
    mapping.event_id = record.event_id
    mapping.synced_at = utcnow()
    return mapping


def finish(session: Session, record: EventRecord, state: str, error: str | None = None) -> None:
    """Mark an event final; when synced, wake the events that waited for its entity."""
    record.state = state
    record.finished_at = utcnow()
    record.waiting_for = None
    if error is not None:
        record.last_error = error
    if state == "synced":
        session.execute(update(EventRecord).where(
            EventRecord.state == "waiting",
            EventRecord.waiting_for == f"{record.entity}:{record.erp_key}",
        ).values(next_attempt_at=utcnow()))


def dead_letter(session: Session, record: EventRecord, reason: str,
                error: PermanentError | None = None) -> DeadLetter:
    """Mark the event dead and file (or refresh) its open dead letter."""
    finish(session, record, "dead", reason)
    letter = session.scalar(select(DeadLetter).where(DeadLetter.event_pk == record.id,
                                                     DeadLetter.status == "open"))
    if letter is None:
        letter = DeadLetter(event_pk=record.id, event_id=record.event_id,
                            entity=record.entity, erp_key=record.erp_key,
                            first_failed_at=record.first_failed_at or utcnow())
        session.add(letter)
    letter.reason = reason
    letter.attempts = record.attempts + 1
    letter.last_failed_at = utcnow()
    if error is not None:
        letter.http_status = error.status
        letter.response_body = error.body
        letter.request_method = error.method
        letter.request_path = error.path
    return letter


def park(record: EventRecord, *, delay: float, error: str, waiting_for: str | None = None,
         count: bool = True, now: datetime | None = None) -> None:
    """Put an event back to ``waiting`` until ``delay`` seconds from now.

    ``count``: a transient failure, counted against the retry budget.
    """
    now = now or utcnow()
    record.state = "waiting"
    record.last_error = error
    record.waiting_for = waiting_for
    record.next_attempt_at = now + timedelta(seconds=delay)
    if count:
        record.attempts += 1
        record.first_failed_at = record.first_failed_at or now


def log_outcome(record: EventRecord, state: str, detail: str | None = None) -> None:
    """The one log line per event outcome (fields for JSON logs; never a secret)."""
    log.info("event %s %s %s %s -> %s%s", record.event_id, record.entity, record.erp_key,
             record.op, state, f": {detail}" if detail else "",
             extra={"event_id": record.event_id, "entity": record.entity,
                    "key": record.erp_key, "op": record.op, "state": state})
