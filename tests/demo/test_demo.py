"""`dokstamp-sync demo` as a new user runs it: embedded Redis, SQLite, in-process sandbox, a real
Celery worker and Flower; then Flower's page in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil
import pytest

EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")
CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run kept alive (--keep-running) for the module's tests, with no REDIS_URL,
    DATABASE_URL or DokStamp settings in its environment."""
    cwd = tmp_path_factory.mktemp("demo")
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DOKSTAMP", "REDIS_URL", "DATABASE_URL"))}
    out, err = (cwd / "out.txt").open("w"), (cwd / "err.txt").open("w")
    proc = subprocess.Popen([EXE, "demo", "--students", "50", "--keep-running"], cwd=cwd,
                            env=env, stdout=out, stderr=err)
    deadline = time.monotonic() + 180
    text = ""
    while "Where to look" not in text:
        assert proc.poll() is None, (cwd / "err.txt").read_text()[-2000:]
        assert time.monotonic() < deadline, "the demo did not finish"
        time.sleep(0.5)
        text = (cwd / "out.txt").read_text()
    time.sleep(1)
    children = psutil.Process(proc.pid).children(recursive=True)
    yield {"proc": proc, "out": (cwd / "out.txt").read_text(), "children": children,
           "flower": re.search(r"http://demo:\S+", text).group(0), "cwd": cwd}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out.close()
    err.close()


def test_demo_syncs_a_graduating_class_and_shows_a_dead_letter(demo):
    """The summary: 50 issued certificates with their graph, the bad event's reason, calls."""
    out = demo["out"]
    assert "pending 0, waiting 0, synced 211, superseded 0, dead 1" in out
    assert ("1 institutions, 6 modules, 2 courses, 2 cohorts, 50 students, 50 enrollments, "
            "50 files, 50 certificates") in out
    assert "S-NO-BIRTHDAY: DokStamp refused POST /students (422)" in out
    assert re.search(r"API calls: \d+", out)
    assert "dokstamp-sync dlq list" in out


def test_demo_state_is_inspectable_with_the_commands_it_prints(demo):
    """The printed `mapping` command answers from the demo's SQLite store."""
    store = demo["cwd"] / "dokstamp-sync-data" / "store.db"
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DATABASE_URL": f"sqlite:///{store}"}
    out = subprocess.run([EXE, "mapping", "certificate", "CERT-00050"], env=env,
                         capture_output=True, text=True, check=False, timeout=30)
    assert out.returncode == 0, out.stderr
    # A certificate also shows DokStamp's status and verification URL (CONTRACT §4, issue 10).
    assert re.fullmatch(r"[0-9a-f-]{36}\nstatus in DokStamp: issued\n"
                        r"verification URL: http\S+/verify/\S+\n", out.stdout)


def test_flower_asks_for_its_password(demo):
    """Flower answers 401 without the credentials the demo generated."""
    bare = re.sub(r"//demo:[^@]+@", "//", demo["flower"])
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(bare)
    info.value.close()
    assert info.value.code == 401


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"),
                    reason="Debian's chromium is not installed (CI installs it)")
def test_flower_in_chromium_lists_the_demo_tasks(demo, tmp_path):
    """Headless Chromium renders Flower's task page with the demo's tasks, ids only as args."""
    assert CHROMIUM, "chromium is required in CI"
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=8000", "--dump-dom", demo["flower"] + "tasks"],
        capture_output=True, text=True, timeout=120, check=False).stdout
    assert "dokstamp_sync.sync_events" in dom
    shown = re.search(r"of (\d+) tasks", dom)
    assert shown, dom[-500:]
    assert int(shown.group(1)) >= 20  # 252 events, 8 or fewer per task
    assert "graduate" not in dom.lower()  # no personal data (emails, names) in Flower


def test_demo_stops_every_process_it_started(demo):
    """On SIGTERM the demo stops the worker, Flower and Redis it started."""
    assert len(demo["children"]) >= 3
    demo["proc"].send_signal(signal.SIGTERM)
    demo["proc"].wait(timeout=60)
    time.sleep(1)
    alive = [p for p in demo["children"] if p.is_running() and p.status() != "zombie"]
    assert alive == []


def test_flower_refuses_to_start_without_a_password(tmp_path):
    """No DOKSTAMP_SYNC_FLOWER_AUTH and no --insecure-no-auth: exit 2 with the reason."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")}
    out = subprocess.run([EXE, "flower"], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=30, check=False)
    assert out.returncode == 2
    assert "refusing to start Flower without a password" in out.stderr
