"""A health check that measures progress, not merely that a process exists.

Celery workers are known to stay alive while silently no longer consuming after a Redis
reconnect, so "the process runs" proves nothing. Healthy means all of:

* the mapping store and Redis answer;
* some stream consumer has read within ``consumer_grace`` seconds (its heartbeat);
* no task is queued while no task has finished for ``stall`` seconds;
* the oldest unsynced event is younger than ``max_age`` seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy.orm import Session

from dokstamp_sync.ops.status import report
from dokstamp_sync.redis_keys import HEARTBEAT


@dataclass
class Health:
    ok: bool
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def _age(raw: bytes | str | None, now: float) -> float | None:
    return None if raw is None else max(0.0, now - float(raw))


def check(session: Session, client: redis.Redis, stream: str, *, max_age: float = 3600.0,
          stall: float = 120.0, consumer_grace: float = 30.0) -> Health:
    problems: list[str] = []
    status = report(session, client, stream)
    if "redis_error" in status:
        return Health(False, [f"Redis unreachable: {status['redis_error']}"], status)
    now = time.time()
    consumers = list(client.scan_iter(f"{HEARTBEAT}ingest:*"))
    ages = [a for a in (_age(client.get(k), now) for k in consumers) if a is not None]
    consumer_age = min(ages) if ages else None
    task_age = _age(client.get(f"{HEARTBEAT}task"), now)
    if consumer_age is None or consumer_age > consumer_grace:
        problems.append("no stream consumer has read recently: is `dokstamp-sync worker` "
                        "running?")
    if status["queue_depth"] and (task_age is None or task_age > stall):
        problems.append(f"{status['queue_depth']} tasks queued but none finished in the last "
                        f"{stall:.0f} s: workers are not consuming")
    oldest = status["oldest_unsynced_age_s"]
    if oldest is not None and oldest > max_age:
        problems.append(f"the oldest unsynced event is {oldest:.0f} s old (limit "
                        f"{max_age:.0f} s)")
    facts = status | {"consumer_heartbeat_age_s": consumer_age,
                      "last_task_finished_age_s": task_age}
    return Health(not problems, problems, facts)
