"""The Dockerfile and docker-compose.yml, checked without a Docker engine: hadolint, the
compose-spec JSON schema, that every service runs a plain `dokstamp-sync` command (the preflight
the worker's start-up check), that the image pins every runtime dependency, and that a
PostgreSQL password with `@` or `:` reaches the server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

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
    assert set(ours) == {"preflight", "migrate", "worker", "flower", "console", "sandbox"}
    for name, service in ours.items():
        if name == "preflight":  # the worker's start-up check, a module of the package
            assert service["entrypoint"] == ["python", "-m", "dokstamp_sync.ops.preflight"]
            assert (ROOT / "src/dokstamp_sync/ops/preflight.py").is_file()
            continue
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


def test_the_worker_waits_for_the_preflight_which_runs_once(compose):
    """A configuration the worker can never start with stops the one-shot preflight (restart
    "no"), and the worker starts only after it succeeded: no restart loop on a bad .env."""
    s = compose["services"]
    assert s["preflight"]["restart"] == "no"
    assert s["worker"]["depends_on"]["preflight"]["condition"] == \
        "service_completed_successfully"


def test_the_database_password_is_not_in_the_url(compose):
    """Compose cannot URL-encode: the password travels in PGPASSWORD, the URL has none."""
    env = compose["x-env"]
    assert "@postgres:5432/" in env["DATABASE_URL"]
    assert "POSTGRES_PASSWORD" not in env["DATABASE_URL"]
    assert env["DATABASE_URL"].split("//", 1)[1].split("@")[0] == "dokstamp"  # no ":password"
    assert env["PGPASSWORD"] == "${POSTGRES_PASSWORD:-dokstamp}"
    assert compose["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == \
        env["PGPASSWORD"]


def test_a_password_with_at_and_colon_reaches_postgresql(monkeypatch):
    """The compose way (a URL without password, PGPASSWORD beside it) makes our engine send
    exactly the password, `@`, `:` and `/` included. (The test server trusts every login, so
    what is checked is the password libpq sends, read back from the live connection.)"""
    from dokstamp_sync.db import make_engine
    from testenv import PG_ADMIN_URL

    password = "p@ss:w/rd%40?#"
    monkeypatch.setenv("PGPASSWORD", password)
    server = PG_ADMIN_URL.split("@", 1)[1]  # host:port/db of the test server
    engine = make_engine(f"postgresql+psycopg://postgres@{server}")
    try:
        with engine.connect() as conn:
            assert conn.connection.dbapi_connection.info.password == password
    finally:
        engine.dispose()


def _constraints() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep == "==", f"not pinned: {line}"
            assert version, f"not pinned: {line}"
            pins[canonicalize_name(name)] = version
    return pins


def _runtime_closure() -> set[str]:
    """Every distribution `pip install .` brings, from the installed metadata (extras followed,
    environment markers evaluated as pip does)."""
    from importlib.metadata import distribution

    visited: set[tuple[str, frozenset[str]]] = set()
    todo = [(canonicalize_name("dokstamp-sync"), frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in visited:
            continue
        visited.add((name, extras))
        for text in distribution(name).requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e})
                                      for e in (extras or {""})):
                continue
            todo.append((canonicalize_name(req.name), frozenset(req.extras)))
    return {name for name, _ in visited} - {"dokstamp-sync"}


def test_the_image_installs_pinned_versions():
    """The Dockerfile builds its wheels with constraints.txt, which the build context keeps,
    and constraints.txt pins (==) every runtime dependency, direct and transitive."""
    text = (ROOT / "Dockerfile").read_text()
    build = text.split("FROM ")[1]
    assert "constraints.txt" in build.split("RUN pip wheel")[0]  # copied before the build
    assert "--constraint constraints.txt" in build
    assert "constraints.txt" not in (ROOT / ".dockerignore").read_text()
    pins = _constraints()
    missing = _runtime_closure() - set(pins)
    assert not missing, f"constraints.txt lacks {sorted(missing)}"

