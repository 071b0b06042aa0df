"""Upload answers are checked: one record per file, sizes equal, matched by name when the
names allow it, else by position; any mismatch is UploadMismatch."""

from __future__ import annotations

import httpx
import pytest

import graph
from dokstamp_sync.dokstamp import Upload, errors

UPLOADS = [Upload("a.pdf", b"a" * 10), Upload("b.pdf", b"b" * 20), Upload("c.pdf", b"c" * 30)]


def _record(name: str, size: int) -> dict:
    return {"uuid": f"uuid-{name}", "original_name": name, "size": size, "used_at": None}


def _files(records):
    return lambda request: httpx.Response(201, json={"data": records})


def test_records_out_of_order_are_matched_by_name(mock_api):
    """Records answered in another order than the files come back in the files' order."""
    c = mock_api(_files([_record("c.pdf", 30), _record("a.pdf", 10), _record("b.pdf", 20)]))
    assert [r["uuid"] for r in c.files.upload(UPLOADS)] == [
        "uuid-a.pdf", "uuid-b.pdf", "uuid-c.pdf"]


def test_deduplicated_record_with_an_old_name_is_matched_by_position(mock_api):
    """A record renamed by deduplication (its first upload's name) is paired by position."""
    c = mock_api(_files([_record("a.pdf", 10), _record("old-name.pdf", 20),
                         _record("c.pdf", 30)]))
    assert [r["uuid"] for r in c.files.upload(UPLOADS)] == [
        "uuid-a.pdf", "uuid-old-name.pdf", "uuid-c.pdf"]


@pytest.mark.parametrize(("records", "why"), [
    ([_record("a.pdf", 10), _record("b.pdf", 20)], "2 records for 3 files"),
    ([_record("a.pdf", 10), _record("b.pdf", 21), _record("c.pdf", 30)], "record says 21"),
    ([_record("a.pdf", 10), _record("b.pdf", 20), {"uuid": "u", "original_name": "c.pdf"}],
     "lacks a uuid or a size"),
    ([_record("a.pdf", 10), _record("x.pdf", 30), _record("b.pdf", 20)],
     "named after another file"),
    ([_record("a.pdf", 10), _record("b.pdf", 20), "c.pdf"], "3 records for 3 files")])
def test_mismatched_records_raise_upload_mismatch(mock_api, records, why):
    """Too few records, a wrong size, a record without size, or a record at the position of
    another file it is named after: UploadMismatch, saying what did not match."""
    c = mock_api(_files(records))
    with pytest.raises(errors.UploadMismatch) as info:
        c.files.upload(UPLOADS)
    assert why in str(info.value)
    assert isinstance(info.value, errors.MalformedResponse)
    assert (info.value.status, info.value.method, info.value.path) == (201, "POST", "/files")


def test_sandbox_upload_with_a_deduplicated_file_passes_the_check(client, sandbox):
    """Against the sandbox: a batch holding bytes uploaded before under another name comes back
    checked, the known file's record first uploaded under its old name."""
    first = client.files.upload([graph.pdf(2001)])[0]
    again = graph.pdf(2001)
    batch = [graph.pdf(2002), Upload("renamed.pdf", again.content), graph.pdf(2003)]
    records = client.files.upload(batch)
    assert records[1]["uuid"] == first["uuid"]
    assert records[1]["original_name"] == first["original_name"]
    assert [r["size"] for r in records] == [len(u.content) for u in batch]
