"""Values are compared exactly, except dates and timestamps, which are compared parsed."""

from __future__ import annotations

from datetime import timedelta

from dokstamp_sync.demo.samples import event
from dokstamp_sync.sync.entities import same_value
from dokstamp_sync.testing import T0, calls, live


def course(name: str, at_hours: int) -> dict:
    return event("course", "BSC", {"name": name, "code": "BSC", "institution_key": "I"},
                 at=T0 + timedelta(hours=at_hours))


def test_a_found_course_whose_name_shares_19_characters_is_patched(h, ctx, sandbox):
    """A course made on the dashboard as "Bachelor of Science in Physics" is found by its code
    when the ERP sends it as "... in Chemistry": one PATCH, and DokStamp ends with the new name
    (the old comparison took the first 19 characters and saw the two as equal)."""
    h.sync(event("institution", "I", {"name": "Uni", "country": "BR"}, at=T0))
    ctx.client.courses.create({"name": "Bachelor of Science in Physics", "code": "BSC",
                               "institution_uuid": h.mapping("institution", "I").dokstamp_uuid})
    assert h.sync(course("Bachelor of Science in Chemistry", 2)) == ["synced"]
    assert calls(sandbox).get("PATCH /courses/{uuid}", 0) == 1, calls(sandbox)
    (held,) = live(sandbox, "courses")
    assert held["name"] == "Bachelor of Science in Chemistry"


def test_dates_and_timestamps_compare_as_parsed_values():
    """A date equals DokStamp's midnight-UTC timestamp of it; the same instant written with an
    offset or more digits is equal; other strings are equal only when identical."""
    assert same_value("2024-02-01", "2024-02-01T00:00:00.000000Z")
    assert same_value("2024-02-01T10:00:00Z", "2024-02-01T10:00:00.000000Z")
    assert same_value("2024-02-01T12:00:00+02:00", "2024-02-01T10:00:00.000000Z")
    assert not same_value("2024-02-01", "2024-02-02T00:00:00.000000Z")
    assert not same_value("2024-02-01", "2024-02-01T10:00:00.000000Z")
    assert not same_value("2024-02-01T10:00:00Z (a)", "2024-02-01T10:00:00Z (b)")
    assert not same_value("Bachelor of Science in Physics", "Bachelor of Science in Chemistry")
    assert not same_value("1", 1)
