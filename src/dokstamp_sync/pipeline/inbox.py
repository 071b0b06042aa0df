"""Writing stream entries into the inbox: one multi-row INSERT per batch, entry by entry when the
database refuses it, and a dead letter for every entry that is not a storable event; and the
operator's transitions of dead letters (replayed: its event dead -> pending; discarded).

No entry can take its batch down: the bulk INSERT is the fast path; if the database refuses it,
each entry is written again in its own savepoint, so only the entries it refuses become dead
letters. A dead letter the database refuses in turn is written once more as a last resort (the
reason and a short, safe excerpt); an entry even that cannot be written is left out of the
acknowledgement (it stays pending and is tried again) instead of failing the others. Only a
database that is away (a lost connection, a timeout, a lock) fails the batch: nothing is then
acknowledged, and the whole batch is read again.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session

from dokstamp_sync.db import dialect_insert, insert_ignore
from dokstamp_sync.events import Event, InvalidEvent, entry_op, parse_event
from dokstamp_sync.held import destructive
from dokstamp_sync.limits import FILE_MAX_BYTES, safe_text
from dokstamp_sync.models import DeadLetter, InboxEvent, utcnow
from dokstamp_sync.pipeline.results import Result, reused_reason
from dokstamp_sync.replays import replay_event_letters
from dokstamp_sync.states import EventState, LetterStatus

log = logging.getLogger("dokstamp_sync.pipeline.ingest")

StreamEntry = tuple[bytes, dict[bytes, bytes]]  # (entry id, fields), as redis-py answers
EXCERPT = 200  # characters of a malformed entry kept by the last resort (and shown by dlq list)
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")
_PASSWORD = re.compile(r"(password\s*[=:]\s*)\S+", re.IGNORECASE)


@dataclass(frozen=True)
class Entry:
    """One stream entry, parsed: its event, or the reason it is none and what it says it is."""

    stream_id: str
    raw: str  # the text as received, NUL and invalid code points escaped (storable)
    event: Event | None
    reason: str | None = None
    event_id: str | None = None
    entity: str | None = None
    key: str | None = None


@dataclass
class Recorded:
    """What a batch left: the new events' primary keys (stream order) and the entries that
    could not be written at all (entry id -> why), which must not be acknowledged; the dead
    letters filed, as outcomes to report once the batch is committed."""

    new: list[int] = field(default_factory=list)
    failed: dict[bytes, str] = field(default_factory=dict)
    letters: list[Result] = field(default_factory=list)
    # (entity, event_id) of the new deletes and revokes: the change guard counts arrivals
    arrivals: list[tuple[str, str]] = field(default_factory=list)


def describe_error(exc: BaseException) -> str:
    """One short line about ``exc``, fit for a dead letter or Redis: the driver's first line,
    a URL's password and any ``password=...`` masked."""
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    text = str(orig if orig is not None else exc).strip().splitlines()
    line = f"{type(orig or exc).__name__}: {text[0] if text else ''}".rstrip(": ")
    line = _PASSWORD.sub(r"\1***", _URL_PASSWORD.sub(r"\1***@", line))
    return safe_text(line)[:300]


def parse_entry(stream_id: str, fields: dict[bytes, bytes],
                max_file_bytes: int = FILE_MAX_BYTES) -> Entry:
    """Parse one entry; never raises (a parser bug is a dead letter too, not a stuck stream)."""
    body = fields.get(b"event")
    raw = safe_text(body.decode("utf-8", "backslashreplace")) if body is not None else \
        safe_text(json.dumps({k.decode("utf-8", "backslashreplace"):
                              v.decode("utf-8", "backslashreplace")
                              for k, v in fields.items()}, ensure_ascii=False))
    try:
        if body is None:
            raise InvalidEvent("stream entry has no 'event' field")
        event = parse_event(body, max_file_bytes=max_file_bytes)
    except InvalidEvent as exc:
        return Entry(stream_id, raw, None, f"invalid event: {exc.reason}", exc.event_id,
                     exc.entity, exc.key)
    except Exception as exc:
        log.exception("stream entry %s could not be parsed", stream_id)
        return Entry(stream_id, raw, None, f"invalid event: could not be parsed "
                     f"({describe_error(exc)})")
    return Entry(stream_id, raw, event, None, event.event_id, event.entity, event.key)


