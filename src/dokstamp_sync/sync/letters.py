"""The dead letters of the walk (docs/erp-guide.md): filing an event's letter, and what a
synced event does to the open letters of its entity: resolve those it makes stale (the same-kind
rule: an upsert never resolves a revoke's or a delete's letter), and, for a certificate's revoke
or delete, replay the refused re-issues newer than it. Only the store calls these, inside its
transactions."""

from __future__ import annotations

import logging

from sqlalchemy import and_, bindparam, exists, or_, select, update
from sqlalchemy.orm import Session

from dokstamp_sync.dokstamp.errors import PermanentError
from dokstamp_sync.events import entry_op
from dokstamp_sync.models import DeadLetter, InboxEvent, utcnow
from dokstamp_sync.replays import history, replay_event_letters
from dokstamp_sync.reporting import Result
from dokstamp_sync.states import EventState, LetterStatus
from dokstamp_sync.sync.outcomes import REISSUE_REFUSED
from dokstamp_sync.sync.statements import DESTRUCTIVE, EVENTS, LETTERS, _finish, _Finished

log = logging.getLogger("dokstamp_sync.sync")


def resolve_letters(session: Session, record: InboxEvent | _Finished,
                    ended: str | None = None) -> list[Result]:
    """What ``record`` having synced does to its entity's open letters: those it makes stale
    are resolved (their outcomes returned, ``superseded``); a certificate's revoke or delete
    that ended the certificate ``ended`` (its uuid: revoked or deleted by this event) replays
    the re-issues newer than it that were refused for that certificate."""
    results = _supersede(session, record)
    if ended is not None:
        _replay_refused_reissues(session, record, ended)
        _rerun_newer_upserts(session, record)
    return results


def _rerun_newer_upserts(session: Session, record: InboxEvent | _Finished) -> None:
    """A certificate's revoke or delete that arrived late ended the certificate: the upserts of
    it newer than the revoke that synced meanwhile without writing it (unchanged) are run
    again, due now, so that they meet the revoked certificate as they would have in the ERP's
    order (a dead letter: a new certificate needs a new file), instead of standing as synced."""
    if record.entity != "certificate" or record.op not in DESTRUCTIVE:
        return
    rerun = session.execute(
        update(EVENTS).where(
            EVENTS.c.entity == record.entity, EVENTS.c.erp_key == record.erp_key,
            EVENTS.c.op == "upsert", EVENTS.c.state == EventState.SYNCED,
            (EVENTS.c.occurred_at > record.occurred_at)
            | ((EVENTS.c.occurred_at == record.occurred_at) & (EVENTS.c.id > record.id)))
        .values(state=EventState.PENDING, finished_at=None, reported_at=None, attempts=0,
                deliveries=0, first_failed_at=None, next_attempt_at=utcnow(),
                last_error=f"run again: the older {record.op} {record.event_id} ended the "
                           "certificate after it synced")
        .returning(EVENTS.c.id)).all()
    if rerun:
        log.info("%s %s: %d newer upsert(s) run again after the late %s %s", record.entity,
                 record.erp_key, len(rerun), record.op, record.event_id)


# The open dead letters a newly synced event resolves (docs/erp-guide.md): those of the same entity
# whose event is older (the order of :func:`_newer`) and of the same kind (an upsert's by an
# upsert; a revoke's or delete's only by a revoke or delete: an upsert never resolves a
# destructive event's letter). Malformed stream entries that named the entity and key and were
# filed before the synced event was received follow the same rule by the op their raw text
# names (:func:`_malformed_resolved`); one whose op cannot be read is never resolved by itself.
_LETTERED = EVENTS.alias("lettered")
_SUPERSEDE = update(LETTERS).where(
    LETTERS.c.status == LetterStatus.OPEN, LETTERS.c.entity == bindparam("l_entity"),
    LETTERS.c.erp_key == bindparam("l_key"),
    or_(exists().where(_LETTERED.c.id == LETTERS.c.event_pk,
                       _LETTERED.c.op.in_(bindparam("l_ops", expanding=True)),
                       (_LETTERED.c.occurred_at < bindparam("occurred_at"))
                       | ((_LETTERED.c.occurred_at == bindparam("occurred_at"))
                          & (_LETTERED.c.id < bindparam("pk")))),
        LETTERS.c.id.in_(bindparam("l_malformed", expanding=True)))
).values(status=LetterStatus.SUPERSEDED, resolved_at=bindparam("l_now"),
         reported_at=None).returning(
    LETTERS.c.id, LETTERS.c.event_id, LETTERS.c.event_pk, LETTERS.c.raw)
# Every open letter of the entity (usually none: then nothing to update), and whether it is a
# malformed entry's filed before the synced event was received.
_OPEN = select(LETTERS.c.id, LETTERS.c.raw, and_(
    LETTERS.c.event_pk.is_(None), LETTERS.c.first_failed_at <= bindparam("received"))).where(
    LETTERS.c.status == LetterStatus.OPEN, LETTERS.c.entity == bindparam("l_entity"),
    LETTERS.c.erp_key == bindparam("l_key"))


