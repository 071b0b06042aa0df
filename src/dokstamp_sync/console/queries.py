"""What the console's pages read: each a short query on an index, so that a page stays fast
with 100,000 dead letters (``bench/console.py`` measures it).

Lists are newest first and paged by keyset (``id < the last id shown``), never by OFFSET, so
the hundredth page costs what the first does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from typing import Any

import redis
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from dokstamp_sync.models import DeadLetter, InboxEvent, LetterHistory, Mapping, utcnow
from dokstamp_sync.ops.status import report
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.states import EventState, LetterStatus

PAGE = 50  # rows per page
RELATED = 50  # an ERP key's other events shown at most
REASONS_OF = 5000  # the overview's reasons: among this many newest open letters
MALFORMED = "malformed"  # the entity shown for (and filtering) letters with none


ID_MAX = 2**63 - 1  # PostgreSQL's bigint: a larger number is no id (and would fail a query)


def row_id(value: Any) -> int | None:
    """``value`` as a row id when it is one (ASCII digits, 1 to :data:`ID_MAX`), else None."""
    if not isinstance(value, str) or not (value.isascii() and value.isdigit()):
        return None
    n = int(value)
    return n if 0 < n <= ID_MAX else None


def clean(value: Any) -> str:
    """A text parameter as a query may use it: stripped, without NUL (PostgreSQL refuses it)."""
    return (value if isinstance(value, str) else "").replace("\x00", "").strip()


@dataclass(frozen=True)
class Filter:
    """The dead-letter list's filter (every field optional; ``status`` open by default)."""

    entity: str = ""  # MALFORMED: the letters with no entity (malformed stream entries)
    status: str = LetterStatus.OPEN.value  # "" for every status
    http_status: int | None = None
    reason: str = ""  # text the reason contains (case-insensitive, literally)
    since: date | None = None  # last failure on or after (UTC day)
    until: date | None = None  # last failure on or before (UTC day)

    @classmethod
    def from_params(cls, params: Any) -> Filter:
        def day(name: str) -> date | None:
            try:
                return date.fromisoformat(params.get(name) or "")
            except ValueError:
                return None

        status = params.get("status", LetterStatus.OPEN.value)
        code = row_id(params.get("http_status"))  # not an HTTP status: no such filter
        return cls(entity=clean(params.get("entity")),
                   status=status if status in {s.value for s in LetterStatus} else "",
                   http_status=code if code is not None and 100 <= code <= 599 else None,
                   reason=clean(params.get("reason")), since=day("since"),
                   until=day("until"))

    def params(self) -> dict[str, str]:
        """The filter as query parameters (for links and hidden form fields)."""
        return {"entity": self.entity, "status": self.status,
               "http_status": str(self.http_status or ""), "reason": self.reason,
               "since": self.since.isoformat() if self.since else "",
               "until": self.until.isoformat() if self.until else ""}

    def apply(self, query: Select[Any]) -> Select[Any]:
        if self.entity == MALFORMED:
            query = query.where(DeadLetter.entity.is_(None))
        elif self.entity:
            query = query.where(DeadLetter.entity == self.entity)
        if self.status:
            query = query.where(DeadLetter.status == self.status)
        if self.http_status is not None:
            query = query.where(DeadLetter.http_status == self.http_status)
        if self.reason:
            # Taken literally: % and _ in the text are no wildcards.
            query = query.where(DeadLetter.reason.icontains(self.reason, autoescape=True))
        if self.since:
            query = query.where(DeadLetter.last_failed_at >= datetime.combine(
                self.since, time.min).replace(tzinfo=utcnow().tzinfo))
        if self.until:
            query = query.where(DeadLetter.last_failed_at < datetime.combine(
                self.until + timedelta(days=1), time.min).replace(tzinfo=utcnow().tzinfo))
        return query


@dataclass
class Page:
    rows: list[Any]
    next_before: int | None  # the keyset of the next page; None on the last one
    extra: dict[str, Any] = field(default_factory=dict)


def letters(session: Session, f: Filter, before: int | None = None,
            size: int = PAGE) -> Page:
    """A page of dead letters matching ``f``, newest first, older than ``before``."""
    query = f.apply(select(DeadLetter)).order_by(DeadLetter.id.desc()).limit(size + 1)
    if before is not None:
        query = query.where(DeadLetter.id < before)
    rows = list(session.scalars(query))
    more = len(rows) > size
    rows = rows[:size]
    return Page(rows, rows[-1].id if more and rows else None)


def count(session: Session, f: Filter) -> int:
    return int(session.scalar(f.apply(select(func.count()).select_from(DeadLetter))) or 0)


