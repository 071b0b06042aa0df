"""`dokstamp-sync check` and the worker's start-up check: credentials, tenant (GET /auth/me),
issue style, DokStamp, PostgreSQL and Redis, one line each; the worker refuses the wrong tenant."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from testenv import TEST_ENGINE_REDIS_URL, TEST_WORKER_REDIS_URL

EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")


@pytest.fixture
def run(sandbox, database_url, tmp_path):
    """Run the command as an operator does, on the sandbox and the test database."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DOKSTAMP_API_URL": sandbox.url, "DOKSTAMP_TENANT": "demo-university",
        "DOKSTAMP_EMAIL": "admin@demo-university.edu", "DOKSTAMP_PASSWORD": "sandbox-password",
        "DATABASE_URL": database_url, "REDIS_URL": TEST_ENGINE_REDIS_URL}

    def call(*args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXE, *args], capture_output=True, text=True, env=base | env,
                              cwd=tmp_path, timeout=timeout, check=False)

    return call


def test_check_passes_with_one_line_per_check(run):
    """All good: seven ok lines (dokstamp, credentials, tenant, issue style, database, schema,
    redis)."""
    out = run("check")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0].split(None, 1)[1] for line in lines] == [
        "dokstamp", "credentials", "tenant", "issue style", "database", "schema", "redis"]
    assert all(line.startswith("ok") for line in lines)
    assert "status" in lines[3]


def test_check_names_the_wrong_tenant(run):
    """A typo in DOKSTAMP_TENANT: the tenant line fails naming both values, exit 1."""
    out = run("check", DOKSTAMP_TENANT="demo-universty")
    assert out.returncode == 1
    tenant = next(line for line in out.stdout.splitlines() if "tenant:" in line)
    assert tenant.startswith("FAIL")
    assert "'demo-universty'" in tenant
    assert "'demo-university'" in tenant


def test_check_refused_credentials_never_show_the_password(run):
    """Wrong password: the credentials line fails with DokStamp's status, the secret is never
    printed; the database and Redis lines still say ok."""
    out = run("check", DOKSTAMP_PASSWORD="wrong-secret-xyz")
    assert out.returncode == 1
    text = out.stdout + out.stderr
    assert "wrong-secret-xyz" not in text
    creds = next(line for line in out.stdout.splitlines() if "credentials:" in line)
    assert creds.startswith("FAIL")
    assert "401" in creds
    assert [line[:4] for line in out.stdout.splitlines()
            if line.split(":")[0].endswith(("database", "redis"))] == ["ok  ", "ok  "]


def test_check_reports_unreachable_services(run):
    """DokStamp, PostgreSQL and Redis that cannot be reached: each its own FAIL line, exit 1,
    no password of a URL shown (neither user:password@ nor ?password=)."""
    out = run("check", DOKSTAMP_API_URL="http://127.0.0.1:9",
              DATABASE_URL="postgresql+psycopg://postgres:pg-secret@127.0.0.1:9/x"
                           "?password=q-secret",
              REDIS_URL="redis://:redis-secret@127.0.0.1:9/0?password=q-secret",
              DOKSTAMP_TIMEOUT="2")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    failed = [line.split(":")[0].split(None, 1)[1] for line in lines if line.startswith("FAIL")]
    assert failed == ["dokstamp", "database", "schema", "redis"]
    assert "pg-secret" not in out.stdout
    assert "redis-secret" not in out.stdout
    assert "q-secret" not in out.stdout + out.stderr
    assert "?password=***" in out.stdout


def test_check_fails_on_a_database_that_is_not_migrated(run, tmp_path):
    """A reachable database without the schema: the schema line fails saying to run
    `dokstamp-sync db upgrade`, exit 1 (it used to say ok)."""
    from dokstamp_sync.testing import scratch_database
    from testenv import PG_ADMIN_URL

    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_empty", migrated=False) as url:
        out = run("check", DATABASE_URL=url)
    assert out.returncode == 1
    schema = next(line for line in out.stdout.splitlines() if "schema:" in line)
    assert schema == "FAIL  schema: no dokstamp-sync schema: run dokstamp-sync db upgrade"
    assert next(line for line in out.stdout.splitlines() if "database:" in line).startswith("ok")


