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
from collections.abc import Sequence
from contextlib import suppress
from functools import partial
from typing import Any, ClassVar

import redis
from celery import Celery, bootsteps
from celery.signals import (
    after_setup_logger,
    after_setup_task_logger,
    worker_init,
    worker_process_init,
)
from sqlalchemy.orm import Session, sessionmaker

from dokstamp_sync import logs, wiring
from dokstamp_sync.config import ConfigError, Settings, StoreSettings
from dokstamp_sync.ops import recorder
from dokstamp_sync.ops.flower import TaskLabels, argsrepr
from dokstamp_sync.pipeline.pump import MetricsServer, Pump
from dokstamp_sync.redis_keys import RedisKeys

log = logging.getLogger("dokstamp_sync.worker")
SYNC_EVENTS = "dokstamp_sync.sync_events"  # the task's name (see :mod:`.tasks`)

app = Celery("dokstamp_sync", include=["dokstamp_sync.tasks"])
app.conf.update(
    task_serializer="json", accept_content=["json"], result_serializer="json",
    task_ignore_result=True, task_acks_late=True, task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True, worker_hijack_root_logger=False,
    worker_send_task_events=True,  # Flower's task list; producers send no task-sent events
    # A task whose events ended dead raises DeadEvents (Flower shows it failed): its message is
    # still acknowledged once, as for a success (Celery's default, kept explicit: see ops.flower).
    task_acks_on_failure_or_timeout=True,
)


def configure(settings: StoreSettings) -> Celery:
    """Point the app at the settings' Redis, with the visibility timeout and the namespace's
    queue."""
    app.conf.update(_from_settings(settings))
    return app


def _from_settings(settings: StoreSettings) -> dict[str, Any]:
    # The queue is not set at import: the app's own settings there would override these.
    return {"broker_url": settings.redis_url,
            "task_default_queue": wiring.redis_keys(settings).queue,
            "broker_transport_options": {
                "visibility_timeout": settings.dokstamp_sync_visibility_timeout}}


@app.on_configure.connect  # type: ignore[untyped-decorator]
def _configure_on_first_use(sender: Celery, **_: Any) -> None:
    """``celery -A dokstamp_sync.worker ...`` and Flower need the broker without our CLI: the
    settings are read when Celery first reads its configuration (at startup), never when this
    module is imported. Unusable settings leave Celery's defaults (the CLI reports them) and
    the queue of no namespace."""
    try:
        sender.config_from_object(_from_settings(wiring.store_settings()))
    except ConfigError:
        sender.config_from_object({"task_default_queue": RedisKeys().queue})


@worker_init.connect  # type: ignore[untyped-decorator]
def _name_replica(**_: Any) -> None:
    recorder.name_replica()  # in the main process, before the pool forks: children inherit it


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_context(**_: Any) -> None:
    wiring.reset()  # each prefork child builds its own connections


@after_setup_logger.connect  # type: ignore[untyped-decorator]
@after_setup_task_logger.connect  # type: ignore[untyped-decorator]
def _json_logs(logger: logging.Logger, **_: Any) -> None:
    with suppress(ConfigError):
        if wiring.store_settings().dokstamp_sync_log_json:
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


def dispatch(pks: Sequence[int], labels: TaskLabels | None = None) -> None:
    """Send the events to the workers, a few consecutive ones per task (by the task's name:
    this module defines the app, :mod:`.tasks` its tasks, and neither imports the other's).
    ``labels``: Flower shows each task's events by entity, ERP key and ``event_id``."""
    described: dict[int, str] = {}
    if labels is not None:
        try:
            described = labels.describe(pks)
        except Exception:  # the labels are for people: never hold the events back for them
            log.exception("events %s: could not describe them for Flower", list(pks)[:10])
    with app.producer_or_acquire() as producer:  # one producer for them all, not one each
        for batch in task_batches(pks):
            app.send_task(SYNC_EVENTS, (batch,), producer=producer,
                          argsrepr=argsrepr(batch, described))


