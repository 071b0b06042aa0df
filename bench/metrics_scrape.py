"""What one /metrics scrape costs as the inbox grows (issue 17, item 14).

Fills a scratch PostgreSQL database with N final events (synced, a few superseded), 100 open
events and 50 open dead letters (``--letters``), then times the fleet-wide part of a scrape
(``SyncCollector.fleet``: open events and letters counted through their indexes) against the
status report's ``GROUP BY`` over the whole inbox (what each scrape ran before).

    python bench/metrics_scrape.py --rows 10000 100000 1000000
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import redis
from sqlalchemy import text

from dokstamp_sync.db import make_engine, make_sessionmaker, session_scope
from dokstamp_sync.ops.metrics import SyncCollector
from dokstamp_sync.ops.status import report
from dokstamp_sync.testing import scratch_database

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
FILL = """
INSERT INTO inbox (event_id, entity, op, erp_key, occurred_at, payload, state, attempts,
                   deliveries, next_attempt_at, received_at, finished_at, reported_at)
SELECT 'ev-' || g, 'student', 'upsert', 'S-' || (g % 50000), now(), '{}',
       CASE WHEN g % 10 = 0 THEN 'superseded' ELSE 'synced' END, 0, 1, now(), now(), now(),
       now()
FROM generate_series(CAST(:start AS bigint), CAST(:stop AS bigint)) AS g
"""
OPEN_ROWS = """
INSERT INTO inbox (event_id, entity, op, erp_key, occurred_at, payload, state, attempts,
                   deliveries, next_attempt_at, received_at)
SELECT 'open-' || g, 'student', 'upsert', 'P-' || g, now(), '{}',
       CASE WHEN g % 2 = 0 THEN 'pending' ELSE 'waiting' END, 0, 0, now(), now()
FROM generate_series(1, 100) AS g;
INSERT INTO dead_letters (reason, entity, erp_key, attempts, status, first_failed_at,
                          last_failed_at)
SELECT 'DokStamp refused POST /students (422)', 'student', 'D-' || g, 1, 'open', now(), now()
FROM generate_series(1, CAST(:letters AS bigint)) AS g;
"""


def timed(fn: object, repeat: int = 7) -> float:
    """Median seconds of ``repeat`` calls (after one warm-up)."""
    assert callable(fn)
    fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--letters", type=int, default=50, help="open dead letters")
    args = parser.parse_args()
    client = redis.Redis.from_url(REDIS_URL)
    with scratch_database(PG_ADMIN, "dokstamp_sync_bench_scrape") as url:
        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with engine.begin() as conn:
            for statement in OPEN_ROWS.split(";"):
                if statement.strip():
                    conn.execute(text(statement), {"letters": args.letters})
        collector = SyncCollector(sessions, client, "bench-scrape:events")
        filled = 0
        print(f"{args.letters} open dead letters")
        print(f"{'inbox rows':>12} {'scrape (new) ms':>16} {'GROUP BY (old) ms':>18}")
        for rows in sorted(args.rows):
            with engine.begin() as conn:
                conn.execute(text(FILL), {"start": filled + 1, "stop": rows})
                conn.execute(text("ANALYZE inbox"))
            filled = rows

            def scrape() -> None:
                list(collector.fleet())

            def old() -> None:
                with session_scope(sessions) as session:
                    report(session, client, "bench-scrape:events")

            print(f"{rows:>12} {timed(scrape) * 1000:>16.1f} {timed(old) * 1000:>18.1f}",
                  flush=True)
        engine.dispose()


if __name__ == "__main__":
    main()
