"""An outage seen by the pump's loops (they retry every second): one traceback, then a line
a minute, then one line when it is over; not a traceback a second."""

from __future__ import annotations

import logging

from dokstamp_sync.pipeline.pump import Failures


def test_an_outage_is_one_traceback_then_a_line_a_minute_then_recovered(caplog):
    now = [0.0]
    failures = Failures("stream ingester: poll failed", clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="dokstamp_sync"):
        for _ in range(200):  # 200 s of failures, one a second
            failures.failed(ConnectionError("Error 111 connecting to 127.0.0.1:6379."))
            now[0] += 1.0
        failures.ok()
        failures.ok()  # healthy again: nothing more to say
    records = caplog.records
    assert len(records) == 1 + 3 + 1  # the first, at 60, 120 and 180 s, recovered
    assert records[0].exc_info is not None
    assert all(r.exc_info is None for r in records[1:])
    assert "still failing, 61 times in 60 s (ConnectionError: Error 111" in records[1].getMessage()
    assert records[-1].getMessage() == ("stream ingester: poll failed: recovered after 200 "
                                        "failures in 200 s")
    failures.failed(ConnectionError("again"))  # a new outage: its traceback again
    assert caplog.records[-1].exc_info is not None
