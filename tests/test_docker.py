"""The Dockerfile and docker-compose.yml, checked without a Docker engine: hadolint, the
compose-spec JSON schema, and that every service runs a plain `dokstamp-sync` command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dokstamp_sync.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name) or str(BIN / name)
    assert os.path.exists(found), f"{name} is not installed (pip install -e '.[dev]')"
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_hadolint_finds_nothing():
    """hadolint (from PyPI) passes the Dockerfile with no finding at all."""
    out = subprocess.run([tool("hadolint"), "--failure-threshold", "info",
                          str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_file_matches_the_compose_spec_schema():
    """docker-compose.yml validates against the compose-spec schema."""
    out = subprocess.run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "docker-compose.yml")], capture_output=True, text=True,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_is_multistage_and_non_root():
    """Two stages, the final one without build tools and running as a non-root user."""
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") == 2
    final = text.split("FROM ")[-1]
    assert "USER 10001" in final
    assert "pip wheel" not in final
    assert "--no-index" in final  # installs only the built wheels


def test_every_service_command_is_a_plain_dokstamp_sync_command(compose):
    """Each service built from our image runs a command our CLI accepts as it is."""
    parser = build_parser()
    ours = {n: s for n, s in compose["services"].items() if s.get("build")}
    assert set(ours) == {"migrate", "worker", "flower", "console", "sandbox"}
    for name, service in ours.items():
        args = parser.parse_args(service["command"])
        assert args.command in ("db", "worker", "flower", "console", "sandbox"), name


def test_compose_services_have_what_operations_need(compose):
    """Volumes, Redis persistence, healthchecks, a one-shot migration before the worker, a
    scalable worker, Flower and the console only with a password (the console on the host's
    loopback), the worker's metrics reachable by Prometheus, the sandbox under a profile."""
    s = compose["services"]
    assert any("pgdata" in v for v in s["postgres"]["volumes"])
    assert "--appendonly" in s["redis"]["command"]
    for name in ("postgres", "redis", "worker"):
        assert "healthcheck" in s[name], name
    assert s["worker"]["healthcheck"]["test"] == ["CMD", "dokstamp-sync", "health"]
    assert s["migrate"]["restart"] == "no"
    assert s["worker"]["depends_on"]["migrate"]["condition"] == \
        "service_completed_successfully"
    assert "ports" not in s["worker"]
    assert "container_name" not in s["worker"]  # `--scale worker=4` needs both absent
    assert "DOKSTAMP_SYNC_FLOWER_AUTH" in s["flower"]["environment"]
    assert "--insecure-no-auth" not in s["flower"]["command"]
    assert s["sandbox"]["profiles"] == ["sandbox"]
    # The console: only with a password, published on the host's loopback only.
    assert "DOKSTAMP_SYNC_CONSOLE_AUTH" in s["console"]["environment"]
    assert s["console"]["ports"] == ["127.0.0.1:8080:8080"]
    # The worker's metrics listen on loopback unless told: compose tells, for Prometheus.
    assert s["worker"]["environment"]["DOKSTAMP_SYNC_METRICS_ADDRESS"] == "0.0.0.0"  # noqa: S104  # checked, not bound
