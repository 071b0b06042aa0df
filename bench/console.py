"""How long the console takes to serve a page with 100,000 dead letters (issue 19).

Fills a scratch PostgreSQL database with N open dead letters over five entities and three
HTTP statuses (plus as many inbox events), serves the console on loopback (uvicorn, in a
thread) and times, over HTTP with a logged-in session: the first page of letters, a page
filtered by entity, a page deep in the list (keyset ``before``), a reason search, the
overview, and a letter's page. Median of 7 after a warm-up.

    python bench/console.py --letters 100000
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import threading
import time

import httpx
import redis
import uvicorn
from pydantic import SecretStr
from sqlalchemy import text

from dokstamp_sync.console.app import Console, build_app
from dokstamp_sync.console.auth import Logins
from dokstamp_sync.db import make_engine, make_sessionmaker
from dokstamp_sync.demo.embedded import free_port
from dokstamp_sync.testing import scratch_database

PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")
FILL = """
INSERT INTO inbox (event_id, entity, op, erp_key, occurred_at, payload, state, attempts,
                   deliveries, next_attempt_at, received_at, finished_at, reported_at)
SELECT 'ev-' || g, (ARRAY['student','course','enrollment','certificate','module'])[g % 5 + 1],
       'upsert', 'K-' || g, now(), '{"data": {"name": "x"}}', 'dead', 1, 1, now(), now(), now(),
       now()
FROM generate_series(1, CAST(:n AS bigint)) AS g;
INSERT INTO dead_letters (event_pk, event_id, entity, erp_key, reason, http_status, attempts,
                          status, first_failed_at, last_failed_at, request_method,
                          request_path)
SELECT id, event_id, entity, erp_key,
       'DokStamp refused POST /' || entity || 's (' || (ARRAY[403, 409, 422])[id % 3 + 1] || ')',
       (ARRAY[403, 409, 422])[id % 3 + 1], 1, 'open', now() - (id || ' seconds')::interval,
       now() - (id || ' seconds')::interval, 'POST', '/' || entity || 's'
FROM inbox;
ANALYZE inbox;
ANALYZE dead_letters
"""


def timed(client: httpx.Client, url: str, repeat: int = 7) -> float:
    assert client.get(url).status_code == 200
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        answer = client.get(url)
        samples.append(time.perf_counter() - start)
        assert answer.status_code == 200
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--letters", type=int, default=100_000)
    args = parser.parse_args()
    with scratch_database(PG_ADMIN, "dokstamp_sync_bench_console") as url:
        engine = make_engine(url)
        with engine.begin() as conn:
            for statement in FILL.split(";"):
                conn.execute(text(statement), {"n": args.letters})
        console = Console(Logins(SecretStr("ops:bench")), make_sessionmaker(engine),
                          redis.Redis.from_url(REDIS_URL), "bench-console:events")
        config = uvicorn.Config(build_app(console), host="127.0.0.1", port=free_port(),
                                log_level="warning")
        server = uvicorn.Server(config)
        threading.Thread(target=server.run, daemon=True).start()
        while not server.started:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{config.port}", timeout=60) as client:
            token = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
            assert token
            client.post("/login", data={"user": "ops", "password": "bench",
                                        "csrf": token.group(1)})
            pages = {"letters, first page": "/letters",
                     "letters, entity=course": "/letters?entity=course",
                     "letters, deep page (before=1000)": "/letters?before=1000",
                     "letters, entity=course + HTTP 409 + reason": (
                         "/letters?entity=course&http_status=409&reason=refused"),
                     "overview": "/",
                     "a letter's page": f"/letters/{args.letters // 2}"}
            print(f"{args.letters} open dead letters")
            for name, path in pages.items():
                print(f"  {name:<45} {timed(client, path) * 1000:8.1f} ms", flush=True)
        server.should_exit = True
        engine.dispose()


if __name__ == "__main__":
    main()
