"""A certificate's events take effect in the ERP's order (issue 17, cases 1-3).

A revoke (or delete) acts only on the certificate the upserts before it produced; an upsert
newer than an open revoke waits for it; a revoke's dead letter is never resolved by an upsert;
an expired certificate is recorded as DokStamp says. Every test asserts what the sandbox holds.
"""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from datetime import timedelta
from typing import Any

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.ops import dlq
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.testing import T0, live

KEY = "CERT-00001"


def graph() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One graduate's events without the certificate, and the certificate's upsert (U1)."""
    cls = samples.graduating_class(1, courses=1, modules_per_course=1)
    return [e for e in cls if e["entity"] != "certificate"], cls[-1]


def reissue(u1: dict[str, Any], days: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """A new diploma file and the certificate's upsert naming it (a re-issue, U2)."""
    pdf = samples.diploma_pdf("Graduate 00001", "Bachelor Programme 1 (re-issued)")
    file = event("file", "DIP-B", {"filename": "diploma-b.pdf",
                                   "content_base64": base64.b64encode(pdf).decode()},
                 at=T0 + timedelta(days=days))
    u2 = event("certificate", KEY, u1["data"] | {"file_key": "DIP-B"},
               at=T0 + timedelta(days=days))
    return file, u2


def revoke(days: int, reason: str = "Issued in error") -> dict[str, Any]:
    return event("certificate", KEY, {"revocation_reason": reason}, op="revoke",
                 at=T0 + timedelta(days=days))


def by_file(sandbox: Any) -> dict[str, str]:
    """The sandbox's certificates: file uuid -> status."""
    return {c["files"][0]["uuid"]: c["status"] for c in live(sandbox, "certificates")}


def file_uuid(h: Any, key: str) -> str:
    mapping = h.mapping("file", key)
    assert mapping is not None
    return str(mapping.dokstamp_uuid)


def script(sandbox: Any, *faults: ScriptedFault) -> None:
    sandbox.sandbox.faults.configure(Faults(script=list(faults)))


# -- 1. a late revoke never touches a newer certificate -------------------------------------

def test_a_revoke_retried_after_a_reissue_revokes_only_the_first_certificate(h, sandbox):
    """U1 issued, then revoke R (between U1 and U2 by occurred_at) fails with 503s and is
    parked; the re-issue U2 (a new file) arrives meanwhile: U2 waits for R, R revokes U1's
    certificate, then U2 issues its own. DokStamp ends with U1's certificate revoked and U2's
    issued; the mapping points at U2's, issued."""
    rest, u1 = graph()
    h.ctx.limits = replace(h.ctx.limits, in_call_attempts=1)
    assert h.sync(*rest, u1)[-1] == "synced"
    r = revoke(days=1)
    script(sandbox, ScriptedFault("PUT", "/certificates/{uuid}/revoke", status=503, times=3))
    assert h.sync(r) == ["waiting"]
    file, u2 = reissue(u1, days=2)
    h.sync(file, u2)
    h.drain()
    assert h.state(r["event_id"]) == h.state(u2["event_id"]) == "synced"
    held = by_file(sandbox)
    assert held == {file_uuid(h, "DIP-00001"): "revoked", file_uuid(h, "DIP-B"): "issued"}
    mapping = h.mapping("certificate", KEY)
    assert (mapping.status, mapping.remote_status) == ("active", "issued")
    assert h.letters() == []


