"""`dokstamp-sync demo` as a new user runs it: embedded Redis, SQLite, in-process sandbox, a real
Celery worker and Flower; then Flower's page in a real headless Chromium."""

from __future__ import annotations

import os
import re
import shlex
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
    # --keep-running: Flower and the outcome stream are still up, so both are offered.
    assert "Flower (Celery dashboard): http://demo:" in out
    assert any(h.endswith("dokstamp-sync results") for h in _hints(out))


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


def test_demo_keep_running_prints_the_consoles_url_and_password(demo):
    """--keep-running starts the dead-letter console and prints its URL, user and password:
    the login page answers there."""
    found = re.search(r"Dead-letter console: (http://127\.0\.0\.1:\d+/)  \(user demo, "
                      r"password (\S+)\)", demo["out"])
    assert found, demo["out"][-800:]
    with urllib.request.urlopen(found.group(1) + "login", timeout=10) as page:
        assert b'name="password"' in page.read()


def test_demo_stops_every_process_it_started(demo):
    """On SIGTERM the demo stops the worker, Flower and Redis it started."""
    assert len(demo["children"]) >= 4  # worker, Flower, the console, Redis
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


def _snapshot(client):
    """Everything a deployment's Redis database holds that the demo could disturb."""
    def still(rows):  # without the clock's share (idle times)
        return [{k: v for k, v in row.items() if k not in ("idle", "inactive",
                                                           "time_since_delivered")}
                for row in rows]

    return {"keys": sorted(client.keys("*")), "entries": client.xrange("dokstamp:events"),
            "groups": still(client.xinfo_groups("dokstamp:events")),
            "pending": still(client.xpending_range("dokstamp:events", "dokstamp-sync", "-",
                                                   "+", 10)),
            "consumers": still(client.xinfo_consumers("dokstamp:events", "dokstamp-sync"))}


def _hints(stdout: str) -> list[str]:
    """The command lines under "Where to look:"."""
    tail = stdout.split("Where to look:\n", 1)[1]
    return [line.strip() for line in tail.splitlines() if "dokstamp-sync " in line]


