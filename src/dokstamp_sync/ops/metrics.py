"""Prometheus metrics (what Flower does not show), read fresh at each scrape.

Gauges come from the mapping store and Redis (events by state, stream and queue depth, oldest
unsynced event, open dead letters, heartbeat ages, held events per kind); counters come from
the Redis hash every
worker process increments (API responses by status class, 429s, retries, event outcomes), so
one endpoint speaks for the whole fleet. ``/metrics`` serves them, ``/healthz`` the health
check (200 or 503).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import redis
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.db import session_scope
from dokstamp_sync.ops.health import check
from dokstamp_sync.redis_keys import COUNTERS

PREFIX = "dokstamp_sync"


class SyncCollector:
    """A Prometheus collector over the store and Redis."""

    def __init__(self, sessions: sessionmaker[Session], client: redis.Redis,
                 stream: str) -> None:
        self.sessions, self.redis, self.stream = sessions, client, stream

    def collect(self) -> Iterator[Metric]:
        with session_scope(self.sessions) as session:
            health = check(session, self.redis, self.stream)
        facts = health.facts
        events = GaugeMetricFamily(f"{PREFIX}_events", "Events in the inbox by state",
                                   labels=["state"])
        for state, n in facts["events"].items():
            events.add_metric([state], n)
        yield events
        kinds = GaugeMetricFamily(f"{PREFIX}_held_events", "Events held by the change guard "
                                  "(CONTRACT §6) by entity kind", labels=["entity"])
        for entity, n in facts["held"].items():
            kinds.add_metric([entity], n)
        yield kinds
        for name, key, text in (
                ("stream_depth", "stream_depth", "Entries waiting in the Redis stream"),
                ("queue_depth", "queue_depth", "Tasks waiting in the Celery queue"),
                ("oldest_unsynced_event_age_seconds", "oldest_unsynced_age_s",
                 "Age of the oldest pending or waiting event (0 when none)"),
                ("dead_letters_open", "dead_letters_open", "Open dead letters"),
                ("consumer_heartbeat_age_seconds", "consumer_heartbeat_age_s",
                 "Seconds since a stream consumer last read (-1: never)"),
                ("last_task_finished_age_seconds", "last_task_finished_age_s",
                 "Seconds since a task last finished (-1: never)")):
            value = facts.get(key)
            default = 0.0 if key == "oldest_unsynced_age_s" else -1.0
            yield GaugeMetricFamily(f"{PREFIX}_{name}", text,
                                    value=default if value is None else float(value))
        yield GaugeMetricFamily(f"{PREFIX}_healthy", "1 when the health check passes",
                                value=1.0 if health.ok else 0.0)
        counters = {(k.decode() if isinstance(k, bytes) else k): int(v)
                    for k, v in self.redis.hgetall(COUNTERS).items()}
        api = CounterMetricFamily(f"{PREFIX}_api_requests", "DokStamp API responses by "
                                  "status class", labels=["status_class"])
        for cls in ("2xx", "3xx", "4xx", "5xx"):
            api.add_metric([cls], counters.get(f"api_{cls}", 0))
        yield api
        yield CounterMetricFamily(f"{PREFIX}_api_429", "HTTP 429 answers from DokStamp",
                                  value=counters.get("api_429", 0))
        yield CounterMetricFamily(f"{PREFIX}_retries", "Events parked for a retry after a "
                                  "transient failure", value=counters.get("retries", 0))
        outcomes = CounterMetricFamily(f"{PREFIX}_task_outcomes", "Task runs by the state "
                                       "they left their event in", labels=["state"])
        for key, n in sorted(counters.items()):
            if key.startswith("events_"):
                outcomes.add_metric([key.removeprefix("events_")], n)
        yield outcomes


def app(sessions: sessionmaker[Session], client: redis.Redis, stream: str) -> Callable[..., Any]:
    """A WSGI app: ``/metrics`` (Prometheus text) and ``/healthz``."""
    registry = CollectorRegistry()
    registry.register(SyncCollector(sessions, client, stream))
    metrics = make_wsgi_app(registry)

    def wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            with session_scope(sessions) as session:
                health = check(session, client, stream)
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
          address: str = "127.0.0.1", port: int = 9464,
          background: bool = False) -> WSGIServer:
    """Serve the metrics; in a daemon thread when ``background``."""
    server = make_server(address, port, app(sessions, client, stream), handler_class=_Quiet)
    if background:
        threading.Thread(target=server.serve_forever, name="dokstamp-metrics",
                         daemon=True).start()
    else:
        server.serve_forever()
    return server
