"""Sending ERP events (docs/erp-guide.md): ``XADD <stream> * event '<json>'``, from Python
or a file.

Events are not validated here: a malformed one still goes through, so that it ends as a dead
letter with its reason instead of being lost; :func:`enqueue_lines` also reports it at once.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis

from dokstamp_sync.events import InvalidEvent, parse_event


def enqueue(event: Mapping[str, Any] | str, *, client: redis.Redis | None = None,
            stream: str | None = None) -> str:
    """Append one event to the stream; return the stream entry id.

    Without ``client``/``stream``, ``REDIS_URL`` and ``DOKSTAMP_SYNC_STREAM`` are used.
    """
    if client is None or stream is None:
        default_client, default_stream = _default_target()
        client, stream = client or default_client, stream or default_stream
    text = event if isinstance(event, str) else json.dumps(dict(event), default=str)
    entry_id = client.xadd(stream, {"event": text})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


_target: tuple[redis.Redis, str] | None = None


def _default_target() -> tuple[redis.Redis, str]:
    """``REDIS_URL``'s client and ``DOKSTAMP_SYNC_STREAM``, read once per process (on the first
    call without both: the public ``enqueue(event)`` of docs/erp-guide.md)."""
    global _target
    if _target is None:
        from dokstamp_sync.config import load_store_settings

        where = load_store_settings()
        _target = (redis.Redis.from_url(where.redis_url), where.dokstamp_sync_stream)
    return _target


@dataclass
class EnqueueReport:
    sent: int = 0
    invalid: list[tuple[int, str]] = field(default_factory=list)  # (line number, reason)


def invalid_lines(lines: Iterable[str]) -> list[tuple[int, str]]:
    """(line number, reason) of every non-blank line that is not a valid event."""
    out = []
    for number, line in enumerate(lines, 1):
        if line.strip():
            try:
                parse_event(line.strip())
            except InvalidEvent as exc:
                out.append((number, exc.reason))
    return out


def enqueue_lines(lines: Iterable[str], *, client: redis.Redis, stream: str,
                  strict: bool = False) -> EnqueueReport:
    """Enqueue one JSON event per non-blank line; note the invalid ones (still enqueued).
    ``strict``: when any line is invalid, send nothing (the report names every bad line)."""
    report = EnqueueReport()
    if strict:
        lines = list(lines)
        report.invalid = invalid_lines(lines)
        if report.invalid:
            return report
    with client.pipeline(transaction=False) as pipe:
        for number, line in enumerate(lines, 1):
            text = line.strip()
            if not text:
                continue
            try:
                parse_event(text)
            except InvalidEvent as exc:
                report.invalid.append((number, exc.reason))
            pipe.xadd(stream, {"event": text})
            report.sent += 1
        pipe.execute()
    return report