def file_letter(session: Session, record: InboxEvent, reason: str,
                 error: PermanentError | None) -> DeadLetter:
    """Mark the event dead and file (or refresh) its open dead letter."""
    _finish(session, record, EventState.DEAD, reason)
    letter = session.scalar(select(DeadLetter).where(DeadLetter.event_pk == record.id,
                                                     DeadLetter.status == LetterStatus.OPEN))
    if letter is None:
        letter = DeadLetter(event_pk=record.id, event_id=record.event_id,
                            entity=record.entity, erp_key=record.erp_key,
                            first_failed_at=record.first_failed_at or utcnow())
        session.add(letter)
    letter.reason = reason
    letter.reported_at = None  # reported with its event's outcome
    letter.attempts = record.attempts + 1
    letter.last_failed_at = utcnow()
    if error is not None:
        letter.http_status = error.status
        letter.response_body = error.body
        letter.request_method = error.method
        letter.request_path = error.path
    session.flush()  # its id, for the outcome stream
    return letter


def _malformed_resolved(session: Session, record: InboxEvent | _Finished,
                        kinds: list[str]) -> list[int] | None:
    """The open letters of malformed entries of ``record``'s entity and key, filed before it
    was received, whose raw text names an op of ``kinds`` (the same-kind rule); an entry whose
    op cannot be read may be a revoke or a delete and stays open. None: the entity has no open
    letter at all (the common case)."""
    rows = session.execute(_OPEN, {
        "l_entity": record.entity, "l_key": record.erp_key, "received": record.received_at,
    }).all()
    if not rows:
        return None
    return [letter_id for letter_id, raw, malformed in rows
            if malformed and entry_op(raw) in kinds]


def _supersede(session: Session, record: InboxEvent | _Finished) -> list[Result]:
    """Resolve the open dead letters this synced event makes stale (one read of the entity's
    open letters; when there are any, one UPDATE); each is reported again as ``superseded``.
    A letter filed between the two (milliseconds apart, in one transaction) is left open, as
    one filed while the update ran always was."""
    kinds = ["upsert"] if record.op == "upsert" else list(DESTRUCTIVE)
    malformed = _malformed_resolved(session, record, kinds)
    if malformed is None:
        return []
    rows = session.execute(_SUPERSEDE, {
        "l_entity": record.entity, "l_key": record.erp_key, "l_ops": kinds,
        "occurred_at": record.occurred_at, "pk": record.id, "l_now": utcnow(),
        "l_malformed": malformed}).all()
    if not rows:
        return []
    pks = [event_pk for _, _, event_pk, _ in rows if event_pk is not None]
    ops = dict(session.execute(select(InboxEvent.id, InboxEvent.op)
                               .where(InboxEvent.id.in_(pks))).all()) if pks else {}
    reason = f"resolved: a newer event of this entity synced ({record.event_id})"
    log.info("%s %s: %d dead letter(s) resolved by event %s", record.entity, record.erp_key,
             len(rows), record.event_id)
    return [Result(event_id=event_id, entity=record.entity, key=record.erp_key,
                   op=ops.get(event_pk) if event_pk is not None else entry_op(raw),
                   state=EventState.SUPERSEDED, at=utcnow(),
                   reason=reason, dead_letter_id=letter_id)
            for letter_id, event_id, event_pk, raw in rows]


def _replay_refused_reissues(session: Session, record: InboxEvent | _Finished,
                             ended: str) -> list[int]:
    """A certificate's revoke or delete just synced: the open dead letters of upserts of the
    same certificate **newer** than it that died refusing to change the issued certificate
    ("... revoke it and issue a new one") are replayed, as ``dlq replay`` would (their events
    pending, due now), if the certificate they were refused for is ``ended``, the one this
    revoke acted on (a revoke that left everything alone replays nothing). In the ERP's order
    they come after this revoke, so they apply now (a re-issue that arrived before the older
    revoke creates its certificate). Returns the letters replayed."""
    if record.entity != "certificate" or record.op not in DESTRUCTIVE:
        return []
    ids = list(session.scalars(
        select(LETTERS.c.id).join(EVENTS, EVENTS.c.id == LETTERS.c.event_pk).where(
            LETTERS.c.status == LetterStatus.OPEN, EVENTS.c.state == EventState.DEAD,
            EVENTS.c.entity == record.entity, EVENTS.c.erp_key == record.erp_key,
            EVENTS.c.op == "upsert", LETTERS.c.reason.like(f"%{REISSUE_REFUSED}"),
            LETTERS.c.reason.contains(f"({ended})", autoescape=True),
            (EVENTS.c.occurred_at > record.occurred_at)
            | ((EVENTS.c.occurred_at == record.occurred_at) & (EVENTS.c.id > record.id)))
        .order_by(LETTERS.c.id)))
    if not ids:
        return []
    now = utcnow()
    replayed = replay_event_letters(session, ids, now)
    actor = f"dokstamp-sync: {record.op} {record.event_id} synced"[:100]
    history(session, "replayed", replayed, actor, now)
    log.info("%s %s: %d refused re-issue(s) replayed after %s %s synced", record.entity,
             record.erp_key, len(replayed), record.op, record.event_id)
    return replayed

