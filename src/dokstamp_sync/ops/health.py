"""A health check that measures progress, not merely that a process exists.

Celery workers are known to stay alive while silently no longer consuming after a Redis
reconnect, so "the process runs" proves nothing. Healthy means all of:

* the mapping store and Redis answer;
* some stream consumer has recorded a batch (or found nothing to read) within
  ``consumer_grace`` seconds (its heartbeat); if not, and an ingest failure was noted since,
  the problem says "stream ingestion failing: <reason>";
* no task is queued while no task has finished for ``stall`` seconds;
* the oldest unsynced event is younger than ``max_age`` seconds.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis
from sqlalchemy.orm import Session

from dokstamp_sync.ops.status import report
from dokstamp_sync.redis_keys import RedisKeys


@dataclass
class Health:
    ok: bool
    problems: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


def _age(raw: bytes | str | None, now: float) -> float | None:
    return None if raw is None else max(0.0, now - float(raw))


def _last_failure(client: redis.Redis, key: str, now: float) -> tuple[float, str] | None:
    """(age in seconds, reason) of the last failed ingest batch still on record, if any."""
    raw = client.get(key)
    try:
        note = json.loads(raw) if raw is not None else None
        return (max(0.0, now - float(note["at"])), str(note["reason"])) if note else None
    except (ValueError, TypeError, KeyError):
        return None


def check(session: Session, client: redis.Redis, stream: str, *, max_age: float = 3600.0,
          stall: float = 120.0, consumer_grace: float = 30.0, finals: bool = True,
          keys: RedisKeys = RedisKeys()) -> Health:
    """``finals``: count final events too (see :func:`~.status.report`); ``keys``: the
    deployment's Redis names (heartbeats, the ingest failure, the queue)."""
    problems: list[str] = []
    status = report(session, client, stream, finals=finals, keys=keys)
    if "redis_error" in status:
        return Health(False, [f"Redis unreachable: {status['redis_error']}"], status)
    now = time.time()
    consumers = list(client.scan_iter(f"{keys.heartbeat}ingest:*"))
    ages = [a for a in (_age(client.get(k), now) for k in consumers) if a is not None]
    consumer_age = min(ages) if ages else None
    task_age = _age(client.get(f"{keys.heartbeat}task"), now)
    failure = _last_failure(client, keys.ingest_failure, now)
    if consumer_age is None or consumer_age > consumer_grace:
        if failure is not None and (consumer_age is None or failure[0] < consumer_age):
            problems.append(f"stream ingestion failing: {failure[1]}")
        else:
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
                      "last_task_finished_age_s": task_age,
                      "last_ingest_failure_age_s": failure[0] if failure else None,
                      "last_ingest_failure": failure[1] if failure else None}
    return Health(not problems, problems, facts)
