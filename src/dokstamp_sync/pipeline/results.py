"""The outcome stream (docs/erp-guide.md): one entry per final outcome, back to the ERP, at
least once.

An outcome is written with ``XADD <stream> MAXLEN ~ <maxlen> * result <json>`` right after the
database transaction that recorded it has committed (the store hands its results to a
:class:`Publisher` then; the ingester does the same for stream entries that are no valid event).

The guarantee: every final outcome is written at least once. The database is the outbox: an
outcome is recorded with ``reported_at`` NULL on its inbox row (or dead letter), and only once
its XADD succeeded does one short UPDATE set it (never a transaction across the Redis call).
A process killed between the commit and the XADD, or a Redis that is away at that moment,
leaves the row unreported; the pump's sweeper (:mod:`dokstamp_sync.pipeline.outbox`) writes
such rows, rebuilt from the database, once they are some seconds old. So an entry may come
twice (a kill between the XADD and the UPDATE), never not at all. An event that is replayed, or
a dead letter that a newer event resolves, is reported again: a consumer keeps the last outcome
per ``event_id``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from redis.client import Pipeline

from dokstamp_sync.redis_keys import RESULTS_STREAM
from dokstamp_sync.reporting import Report as Report
from dokstamp_sync.reporting import Result as Result

log = logging.getLogger("dokstamp_sync.results")

RESULTS_MAXLEN = 100_000
FIELD = "result"


def reused_reason(event_id: str | None) -> str:
    """The reason of the dead letter of an entry refused for reusing ``event_id`` with other
    content; an outcome rebuilt from a letter with exactly this reason is a refused duplicate."""
    return (f"invalid event: event_id {event_id} was already used by a different event; the "
            "first one is kept, this one is not applied")


class Publisher:
    """Writes results to the outcome stream; never raises (the outcome is committed already):
    answers whether they were written."""

    def __init__(self, client: redis.Redis, stream: str = RESULTS_STREAM,
                 maxlen: int = RESULTS_MAXLEN) -> None:
        self.redis, self.stream, self.maxlen = client, stream, maxlen

    def __call__(self, results: Sequence[Result]) -> bool:
        return publish(self.redis, results, stream=self.stream, maxlen=self.maxlen)

    def add(self, pipe: Pipeline, results: Sequence[Result]) -> None:
        """XADD ``results`` in ``pipe`` (a caller's round trip, see :func:`publish`)."""
        add(pipe, results, stream=self.stream, maxlen=self.maxlen)

    def written(self, results: Sequence[Result], ok: bool) -> None:
        """What :func:`publish` says once they were written, or not, in someone's pipeline."""
        if not ok:
            _not_written(results, self.stream, "a Redis error")


def add(pipe: Pipeline, results: Sequence[Result], *, stream: str = RESULTS_STREAM,
        maxlen: int = RESULTS_MAXLEN) -> None:
    for result in results:
        pipe.xadd(stream, {FIELD: result.to_json()}, maxlen=maxlen, approximate=True)


def _not_written(results: Sequence[Result], stream: str, why: str) -> None:
    log.warning("could not write %d outcome(s) to %s (%s), the sweeper will: %s",
                len(results), stream, why, ", ".join(str(r.event_id) for r in results[:5]))


def publish(client: redis.Redis, results: Sequence[Result], *, stream: str = RESULTS_STREAM,
            maxlen: int = RESULTS_MAXLEN) -> bool:
    """XADD each result (approximate MAXLEN trim), in one round trip; a failure is logged (the
    rows stay unreported, the sweeper writes them later). Returns whether they were written."""
    if not results:
        return True
    try:
        with client.pipeline(transaction=False) as pipe:
            add(pipe, results, stream=stream, maxlen=maxlen)
            pipe.execute()
    except redis.RedisError as exc:
        _not_written(results, stream, type(exc).__name__)
        return False
    return True


def read(client: redis.Redis, stream: str = RESULTS_STREAM, *, since: str = "0",
         follow: bool = False, block_ms: int = 5000,
         count: int = 100) -> Iterator[tuple[str, dict[str, Any]]]:
    """(entry id, result) from the stream after ``since``; with ``follow``, wait for more."""
    last = since
    while True:
        answer: Any = client.xread({stream: last}, count=count,
                                   block=block_ms if follow else None)
        entries = [entry for _, items in answer or [] for entry in items]
        for entry_id, fields in entries:
            last = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            raw = fields.get(FIELD.encode(), fields.get(FIELD, b"{}"))
            try:
                yield last, json.loads(raw)
            except ValueError:
                yield last, {"unreadable": raw.decode("utf-8", "replace")
                             if isinstance(raw, bytes) else str(raw)}
        if not entries and not follow:
            return


def render(entry_id: str, result: dict[str, Any]) -> str:
    """One readable line per outcome (``dokstamp-sync results``)."""
    head = (f"{result.get('at', '?')}  {result.get('state', '?'):<10} "
            f"{result.get('entity') or '-'} {result.get('key') or '-'} "
            f"({result.get('op') or '-'}, event {result.get('event_id') or '-'})")
    tail = []
    if result.get("dokstamp_uuid"):
        tail.append(f"uuid {result['dokstamp_uuid']}")
    if result.get("mapping_status"):
        tail.append(str(result["mapping_status"]))
    if result.get("public_verification_url"):
        tail.append(result["public_verification_url"])
    if result.get("dead_letter_id") is not None:
        tail.append(f"dead letter #{result['dead_letter_id']}")
    if result.get("http_status") is not None:
        tail.append(f"HTTP {result['http_status']}")
    if result.get("refused_duplicate"):
        tail.append("refused duplicate (not the kept event's outcome)")
    if result.get("reason"):
        tail.append(str(result["reason"]))
    return head + (": " + "; ".join(tail) if tail else "") + f"  [{entry_id}]"