def test_a_revoke_arriving_after_the_reissue_synced_revokes_the_older_certificate(h, sandbox):
    """The late revoke in its plainest form: U1, R and the re-issue U2 synced in order, then
    another revoke older than U2 arrives (a late copy from the ERP). It acts on U1's
    certificate (found by U1's data: revoked already), never on U2's; the mapping stays on
    U2's certificate, active."""
    rest, u1 = graph()
    h.sync(*rest, u1)
    file, u2 = reissue(u1, days=2)
    h.sync(file)
    assert h.sync(revoke(days=1), u2) == ["synced", "synced"]  # in order: both fine
    first, second = file_uuid(h, "DIP-00001"), file_uuid(h, "DIP-B")
    assert by_file(sandbox) == {first: "revoked", second: "issued"}
    late = revoke(days=1, reason="late copy")
    assert h.sync(late) == ["synced"]
    assert by_file(sandbox) == {first: "revoked", second: "issued"}
    mapping = h.mapping("certificate", KEY)
    assert (mapping.dokstamp_uuid, mapping.status) == (
        next(c["uuid"] for c in live(sandbox, "certificates") if c["files"][0]["uuid"] == second),
        "active")


def test_a_late_revoke_leaves_a_draft_reissued_in_place_issued(h, sandbox):
    """U1 creates a draft (``issue: false``); the re-issue U2 (day 2, a new file, ``issue:
    true``) updates that draft in place and issues it (the same DokStamp uuid). Then revoke R
    (day 1, meant for U1's draft) arrives late. In the ERP's order U1's draft is gone and U2's
    certificate is issued: R leaves the certificate U2 wrote alone, and DokStamp holds it
    issued with U2's file."""
    rest, u1 = graph()
    u1 = u1 | {"data": u1["data"] | {"issue": False}}
    assert h.sync(*rest, u1)[-1] == "synced"
    file, u2 = reissue(u1, days=2)
    u2["data"]["issue"] = True
    assert h.sync(file, u2) == ["synced", "synced"]
    (cert,) = live(sandbox, "certificates")
    r = revoke(days=1)
    assert h.sync(r) == ["synced"]
    assert by_file(sandbox) == {file_uuid(h, "DIP-B"): "issued"}
    mapping = h.mapping("certificate", KEY)
    assert (mapping.dokstamp_uuid, mapping.status) == (cert["uuid"], "active")
    assert "newer upsert" in h.record(r["event_id"]).last_error


def test_a_late_revoke_leaves_a_draft_then_issued_by_the_same_data_issued(h, sandbox):
    """Plain "draft, then issue": U1 creates a draft, U2 (day 2, the same file) issues it in
    place. A revoke R (day 1, meant for U1's draft) arrives late; the search by U1's data finds
    the mapped certificate itself, which U2 wrote: it is left alone (a note says so), never
    revoked. DokStamp holds one certificate, issued."""
    rest, u1 = graph()
    u1 = u1 | {"data": u1["data"] | {"issue": False}}
    assert h.sync(*rest, u1)[-1] == "synced"
    u2 = event("certificate", KEY, u1["data"] | {"issue": True}, at=T0 + timedelta(days=2))
    assert h.sync(u2) == ["synced"]
    r = revoke(days=1)
    assert h.sync(r) == ["synced"]
    (cert,) = live(sandbox, "certificates")
    assert cert["status"] == "issued"
    mapping = h.mapping("certificate", KEY)
    assert (mapping.dokstamp_uuid, mapping.status, mapping.produced_by) == (
        cert["uuid"], "active", u2["event_id"])
    assert "left alone" in h.record(r["event_id"]).last_error


def test_an_older_revoke_arriving_after_a_refused_reissue_lets_the_reissue_issue(h, sandbox):
    """Arrival order U1, U2 (day 2, a new file), R (day 1). U2 first meets U1's issued
    certificate and is refused ("already issued ... revoke it"): a dead letter. When R syncs
    (revoking U1's certificate), U2's letter is replayed automatically: in the ERP's order U1's
    certificate ends revoked and U2's issued, and no letter stays open."""
    rest, u1 = graph()
    assert h.sync(*rest, u1)[-1] == "synced"
    file, u2 = reissue(u1, days=2)
    assert h.sync(file, u2) == ["synced", "dead"]
    r = revoke(days=1)
    assert h.sync(r) == ["synced"]
    h.drain()
    assert h.state(u2["event_id"]) == "synced"
    assert by_file(sandbox) == {file_uuid(h, "DIP-00001"): "revoked",
                                file_uuid(h, "DIP-B"): "issued"}
    assert [letter.status for letter in h.letters()] == ["replayed"]
    mapping = h.mapping("certificate", KEY)
    assert (mapping.status, mapping.remote_status) == ("active", "issued")


