"""Files for ``POST /files`` (:class:`Upload`) and the check of what the upload answered.

The docs' upload answer is ``{"data": [{file}, ...]}`` with, per file, ``uuid``,
``original_name``, ``mime_type``, ``size`` (bytes) and ``used_at``; they do not say that the
records come in the order of the ``files[]`` parts, and they show no hash. Uploads are
deduplicated by content: a file already stored comes back as the *existing* record, with the
``original_name`` it was first uploaded under. So :func:`check_upload` matches

1. by ``original_name`` when every record's name is the filename of exactly one upload and the
   names pair records and uploads one to one (records may then come in any order);
2. else by position, provided no record names another upload's file;

and then requires, for each pair, a ``uuid`` and a ``size`` equal to the bytes sent. Anything
else raises :class:`~.errors.UploadMismatch`: which UUID belongs to which file is then unknown,
so upload the files one per request (a single file's record is unambiguous, and deduplication
makes re-sending harmless). Two same-sized files whose records come back swapped *and* renamed
by deduplication cannot be told apart; only a hash in the answer could, and the docs show none.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from dokstamp_sync.dokstamp import errors

Entity = dict[str, Any]


@dataclass(frozen=True)
class Upload:
    """One file for ``POST /files``."""

    filename: str
    content: bytes
    content_type: str = "application/pdf"


def check_upload(response: httpx.Response, uploads: Sequence[Upload],
                 records: Sequence[Any]) -> list[Entity]:
    """``records`` (what ``response`` answered) paired with ``uploads``: one record per upload,
    returned in the order of ``uploads``. Raises :class:`~.errors.UploadMismatch` otherwise
    (see the module docstring for what is matched)."""
    if len(records) != len(uploads) or not all(isinstance(r, dict) for r in records):
        raise _mismatch(response, f"{len(records)} records for {len(uploads)} files")
    ordered = _by_name(uploads, records) or _by_position(response, uploads, records)
    for i, (upload, record) in enumerate(zip(uploads, ordered, strict=True)):
        size = record.get("size")
        if not record.get("uuid") or not isinstance(size, int) or isinstance(size, bool):
            raise _mismatch(response, f"the record for file {i + 1} lacks a uuid or a size")
        if size != len(upload.content):
            raise _mismatch(response, f"file {i + 1} has {len(upload.content)} bytes, its "
                                      f"record says {size}")
    return [dict(r) for r in ordered]


def _by_name(uploads: Sequence[Upload], records: Sequence[Entity]) -> list[Entity] | None:
    names = [u.filename for u in uploads]
    if len(set(names)) != len(names):
        return None
    by_name = {r.get("original_name"): r for r in records}
    if set(by_name) != set(names):
        return None
    return [by_name[n] for n in names]


def _by_position(response: httpx.Response, uploads: Sequence[Upload],
                 records: Sequence[Entity]) -> list[Entity]:
    names = Counter(u.filename for u in uploads)
    for i, (upload, record) in enumerate(zip(uploads, records, strict=True)):
        name = record.get("original_name")
        if isinstance(name, str) and name != upload.filename and names[name]:
            raise _mismatch(response, f"record {i + 1} is named after another file sent")
    return list(records)


def _mismatch(response: httpx.Response, reason: str) -> errors.UploadMismatch:
    return errors.UploadMismatch(f"upload answer does not match the files sent: {reason}",
                                 status=response.status_code, method=response.request.method,
                                 path=response.request.url.path)
