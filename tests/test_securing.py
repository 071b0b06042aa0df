"""docs/securing.md's Redis ACL lines, applied as written to the real Redis: the ERP's user can
add events (redis-cli's XADD, `dokstamp-sync enqueue`) and read outcomes (`dokstamp-sync
results`), and is refused the events themselves, the outcome stream's writes, the workers' keys
and the Celery queue; the workers' user reaches their keys but not the dangerous commands.
Each user is created under a name of its own and deleted by the test."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from testenv import TEST_REDIS_URL

ROOT = Path(__file__).resolve().parent.parent
EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")


def acl_lines() -> dict[str, list[str]]:
    """The ACL SETUSER lines of the page's ```redis block, by user name."""
    text = (ROOT / "docs/securing.md").read_text()
    block = re.search(r"```redis\n(.*?)```", text, re.S)
    assert block, "docs/securing.md has no ```redis block"
    users: dict[str, list[str]] = {}
    for line in block.group(1).splitlines():
        words = shlex.split(line)
        assert words[:2] == ["ACL", "SETUSER"], line
        users[words[2]] = words[3:]
    return users


@pytest.fixture
def admin() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    client.delete("dokstamp:events", "dokstamp:results", "dokstamp-sync", "dokstamp:metrics")
    yield client
    client.delete("dokstamp:events", "dokstamp:results", "dokstamp-sync", "dokstamp:metrics")
    client.close()


@pytest.fixture
def make_user(admin) -> Iterator:
    """Create a user from the page's line for ``name`` (a name and password of the test's own);
    give back its Redis URL. Every user made is deleted at the end."""
    made: list[str] = []

    def make(name: str) -> str:
        rules = acl_lines()[name]
        user, password = f"test-{name}-{secrets.token_hex(4)}", secrets.token_hex(16)
        rules = [f">{password}" if r.startswith(">") else r for r in rules]
        admin.execute_command("ACL", "SETUSER", user, *rules)
        made.append(user)
        parts = urlsplit(TEST_REDIS_URL)
        return f"redis://{user}:{password}@{parts.hostname}:{parts.port}{parts.path}"

    yield make
    for user in made:
        admin.execute_command("ACL", "DELUSER", user)


def test_the_page_gives_the_erp_the_workers_and_the_default_user(admin):
    """The page's block names the two users and switches the default user off (not applied
    here: the test server's default user is how every other test connects)."""
    lines = acl_lines()
    assert set(lines) == {"erp-sis", "dokstamp-worker", "default"}
    assert lines["default"] == ["off"]


def test_the_erp_user_adds_events_and_reads_outcomes_only(admin, make_user, tmp_path):
    """The ERP's user: XADD to the events stream and read the outcome stream (also through
    `dokstamp-sync enqueue` and `dokstamp-sync results`); NOPERM for reading the events,
    writing or deleting the outcomes, the workers' keys and the Celery queue."""
    admin.xadd("dokstamp:results", {"result": json.dumps({"event_id": "e-1", "state": "synced"})})
    admin.hset("dokstamp:metrics", "api_2xx", 1)
    admin.rpush("dokstamp-sync", "a task")
    url = make_user("erp-sis")
    erp = redis.Redis.from_url(url)
    try:
        assert erp.xadd("dokstamp:events", {"event": "{}"})
        assert erp.xlen("dokstamp:results") == 1
        assert erp.xrange("dokstamp:results")
        assert erp.xread({"dokstamp:results": "0"})
        refused = [
            lambda: erp.xrange("dokstamp:events"),  # other systems' events: not readable
            lambda: erp.xread({"dokstamp:events": "0"}),
            lambda: erp.delete("dokstamp:events"),
            lambda: erp.xtrim("dokstamp:events", maxlen=0),
            lambda: erp.xadd("dokstamp:results", {"result": "{}"}),  # no forged outcomes
            lambda: erp.delete("dokstamp:results"),
            lambda: erp.hgetall("dokstamp:metrics"),
            lambda: erp.get("dokstamp:token:abc"),
            lambda: erp.set("dokstamp:lock:entity:student:S-1", "x"),
            lambda: erp.llen("dokstamp-sync"),  # the Celery queue
            lambda: erp.lpop("dokstamp-sync"),
            lambda: erp.keys("*"),
            lambda: erp.flushdb(),
        ]
        for call in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
        assert admin.llen("dokstamp-sync") == 1
        assert admin.xlen("dokstamp:results") == 1
    finally:
        erp.close()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "REDIS_URL": url}
    (tmp_path / "events.jsonl").write_text('{"event_id": "e-2"}\n')
    sent = subprocess.run([EXE, "enqueue", "events.jsonl"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert sent.returncode == 0, sent.stderr
    assert admin.xlen("dokstamp:events") == 2
    read = subprocess.run([EXE, "results", "--json"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert read.returncode == 0, read.stderr
    assert '"e-1"' in read.stdout


def test_the_worker_user_reaches_its_keys_but_not_dangerous_commands(admin, make_user):
    """The workers' user: the streams, locks, counters and Celery's queue; not FLUSHDB,
    CONFIG or KEYS, and no key outside its patterns."""
    worker = redis.Redis.from_url(make_user("dokstamp-worker"))
    try:
        worker.xadd("dokstamp:results", {"result": "{}"})
        assert worker.xrange("dokstamp:events") == []
        worker.rpush("dokstamp-sync", "a task")
        assert worker.lpop("dokstamp-sync") == b"a task"
        assert worker.hincrby("dokstamp:metrics", "api_2xx", 1) == 1
        assert worker.set("dokstamp:lock:entity:student:S-1", "me", px=1000)
        for call in (worker.flushdb, lambda: worker.config_get("*"), lambda: worker.keys("*"),
                     lambda: worker.get("someone-else:key")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                call()
    finally:
        worker.delete("dokstamp:lock:entity:student:S-1")
        worker.close()