def ids(session: Session, f: Filter, before: int | None, size: int) -> list[int]:
    """Up to ``size`` ids matching ``f`` below ``before``, newest first (a batch to act on)."""
    query = f.apply(select(DeadLetter.id)).order_by(DeadLetter.id.desc()).limit(size)
    if before is not None:
        query = query.where(DeadLetter.id < before)
    return list(session.scalars(query))


def overview(session: Session, client: redis.Redis, stream: str,
             keys: RedisKeys = RedisKeys()) -> dict[str, Any]:
    """The overview page: open events, depths, oldest age, events held by the change guard
    per kind (the status report's ``held``), letters by entity and reason, outcomes in the
    last minute and the last ten (``keys``: the deployment's Redis names)."""
    status = report(session, client, stream, finals=False, keys=keys)
    open_letters = select(func.count()).where(DeadLetter.status == LetterStatus.OPEN)
    by_entity = session.execute(
        open_letters.add_columns(DeadLetter.entity).group_by(DeadLetter.entity)
        .order_by(func.count().desc())).all()
    # Reasons among the newest open letters only: grouping free text over every open letter
    # is what made this page slow with 100,000 of them.
    newest = (select(DeadLetter.reason).where(DeadLetter.status == LetterStatus.OPEN)
              .order_by(DeadLetter.id.desc()).limit(REASONS_OF).subquery())
    by_reason = session.execute(
        select(func.count(), newest.c.reason).group_by(newest.c.reason)
        .order_by(func.count().desc()).limit(10)).all()
    now = utcnow()
    outcomes: dict[str, list[int]] = {s.value: [0, 0] for s in EventState if s not in (
        EventState.PENDING, EventState.WAITING)}
    for minutes, slot in ((1, 0), (10, 1)):
        for state, n in session.execute(
                select(InboxEvent.state, func.count())
                .where(InboxEvent.finished_at >= now - timedelta(minutes=minutes))
                .group_by(InboxEvent.state)):
            outcomes.setdefault(state, [0, 0])[slot] = n
    return status | {"by_entity": [(e or MALFORMED, n) for n, e in by_entity],
                     "by_reason": [(r, n) for n, r in by_reason],
                     "outcomes": outcomes}


def letter(session: Session, letter_id: int) -> dict[str, Any] | None:
    """A letter with its event, the ERP key's other events, its mapping and its history."""
    found = session.get(DeadLetter, letter_id)
    if found is None:
        return None
    event = session.get(InboxEvent, found.event_pk) if found.event_pk else None
    related: list[InboxEvent] = []
    mapping = None
    if found.entity and found.erp_key:
        related = list(session.scalars(
            select(InboxEvent).where(InboxEvent.entity == found.entity,
                                     InboxEvent.erp_key == found.erp_key)
            .order_by(InboxEvent.occurred_at.desc()).limit(RELATED)))
        mapping = session.scalar(select(Mapping).where(Mapping.entity == found.entity,
                                                       Mapping.erp_key == found.erp_key))
    history = list(session.scalars(select(LetterHistory).where(
        LetterHistory.letter_id == letter_id).order_by(LetterHistory.id)))
    return {"letter": found, "event": event, "related": related, "mapping": mapping,
            "history": history}


def waiting(session: Session, before: int | None = None, size: int = PAGE) -> Page:
    """Waiting events (why, until when, which dependency), newest first."""
    query = (select(InboxEvent).where(InboxEvent.state == EventState.WAITING)
             .order_by(InboxEvent.id.desc()).limit(size + 1))
    if before is not None:
        query = query.where(InboxEvent.id < before)
    rows = list(session.scalars(query))
    more = len(rows) > size
    rows = rows[:size]
    return Page(rows, rows[-1].id if more and rows else None)


def mapping(session: Session, entity: str, key: str) -> dict[str, Any]:
    """A mapping lookup: entity + ERP key -> UUID, status, verification URL, its events."""
    found = session.scalar(select(Mapping).where(Mapping.entity == entity,
                                                 Mapping.erp_key == key))
    events = list(session.scalars(
        select(InboxEvent).where(InboxEvent.entity == entity, InboxEvent.erp_key == key)
        .order_by(InboxEvent.occurred_at.desc()).limit(RELATED)))
    letters_of_key = list(session.scalars(
        select(DeadLetter).where(DeadLetter.entity == entity, DeadLetter.erp_key == key)
        .order_by(DeadLetter.id.desc()).limit(RELATED)))
    return {"mapping": found, "events": events, "letters": letters_of_key}
