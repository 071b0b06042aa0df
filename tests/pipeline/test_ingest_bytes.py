"""A batch of the ingester is bounded by bytes as well as by count (issue 17, item 7): with
entries of megabytes each, no read hands the worker more than the batch's byte budget, and an
entry larger than the budget alone is never read at all: it becomes a dead letter with its
reason, and the entries after it are recorded. Measured on the wire: a real Redis, read through
a redis-py connection that counts the bytes of every answer it parses."""

from __future__ import annotations

import base64
import json
from typing import Any

import redis
from sqlalchemy import select

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo.samples import event
from dokstamp_sync.models import DeadLetter, InboxEvent
from dokstamp_sync.pipeline.ingest import StreamIngester
from dokstamp_sync.testing import STREAM
from testenv import TEST_ENGINE_REDIS_URL

MiB = 1024 * 1024


class CountingConnection(redis.Connection):
    """A real connection that adds up the bytes of the strings in every answer it reads."""

    read_bytes = 0

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        answer = super().read_response(*args, **kwargs)
        CountingConnection.read_bytes += _size(answer)
        return answer


def _size(value: Any) -> int:
    if isinstance(value, bytes | str):
        return len(value)
    if isinstance(value, list | tuple):
        return sum(_size(v) for v in value)
    if isinstance(value, dict):
        return sum(_size(k) + _size(v) for k, v in value.items())
    return 0


def _file_event(key: str, size: int) -> str:
    content = base64.b64encode(b"%PDF" + b"x" * (size - 4)).decode()
    return json.dumps(event("file", key, {"filename": f"{key}.pdf",
                                          "content_base64": content}))


def test_a_batch_never_reads_more_than_its_byte_budget(ctx):
    """Eight file events of about 4 MiB each and, among them, one entry of 24 MiB; the budget
    is 10 MiB a batch: every poll reads at most 10 MiB from Redis (so at most two of the files),
    all eight files are recorded in stream order, and the 24 MiB entry, never read, is a dead
    letter saying how big it is; nothing stays pending."""
    pool = redis.ConnectionPool.from_url(TEST_ENGINE_REDIS_URL,
                                         connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    got: list[int] = []
    ingester = StreamIngester(client, ctx.sessions, STREAM, consumer="bytes", dispatch=got.extend,
                              lease=600, batch=200, batch_bytes=10 * MiB,
                              max_file_bytes=4 * MiB)
    ingester.ensure_group()
    keys = [f"F-{i}" for i in range(8)]
    for i, key in enumerate(keys):
        ctx.redis.xadd(STREAM, {"event": _file_event(key, 3 * MiB)})
        if i == 3:
            ctx.redis.xadd(STREAM, {"event": "x" * (24 * MiB)})
    peaks = []
    while True:
        CountingConnection.read_bytes = 0
        read = ingester.poll(block_ms=10)
        peaks.append(CountingConnection.read_bytes)
        if not read:
            break
    assert max(peaks) <= 10 * MiB, [round(p / MiB, 1) for p in peaks]
    assert len(got) == 8
    with session_scope(ctx.sessions) as s:
        assert list(s.scalars(select(InboxEvent.erp_key).order_by(InboxEvent.id))) == keys
        (letter,) = s.scalars(select(DeadLetter))
        assert letter.reason.startswith(f"invalid event: the stream entry is {24 * MiB + 5} "
                                        "bytes"), letter.reason
        assert letter.event_pk is None
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0
    client.close()


def test_a_restart_and_a_takeover_read_pending_entries_within_the_budget(ctx):
    """A consumer took six 4 MiB entries with one plain XREADGROUP and died (the crash loop of
    the issue: its pending batch is what a restart reads first). Restarted under its name, it
    reads its own pending entries at most 10 MiB a poll; another consumer taking over a dead
    one's six entries (XAUTOCLAIM) reads them within the same bound. All twelve are recorded
    once and nothing stays pending."""
    pool = redis.ConnectionPool.from_url(TEST_ENGINE_REDIS_URL,
                                         connection_class=CountingConnection)
    client = redis.Redis(connection_pool=pool)
    got: list[int] = []

    def ingester(name: str) -> StreamIngester:
        return StreamIngester(client, ctx.sessions, STREAM, consumer=name, dispatch=got.extend,
                              lease=600, batch_bytes=10 * MiB, max_file_bytes=4 * MiB,
                              claim_idle_ms=0)

    ingester("first").ensure_group()
    for name in ("first", "lost"):
        for i in range(6):
            ctx.redis.xadd(STREAM, {"event": _file_event(f"{name}-{i}", 3 * MiB)})
        ctx.redis.xreadgroup("dokstamp-sync", name, {STREAM: ">"}, count=200)  # then it dies
    for survivor in (ingester("first"), ingester("other")):
        peaks = []
        while True:
            CountingConnection.read_bytes = 0
            read = survivor.poll(block_ms=10)
            peaks.append(CountingConnection.read_bytes)
            if not read:
                break
        assert max(peaks) <= 10 * MiB, [round(p / MiB, 1) for p in peaks]
    assert len(got) == 12
    assert ctx.redis.xpending(STREAM, "dokstamp-sync")["pending"] == 0
    client.close()
