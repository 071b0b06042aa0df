"""A deployment's namespace reaches every Redis name the sync writes: wiring builds one
``RedisKeys`` from ``DOKSTAMP_SYNC_NAMESPACE`` and hands it to the token cache, the rate limiter,
the breaker, the walk's marks and locks, the counters and the replica's metrics."""

from __future__ import annotations

import json

from dokstamp_sync import wiring
from dokstamp_sync.ops.health import check
from dokstamp_sync.pipeline.ingest import StreamIngester
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.sync import engine
from dokstamp_sync.testing import STREAM, live, sandbox_settings, student


def test_every_name_a_sync_writes_carries_the_namespace(sandbox, sessions, engine_redis):
    """One student synced with the namespace ``blue:``: DokStamp holds her, and every Redis key
    the run left (token, rate-limit bucket, listing and in-flight marks, counters, heartbeat,
    replica counters) starts with ``blue:``; only the streams (the ERP's interface) do not.
    The health check and status, given the same names, see the task's heartbeat."""
    settings = sandbox_settings(sandbox.url, dokstamp_sync_namespace=" blue: ")
    keys = wiring.redis_keys(settings)
    assert keys == RedisKeys("blue:")
    ctx = wiring.build_context(settings, sessions=sessions, redis_client=engine_redis,
                               sleep=lambda _s: None)
    try:
        got: list[int] = []
        ingester = StreamIngester(engine_redis, sessions, STREAM, consumer="ns", keys=keys,
                                  dispatch=got.extend, lease=600, report=ctx.store.report)
        ingester.ensure_group()
        engine_redis.xadd(STREAM, {"event": json.dumps(student())})
        while ingester.poll(block_ms=10):
            pass
        assert [engine.run(ctx, pk) for pk in got] == ["synced"]
        wiring.recorder().count("op", "test")
        wiring.recorder().flush(engine_redis, ctx.counters.keys)
    finally:
        ctx.close()
    assert len(live(sandbox, "students")) == 1
    assert [g["name"] for g in engine_redis.xinfo_groups(STREAM)] == [b"blue:dokstamp-sync"]
    names = {k.decode() for k in engine_redis.scan_iter("*")}
    outside = names - {STREAM, settings.dokstamp_sync_results_stream}
    assert outside
    assert all(n.startswith("blue:") for n in outside), sorted(outside)
    for made in ("blue:dokstamp:token:", "blue:dokstamp:ratelimit:", "blue:dokstamp:metrics",
                 "blue:dokstamp:heartbeat:task", "blue:dokstamp:heartbeat:ingest:ns",
                 "blue:dokstamp:metrics:replica:"):
        assert any(n.startswith(made) for n in outside), (made, sorted(outside))
    with sessions() as session:
        health = check(session, engine_redis, STREAM, keys=keys)
    assert health.facts["last_task_finished_age_s"] is not None
    assert health.facts["consumer_heartbeat_age_s"] is not None
