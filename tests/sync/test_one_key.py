"""One DokStamp entity belongs to one ERP key (issue 17, case 5).

Two ERP keys with the same natural key (a recycled email, a merged SIS duplicate), or an event
naming in ``data.uuid`` an entity mapped to another key: a conflict, dead-lettered naming both
keys, never adopted. DokStamp keeps one entity, unchanged by the second key.
"""

from __future__ import annotations

from datetime import timedelta

from dokstamp_sync.testing import T0, live, student


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