def test_a_newer_revoke_never_replays_an_older_refused_reissue(h, sandbox):
    """The automatic replay is for upserts newer than the revoke only: U1 issued, U2 (day 1, a
    new file) refused ("already issued"), then revoke R (day 2) syncs. In the ERP's order U2
    came before R and was refused; R revokes U1's certificate and U2's letter stays open (no
    certificate for U2's file in DokStamp)."""
    rest, u1 = graph()
    assert h.sync(*rest, u1)[-1] == "synced"
    file, u2 = reissue(u1, days=1)
    assert h.sync(file, u2) == ["synced", "dead"]
    assert h.sync(revoke(days=2)) == ["synced"]
    h.drain()
    assert h.state(u2["event_id"]) == "dead"
    assert by_file(sandbox) == {file_uuid(h, "DIP-00001"): "revoked"}
    assert [letter.status for letter in h.letters()] == ["open"]

# -- 2. a revoke's dead letter is never resolved by an upsert --------------------------------

def test_a_revoke_letter_survives_a_resent_upsert_and_its_replay_revokes(h, sandbox):
    """U1 issued, R refused once (403: a dead letter), then the ERP re-sends U1's data with a
    newer occurred_at (a nightly export): the revoke's letter stays open (listed, replayed by
    `replay --all`), and the replay revokes the diploma in DokStamp. The re-sent upsert, newer
    than the revoke, then meets the revoked certificate as it would have in the ERP's order: a
    dead letter of its own (a new certificate needs a new file)."""
    rest, u1 = graph()
    h.sync(*rest, u1)
    script(sandbox, ScriptedFault("PUT", "/certificates/{uuid}/revoke", status=403))
    r = revoke(days=1, reason="Fraud")
    assert h.sync(r) == ["dead"]
    again = event("certificate", KEY, u1["data"], at=T0 + timedelta(days=2))
    assert h.sync(again) == ["synced"]
    with session_scope(h.ctx.sessions) as s:
        listed = [letter.event_id for letter in dlq.list_letters(s)]
    assert listed == [r["event_id"]]
    dlq.replay(h.ctx.sessions, everything=True)
    h.drain()
    assert h.state(r["event_id"]) == "synced"
    (held,) = live(sandbox, "certificates")
    assert (held["status"], held["revocation_reason"]) == ("revoked", "Fraud")
    assert [(letter.event_id, letter.status) for letter in h.letters()] == [
        (r["event_id"], "replayed"), (again["event_id"], "open")]


def test_a_revoke_letter_is_resolved_by_a_newer_revoke_that_synced(h, sandbox):
    """The one automatic resolution of a revoke's letter: a newer revoke of the same
    certificate synced (DokStamp holds it revoked): the older letter is superseded."""
    rest, u1 = graph()
    h.sync(*rest, u1)
    script(sandbox, ScriptedFault("PUT", "/certificates/{uuid}/revoke", status=403))
    assert h.sync(revoke(days=1)) == ["dead"]
    assert h.sync(revoke(days=2, reason="Fraud")) == ["synced"]
    (held,) = live(sandbox, "certificates")
    assert held["status"] == "revoked"
    assert [letter.status for letter in h.letters()] == ["superseded"]


