"""The limits of an ERP event (CONTRACT §2, "Limits"), checked when it is parsed."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from dokstamp_sync.config import Settings
from dokstamp_sync.events import InvalidEvent, parse_event
from dokstamp_sync.limits import FILE_MAX_BYTES, MAX_JSON_BYTES, base64_length

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)


def student(**changes):
    body = {"event_id": "erp-1", "entity": "student", "op": "upsert", "key": "S-1",
            "occurred_at": "2026-11-22T10:00:00Z",
            "data": {"name": "Maria", "email": "maria@example.edu"}}
    return body | changes


def refused(raw, **kw) -> InvalidEvent:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw if isinstance(raw, str | bytes) else json.dumps(raw), now=NOW, **kw)
    return info.value


@pytest.mark.parametrize(("occurred_at", "ok"), [
    ("9999-12-31T23:59:59-05:00", False),
    ("9999-12-31T23:59:59+14:00", False),
    ("1969-12-31T23:59:59Z", False),
    ((NOW + timedelta(days=2)).isoformat(), False),
    ((NOW + timedelta(hours=23)).isoformat(), True),
    (NOW.isoformat(), True),
    ("1970-01-01T00:00:00Z", True),
])
def test_occurred_at_must_lie_between_1970_and_a_day_after_the_clock(occurred_at, ok):
    """Year 9999 (with an offset that would overflow in UTC), 1969 and two days ahead are
    refused with a reason naming occurred_at; now, a day ahead at most, and 1970 pass."""
    raw = json.dumps(student(occurred_at=occurred_at))
    if ok:
        assert parse_event(raw, now=NOW).occurred_at is not None
        return
    error = refused(raw)
    assert error.reason.startswith("occurred_at "), error.reason
    assert "out of range" in error.reason
    assert (error.event_id, error.entity, error.key) == ("erp-1", "student", "S-1")


def test_the_clock_is_the_workers_own_by_default():
    """Without ``now``, an event of two days ahead of the real clock is refused."""
    ahead = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    with pytest.raises(InvalidEvent, match=r"occurred_at .* out of range"):
        parse_event(json.dumps(student(occurred_at=ahead)))
    assert parse_event(json.dumps(student(occurred_at=datetime.now(UTC).isoformat())))


@pytest.mark.parametrize(("body", "reason"), [
    (student(event_id="erp-\u0000"), "event_id contains a NUL character"),
    (student(event_id="erp-\ud800"),
     "event_id contains an invalid code point (a lone surrogate U+D800)"),
    (student(data={"name": "Ma\u0000ria", "email": "m@example.edu"}),
     "data.name contains a NUL character"),
    (student(data={"name": "M", "email": "m@example.edu", "tags": ["ok", "\udfff"]}),
     "data.tags[1] contains an invalid code point (a lone surrogate U+DFFF)"),
    (student(data={"na\u0000me": "M", "email": "m@example.edu"}),
     'a key in data ("na\\u0000me") contains a NUL character'),
])
def test_no_nul_or_lone_surrogate_in_any_string_keys_included(body, reason):
    """PostgreSQL cannot store NUL, and no UTF-8 encoder can write a lone surrogate: both are
    refused with the field named, wherever they are."""
    assert refused(body).reason == reason


def test_nesting_deeper_than_32_levels_is_refused_before_decoding():
    """5,000 levels (beyond Python's recursion limit) give a clear reason naming the field
    and the event's identity, not a RecursionError; 32 levels pass."""
    deep = ('{"event_id": "erp-1", "entity": "student", "key": "S-1", "data": '
            + '{"a": ' * 5000 + "1" + "}" * 5000 + "}")
    error = refused(deep)
    assert error.reason == "data is nested deeper than 32 levels"
    assert (error.event_id, error.entity, error.key) == ("erp-1", "student", "S-1")
    # The event is level 1, data level 2: 30 more levels are the most it may hold.
    fine = student(data={"name": "M", "email": "m@example.edu",
                         "x": json.loads("[" * 30 + "]" * 30)})
    assert parse_event(json.dumps(fine), now=NOW).data is not None
    too_deep = student(data={"name": "M", "email": "m@example.edu",
                             "x": json.loads("[" * 31 + "]" * 31)})
    assert refused(too_deep).reason == "data is nested deeper than 32 levels"
    assert refused(json.loads(json.dumps(too_deep))).reason.endswith("deeper than 32 levels")


def test_brackets_inside_strings_do_not_count_as_nesting():
    """The scan skips strings, escaped quotes included."""
    body = student(data={"name": 'a \\" [[[[' + "[" * 40, "email": "m@example.edu"})
    assert parse_event(json.dumps(body), now=NOW).data["name"].endswith("[")


def test_one_entry_holds_at_most_1_mib_of_json():
    """1 MiB of JSON passes, one byte more is refused with the size named."""
    body = student()
    room = MAX_JSON_BYTES - len(json.dumps(body | {"pad": ""}))
    assert parse_event(json.dumps(body | {"pad": "x" * room}), now=NOW)
    error = refused(body | {"pad": "x" * (room + 1)})
    assert "1 MiB" in error.reason
    assert error.event_id == "erp-1"


def test_a_files_content_may_add_the_file_size_limit_in_base64():
    """A file's content_base64 may be as long as the file size limit in base64 on top of the
    1 MiB; one quantum more is refused naming data.content_base64; the limit is a parameter
    whose default is the settings' default."""
    assert Settings.model_fields["dokstamp_sync_file_max_bytes"].default == FILE_MAX_BYTES
    limit = 3000
    body = {"event_id": "erp-f", "entity": "file", "op": "upsert", "key": "F-1",
            "occurred_at": "2026-11-22T10:00:00Z", "data": {"filename": "d.pdf"}}
    fits = body | {"data": {"filename": "d.pdf", "content_base64": "A" * base64_length(limit)}}
    assert parse_event(json.dumps(fits), max_file_bytes=limit, now=NOW)
    over = body | {"data": {"filename": "d.pdf",
                            "content_base64": "A" * (base64_length(limit) + 4)}}
    assert refused(over, max_file_bytes=limit).reason.startswith("data.content_base64 is ")
    huge = json.dumps(over) + " " * (MAX_JSON_BYTES + 10)
    assert "more than the limit" in refused(huge, max_file_bytes=limit).reason


def test_nan_and_bad_utf8_are_not_json():
    """NaN (which PostgreSQL's json refuses) and bytes that are not UTF-8 are "not JSON"."""
    assert refused(json.dumps(student(data={"name": "M", "email": "e", "x": float("nan")})))\
        .reason == "not JSON: NaN is not a JSON value"
    assert refused(b'{"event_id": "\xff"}').reason.startswith("not JSON: not UTF-8 text")


def test_identity_is_kept_when_validation_fails():
    """An invalid event still says which event, entity and key it was (strings only)."""
    error = refused(student(key="S-BAD1", data={"name": "No email"}))
    assert (error.event_id, error.entity, error.key) == ("erp-1", "student", "S-BAD1")
    assert error.reason == "data.email is required for a student"
    error = refused(student(key=7))
    assert (error.entity, error.key) == ("student", None)
