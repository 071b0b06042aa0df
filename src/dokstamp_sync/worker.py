"""The Celery app and its configuration, and the step that runs the stream ingester and the
retry scheduler inside every ``dokstamp-sync worker``.

Configuration choices (see the README): JSON only; ``acks_late`` with
``reject_on_worker_lost`` so a task whose worker dies is redelivered; prefetch 1; one visibility
timeout (``DOKSTAMP_SYNC_VISIBILITY_TIMEOUT``) used both by the Redis transport and as the
scheduler's lease, and no countdown/ETA messages (waits live in the database). Events are
dispatched a few consecutive ones per task (:func:`task_batches`).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from contextlib import suppress
from typing import Any, ClassVar

import redis
from celery import Celery, bootsteps
from celery.signals import after_setup_logger, after_setup_task_logger, worker_process_init

from dokstamp_sync import logs, runtime
from dokstamp_sync.config import (
    ConfigError,
    Settings,
    StoreSettings,
    load_settings,
    load_store_settings,
)
from dokstamp_sync.db import make_engine, make_sessionmaker
from dokstamp_sync.ingest import StreamIngester
from dokstamp_sync.scheduler import dispatch_due

log = logging.getLogger("dokstamp_sync.worker")
QUEUE = "dokstamp-sync"

app = Celery("dokstamp_sync", include=["dokstamp_sync.tasks"])
app.conf.update(
    task_serializer="json", accept_content=["json"], result_serializer="json",
    task_ignore_result=True, task_acks_late=True, task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1, task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
    worker_send_task_events=True,  # Flower's task list; producers send no task-sent events
)


def configure(settings: StoreSettings) -> Celery:
    """Point the app at the settings' Redis, with the visibility timeout."""
    app.conf.update(
        broker_url=settings.redis_url,
        broker_transport_options={"visibility_timeout": settings.dokstamp_sync_visibility_timeout},
    )
    return app


# `celery -A dokstamp_sync.worker ...` and Flower need the broker without our CLI.
with suppress(ConfigError):
    configure(load_store_settings())


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_context(**_: Any) -> None:
    runtime.reset()  # each prefork child builds its own connections


@after_setup_logger.connect  # type: ignore[untyped-decorator]
@after_setup_task_logger.connect  # type: ignore[untyped-decorator]
def _json_logs(logger: logging.Logger, **_: Any) -> None:
    with suppress(ConfigError):
        if load_store_settings().dokstamp_sync_log_json:
            logs.use_json(logger)


EVENTS_PER_TASK = 8


def task_batches(pks: Sequence[int]) -> list[list[int]]:
    """Consecutive events, up to ``EVENTS_PER_TASK`` per task, in the order given.

    The ERP sends parents before children, so a batch often holds a whole chain (student,
    enrollment, diploma, certificate) that one process then syncs in order. A short burst is
    spread thinner (one event per task for 8 or fewer) so that it still runs in parallel.
    """
    size = min(EVENTS_PER_TASK, -(-len(pks) // EVENTS_PER_TASK))
    return [list(pks[i:i + size]) for i in range(0, len(pks), size)] if pks else []


def dispatch(pks: Sequence[int]) -> None:
    from dokstamp_sync.tasks import sync_events

    with app.producer_or_acquire() as producer:  # one producer for them all, not one each
        for batch in task_batches(pks):
            sync_events.apply_async((batch,), producer=producer)


class Pump:
    """The ingester and the scheduler, each in a thread of the worker's main process."""

    def __init__(self, settings: Settings, *, poll_interval: float = 1.0,
                 metrics_port: int | None = None) -> None:
        self.settings = settings
        self.metrics_port = metrics_port
        self.stop_event = threading.Event()
        self.poll_interval = poll_interval
        lease = settings.dokstamp_sync_visibility_timeout
        self.sessions = make_sessionmaker(make_engine(settings.database_url))
        self.ingester = StreamIngester(
            redis.Redis.from_url(settings.redis_url), self.sessions,
            settings.dokstamp_sync_stream, consumer=f"{socket.gethostname()}-{os.getpid()}",
            dispatch=dispatch, lease=lease)
        self.lease = lease
        self.threads = [threading.Thread(target=self._ingest, name="dokstamp-ingest",
                                         daemon=True),
                        threading.Thread(target=self._schedule, name="dokstamp-scheduler",
                                         daemon=True)]

    def start(self) -> None:
        self.ingester.ensure_group()
        for thread in self.threads:
            thread.start()
        if self.metrics_port:
            from dokstamp_sync.metrics import serve

            serve(self.sessions, self.ingester.redis, self.settings.dokstamp_sync_stream,
                  address="0.0.0.0", port=self.metrics_port, background=True)  # noqa: S104

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def _ingest(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.ingester.poll(block_ms=int(self.poll_interval * 1000))
            except Exception:  # Redis or the database away: log, wait, go on
                log.exception("stream ingester: poll failed")
                self.stop_event.wait(self.poll_interval)

    def _schedule(self) -> None:
        while not self.stop_event.is_set():
            try:
                dispatch_due(self.sessions, dispatch, lease=self.lease)
            except Exception:
                log.exception("retry scheduler: dispatch failed")
            self.stop_event.wait(self.poll_interval)


class PumpStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Runs the :class:`Pump` for as long as the worker runs (after its pool has started)."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.pump: Pump | None = None

    def start(self, worker: Any) -> None:
        port = os.environ.get("DOKSTAMP_SYNC_METRICS_PORT")
        self.pump = Pump(load_settings(), metrics_port=int(port) if port else None)
        self.pump.start()

    def stop(self, worker: Any) -> None:
        if self.pump is not None:
            self.pump.stop()


app.steps["worker"].add(PumpStep)


def run_worker(settings: Settings, *, concurrency: int, loglevel: str = "INFO") -> None:
    """Start the Celery worker (prefork, ``concurrency`` processes) with the pump."""
    configure(settings)
    app.worker_main(["worker", f"--concurrency={concurrency}", "--pool=prefork",
                     f"--queues={QUEUE}", f"--loglevel={loglevel}", "--without-gossip",
                     "--without-mingle", f"--hostname=dokstamp-sync-{os.getpid()}@%h",
                     "--task-events"])