def test_a_malformed_revoke_entrys_letter_survives_a_resent_upsert(h, sandbox):
    """A revoke entry that fails validation (``occurred_at: "yesterday"``) but names its
    entity and key is a dead letter with no inbox event. The ERP's nightly re-send of U1 then
    syncs: the letter stays open (it may be a fraud revocation; only a revoke or delete, or an
    operator, resolves it), it records the op it carried, and DokStamp's certificate is still
    issued (nothing revoked behind the operator's back)."""
    rest, u1 = graph()
    h.sync(*rest, u1)
    bad = revoke(days=1, reason="Fraud")
    bad["occurred_at"] = "yesterday"
    h.send(json.dumps(bad))
    again = event("certificate", KEY, u1["data"], at=T0 + timedelta(days=2))
    assert h.sync(again) == ["synced"]
    (letter,) = h.letters()
    assert (letter.status, letter.entity, letter.erp_key, letter.entry_op) == (
        "open", "certificate", KEY, "revoke")
    assert set(by_file(sandbox).values()) == {"issued"}


def test_a_malformed_upsert_entrys_letter_is_resolved_by_a_newer_upsert(h, sandbox):
    """The same-kind rule for malformed entries: an upsert entry that fails validation
    (readable op ``upsert``) is resolved by a newer upsert of that key that synced."""
    rest, u1 = graph()
    h.sync(*rest, u1)
    bad = event("certificate", KEY, u1["data"], at=T0 + timedelta(days=1))
    bad["occurred_at"] = "yesterday"
    h.send(json.dumps(bad))
    again = event("certificate", KEY, u1["data"], at=T0 + timedelta(days=2))
    assert h.sync(again) == ["synced"]
    assert [(letter.status, letter.entry_op) for letter in h.letters()] == [
        ("superseded", "upsert")]


def test_a_malformed_entry_of_unknown_op_is_never_resolved_by_an_upsert(h, sandbox):
    """A malformed entry whose op cannot be read (``op: 42``) may be a revoke: no upsert
    resolves its letter; it stays open for an operator."""
    rest, u1 = graph()
    h.sync(*rest, u1)
    bad = revoke(days=1, reason="Fraud") | {"op": 42}
    h.send(json.dumps(bad))
    again = event("certificate", KEY, u1["data"], at=T0 + timedelta(days=2))
    assert h.sync(again) == ["synced"]
    assert [(letter.status, letter.entry_op) for letter in h.letters()] == [("open", None)]
    assert set(by_file(sandbox).values()) == {"issued"}


# -- 3. an expired certificate is recorded as DokStamp says ----------------------------------

def test_revoking_an_expired_certificate_records_expired_not_revoked(h, sandbox):
    """U1 issued, then DokStamp expires it (a validity period ended); a revoke arrives: it is
    tried (the docs do not say an expired certificate is never revocable), DokStamp refuses,
    and the revoke ends synced with the mapping saying what DokStamp holds: ``expired``, never
    ``revoked``; DokStamp's certificate is still expired, nothing is dead."""
    rest, u1 = graph()
    h.sync(*rest, u1)
    uuid = h.mapping("certificate", KEY).dokstamp_uuid
    sandbox.sandbox.tenants["demo-university"].expire(uuid)
    r = revoke(days=1)
    assert h.sync(r) == ["synced"]
    (held,) = live(sandbox, "certificates")
    assert held["status"] == "expired"
    mapping = h.mapping("certificate", KEY)
    assert (mapping.status, mapping.remote_status) == ("expired", "expired")
    assert "expired" in h.record(r["event_id"]).last_error
    assert h.letters() == []


def test_revoking_an_expired_certificate_dokstamp_allows_records_revoked(h, sandbox):
    """The other reading of the docs: this DokStamp lets an expired certificate be revoked
    (the sandbox switched to allow it). U1 issued, expired by DokStamp, then a revoke: it is
    revoked, DokStamp holds it ``revoked`` with the reason, and the mapping says ``revoked``
    (status and ``remote_status``), the note "expired, then revoked"."""
    rest, u1 = graph()
    h.sync(*rest, u1)
    uuid = h.mapping("certificate", KEY).dokstamp_uuid
    tenant = sandbox.sandbox.tenants["demo-university"]
    tenant.revoke_expired = True
    tenant.expire(uuid)
    r = revoke(days=1, reason="Fraud")
    assert h.sync(r) == ["synced"]
    (held,) = live(sandbox, "certificates")
    assert (held["status"], held["revocation_reason"]) == ("revoked", "Fraud")
    mapping = h.mapping("certificate", KEY)
    assert (mapping.status, mapping.remote_status) == ("revoked", "revoked")
    assert h.record(r["event_id"]).last_error == "expired, then revoked"
    assert h.letters() == []

