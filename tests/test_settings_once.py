"""Settings are read once, in config.py, and passed down: no other module of the package reads
the environment or a .env file, and importing the Celery app reads nothing."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import dokstamp_sync

ROOT = Path(dokstamp_sync.__file__).parent


def environment_reads(tree: ast.Module) -> list[str]:
    """Each read of the environment in ``tree`` (``os.environ``, ``os.environb``, ``os.getenv``,
    ``from os import environ``/``getenv``, any import of ``dotenv``), as ``"line: what"``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id == "os" and node.attr in ("environ", "environb", "getenv",
                                                            "getenvb"):
            found.append(f"{node.lineno}: os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and any(
                a.name in ("environ", "environb", "getenv", "getenvb") for a in node.names):
            found.append(f"{node.lineno}: from os import ...")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "dotenv":
            found.append(f"{node.lineno}: from dotenv")
        elif isinstance(node, ast.Import) and any(a.name.split(".")[0] == "dotenv"
                                                  for a in node.names):
            found.append(f"{node.lineno}: import dotenv")
    return found


def test_only_config_reads_the_environment() -> None:
    """No module but config.py reads os.environ, os.getenv or a .env file (dotenv)."""
    offenders = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name == "config.py":
            continue
        reads = environment_reads(ast.parse(path.read_text(), name))
        if reads:
            offenders[name] = reads
    assert offenders == {}


def test_each_kind_of_environment_read_is_found() -> None:
    """The check itself: every way of reading the environment above is caught."""
    code = ("import os\nfrom os import environ\nimport dotenv\nfrom dotenv import load_dotenv\n"
            "a = os.environ['X']\nb = os.getenv('Y')\nc = dict(os.environ)\n")
    assert [r.split(": ")[0] for r in environment_reads(ast.parse(code))] == [
        "2", "3", "4", "5", "6", "7"]
    assert environment_reads(ast.parse("import os\nos.path.join('a')\n")) == []


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("DOKSTAMP", "REDIS_URL", "DATABASE_URL"))}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=clean | env, cwd=ROOT.parent, timeout=60, check=False)


def test_importing_the_worker_reads_no_settings() -> None:
    """`import dokstamp_sync.worker` (and the tasks) read no settings: with none set at all the
    import works and the process's settings are still unread."""
    out = _python("import dokstamp_sync.worker, dokstamp_sync.tasks\n"
                  "from dokstamp_sync import wiring\nprint(wiring._settings is None)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_celery_reads_the_broker_from_the_settings_when_it_starts() -> None:
    """`celery -A dokstamp_sync.worker` (and Flower) still get REDIS_URL, the visibility
    timeout and the namespace's queue: read from the settings when Celery first reads its
    configuration."""
    out = _python("from dokstamp_sync.worker import app\n"
                  "print(app.conf.broker_url)\n"
                  "print(app.conf.broker_transport_options['visibility_timeout'])\n"
                  "print(app.conf.task_serializer)\n"
                  "print(app.conf.task_default_queue)",
                  REDIS_URL="redis://127.0.0.1:6399/3",
                  DOKSTAMP_SYNC_VISIBILITY_TIMEOUT="42", DOKSTAMP_SYNC_NAMESPACE=" blue: ")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["redis://127.0.0.1:6399/3", "42.0", "json",
                                  "blue:dokstamp-sync"]


def test_celery_queue_without_a_namespace_or_usable_settings() -> None:
    """No namespace: the queue keeps its earlier name; unusable settings (a bad visibility
    timeout) still leave the app on that queue, not Celery's ``celery``."""
    code = "from dokstamp_sync.worker import app\nprint(app.conf.task_default_queue)"
    assert _python(code).stdout.split() == ["dokstamp-sync"]
    bad = _python(code, DOKSTAMP_SYNC_VISIBILITY_TIMEOUT="-1")
    assert bad.returncode == 0, bad.stderr
    assert bad.stdout.split() == ["dokstamp-sync"]


def test_importing_the_names_reads_no_namespace() -> None:
    """`redis_keys` builds nothing from the environment: with DOKSTAMP_SYNC_NAMESPACE set,
    ``RedisKeys()`` is still the empty namespace and no module-level name is left."""
    out = _python("from dokstamp_sync import redis_keys as k\n"
                  "print(repr(k.RedisKeys().namespace), hasattr(k, 'QUEUE'), "
                  "hasattr(k, 'PAUSE'), hasattr(k, '_namespace'))",
                  DOKSTAMP_SYNC_NAMESPACE="blue:")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["''", "False", "False", "False"]
