"""Prometheus metrics (what Flower does not show), read fresh at each scrape.

Two kinds, so that with several worker replicas scraped the numbers add up:

* **Per-replica counters** (``*_total`` and the request-latency histogram): what this replica's
  processes did (API responses by route, method and status, outcomes, retries), from its own
  Redis hash (:mod:`.recorder`). ``sum()`` over replicas is the fleet's; ``dokstamp-sync
  metrics`` alone (no worker) exports none.
* **Fleet-wide gauges** (events by state, stream and queue depth, oldest unsynced event, open
  dead letters, heartbeat ages, the breaker, events held by the change guard per kind): the
  same value from every replica. Aggregate them with ``max()``, never ``sum()``.

A scrape's cost does not grow with the inbox's history: it counts open events and open dead
letters through indexes that lead with their state (see ``bench/metrics_scrape.py``).
``/metrics`` serves them, ``/healthz`` the health check (200 or 503).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any, get_args
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.dokstamp.breaker import CircuitBreaker
from dokstamp_sync.events import Entity
from dokstamp_sync.models import DeadLetter
from dokstamp_sync.ops import recorder
from dokstamp_sync.ops.health import check
from dokstamp_sync.redis_keys import RedisKeys
from dokstamp_sync.states import OPEN, LetterStatus

PREFIX = "dokstamp_sync"
GAUGES = (("stream_depth", "stream_depth", "Entries waiting in the Redis stream"),
          ("queue_depth", "queue_depth", "Tasks waiting in the Celery queue"),
          ("oldest_unsynced_event_age_seconds", "oldest_unsynced_age_s",
           "Age of the oldest pending or waiting event (0 when none)"),
          ("dead_letters_open", "dead_letters_open", "Open dead letters"),
          ("consumer_heartbeat_age_seconds", "consumer_heartbeat_age_s",
           "Seconds since a stream consumer last read (-1: never)"),
          ("last_task_finished_age_seconds", "last_task_finished_age_s",
           "Seconds since a task last finished (-1: never)"))


class SyncCollector:
    """A Prometheus collector over the store and Redis: the fleet's gauges and, when
    ``replica`` is given, that replica's counters (``keys``: the deployment's Redis names)."""

    def __init__(self, sessions: sessionmaker[Session], client: redis.Redis,
                 stream: str, *, replica: str | None = None, tenant: str | None = None,
                 keys: RedisKeys = RedisKeys()) -> None:
        self.sessions, self.redis, self.stream = sessions, client, stream
        self.replica, self.keys = replica, keys
        self.breaker = CircuitBreaker(client, tenant, keys=keys) if tenant else None

    def collect(self) -> Iterator[Metric]:
        yield from self.fleet()
        if self.replica is not None:
            yield from replica_counters(self.redis, self.replica, self.keys)

    def fleet(self) -> Iterator[Metric]:
        with session_scope(self.sessions) as session:
            health = check(session, self.redis, self.stream, finals=False, keys=self.keys)
            by_entity = session.execute(
                select(DeadLetter.entity, func.count()).where(
                    DeadLetter.status == LetterStatus.OPEN).group_by(DeadLetter.entity)).all()
        facts = health.facts
        events = GaugeMetricFamily(f"{PREFIX}_events", "Open events in the inbox by state "
                                   "(fleet-wide: use max())", labels=["state"])
        for state in OPEN:
            events.add_metric([state.value], facts["events"].get(state.value, 0))
        yield events
        kinds = GaugeMetricFamily(f"{PREFIX}_held_events", "Events held by the change guard "
                                  "(docs/guard.md) by entity kind (fleet-wide: use max())",
                                  labels=["entity"])
        for entity in get_args(Entity):  # 0, not a vanished series, once nothing is held
            kinds.add_metric([entity], facts["held"].get(entity, 0))
        yield kinds
        for name, key, text in GAUGES:
            value = facts.get(key)
            default = 0.0 if key == "oldest_unsynced_age_s" else -1.0
            yield GaugeMetricFamily(f"{PREFIX}_{name}", f"{text} (fleet-wide: use max())",
                                    value=default if value is None else float(value))
        letters = GaugeMetricFamily(f"{PREFIX}_dead_letters_open_by_entity", "Open dead "
                                    "letters by entity (fleet-wide: use max())",
                                    labels=["entity"])
        for entity, n in by_entity:
            letters.add_metric([entity or "malformed"], n)
        yield letters
        yield GaugeMetricFamily(f"{PREFIX}_healthy", "1 when the health check passes",
                                value=1.0 if health.ok else 0.0)
        if self.breaker is not None:
            yield GaugeMetricFamily(f"{PREFIX}_breaker_open", "1 while the fleet's circuit "
                                    "breaker holds DokStamp requests (fleet-wide: use max())",
                                    value=0.0 if self.breaker.open_for() is None else 1.0)


def replica_counters(client: redis.Redis, name: str,
                     keys: RedisKeys = RedisKeys()) -> Iterator[Metric]:
    """One replica's counters and latency histogram (see :mod:`.recorder`)."""
    api = CounterMetricFamily(f"{PREFIX}_api_requests", "DokStamp API responses by route, "
                              "method and status", labels=["route", "method", "status",
                                                           "status_class"])
    too_many = CounterMetricFamily(f"{PREFIX}_api_429", "HTTP 429 answers from DokStamp")
    outcomes = CounterMetricFamily(f"{PREFIX}_task_outcomes", "Event runs by the state they "
                                   "left their event in", labels=["state"])
    ops = CounterMetricFamily(f"{PREFIX}_operations", "The sync engine's steps (creates, "
                              "searches, uploads, unchanged...)", labels=["kind"])
    retries = 0.0
    n429 = 0.0
    buckets: dict[tuple[str, str], dict[str, float]] = {}
    sums: dict[tuple[str, str], float] = {}
    for parts, value in recorder.read(client, name, keys):
        kind, labels = parts[0], parts[1:]
        if kind == "api" and len(labels) == 3:
            api.add_metric([*labels, f"{labels[2][:1]}xx"], value)
            n429 += value if labels[2] == "429" else 0
        elif kind == "outcome" and len(labels) == 1:
            outcomes.add_metric(labels, value)
        elif kind == "op" and labels == ["retries"]:
            retries += value
        elif kind == "op" and len(labels) == 1:
            ops.add_metric(labels, value)
        elif kind == "latency" and len(labels) == 3:
            buckets.setdefault((labels[0], labels[1]), {})[labels[2]] = value
        elif kind == "latency_sum" and len(labels) == 2:
            sums[(labels[0], labels[1])] = value
    too_many.add_metric([], n429)
    latency = HistogramMetricFamily(f"{PREFIX}_api_request_duration_seconds",
                                    "DokStamp request latency (to the response's headers)",
                                    labels=["route", "method"])
    les = [*(str(le) for le in recorder.BUCKETS), "+Inf"]
    for key, counts in sorted(buckets.items()):
        latency.add_metric(list(key), [(le, counts.get(le, 0.0)) for le in les],
                           sum_value=sums.get(key, 0.0))
    yield from (api, too_many, outcomes, ops, latency)
    yield CounterMetricFamily(f"{PREFIX}_retries", "Events parked for a retry after a "
                              "transient failure", value=retries)


