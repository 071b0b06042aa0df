"""One DokStamp entity belongs to one ERP key (issue 17, case 5).

Two ERP keys with the same natural key (a recycled email, a merged SIS duplicate), or an event
naming in ``data.uuid`` an entity mapped to another key: a conflict, dead-lettered naming both
keys, never adopted. DokStamp keeps one entity, unchanged by the second key.
"""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from dokstamp_sync.testing import T0, calls, live, student


def test_a_second_key_with_the_same_email_is_a_conflict_not_a_share(h, sandbox):
    """S-1 synced; S-2 arrives with the same email and another name: S-2 is dead with a letter
    naming S-1 and S-2; DokStamp still holds one student, S-1's, not renamed; deleting S-2
    never touches it."""
    assert h.sync(student("S-1", name="Maria Silva")) == ["synced"]
    assert h.sync(student("S-2", name="Mario Souza", at=T0 + timedelta(minutes=1))) == ["dead"]
    (letter,) = h.letters()
    assert "S-1" in letter.reason
    assert "S-2" in letter.reason
    assert "conflict" in letter.reason
    (held,) = live(sandbox, "students")
    assert held["name"] == "Maria Silva"
    assert h.mapping("student", "S-2") is None
    assert h.sync(student("S-2", at=T0 + timedelta(minutes=2)) | {"op": "delete"}
                  ) == ["synced"]
    (held,) = live(sandbox, "students")
    assert held["uuid"] == h.mapping("student", "S-1").dokstamp_uuid
    assert h.mapping("student", "S-1").status == "active"


def test_a_data_uuid_mapped_to_another_key_is_a_conflict(h, sandbox):
    """S-3 names S-1's DokStamp student in ``data.uuid`` (with its own email): dead, naming
    both keys; DokStamp's student keeps S-1's data."""
    assert h.sync(student("S-1", name="Maria Silva")) == ["synced"]
    uuid = h.mapping("student", "S-1").dokstamp_uuid
    other = student("S-3", name="Ana Lima", email="ana@example.edu",
                    at=T0 + timedelta(minutes=1))
    other["data"]["uuid"] = uuid
    assert h.sync(other) == ["dead"]
    (letter,) = h.letters()
    assert "S-1" in letter.reason
    assert "S-3" in letter.reason
    (held,) = live(sandbox, "students")
    assert (held["name"], held["email"]) == ("Maria Silva", "maria@example.edu")


def _file(key: str, content: bytes) -> dict[str, Any]:
    return event("file", key, {"filename": f"{key}.pdf",
                               "content_base64": base64.b64encode(content).decode()}, at=T0)


def test_deleting_one_of_two_file_keys_sharing_a_dokstamp_file_keeps_the_file(h, sandbox):
    """Files are the exception to one entity per key: DokStamp deduplicates uploads by
    content, so F-1 and F-2 with equal contents share one DokStamp file. A delete of F-2 must
    not delete the file F-1 still maps as active: F-2's mapping is forgotten (synced, a note
    naming F-1), no DELETE is sent, and DokStamp still holds the one file F-1 maps."""
    pdf = samples.diploma_pdf("X", "Y")
    assert h.sync(_file("F-1", pdf), _file("F-2", pdf)) == ["synced", "synced"]
    shared = h.mapping("file", "F-1").dokstamp_uuid
    assert h.mapping("file", "F-2").dokstamp_uuid == shared
    d = event("file", "F-2", None, op="delete", at=T0 + timedelta(minutes=1))
    assert h.sync(d) == ["synced"]
    assert [f["uuid"] for f in live(sandbox, "files")] == [shared]
    assert not [route for route in calls(sandbox) if route.startswith("DELETE")]
    assert "F-1" in h.record(d["event_id"]).last_error
    assert h.mapping("file", "F-1").status == "active"
    assert h.mapping("file", "F-2").status == "deleted"
    # The last key's delete does delete the file.
    assert h.sync(event("file", "F-1", None, op="delete", at=T0 + timedelta(minutes=2))
                  ) == ["synced"]
    assert live(sandbox, "files") == []