def _away(exc: Exception) -> bool:
    """The database is away or busy (retry the batch later), rather than refusing the data.
    A program limit (SQLSTATE class 54: an index row or a JSON value too large) is the data's."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    state = getattr(exc.orig, "sqlstate", None) or getattr(exc.orig, "pgcode", None) or ""
    return isinstance(exc, OperationalError) and not str(state).startswith("54")


def _column(value: str | None, size: int) -> str | None:
    return safe_text(value)[:size] or None if value else None


def dead_letter(session: Session, entry: Entry, reason: str,
                results: list[Result] | None = None, *, refused_duplicate: bool = False) -> None:
    """File ``entry`` as an open dead letter (once per stream entry id), keeping its
    ``event_id``, ``entity`` and ``key`` when it has them. If the database refuses the letter,
    a last resort keeps the reason and an excerpt; if even that fails, the error propagates.
    A new letter is added to ``results`` (its outcome, reported after the commit)."""
    now = utcnow()
    reason = safe_text(reason)
    event_id, entity, key = (_column(entry.event_id, 255), _column(entry.entity, 20),
                             _column(entry.key, 255))
    values = {"stream_id": entry.stream_id, "event_id": event_id, "entity": entity,
              "erp_key": key,
              "reason": reason, "raw": entry.raw, "attempts": 1, "status": LetterStatus.OPEN,
              "first_failed_at": now, "last_failed_at": now}
    table = DeadLetter.__table__
    try:
        with session.begin_nested():
            letter_id = insert_ignore(session, table, values,  # type: ignore[arg-type]
                                      ["stream_id"])
    except Exception as exc:
        if _away(exc):
            raise
        log.error("stream entry %s: the dead letter was refused (%s); keeping an excerpt",
                  entry.stream_id, describe_error(exc))
        with session.begin_nested():
            letter_id = insert_ignore(session, table, values | {  # type: ignore[arg-type]
                "event_id": None, "entity": None, "erp_key": None,
                "raw": entry.raw[:EXCERPT],
                "reason": f"{reason[:2000]} (the entry could not be stored whole: "
                          f"{describe_error(exc)})"}, ["stream_id"])
    log.warning("stream entry %s is not a valid event: %s", entry.stream_id, reason,
                extra={"event_id": values["event_id"], "state": EventState.DEAD})
    if letter_id is not None and results is not None:  # None: filed when first delivered
        results.append(Result(
            event_id=event_id, entity=entity, key=key,
            op=entry.event.op if entry.event is not None else entry_op(entry.raw),
            state=EventState.DEAD,
            at=now, reason=reason, dead_letter_id=letter_id,
            refused_duplicate=refused_duplicate))


def _row(event: Event, lease: float) -> dict[str, Any]:
    now = utcnow()
    return {"event_id": event.event_id, "entity": event.entity, "op": event.op,
            "erp_key": event.key, "occurred_at": event.occurred_at,
            "payload": event.model_dump(mode="json"), "state": EventState.PENDING,
            "attempts": 0, "deliveries": 0, "received_at": now,
            # Dispatched right away; the scheduler re-dispatches if this lease runs out.
            "next_attempt_at": now + timedelta(seconds=lease)}


def _reused(session: Session, entry: Entry, results: list[Result]) -> None:
    # An ERP bug: keep it visible, never drop it silently.
    # Reported with refused_duplicate (docs/erp-guide.md): not the outcome of the kept event.
    dead_letter(session, entry, reused_reason(entry.event_id), results, refused_duplicate=True)


def record_oversized(session: Session, entry_id: bytes, size: int,
                     batch_bytes: int) -> list[Result]:
    """File a stream entry too large for any batch as a dead letter, never having read it
    (nothing of it is kept but its id and size); its outcome is returned for reporting."""
    results: list[Result] = []
    entry = Entry(entry_id.decode(), "", None)
    dead_letter(session, entry, f"invalid event: the stream entry is {size} bytes, more than "
                f"one batch may read ({batch_bytes} bytes, DOKSTAMP_SYNC_INGEST_BATCH_BYTES); "
                "it was never read", results)
    return results


def record_entry(session: Session, stream_id: str, fields: dict[bytes, bytes], lease: float,
                 *, max_file_bytes: int = FILE_MAX_BYTES) -> int | None:
    """Store one stream entry in its own savepoint; return the new event's primary key (None:
    nothing new). An entry the database refuses becomes a dead letter."""
    return _record_one(session, parse_entry(stream_id, fields, max_file_bytes), lease, [])


def _record_one(session: Session, entry: Entry, lease: float,
                results: list[Result]) -> int | None:
    if entry.event is None:
        dead_letter(session, entry, entry.reason or "invalid event", results)
        return None
    row = _row(entry.event, lease)
    try:
        with session.begin_nested():
            pk = insert_ignore(session, InboxEvent.__table__,  # type: ignore[arg-type]
                               row, ["event_id"])
            known = None if pk is not None else session.scalar(
                select(InboxEvent.payload).where(InboxEvent.event_id == entry.event_id))
    except Exception as exc:
        if _away(exc):
            raise
        dead_letter(session, entry, f"refused by the database: {describe_error(exc)}", results)
        return None
    if pk is None and known != row["payload"]:
        _reused(session, entry, results)
    return pk


def record_entries(session: Session, entries: Sequence[StreamEntry], lease: float, *,
                   max_file_bytes: int = FILE_MAX_BYTES) -> Recorded:
    """Store a batch of stream entries (see the module's docstring for what may fail how)."""
    parsed = [parse_entry(entry_id.decode(), fields, max_file_bytes)
              for entry_id, fields in entries]
    try:
        with session.begin_nested():
            letters: list[Result] = []
            arrivals: list[tuple[str, str]] = []
            new = _record_bulk(session, parsed, lease, letters, arrivals)
            return Recorded(new, letters=letters, arrivals=arrivals)
    except Exception as exc:
        if _away(exc):
            raise  # the database, not the data: the caller tries the batch again
        log.warning("the database refused a batch of %d entries (%s); writing them one by one",
                    len(entries), describe_error(exc))
    recorded = Recorded()
    for (entry_id, _), entry in zip(entries, parsed, strict=True):
        letters = []
        try:
            pk = _record_one(session, entry, lease, letters)
        except Exception as exc:
            if _away(exc):
                raise
            recorded.failed[entry_id] = describe_error(exc)
            log.error("stream entry %s could not be recorded, not even as a dead letter (%s); "
                      "it stays pending", entry.stream_id, recorded.failed[entry_id])
            continue
        recorded.letters += letters
        if pk is not None:
            recorded.new.append(pk)
            if entry.event is not None and destructive(entry.event.op):
                recorded.arrivals.append((entry.event.entity, entry.event.event_id))
    return recorded


def _record_bulk(session: Session, entries: Sequence[Entry], lease: float,
                 results: list[Result], arrivals: list[tuple[str, str]]) -> list[int]:
    rows: dict[str, dict[str, Any]] = {}  # by event_id: the first entry with it is the one
    origin: dict[str, Entry] = {}
    repeats: list[tuple[Entry, dict[str, Any]]] = []
    for entry in entries:
        if entry.event is None:
            dead_letter(session, entry, entry.reason or "invalid event", results)
            continue
        row = _row(entry.event, lease)
        if entry.event.event_id in rows:
            repeats.append((entry, row))
        else:
            rows[entry.event.event_id] = row
            origin[entry.event.event_id] = entry
    if not rows:
        return []
    table = InboxEvent.__table__
    stmt = dialect_insert(session.get_bind().dialect.name)(table).values(list(rows.values()))
    inserted: dict[str, int] = dict(session.execute(
        stmt.on_conflict_do_nothing(index_elements=["event_id"])
        .returning(table.c.event_id, table.c.id)).all())
    existed = [event_id for event_id in rows if event_id not in inserted]
    known: dict[str, Any] = dict(session.execute(
        select(InboxEvent.event_id, InboxEvent.payload)
        .where(InboxEvent.event_id.in_(existed))).all()) if existed else {}
    for event_id, row in rows.items():
        if event_id not in inserted and known.get(event_id) != row["payload"]:
            _reused(session, origin[event_id], results)
    for entry, row in repeats:  # compared with the copy that is kept
        event_id = row["event_id"]
        kept = rows[event_id]["payload"] if event_id in inserted else known.get(event_id)
        if kept != row["payload"]:
            _reused(session, entry, results)
    arrivals += [(e.entity, event_id) for event_id in inserted
                 if (e := origin[event_id].event) is not None and destructive(e.op)]
    return sorted(inserted.values())


@dataclass
class Replayed:
    """What one batch of :func:`replay_letters` did, by letter id."""

    replayed: list[int] = field(default_factory=list)
    still_invalid: list[int] = field(default_factory=list)
    not_open: list[int] = field(default_factory=list)


def replay_letters(session: Session, ids: Sequence[int], now: datetime) -> Replayed:
    """Replay the open letters among ``ids`` (one short transaction is the caller's): each
    becomes ``replayed`` and its event, if dead, ``pending`` as if just received (attempts and
    deliveries reset, a fresh dependency timeout, due now, its next outcome reported again,
    docs/erp-guide.md). A malformed stream entry is parsed again: still invalid, it stays open with
    its reason refreshed; valid, it is recorded as a new event. Letters no longer open (replayed,
    discarded, superseded, or resolved meanwhile by a worker) are left as they are."""
    done = Replayed(replayed=replay_event_letters(session, ids, now))
    malformed = session.scalars(select(DeadLetter).where(
        DeadLetter.id.in_(ids), DeadLetter.status == LetterStatus.OPEN,
        DeadLetter.event_pk.is_(None)).with_for_update())
    for letter in malformed:
        try:
            parse_event(letter.raw or "")
        except InvalidEvent as exc:
            letter.reason, letter.last_failed_at = f"invalid event: {exc.reason}", now
            letter.attempts += 1
            done.still_invalid.append(letter.id)
            continue
        record_entry(session, f"replay-{letter.id}", {b"event": (letter.raw or "").encode()},
                     lease=0)
        letter.status, letter.resolved_at = LetterStatus.REPLAYED, now
        letter.reported_at = letter.reported_at or now
        done.replayed.append(letter.id)
    acted = set(done.replayed) | set(done.still_invalid)
    done.not_open = [i for i in ids if i not in acted]
    return done


def discard_letters(session: Session, ids: Sequence[int], now: datetime) -> list[int]:
    """Mark the open letters among ``ids`` ``discarded`` (on purpose: their events stay dead);
    returns those it discarded."""
    letters = DeadLetter.__table__.c
    return list(session.scalars(
        update(DeadLetter).where(letters.id.in_(ids), letters.status == LetterStatus.OPEN)
        .values(status=LetterStatus.DISCARDED, resolved_at=now).returning(letters.id)))
