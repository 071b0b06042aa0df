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
    """All good: six ok lines (dokstamp, credentials, tenant, issue style, database, redis)."""
    out = run("check")
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0].split(None, 1)[1] for line in lines] == [
        "dokstamp", "credentials", "tenant", "issue style", "database", "redis"]
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
    no password of a URL shown."""
    out = run("check", DOKSTAMP_API_URL="http://127.0.0.1:9",
              DATABASE_URL="postgresql+psycopg://postgres:pg-secret@127.0.0.1:9/x",
              REDIS_URL="redis://:redis-secret@127.0.0.1:9/0", DOKSTAMP_TIMEOUT="2")
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    failed = [line.split(":")[0].split(None, 1)[1] for line in lines if line.startswith("FAIL")]
    assert failed == ["dokstamp", "database", "redis"]
    assert "pg-secret" not in out.stdout
    assert "redis-secret" not in out.stdout


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
