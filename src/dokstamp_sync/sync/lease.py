"""A running task's heartbeat: the short lease on its events renewed while it works.

The scheduler hands an open event out again once its ``next_attempt_at`` has passed. A task
leases its batch for ``lease`` seconds (``DOKSTAMP_SYNC_LEASE``, 30 s by default) and a
:class:`Heartbeat` thread renews that lease every third of it for the events not finished yet.
When the worker is killed (kill -9) the renewals stop and the scheduler re-dispatches its events
within a lease; when the task's message was lost (the broker's keys gone) the same happens,
since the lease set at dispatch is never renewed. A live task, however slow (rate-limit pauses,
dependencies synced inline), keeps its events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from types import TracebackType

from dokstamp_sync.sync.store import Store

log = logging.getLogger("dokstamp_sync.sync")

# s between two markings of written outcomes as reported: half the sweeper's settle delay
# (pipeline/outbox.SETTLE, 10 s), which the walk may not import
MARK_EVERY = 5.0


class Heartbeat:
    """Renews the lease of ``pks`` every ``lease / 3`` seconds until stopped, and marks the
    outcomes written meanwhile reported; :meth:`done` takes an event out (finished or parked:
    its next attempt time is its own again)."""

    def __init__(self, store: Store, pks: Iterable[int], lease: float,
                 floor: datetime) -> None:
        self.store = store
        self.lease = lease
        self.floor = floor
        self.pks = list(pks)
        self.guard = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="dokstamp-lease", daemon=True)

    def __enter__(self) -> Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def done(self, pk: int) -> None:
        with self.guard:
            if pk in self.pks:
                self.pks.remove(pk)

    def beat(self) -> None:
        """One renewal (the thread's step; callable directly in tests)."""
        with self.guard:
            pks = list(self.pks)
            if pks:
                # A claim since the last beat set a later end than the floor; a park, an
                # earlier one (unless longer than two thirds of the lease).
                self.floor = self.store.renew(pks, self.lease, self.floor)

    def _beat(self) -> None:
        # Outcomes written since the last one recorded (a long run since) are marked reported
        # every MARK_EVERY seconds, well before the sweeper's settle delay would have it write
        # them again, whatever the lease; the lease is renewed every third of it.
        renewed = time.monotonic()
        while not self.stopped.wait(min(self.lease / 3, MARK_EVERY)):
            try:
                if time.monotonic() - renewed >= self.lease / 3 - 0.01:
                    self.beat()
                    renewed = time.monotonic()
                self.store.flush_reported()
            except Exception:  # the database away: the next beat tries again
                log.exception("lease heartbeat failed")