def app(sessions: sessionmaker[Session], client: redis.Redis, stream: str, *,
        replica: str | None = None, tenant: str | None = None,
        keys: RedisKeys = RedisKeys()) -> Callable[..., Any]:
    """A WSGI app: ``/metrics`` (Prometheus text) and ``/healthz``."""
    registry = CollectorRegistry()
    registry.register(SyncCollector(sessions, client, stream, replica=replica, tenant=tenant,
                                    keys=keys))
    metrics = make_wsgi_app(registry)

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            with session_scope(sessions) as session:
                health = check(session, client, stream, keys=keys)
            body = json.dumps({"ok": health.ok, "problems": health.problems,
                               "facts": health.facts}).encode()
            start_response("200 OK" if health.ok else "503 Service Unavailable",
                           [("Content-Type", "application/json")])
            return [body]
        result: Iterable[bytes] = metrics(environ, start_response)
        return result

    return wsgi


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # stdlib's name
        pass


def serve(sessions: sessionmaker[Session], client: redis.Redis, stream: str, *,
          address: str = "127.0.0.1", port: int = 9464, background: bool = False,
          replica: str | None = None, tenant: str | None = None,
          keys: RedisKeys = RedisKeys(),
          listening: Callable[[str], None] | None = None) -> WSGIServer:
    """Serve the metrics; in a daemon thread when ``background``. ``listening`` is told the
    URL once the port is bound (never before: a port in use must not be announced)."""
    server = make_server(address, port, app(sessions, client, stream, replica=replica,
                                            tenant=tenant, keys=keys), handler_class=_Quiet)
    if listening is not None:
        listening(f"http://{address}:{server.server_address[1]}/metrics")
    if background:
        threading.Thread(target=server.serve_forever, name="dokstamp-metrics",
                         daemon=True).start()
    else:
        server.serve_forever()
    return server
