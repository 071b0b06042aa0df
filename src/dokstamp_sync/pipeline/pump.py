"""The pump: the stream ingester and the retry scheduler, each in a thread of the worker's main
process, feeding Celery through a ``dispatch`` callable (so this module never imports the app);
and the outbox's sweeper, writing the outcomes the normal path could not (docs/erp-guide.md).

Its connections and the metrics endpoint are handed to it (by the worker, from ``wiring`` and
``ops.metrics``): this module imports neither a higher layer nor builds connections itself.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable

import redis
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync.config import Settings
from dokstamp_sync.guard import Guard, GuardPolicy
from dokstamp_sync.pipeline import outbox, retention
from dokstamp_sync.pipeline.ingest import Dispatch, StreamIngester
from dokstamp_sync.pipeline.results import Publisher
from dokstamp_sync.pipeline.scheduler import dispatch_due
from dokstamp_sync.redis_keys import RedisKeys

log = logging.getLogger("dokstamp_sync.worker")

# Starts serving metrics over the pump's sessions and Redis (in the background).
MetricsServer = Callable[[sessionmaker[Session], redis.Redis], None]


class Pump:
    """Ingests the stream, re-dispatches due events and, when given ``serve_metrics``, serves
    the metrics; :meth:`start` and :meth:`stop` bracket the worker's life."""

    def __init__(self, settings: Settings, dispatch: Dispatch, *,
                 sessions: sessionmaker[Session], redis_client: redis.Redis,
                 serve_metrics: MetricsServer | None = None,
                 keys: RedisKeys = RedisKeys(), poll_interval: float = 1.0) -> None:
        self.settings = settings
        self.dispatch = dispatch
        self.stop_event = threading.Event()
        self.poll_interval = poll_interval
        self._pruned = -60.0  # monotonic time of the last retention run
        self.lease = settings.dokstamp_sync_lease
        self.sessions = sessions
        self.serve_metrics = serve_metrics
        self.keys = keys
        client = redis_client
        self.publisher = Publisher(client, settings.dokstamp_sync_results_stream,
                                   settings.dokstamp_sync_results_maxlen)
        self.ingester = StreamIngester(
            client, self.sessions,
            settings.dokstamp_sync_stream, consumer=f"{socket.gethostname()}-{os.getpid()}",
            dispatch=dispatch, lease=self.lease,
            max_file_bytes=settings.dokstamp_sync_file_max_bytes,
            batch_bytes=settings.dokstamp_sync_ingest_batch_bytes,
            report=self.publisher, keys=keys,
            # the change guard counts deletes and revokes as they arrive
            arrivals=Guard(GuardPolicy.from_settings(settings), self.sessions, client,
                           prefix=keys.guard).note_arrivals)
        self.threads = [threading.Thread(target=self._ingest, name="dokstamp-ingest",
                                         daemon=True),
                        threading.Thread(target=self._schedule, name="dokstamp-scheduler",
                                         daemon=True),
                        threading.Thread(target=self._sweep, name="dokstamp-outbox",
                                         daemon=True)]

    def start(self) -> None:
        self.ingester.ensure_group()
        for thread in self.threads:
            thread.start()
        if self.serve_metrics is not None:
            self.serve_metrics(self.sessions, self.ingester.redis)

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def _ingest(self) -> None:
        failures = Failures("stream ingester: poll failed")
        while not self.stop_event.is_set():
            try:
                self.ingester.poll(block_ms=int(self.poll_interval * 1000))
                failures.ok()
            except Exception as exc:  # Redis or the database away: log, wait, go on
                failures.failed(exc)
                self.stop_event.wait(self.poll_interval)

    def _queued(self) -> int:
        """Tasks waiting in Celery's queue (a Redis list on the same Redis)."""
        return int(self.ingester.redis.llen(self.keys.queue))

    def _schedule(self) -> None:
        failures = Failures("retry scheduler: dispatch failed")
        while not self.stop_event.is_set():
            try:
                dispatch_due(self.sessions, self.dispatch, lease=self.lease,
                             queued=self._queued)
                failures.ok()
            except Exception as exc:
                failures.failed(exc)
            self.stop_event.wait(self.poll_interval)

    def _prune(self) -> None:
        """The inbox's retention, at most once a minute, by the one sweeper (its lock)."""
        days = self.settings.dokstamp_sync_inbox_retention_days
        now = time.monotonic()
        if days is not None and now - self._pruned >= 60:
            self._pruned = now
            retention.prune(self.sessions, days)

    def _sweep(self) -> None:
        """Every few seconds, write the outcomes left unreported (a process killed between a
        commit and its XADD, Redis away at that moment). Every worker's pump runs one: two
        sweepers would both write the same rows, so one sweeps at a time (a Redis lock)."""
        failures = Failures("outbox sweeper: sweep failed")
        while not self.stop_event.wait(outbox.INTERVAL):
            try:
                lock = self.ingester.redis.lock(f"{self.keys.lock}outbox", timeout=120,
                                                blocking=False)
                if lock.acquire():
                    try:
                        outbox.sweep(self.sessions, self.publisher)
                        self._prune()
                    finally:
                        lock.release()
                failures.ok()
            except Exception as exc:
                failures.failed(exc)


class Failures:
    """How a loop that retries every second logs an outage: the first failure with its
    traceback, then one line a minute while it lasts (not a traceback a second: a Redis outage
    of minutes wrote tens of thousands of lines), and one line when it is over."""

    EVERY = 60.0  # s between the lines of an ongoing outage

    def __init__(self, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.what, self.clock = what, clock
        self.count, self.since, self.said = 0, 0.0, 0.0

    def failed(self, exc: BaseException) -> None:
        now = self.clock()
        self.count += 1
        if self.count == 1:
            self.since = self.said = now
            log.error(self.what, exc_info=exc)
        elif now - self.said >= self.EVERY:
            self.said = now
            log.error("%s: still failing, %d times in %.0f s (%s: %s)", self.what, self.count,
                      now - self.since, type(exc).__name__, str(exc).splitlines()[0][:200]
                      if str(exc) else "")

    def ok(self) -> None:
        if self.count:
            log.warning("%s: recovered after %d failures in %.0f s", self.what, self.count,
                        self.clock() - self.since)
            self.count = 0
