"""The worker's start-up check as a one-shot (`python -m dokstamp_sync.ops.preflight`), run by
docker-compose.yml before the worker so that a configuration the worker can never start with
stops once, with one line, instead of the worker restarting forever."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dokstamp_sync.demo.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def preflight(tmp_path):
    """Run the one-shot in a folder of its own, with no DokStamp or store variables set."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("DOKSTAMP") and k not in ("REDIS_URL", "DATABASE_URL")}

    def call(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dokstamp_sync.ops.preflight"],
                              capture_output=True, text=True, env=base | env, cwd=tmp_path,
                              timeout=60, check=False)

    return call


def test_an_env_file_copied_unchanged_stops_with_one_line(preflight, tmp_path):
    """`.env` copied from `.env.example` as it is: exit 2, one line naming what to set, no
    traceback (compose then never starts the worker)."""
    shutil.copy(ROOT / ".env.example", tmp_path / ".env")
    out = preflight()
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("configuration error: no DokStamp credentials: set "
                                 "DOKSTAMP_EMAIL and DOKSTAMP_PASSWORD")
    assert "docs/configuration.md" in out.stderr
    assert "Traceback" not in out.stderr


def _dokstamp(url: str, password: str = "sandbox-password") -> dict[str, str]:
    return {"DOKSTAMP_API_URL": url, "DOKSTAMP_TENANT": "demo-university",
            "DOKSTAMP_EMAIL": "admin@demo-university.edu", "DOKSTAMP_PASSWORD": password}


def test_refused_credentials_stop_with_one_line_and_no_secret(preflight, sandbox):
    """Credentials DokStamp (the sandbox) refuses: exit 1, the refusal, not the password."""
    out = preflight(**_dokstamp(sandbox.url, password="wrong-secret-123"))
    assert out.returncode == 1, out.stdout + out.stderr
    assert out.stderr.startswith("refusing to start: DokStamp refused the credentials")
    assert "wrong-secret-123" not in out.stderr + out.stdout


def test_the_wrong_tenant_stops(preflight, sandbox):
    """Credentials of another tenant than DOKSTAMP_TENANT: exit 1 naming both tenants."""
    out = preflight(**_dokstamp(sandbox.url) | {"DOKSTAMP_TENANT": "other-university"})
    assert out.returncode == 1, out.stdout + out.stderr
    assert "'other-university'" in out.stderr
    assert "'demo-university'" in out.stderr


def test_good_credentials_or_an_unreachable_dokstamp_pass(preflight, sandbox):
    """Right credentials: exit 0. A DokStamp that cannot be reached is no reason to refuse
    (the worker starts and events wait for it), so the one-shot passes too."""
    assert preflight(**_dokstamp(sandbox.url)).returncode == 0
    closed = f"http://127.0.0.1:{free_port()}"
    out = preflight(**_dokstamp(closed))
    assert out.returncode == 0, out.stdout + out.stderr
