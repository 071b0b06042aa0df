"""A certificate's whole lifecycle in DokStamp (docs/erp-guide.md), in one place:

- the ordering rule (:func:`place`): upserts decide the data, the newest of a run of upserts
  wins; a revoke (or delete) is applied on top of the newest upsert before it, and neither kind
  supersedes the other;
- issue (:func:`upsert_certificate`: create, change or issue, verifying that an issue issued);
- revoke (:func:`end_certificate`, :func:`revoke_found`, :func:`revoke_certificate`): the
  certificate DokStamp really holds is revoked; a draft, never issued, is deleted instead; an
  issued certificate is never deleted (a delete event revokes).

"A revoke arrives while its upsert is still open": :func:`end_certificate` syncs that upsert
first, under the entity lock, and the upsert (seeing the revoke after it, :func:`place`) creates
and revokes in one go.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any

from dokstamp_sync.dokstamp import Entity
from dokstamp_sync.dokstamp.errors import NotFound, ValidationFailed
from dokstamp_sync.events import Event
from dokstamp_sync.states import (
    ENDED,
    OPEN,
    CertificateStatus,
    EventState,
    MappingStatus,
)
from dokstamp_sync.sync.context import SyncContext
from dokstamp_sync.sync.entities import SPECS, Spec, matches, remote_value
from dokstamp_sync.sync.outcomes import REISSUE_REFUSED, Dead, Outcome, Waiting
from dokstamp_sync.sync.statements import Neighbour, Snapshot
from dokstamp_sync.sync.upserts import find_or_create, search, unchanged

# -- the ordering rule --------------------------------------------------------------------------


@dataclass(frozen=True)
class Lifecycle:
    """A certificate event among the other events of its certificate.

    Dead events are not counted (as for every entity), except as the data a revoke may search
    by: an event is superseded only when the next one counted (by ``occurred_at``, then
    arrival) is of its own kind.
    """

    superseded: bool
    end: Neighbour | None = None  # an upsert's: the revoke or delete right after it
    upsert: Neighbour | None = None  # a revoke's or delete's: the newest upsert before it
    # an upsert's: the revoke or delete right before it, still open: it applies first
    after_end: Neighbour | None = None


def place(events: tuple[Neighbour, ...], pk: int) -> Lifecycle:
    """Where certificate event ``pk`` stands among its certificate's ``events`` (oldest
    first, none superseded)."""
    at = next(n for n, e in enumerate(events) if e.pk == pk)
    me = events[at]
    counted = (*OPEN, EventState.SYNCED)
    after = next((e for e in events[at + 1:] if e.state in counted), None)
    if after is not None and (after.op == "upsert") == (me.op == "upsert"):
        return Lifecycle(superseded=True)
    if me.op == "upsert":
        before = next((e for e in reversed(events[:at]) if e.state in counted), None)
        pending = before if before is not None and before.op != "upsert" \
            and before.state in OPEN else None
        return Lifecycle(superseded=False, end=after, after_end=pending)
    before = next((e for e in reversed(events[:at]) if e.op == "upsert"), None)
    return Lifecycle(superseded=False, upsert=before)


def wait_for_end(key: str, end: Neighbour) -> Waiting:
    """An upsert newer than an open revoke or delete applies after it (docs/erp-guide.md): it
    waits, woken when that event ends (synced or dead)."""
    return Waiting(f"certificate {key}: the older {end.op} {end.payload.get('event_id')} "
                   "applies first", waiting_for=f"certificate:{key}")


def revocation_reason(event: Event | None) -> str | None:
    if event is None:
        return None
    return (event.data or {}).get("revocation_reason") or (
        "deleted in the ERP" if event.op == "delete" else None)


# -- what DokStamp answered ---------------------------------------------------------------------

def is_issued(cert: Entity) -> bool:
    """What DokStamp answered says issued: ``status: issued``, or a verification URL on a
    certificate that does not say it is something else."""
    status = cert.get("status")
    return status == CertificateStatus.ISSUED or (
        status not in (CertificateStatus.DRAFT, *ENDED)
        and bool(cert.get("public_verification_url")))


def verify_issued(ctx: SyncContext, key: str, cert: Entity) -> Entity:
    """A write meant to issue must have issued: trust the answer only if it says so, else
    read the certificate once more; still not issued is a dead letter naming the style."""
    if is_issued(cert):
        return cert
    cert = ctx.client.certificates.get(str(cert["uuid"]))
    if is_issued(cert):
        return cert
    style = ctx.client.certificates.issue_style
    other = "status" if style == "finish" else "finish"
    fields = {"status": '"status": "issued"', "finish": '"finish": true'}
    raise Dead(f"certificate {key}: DokStamp did not issue it: {cert['uuid']} is "
               f"{cert.get('status') or 'without a status'} after a write meant to issue it "
               f"with DOKSTAMP_ISSUE_STYLE={style} ({fields[style]}). This server may issue the "
               f"other way: set DOKSTAMP_ISSUE_STYLE={other} (or leave it unset to follow the "
               "credential scheme: client credentials -> finish, password login -> status) "
               "and replay the dead letter")


def certificate_outcome(cert: Entity | None, *, uuid: str, sent: dict[str, Any] | None,
                        digest: str | None = None,
                        status: MappingStatus = MappingStatus.ACTIVE,
                        note: str | None = None, produced: bool = False) -> Outcome:
    """A certificate's synced outcome, carrying DokStamp's status and verification URL when
    read; ``produced``: this upsert wrote the certificate (the mapping's producer)."""
    return Outcome.synced(
        uuid=uuid, status=status, sent=sent, digest=digest, note=note, produced=produced,
        remote_status=None if cert is None else str(cert.get("status") or "") or None,
        verification_url=None if cert is None else cert.get("public_verification_url"))


# -- issue --------------------------------------------------------------------------------------

def update_existing(ctx: SyncContext, key: str, cert: Entity, changes: dict[str, Any], *,
                    issue: bool, issued_at: Any, ending: bool) -> Entity:
    """Make the certificate DokStamp holds (``cert``, just read) what the event asks, acting
    on its real state: issued already (a lost answer, a replay) is left alone."""
    uuid = str(cert["uuid"])
    status = cert.get("status")
    if status in ENDED:
        if ending:  # a revoke follows: it is revoked already, which is where it ends
            return cert
        raise Dead(f"certificate {key}: DokStamp's certificate {uuid} for this file is "
                   f"{status}; a new certificate needs a new file")
    if is_issued(cert):
        if changes:
            raise Dead(f"certificate {key} is already issued in DokStamp ({uuid}) and cannot be "
                       f"changed ({', '.join(sorted(changes))}): {REISSUE_REFUSED}")
        return cert
    certs = ctx.client.certificates
    body = changes | (certs.issue_fields(issued_at) if issue else {})
    if body:
        cert = certs.update(uuid, body)
    return verify_issued(ctx, key, cert) if issue else cert


def upsert_certificate(ctx: SyncContext, event: Event, payload: dict[str, Any],
                       snapshot: Snapshot | None, digest: str, *,
                       revocation: Event | None = None) -> Outcome:
    """Create, change or issue a certificate, verifying that an issue issued; with
    ``revocation`` (a revoke or delete after this upsert, :func:`place`) it is then revoked on
    top (a draft, never issued, ends deleted: it is not created at all)."""
    data = event.data or {}
    issue = bool(data.get("issue"))
    issued_at = data.get("issued_at")
    certs = ctx.client.certificates
    fields = {k: v for k, v in payload.items() if k not in ("issued_at", "status", "finish")}
    sent = fields | {"issue": issue}
    reason = revocation_reason(revocation)
    if revocation is not None and not issue:
        return revoke_found(ctx, event.key, reason, snapshot, fields)
    if revocation is None and (same := unchanged(ctx, snapshot, digest)) is not None:
        return same
    cert: Entity | None = None
    wrote = True  # created, changed or issued the certificate (or found it for this key)
    if snapshot is not None and snapshot.status == MappingStatus.ACTIVE:
        uuid = snapshot.uuid
        was_issued = bool(snapshot.sent.get("issue"))
        changed = {k: v for k, v in fields.items() if snapshot.sent.get(k) != v}
        if was_issued and changed:
            raise Dead(f"certificate {event.key} is already issued in DokStamp "
                       f"({snapshot.uuid}) and cannot be changed ({', '.join(sorted(changed))}):"
                       f" {REISSUE_REFUSED}")
        wrote = bool(changed) or (issue and not was_issued)
        if revocation is not None or wrote:
            # The mapping may be stale (a lost answer issued it already): read, then act.
            cert = update_existing(ctx, event.key, certs.get(uuid), changed, issue=issue,
                                   issued_at=issued_at, ending=revocation is not None)
    else:
        created: list[Entity] = []

        def create(body: dict[str, Any]) -> Entity:
            created.append(certs.create(body, issue=issue, issued_at=issued_at))
            return created[-1]

        try:
            uuid, remote = find_or_create(ctx, SPECS["certificate"], event, fields, create)
        except ValidationFailed as exc:
            _explain_used_file(ctx, event, fields, exc)
            raise
        if remote is not None:
            cert = update_existing(ctx, event.key, remote, {}, issue=issue,
                                   issued_at=issued_at, ending=revocation is not None)
        elif created:
            cert = verify_issued(ctx, event.key, created[-1]) if issue else created[-1]
    if revocation is not None:
        return revoke_certificate(ctx, reason, cert or certs.get(uuid), sent)
    return certificate_outcome(cert, uuid=uuid, sent=sent, digest=digest, produced=wrote)


def _explain_used_file(ctx: SyncContext, event: Event, fields: dict[str, Any],
                       exc: ValidationFailed) -> None:
    """A create refused because the file is used: by a certificate of another student (found
    among the course's, a documented filter), that is a conflict, named with both sides."""
    if "file_uuid" not in exc.errors or not fields.get("course_uuid"):
        return
    for other in ctx.client.certificates.listing({"course_uuid": fields["course_uuid"]}):
        if matches(Spec("certificate", "certificates", ("file_uuid",)), fields, other):
            theirs = remote_value(other, "student_uuid")
            raise Dead(f"conflict: certificate {event.key} matches DokStamp certificate "
                       f"{other.get('uuid')} by file_uuid, but there student_uuid={theirs} "
                       f"while the event has student_uuid={fields.get('student_uuid')}",
                       exc) from None


# -- revoke (and delete, which revokes) ---------------------------------------------------------

SyncFirst = Callable[[Neighbour], None]  # sync this open upsert now (the engine's attempt)
PayloadOf = Callable[[Event], dict[str, Any]]  # an upsert's DokStamp fields, references resolved


def end_certificate(ctx: SyncContext, event: Event, own: Snapshot | None,
                    upsert: Neighbour | None, *, sync_first: SyncFirst,
                    payload_of: PayloadOf) -> Outcome:
    """A certificate's revoke or delete, applied on top of its newest upsert ``upsert``.

    When that upsert is still open (waiting for its student, a retry parked), it is synced
    first (``sync_first``, under the entity lock the caller holds), as a dependency would be: it
    sees this event after it and revokes what it creates. Whatever stops it (a dependency
    missing) stops this event too, so both wait for the same thing. Otherwise the certificate
    is found by its mapping or, without one, searched for with the newest upsert's data: a
    missing mapping is not proof of absence.

    A mapping produced by an upsert newer than this event (a re-issue that synced while this
    revoke waited, or arrived late) is not this event's to touch: the certificate the upserts
    before it produced is searched for with their data, revoked if found, and the mapping is
    left on the newer certificate. When that search finds the mapped certificate itself (a
    draft the newer upsert changed in place and issued: the same uuid), it is the newer
    upsert's now and is left alone, with a note.
    """
    if upsert is not None and upsert.state in OPEN:
        sync_first(upsert)
        own = ctx.store.mapping(event.entity, event.key)
    newer = own is not None and own.produced_after(event.occurred_at)
    fields = None
    if (own is None or newer) and upsert is not None:  # synced or dead, no mapping of its own
        try:
            fields = payload_of(Event.model_validate(upsert.payload))
        except (Waiting, Dead):
            fields = None  # what it names was never synced: neither can the certificate be
    if not newer:
        return revoke_found(ctx, event.key, revocation_reason(event), own, fields)
    assert own is not None
    if fields is None:
        return Outcome.synced(note=f"nothing to revoke: the mapped certificate {own.uuid} "
                                   "comes from a newer upsert, left alone")
    done = revoke_found(ctx, event.key, revocation_reason(event), None, fields, spare=own.uuid)
    # The mapping stays on the newer upsert's certificate: recorded without it.
    return replace(done, uuid=None, note=f"{done.note + '; ' if done.note else ''}acted on "
                   f"{done.uuid or 'nothing'}, not on {own.uuid} (from a newer upsert)")


def revoke_found(ctx: SyncContext, key: str, reason: str | None, snapshot: Snapshot | None,
                 fields: dict[str, Any] | None, *, spare: str | None = None) -> Outcome:
    """Revoke (or, a draft, delete) the certificate DokStamp really holds: found by its
    mapping (read, never assumed) or, without one, by a search with the newest upsert's
    data; "nothing to revoke" only once the search confirms it is absent. A certificate found
    whose uuid is ``spare`` (written by a newer upsert) is left alone."""
    certs = ctx.client.certificates
    cert: Entity | None = None
    if snapshot is not None:
        with suppress(NotFound):  # gone (a deleted draft), or a stale mapping: search
            cert = certs.get(snapshot.uuid)
    wanted = fields or (snapshot.sent if snapshot is not None else None)
    spec = SPECS["certificate"]
    if cert is None and wanted and all(wanted.get(f) for f in (*spec.natural_key,
                                                               *spec.search_filters)):
        cert = search(ctx, spec, wanted)
        if cert is None:
            return Outcome.synced(
                uuid=snapshot.uuid if snapshot else None, status=MappingStatus.DELETED,
                sent=snapshot.sent if snapshot else None,
                note="nothing to revoke: not in DokStamp (searched by student and course)")
    if cert is None:
        return Outcome.synced(note="nothing to revoke: no upsert of this certificate is known "
                                   "(one arriving later is created and revoked)")
    if spare is not None and str(cert["uuid"]) == spare:
        return Outcome.synced(note=f"nothing to revoke: the certificate found, {spare}, was "
                                   "written by a newer upsert (the mapped one), left alone")
    return revoke_certificate(ctx, reason, cert, snapshot.sent if snapshot else fields)


def revoke_certificate(ctx: SyncContext, reason: str | None, cert: Entity,
                       sent: dict[str, Any] | None) -> Outcome:
    """Revoke ``cert`` (as just read) unless it is revoked already; a draft is deleted (it
    was never issued); an issued certificate is never deleted. An expired one is revoked if
    DokStamp lets it be (the docs say neither way); refused, it is recorded as what DokStamp
    says it is, ``expired``, never as revoked."""
    certs = ctx.client.certificates
    uuid = str(cert["uuid"])
    status = cert.get("status")
    if status == CertificateStatus.EXPIRED:
        return revoke_expired(ctx, reason, cert, sent)
    if status in ENDED:
        return certificate_outcome(cert, uuid=uuid, sent=sent, status=MappingStatus.REVOKED,
                                   note=f"already {status}")
    if status == CertificateStatus.DRAFT:
        with suppress(NotFound):
            certs.delete(uuid)
        return certificate_outcome(
            cert | {"status": CertificateStatus.DELETED.value, "public_verification_url": None},
            uuid=uuid, sent=sent, status=MappingStatus.DELETED, note="draft deleted")
    try:
        cert = certs.revoke(uuid, reason)
    except ValidationFailed:
        cert = certs.get(uuid)  # revoked meanwhile (a lost answer, another worker)?
        if cert.get("status") != CertificateStatus.REVOKED:
            raise
    return certificate_outcome(cert, uuid=uuid, sent=sent, status=MappingStatus.REVOKED)


def revoke_expired(ctx: SyncContext, reason: str | None, cert: Entity,
                   sent: dict[str, Any] | None) -> Outcome:
    """Try to revoke an expired certificate; DokStamp's answer (or, refused, its status read
    again) is what the mapping records."""
    certs = ctx.client.certificates
    uuid = str(cert["uuid"])
    try:
        cert = certs.revoke(uuid, reason)
    except ValidationFailed:
        cert = certs.get(uuid)
    if cert.get("status") == CertificateStatus.REVOKED:
        return certificate_outcome(cert, uuid=uuid, sent=sent, status=MappingStatus.REVOKED,
                                   note="expired, then revoked")
    if cert.get("status") != CertificateStatus.EXPIRED:
        raise Dead(f"certificate {uuid}: a revoke of an expired certificate left it "
                   f"{cert.get('status') or 'without a status'}")
    return certificate_outcome(cert, uuid=uuid, sent=sent, status=MappingStatus.EXPIRED,
                               note="expired in DokStamp, which refused to revoke it: "
                                    "recorded as expired")