# -- with the change guard: a held revoke keeps the ERP's order when released ------------------
def test_a_held_revoke_released_applies_before_the_reissue_waiting_behind_it(make_ctx, sandbox):
    """The guard holds revoke R (threshold 0: every destructive event is held); the re-issue
    U2 arrives and waits behind it, DokStamp untouched. Released, R revokes U1's certificate
    and then U2 issues its own: U1's revoked, U2's issued, nothing out of order."""
    from dokstamp_sync import held
    from dokstamp_sync.guard import GuardPolicy
    from dokstamp_sync.ops.held import decide
    from dokstamp_sync.testing import Harness

    h = Harness(make_ctx(guard_policy=GuardPolicy(delay=0.0, minimum=0, threshold=0.0)))
    rest, u1 = graph()
    assert h.sync(*rest, u1)[-1] == "synced"
    r = revoke(days=1)
    assert h.sync(r) == ["held"]
    file, u2 = reissue(u1, days=2)
    assert h.sync(file, u2)[-1] == "waiting"
    assert set(by_file(sandbox).values()) == {"issued"}  # nothing applied while held
    decide(h.ctx.sessions, h.ctx.redis, h.ctx.store.report, held.release,
           held.Selection(entity="certificate"))
    h.drain()
    assert h.state(r["event_id"]) == h.state(u2["event_id"]) == "synced"
    assert by_file(sandbox) == {file_uuid(h, "DIP-00001"): "revoked",
                                file_uuid(h, "DIP-B"): "issued"}


def test_a_revoke_that_touched_nothing_does_not_replay_refused_reissues(h, sandbox):
    """U1 draft (day 0), U1b issues it in place (day 2, its producer), U2 (day 3, a new file)
    refused: the certificate is issued. A late revoke R (day 1) leaves it alone (it is U1b's),
    so U2's refusal still stands: its letter is not replayed (no second refusal, no second
    letter) and DokStamp keeps the certificate issued."""
    rest, u1 = graph()
    u1 = u1 | {"data": u1["data"] | {"issue": False}}
    assert h.sync(*rest, u1)[-1] == "synced"
    u1b = event("certificate", KEY, u1["data"] | {"issue": True}, at=T0 + timedelta(days=2))
    assert h.sync(u1b) == ["synced"]
    file, u2 = reissue(u1, days=3)
    u2["data"]["issue"] = True
    assert h.sync(file, u2) == ["synced", "dead"]
    assert h.sync(revoke(days=1)) == ["synced"]
    h.drain()
    assert [c["status"] for c in live(sandbox, "certificates")] == ["issued"]
    assert [letter.status for letter in h.letters()] == ["open"]


def test_a_late_revoke_after_an_unchanged_newer_upsert_ends_as_in_order(h, sandbox):
    """The ERP's order: U1 issued (day 0), R (day 1), U2 (day 2, U1's data again). In order U2
    meets the revoked certificate and is dead-lettered (a new certificate needs a new file).
    Arriving U1, U2, R, U2 first syncs unchanged (no call), then R revokes U1's certificate:
    U2 is run again and ends as in order, dead with its letter open, not silently synced."""
    rest, u1 = graph()
    assert h.sync(*rest, u1)[-1] == "synced"
    u2 = event("certificate", KEY, u1["data"], at=T0 + timedelta(days=2))
    assert h.sync(u2) == ["synced"]
    assert h.sync(revoke(days=1)) == ["synced"]
    h.drain()
    assert [c["status"] for c in live(sandbox, "certificates")] == ["revoked"]
    assert h.state(u2["event_id"]) == "dead"
    assert [letter.status for letter in h.letters()] == ["open"]
