"""How long `dlq replay --all` and `dlq discard --all` take over many dead letters, and the
longest single transaction (what a worker recording a sync of a key with an open letter may
wait for). Usage: python bench/dlq_replay.py [--letters 30000] [--pg postgresql://...]"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import insert

from dokstamp_sync import wiring
from dokstamp_sync.models import DeadLetter, InboxEvent
from dokstamp_sync.ops import dlq
from dokstamp_sync.pipeline import inbox
from dokstamp_sync.states import EventState, LetterStatus
from dokstamp_sync.testing import scratch_database


def fill(sessions: Any, n: int, tag: str) -> None:
    """``n`` dead events, each with its open letter (bulk INSERTs, 5,000 rows each)."""
    now = datetime.now(UTC)
    for start in range(0, n, 5000):
        rows = range(start, min(n, start + 5000))
        with sessions.begin() as session:
            pks = session.scalars(
                insert(InboxEvent).returning(InboxEvent.id),
                [{"event_id": f"{tag}-{i}", "entity": "student", "op": "upsert",
                  "erp_key": f"{tag}-S-{i}", "occurred_at": now, "payload": {"i": i},
                  "state": EventState.DEAD, "attempts": 1, "deliveries": 1,
                  "next_attempt_at": now, "received_at": now, "finished_at": now,
                  "reported_at": now} for i in rows]).all()
            session.execute(insert(DeadLetter), [
                {"event_pk": pk, "event_id": f"{tag}-{i}", "entity": "student",
                 "erp_key": f"{tag}-S-{i}",
                 "reason": f"DokStamp refused POST /students ({400 + i % 3})",
                 "http_status": 422, "attempts": 1, "status": LetterStatus.OPEN,
                 "first_failed_at": now, "last_failed_at": now, "reported_at": now}
                for pk, i in zip(pks, rows, strict=True)])


def timed(batches: list[float], fn: Any) -> Any:
    def wrapper(*args: Any, **kw: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kw)
        finally:
            batches.append(time.perf_counter() - start)
    return wrapper


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--letters", type=int, default=30_000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    with scratch_database(args.pg, "dokstamp_sync_bench_dlq") as url:
        sessions = wiring.database(url)
        for action in ("replay", "discard"):
            fill(sessions, args.letters, action)
            with sessions.begin() as session:
                preview_start = time.perf_counter()
                preview = dlq.preview(session, everything=True)
                preview_s = time.perf_counter() - preview_start
            batches: list[float] = []
            name = "replay_letters" if action == "replay" else "discard_letters"
            original = getattr(inbox, name)
            setattr(inbox, name, timed(batches, original))
            start = time.perf_counter()
            report = getattr(dlq, action)(sessions, everything=True)
            total = time.perf_counter() - start
            setattr(inbox, name, original)
            done = len(report.replayed if action == "replay" else report.discarded)
            print(f"{action} --all: {done} letters in {total:.1f} s, {len(batches)} batches of "
                  f"{dlq.BATCH}, longest batch statement time {max(batches) * 1000:.0f} ms, "
                  f"median {sorted(batches)[len(batches) // 2] * 1000:.0f} ms; "
                  f"--dry-run over them {preview_s:.2f} s ({preview.total} counted)")
        sessions.kw["bind"].dispose()


if __name__ == "__main__":
    main()
