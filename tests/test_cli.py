"""The dokstamp-sync command, run as a user runs it (subprocesses)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import httpx

EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_walkthrough_command_issues_a_certificate(tmp_path):
    """`dokstamp-sync walkthrough` syncs one certificate on an in-process sandbox, twice."""
    out = subprocess.run([EXE, "walkthrough"], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("issued   certificate") == 1
    assert "found    certificate" in out.stdout
    assert "POST /certificates x1" in out.stdout


def test_sandbox_command_serves_the_api(tmp_path):
    """`dokstamp-sync sandbox --port P` answers logins with the given token TTL and stops."""
    port = _free_port()
    proc = subprocess.Popen([EXE, "sandbox", "--port", str(port), "--token-ttl", "120"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/auth/login", json={
                    "email": "admin@demo-university.edu", "password": "sandbox-password"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "sandbox did not start"
                time.sleep(0.1)
        assert r.status_code == 200
        assert r.json()["expires_in"] == 120
    finally:
        proc.terminate()
        proc.communicate(timeout=10)  # also closes its pipes


def test_sandbox_command_generation_strict_and_unkind_flags(tmp_path):
    """`dokstamp-sync sandbox --generation b --strict --page-cap 2 --reorder-uploads
    --conflict-409` serves the newer docs (no /auth/login) with those switches on."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([EXE, "sandbox", "--port", str(port), "--generation", "b",
                             "--strict", "--page-cap", "2", "--reorder-uploads",
                             "--conflict-409"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                config = httpx.get(f"{url}/_sandbox/config").json()
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "sandbox did not start"
                time.sleep(0.1)
        assert (config["generation"], config["strict"], config["error_style"]) == (
            "b", True, None)
        faults = httpx.get(f"{url}/_sandbox/faults").json()
        assert (faults["page_cap"], faults["reorder_uploads"], faults["conflict_409"]) == (
            2, True, True)
        login = httpx.post(f"{url}/auth/login", json={
            "email": "admin@demo-university.edu", "password": "sandbox-password"})
        assert (login.status_code, login.json()["success"]) == (404, False)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)  # also closes its pipes


def test_walkthrough_with_settings_but_no_tenant_fails_in_one_line(tmp_path):
    """Missing configuration: exit code 2 and a single clear line on stderr, no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP_")}
    out = subprocess.run([EXE, "walkthrough", "--use-settings"], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path, env=env, check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == "configuration error: DOKSTAMP_TENANT is not set"