def test_worker_refuses_to_start_on_a_database_that_is_not_migrated(run):
    """`dokstamp-sync worker` on a database without the schema: one line naming the fix,
    exit 1, no Celery process started."""
    from dokstamp_sync.testing import scratch_database
    from testenv import PG_ADMIN_URL

    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_empty", migrated=False) as url:
        out = run("worker", "--concurrency", "1", DATABASE_URL=url,
                  REDIS_URL=TEST_WORKER_REDIS_URL)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.endswith("has no dokstamp-sync schema: run dokstamp-sync db upgrade")


def test_worker_with_redis_down_refuses_in_one_line(run):
    """`dokstamp-sync worker` with Redis not reachable at start: one line naming the redacted
    REDIS_URL, exit 1; no Celery banner, no traceback."""
    out = run("worker", "--concurrency", "1", REDIS_URL="redis://:r-secret@127.0.0.1:9/0",
              timeout=60)
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("cannot reach Redis at redis://:***@127.0.0.1:9/0")
    assert "r-secret" not in out.stdout + out.stderr
    assert "celery@" not in out.stdout + out.stderr


def test_worker_exits_non_zero_after_a_fatal_error(run):
    """Celery stopping on an unrecoverable error (here the event stream's key holds a string, so
    the pump cannot create its consumer group) ends `dokstamp-sync worker` with exit status 1,
    not 0: restart policies (systemd on-failure, compose, Kubernetes) see the failure."""
    import redis

    client = redis.Redis.from_url(TEST_WORKER_REDIS_URL)
    client.flushdb()
    client.set("test:fatal:events", "not a stream")
    try:
        out = run("worker", "--concurrency", "1", REDIS_URL=TEST_WORKER_REDIS_URL,
                  DOKSTAMP_SYNC_STREAM="test:fatal:events", timeout=120)
    finally:
        client.flushdb()
        client.close()
    assert "Unrecoverable error" in out.stderr
    assert out.returncode == 1


def test_worker_refuses_to_start_for_the_wrong_tenant(run):
    """`dokstamp-sync worker` with a tenant its credentials do not belong to exits non-zero
    with one clear line, before any Celery process starts."""
    out = run("worker", "--concurrency", "1", DOKSTAMP_TENANT="demo-universty",
              REDIS_URL=TEST_WORKER_REDIS_URL, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "refusing to start: DOKSTAMP_TENANT is 'demo-universty' but the credentials belong to "
        "tenant 'demo-university' (GET /auth/me tenant.domain)"]


def test_worker_refuses_to_start_with_refused_credentials(run):
    """Credentials DokStamp refuses: one line, exit 1, the password not shown."""
    out = run("worker", "--concurrency", "1", DOKSTAMP_PASSWORD="wrong-secret-xyz",
              REDIS_URL=TEST_WORKER_REDIS_URL, timeout=60)
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("refusing to start: DokStamp refused the "
                                                   "credentials (401")
    assert "wrong-secret-xyz" not in out.stderr


def test_worker_stopped_on_request_exits_zero(sandbox, database_url, tmp_path):
    """SIGTERM (a stop on request: systemd stop, docker stop) ends the worker with exit 0."""
    import signal
    import time

    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DOKSTAMP_API_URL": sandbox.url, "DOKSTAMP_TENANT": "demo-university",
        "DOKSTAMP_EMAIL": "admin@demo-university.edu", "DOKSTAMP_PASSWORD": "sandbox-password",
        "DATABASE_URL": database_url, "REDIS_URL": TEST_WORKER_REDIS_URL,
        "DOKSTAMP_SYNC_STREAM": "test:stop:events"}
    log = tmp_path / "worker.log"
    with log.open("w") as out:
        proc = subprocess.Popen([EXE, "worker", "--concurrency", "1"], env=env, cwd=tmp_path,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 90
            while " ready." not in log.read_text():
                assert proc.poll() is None, log.read_text()[-2000:]
                assert time.monotonic() < deadline, "the worker did not become ready"
                time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()[-2000:]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_check_names_a_schema_migrated_by_a_newer_version(run):
    """A schema at a revision this version does not know: the schema line says a newer
    dokstamp-sync migrated it, and does not send the user to `db upgrade` (which cannot help)."""
    from dokstamp_sync.migrate import upgrade
    from dokstamp_sync.testing import scratch_database
    from testenv import PG_ADMIN_URL, set_revision

    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_newer", migrated=False) as url:
        upgrade(url)
        set_revision(url, "0099")
        out = run("check", DATABASE_URL=url)
    assert out.returncode == 1
    schema = next(line for line in out.stdout.splitlines() if "schema:" in line)
    assert schema.startswith("FAIL  schema: at revision 0099, which this version does not know")
    assert "db upgrade" not in schema