class PumpStep(bootsteps.StartStopStep):  # type: ignore[misc]  # celery is untyped
    """Runs the :class:`Pump` for as long as the worker runs (after its pool has started)."""

    requires: ClassVar[set[str]] = {"celery.worker.components:Pool"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.pump: Pump | None = None

    def start(self, worker: Any) -> None:
        settings = wiring.settings()
        sessions = wiring.database(settings.database_url)
        labels = TaskLabels(sessions)
        self.pump = Pump(settings, partial(dispatch, labels=labels), sessions=sessions,
                         redis_client=wiring.redis_client(settings.redis_url),
                         serve_metrics=_metrics_server(settings),
                         keys=wiring.redis_keys(settings))
        self.pump.start()

    def stop(self, worker: Any) -> None:
        if self.pump is not None:
            self.pump.stop()


app.steps["worker"].add(PumpStep)


def _metrics_server(settings: Settings) -> MetricsServer | None:
    """The pump's metrics endpoint when the settings name a port (the pump, a lower layer,
    is handed it rather than importing :mod:`.ops.metrics`)."""
    port = settings.dokstamp_sync_metrics_port
    if not port:
        return None
    from dokstamp_sync.ops.metrics import serve

    def start(sessions: sessionmaker[Session], client: redis.Redis) -> None:
        serve(sessions, client, settings.dokstamp_sync_stream,
              address=settings.dokstamp_sync_metrics_address, port=port, background=True,
              replica=recorder.replica(), tenant=settings.dokstamp_tenant,
              keys=wiring.redis_keys(settings))

    return start


def check_start(settings: Settings) -> None:
    """Refuse to start (:class:`~.ops.check.StartRefused`, one line) when the database's schema
    is not this version's (:class:`~.migrate.SchemaNotCurrent`: run ``db upgrade``), DokStamp
    refuses the credentials or they belong to another tenant than ``DOKSTAMP_TENANT``
    (``GET /auth/me``): with the wrong tenant every lookup answers 404, which a delete takes
    for "already gone"."""
    from dokstamp_sync.migrate import require_current

    engine = wiring.database(settings.database_url).kw["bind"]
    try:
        require_current(engine)
    finally:
        engine.dispose()
    from dokstamp_sync.dokstamp import RedisTokenStore, client_from_settings
    from dokstamp_sync.ops.check import StartRefused, refusal

    store = wiring.redis_client(settings.redis_url, socket_connect_timeout=5)
    try:  # Redis away: one line now, not Celery's banner and a traceback from its consumer
        store.ping()
    except BaseException:
        store.close()
        raise
    client = client_from_settings(settings, store=RedisTokenStore(
        store, prefix=wiring.redis_keys(settings).token))
    try:
        problem = refusal(client, settings)
    finally:
        client.http.close()
        store.close()
    if problem is not None:
        raise StartRefused(problem)


def run_worker(settings: Settings, *, concurrency: int, loglevel: str = "INFO") -> int:
    """Run the Celery worker (prefork, ``concurrency`` processes) with the pump until it stops;
    every process of it uses ``settings`` (the children inherit them at the fork). Checks the
    schema, the credentials and the tenant first (:func:`check_start`).

    Returns Celery's exit status: 0 when stopped on request (SIGTERM, Ctrl-C), 1 after a fatal
    error ("Unrecoverable error"), so that systemd's ``on-failure`` and container restart
    policies see it (``app.worker_main`` and ``app.start`` drop it: see :func:`_celery`)."""
    check_start(settings)
    wiring.use(settings)
    configure(settings)
    queue = wiring.redis_keys(settings).queue
    return _celery(["worker", f"--concurrency={concurrency}", "--pool=prefork",
                    f"--queues={queue}", f"--loglevel={loglevel}", "--without-gossip",
                    "--without-mingle", f"--hostname=dokstamp-sync-{os.getpid()}@%h",
                    "--task-events"])


def _celery(argv: list[str]) -> int:
    """Run the ``celery`` command on this app and return its exit status. ``app.worker_main``
    and ``app.start`` drop it: in non-standalone mode click *returns* the status the worker
    command exits with (``ctx.exit(worker.exitcode)``), and they ignore the return value."""
    from celery.bin.celery import celery as command
    from click.exceptions import Exit

    command.params[0].default = app  # as app.start does: `-A` is this app
    try:
        status = command.main(args=argv, standalone_mode=False)
    except Exit as exc:
        status = exc.exit_code
    finally:
        command.params[0].default = None
    return int(status or 0)
