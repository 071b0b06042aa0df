"""Health check (progress, not liveness), Prometheus metrics, JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import re
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime

import pytest
from sqlalchemy import update

from dokstamp_sync import tasks, wiring
from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.embedded import free_port
from dokstamp_sync.logs import formatter
from dokstamp_sync.models import InboxEvent
from dokstamp_sync.ops import recorder
from dokstamp_sync.ops.health import check
from dokstamp_sync.ops.metrics import serve
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sandbox import Faults, ScriptedFault
from dokstamp_sync.sync import engine
from dokstamp_sync.testing import STREAM, student


def health(ctx, **kw):
    with session_scope(ctx.sessions) as s:
        return check(s, ctx.redis, STREAM, **kw)


def test_unhealthy_when_no_consumer_reads(ctx):
    """No ingester heartbeat: unhealthy, whatever processes exist."""
    result = health(ctx)
    assert not result.ok
    assert "no stream consumer has read recently" in result.problems[0]


def test_healthy_when_the_consumer_reads_and_nothing_is_stuck(h, ctx):
    """A consumer that just polled and an empty queue: healthy."""
    h.sync(student())
    result = health(ctx)
    assert result.ok, result.problems
    assert result.facts["consumer_heartbeat_age_s"] < 5


def test_unhealthy_when_tasks_are_queued_but_none_finishes(h, ctx):
    """Tasks waiting in the Celery queue while no task finished lately: workers stopped
    consuming (the silent-after-reconnect failure)."""
    h.send(student())
    ctx.redis.lpush(RedisKeys().queue, "a task nobody takes")
    ctx.redis.set("dokstamp:heartbeat:task", str(time.time() - 600))
    result = health(ctx, stall=120)
    assert not result.ok
    assert "tasks queued but none finished" in result.problems[0]
    ctx.redis.set("dokstamp:heartbeat:task", str(time.time()))
    assert health(ctx, stall=120).ok


def test_unhealthy_when_the_oldest_unsynced_event_is_too_old(h, ctx):
    """An event left unsynced longer than max_age makes the check fail."""
    h.send(student())  # recorded, never run
    time.sleep(1.1)
    result = health(ctx, max_age=1)
    assert not result.ok
    assert "oldest unsynced event" in result.problems[-1]


def run_as_task(ctx, pks):
    """Run events as the task does: the engine, then the replica's counts, then the flush."""
    states = [engine.run(ctx, pk, flush=False) for pk in pks]
    tasks.record(ctx)
    engine.flush_counters(ctx)
    return states


def test_metrics_endpoint_reports_states_api_calls_429s_and_retries(h, ctx, sandbox):
    """/metrics shows open events by state, this replica's API responses by route and status
    with their latency, 429s, outcomes and retries, and the breaker; /healthz answers 200 or
    503 with the reasons."""
    wiring.recorder().flush(ctx.redis)  # earlier tests' requests go to another replica
    replica = recorder.name_replica(f"test-{time.time_ns()}")
    sandbox.sandbox.faults.configure(Faults(script=[
        ScriptedFault("GET", "/students", status=429, retry_after=1),
        ScriptedFault("GET", "/institutions", status=503, times=3)]))
    events = samples.graduating_class(1)
    assert run_as_task(ctx, h.send(events[0])) == ["waiting"]  # one retry, parked
    with session_scope(ctx.sessions) as s:  # its backoff over: dependents may run it inline
        s.execute(update(InboxEvent).values(next_attempt_at=datetime.now(UTC)))
    run_as_task(ctx, h.send(*events[1:]))
    port = free_port()
    server = serve(ctx.sessions, ctx.redis, STREAM, port=port, background=True,
                   replica=replica, tenant="demo-university")
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert 'dokstamp_sync_events{state="pending"} 0.0' in text
        assert 'dokstamp_sync_events{state="synced"}' not in text  # a scrape counts open ones
        assert 'dokstamp_sync_task_outcomes_total{state="waiting"} 1.0' in text
        assert 'dokstamp_sync_task_outcomes_total{state="synced"} 14.0' in text
        assert ('dokstamp_sync_api_requests_total{method="GET",route="/students",'
                'status="429",status_class="4xx"} 1.0') in text
        assert "dokstamp_sync_api_429_total 1.0" in text
        assert "dokstamp_sync_retries_total 1.0" in text
        assert re.search(r'dokstamp_sync_api_request_duration_seconds_bucket\{le="\+Inf",'
                         r'method="POST",route="/students"\} [1-9]', text), text
        assert "dokstamp_sync_breaker_open 0.0" in text
        assert "dokstamp_sync_oldest_unsynced_event_age_seconds" in text
        body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz").read())
        assert body["ok"] is True
        ctx.redis.delete(*ctx.redis.keys("dokstamp:heartbeat:ingest:*"))
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz")
        info.value.close()
        assert info.value.code == 503
    finally:
        server.shutdown()
        server.server_close()


def test_event_outcomes_log_as_json_lines_with_their_fields(h):
    """With JSON logs, each outcome is one JSON object carrying event_id, entity, key, state,
    and no secret."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter(True))
    logger = logging.getLogger("dokstamp_sync.sync")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        e = student()
        h.sync(e)
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    (outcome,) = [x for x in lines if x.get("event_id") == e["event_id"]]
    assert (outcome["entity"], outcome["key"], outcome["state"]) == ("student", "S-1",
                                                                     "synced")
    assert "sandbox-password" not in stream.getvalue()
