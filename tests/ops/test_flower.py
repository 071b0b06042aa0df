"""Flower tells the truth: a real worker and a real Flower (`dokstamp-sync flower`), one bad
event; Flower's API and its tasks page in headless Chromium."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import select

from dokstamp_sync.db import session_scope
from dokstamp_sync.demo import samples
from dokstamp_sync.demo.embedded import free_port
from dokstamp_sync.models import DeadLetter
from dokstamp_sync.redis_keys import RedisKeys
from test_worker import EXE, start_worker, wait_settled, wredis, xadd
from testenv import TEST_WORKER_REDIS_URL

__all__ = ["start_worker", "wredis"]  # fixtures, used by name
CHROMIUM = shutil.which("chromium")
DOCS = Path(__file__).resolve().parents[2] / "docs"
AUTH = ("ops", "flower-test-pw")


def flower_get(base: str, path: str):
    request = urllib.request.Request(base + path)
    token = base64.b64encode(":".join(AUTH).encode()).decode()
    request.add_header("Authorization", f"Basic {token}")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.loads(answer.read())


@pytest.fixture
def flower(wredis, tmp_path):
    """`dokstamp-sync flower` on a free loopback port, listening before any task is sent."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "REDIS_URL": TEST_WORKER_REDIS_URL, "DOKSTAMP_SYNC_FLOWER_AUTH": ":".join(AUTH)}
    log = open(tmp_path / "flower.log", "w")  # noqa: SIM115  # closed below
    proc = subprocess.Popen([EXE, "flower", "--port", str(port)], env=env, cwd=tmp_path,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, (tmp_path / "flower.log").read_text()[-2000:]
        try:
            flower_get(base, "api/workers?refresh=0")
            break
        except OSError:
            assert time.monotonic() < deadline, "Flower did not start"
            time.sleep(0.3)
    time.sleep(2)  # its event consumer is connected
    yield base
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)
    log.close()


def tasks_of(base: str) -> dict[str, dict]:
    return flower_get(base, "api/tasks")


def test_flower_shows_a_task_with_a_dead_event_failed_and_acknowledged_once(
        flower, start_worker, wredis, sessions, sandbox, tmp_path):
    """One good and one bad student: in Flower's API the bad one's task is FAILURE naming its
    dead letter (id, entity, key, reason), its args show entity, key and event_id (Flower's
    search finds a task by an ERP key or an event_id); the good
    one's task is SUCCESS; the Workers view counts one failure; the failed message is
    acknowledged once (run once, nothing left in the queue or unacked, no redelivery after
    the visibility timeout); Chromium's rendering of the tasks page shows the dead key."""
    proc = start_worker(concurrency=1)
    good = samples.event("student", "S-GOOD", {"name": "Ana Boa", "email": "ana@x.edu",
                                               "date_of_birth": "2000-01-01"},
                         event_id="ev-good-1")
    bad = samples.event("student", "S-BAD", {"name": "Rui Sem Data", "email": "rui@x.edu"},
                        event_id="ev-bad-1")
    xadd(wredis, [good, bad])
    assert wait_settled(sessions, 2, proc=proc) == {"synced": 1, "dead": 1}
    with session_scope(sessions) as s:
        letter = s.scalars(select(DeadLetter)).one()
        letter_id, reason = letter.id, letter.reason
    deadline = time.monotonic() + 30
    while True:
        tasks = list(tasks_of(flower).values())
        if len([t for t in tasks if t["state"] in ("SUCCESS", "FAILURE")]) >= 2:
            break
        assert time.monotonic() < deadline, tasks
        time.sleep(0.5)
    by_key = {("S-BAD" if "S-BAD" in t["args"] else "S-GOOD"): t for t in tasks}
    assert by_key["S-BAD"]["args"] == "student S-BAD (ev-bad-1)"
    assert by_key["S-GOOD"]["args"] == "student S-GOOD (ev-good-1)"
    for term, key in (("S-BAD", "S-BAD"), ("ev-good-1", "S-GOOD")):  # Flower's search box
        found = list(flower_get(flower, f"api/tasks?search={term}").values())
        assert [t["args"] for t in found] == [by_key[key]["args"]]
    assert by_key["S-GOOD"]["state"] == "SUCCESS"
    assert by_key["S-BAD"]["state"] == "FAILURE"
    assert f"dead letter {letter_id}: student S-BAD: {reason}" in by_key["S-BAD"]["exception"]
    assert "422" in reason
    workers = flower_get(flower, "workers?json=1")["data"]
    assert sum(w.get("task-failed", 0) for w in workers) == 1
    time.sleep(10)  # past the worker's visibility timeout (8 s): a redelivery would show
    assert len([t for t in tasks_of(flower).values() if "S-BAD" in t["args"]]) == 1
    assert wredis.llen(RedisKeys().queue) == 0
    assert wredis.hlen("unacked") == 0
    if CHROMIUM is None and not os.environ.get("CI"):
        pytest.skip("Debian's chromium is not installed (CI installs it)")
    assert CHROMIUM, "chromium is required in CI"
    url = flower.replace("//", f"//{AUTH[0]}:{AUTH[1]}@", 1) + "tasks"

    def chromium(profile: str, *args: str) -> str:
        return subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / profile}",
             "--virtual-time-budget=8000", *args, url],
            capture_output=True, text=True, timeout=120, check=False).stdout

    dom = chromium("profile", "--dump-dom")
    assert "S-BAD" in dom
    assert "ev-bad-1" in dom
    assert "FAILURE" in dom
    assert re.search(rf"dead letter {letter_id}: student S-BAD", dom), dom[-1500:]
    # The operator guide's and monitoring.md's picture of Flower is this page, taken here.
    shot, taken = DOCS / "flower-tasks.png", time.time()
    chromium("profile-shot", "--window-size=1500,560", "--hide-scrollbars",
             f"--screenshot={shot}")
    assert shot.stat().st_mtime >= taken - 1
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