def _run_hint(line: str, env: dict, cwd) -> subprocess.CompletedProcess[str]:
    """Run one printed hint as a shell would: leading NAME=value words go to its environment."""
    words = shlex.split(line)
    extra = {}
    while "=" in words[0]:
        name, _, value = words.pop(0).partition("=")
        extra[name] = value
    assert words[0] == "dokstamp-sync", line
    return subprocess.run([EXE, *words[1:]], env=env | extra, cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_the_demo_leaves_a_configured_deployment_untouched(tmp_path):
    """With a deployment's REDIS_URL and DATABASE_URL set (in the environment and in a .env),
    the demo runs on its own embedded Redis and SQLite: the deployment's stream, its consumer
    group, its pending entry and every other key stay as they were, and no URL is printed
    with its password. Its output is not a terminal: no progress bar's carriage returns."""
    import redis

    from testenv import TEST_WORKER_REDIS_URL

    client = redis.Redis.from_url(TEST_WORKER_REDIS_URL)
    client.flushdb()
    try:
        client.xadd("dokstamp:events", {"event": '{"event_id": "prod-1"}'})
        client.xadd("dokstamp:events", {"event": '{"event_id": "prod-2"}'})
        client.xgroup_create("dokstamp:events", "dokstamp-sync", id="0")
        client.xreadgroup("dokstamp-sync", "prod-worker", {"dokstamp:events": ">"}, count=1)
        before = _snapshot(client)
        database_url = "postgresql+psycopg://prod:s3cret-pw@127.0.0.1:1/prod"
        (tmp_path / ".env").write_text(f"REDIS_URL={TEST_WORKER_REDIS_URL}\n"
                                       f"DATABASE_URL={database_url}\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
            "REDIS_URL": TEST_WORKER_REDIS_URL, "DATABASE_URL": database_url}
        out = subprocess.run([EXE, "demo", "--students", "2", "--no-flower",
                              "--concurrency", "1"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=180, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "pending 0, waiting 0, synced 19, superseded 0, dead 1" in out.stdout
        assert "s3cret-pw" not in out.stdout + out.stderr
        assert "\r" not in out.stderr
        assert "syncing 20 events ..." in out.stderr
        assert _snapshot(client) == before
        # The hints work after the demo stopped, from this folder (its .env names the
        # deployment): they name the demo's store and Redis. Flower and the outcome stream
        # stopped with the demo, so neither is offered.
        hints = _hints(out.stdout)
        assert "Flower (Celery dashboard)" not in out.stdout
        assert not any(h.endswith("dokstamp-sync results") for h in hints)
        runs = {h.split("dokstamp-sync ")[1]: _run_hint(h, env, tmp_path) for h in hints}
        assert all("REDIS_URL=" in h and "DATABASE_URL=sqlite" in h for h in hints), hints
        assert set(runs) == {"status", "mapping student S-00001", "dlq list", "dlq show 1"}
        for command, run in runs.items():
            # status says the demo's Redis is gone (exit 1: not everything it checks is up),
            # after printing the store's counts; the others need only the store.
            expected = 1 if command == "status" else 0
            assert run.returncode == expected, (command, run.stderr)
            assert "Traceback" not in run.stderr, command
        assert "cannot reach Redis" in runs["status"].stderr
        assert "synced 19" in runs["status"].stdout
        assert re.fullmatch(r"[0-9a-f-]{36}\n", runs["mapping student S-00001"].stdout)
        assert "S-NO-BIRTHDAY" in runs["dlq list"].stdout
        assert _snapshot(client) == before
    finally:
        client.flushdb()
        client.close()


def test_the_demo_with_use_configured_keeps_to_names_of_its_own(tmp_path, sessions,
                                                                  database_url):
    """--use-configured runs on the configured Redis and database, but with a stream, consumer
    group, Celery queue and keys of its own: the deployment's stream and group are untouched,
    its ERP keys carry a prefix of their own in the shared database, and every Redis key it
    made is removed when it ends (kombu's shared bindings keep the deployment's members only).
    Its hints, run with the configured settings, answer about its own (prefixed) entities."""
    import redis

    from testenv import TEST_WORKER_REDIS_URL

    client = redis.Redis.from_url(TEST_WORKER_REDIS_URL)
    client.flushdb()
    try:
        client.xadd("dokstamp:events", {"event": '{"event_id": "prod-1"}'})
        client.xgroup_create("dokstamp:events", "dokstamp-sync", id="0")
        # A deployment's own kombu bookkeeping, shared with the demo's worker and Flower.
        client.sadd("_kombu.binding.celeryev", "#celeryev.deployment-flower")
        # (kombu drops a binding whose deadline, in ms, has passed: this one is an hour ahead)
        client.zadd("_kombu.binding_deadlines", {"celeryev": time.time() * 1000 + 3_600_000})
        before = _snapshot(client) | {
            "celeryev": client.smembers("_kombu.binding.celeryev"),
            # kombu's deadlines of shared bindings: the members (a live worker moves the times)
            "deadlines": client.zrange("_kombu.binding_deadlines", 0, -1)}
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
            "REDIS_URL": TEST_WORKER_REDIS_URL, "DATABASE_URL": database_url}
        out = subprocess.run([EXE, "demo", "--students", "2", "--concurrency",
                              "1", "--use-configured"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=180, check=False)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "pending 0, waiting 0, synced 19, superseded 0, dead 1" in out.stdout
        after = _snapshot(client) | {
            "celeryev": client.smembers("_kombu.binding.celeryev"),
            # kombu's deadlines of shared bindings: the members (a live worker moves the times)
            "deadlines": client.zrange("_kombu.binding_deadlines", 0, -1)}
        assert after == before  # keys included: nothing of the demo's is left
        hints = _hints(out.stdout)
        prefix = re.search(r"mapping student (D[0-9a-f]{4}-)S-00001", out.stdout).group(1)
        mapping = _run_hint(next(h for h in hints if "mapping" in h), env, tmp_path)
        assert mapping.returncode == 0, mapping.stderr
        assert re.fullmatch(r"[0-9a-f-]{36}\n", mapping.stdout)
        letters = _run_hint(next(h for h in hints if "dlq list" in h), env, tmp_path)
        assert f"{prefix}S-NO-BIRTHDAY" in letters.stdout
        assert not any(h.endswith("dokstamp-sync results") for h in hints)
    finally:
        client.flushdb()
        client.close()
