"""The CLI as users meet it (issue 20): every failure is one line saying what is wrong and what to
do, with an exit status other than 0; --debug (or DOKSTAMP_SYNC_DEBUG=1) adds the traceback;
entity names and numbers are checked; no flag is accepted and ignored; every argument has help.
Each test runs the real command as a subprocess."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dokstamp_sync.demo.samples import event
from testenv import PG_ADMIN_URL, TEST_ENGINE_REDIS_URL, set_revision

EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")
DEAD_REDIS = "redis://:redis-secret@127.0.0.1:9/0?password=q-secret"
DEAD_DB = "postgresql+psycopg://postgres:pg-secret@127.0.0.1:9/x?password=q-secret"
SECRETS = ("redis-secret", "pg-secret", "q-secret")


@pytest.fixture
def cli(database_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DATABASE_URL": database_url, "REDIS_URL": TEST_ENGINE_REDIS_URL,
        "DOKSTAMP_SYNC_STREAM": "test:events"}

    def run(*args: str, stdin: str | None = None,
            **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXE, *args], capture_output=True, text=True, env=env | extra,
                              cwd=tmp_path, input=stdin, timeout=60, check=False)

    return run


@pytest.fixture
def wredis_stream_len():
    """The length of the stream the cli fixture's commands write to."""
    import redis

    client = redis.Redis.from_url(TEST_ENGINE_REDIS_URL)
    yield lambda: client.xlen("test:events")
    client.close()


@pytest.fixture
def empty_database() -> Iterator[str]:
    """A PostgreSQL database that was never migrated."""
    from dokstamp_sync.testing import scratch_database

    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_empty", migrated=False) as url:
        yield url


def one_line(out: subprocess.CompletedProcess[str]) -> str:
    """The failure's only line on stderr (no traceback), with no secret in any output."""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert "Traceback" not in out.stderr
    assert not any(s in out.stdout + out.stderr for s in SECRETS)
    return lines[0]


@pytest.mark.parametrize("command", [("status",), ("dlq", "list"), ("health",),
                                     ("mapping", "student", "S-1")])
def test_an_unreachable_database_is_one_line(cli, command):
    """A wrong DATABASE_URL: one line naming the redacted URL and what to check, exit 1."""
    out = cli(*command, DATABASE_URL=DEAD_DB)
    line = one_line(out)
    assert out.returncode == 1
    assert line.startswith("cannot use the database at postgresql+psycopg://postgres:***@"
                           "127.0.0.1:9/x?password=***")
    assert "check DATABASE_URL" in line


def test_a_postgres_scheme_is_a_configuration_error(cli):
    """`postgres://` (no driver SQLAlchemy knows): a configuration line, exit 2."""
    out = cli("status", DATABASE_URL="postgres://postgres:pg-secret@127.0.0.1/x")
    assert out.returncode == 2
    assert one_line(out) == ("configuration error: DATABASE_URL: the scheme postgres:// names "
                             "no driver dokstamp-sync installs: write postgresql+psycopg://...")


def test_a_redis_url_of_another_scheme_is_a_configuration_error(cli):
    """`REDIS_URL=http://...`: a configuration line naming the schemes Redis takes, exit 2
    (redis-py's ValueError at first use was an "unexpected error")."""
    out = cli("results", REDIS_URL="http://user:redis-secret@127.0.0.1/0")
    assert out.returncode == 2
    line = one_line(out)
    assert line.startswith("configuration error: REDIS_URL: the scheme http:// is not Redis's")


def test_an_unmigrated_database_says_to_run_db_upgrade(cli, empty_database):
    """A database never migrated: `status`, `dlq list` name the fix, exit 1."""
    for command in (("status",), ("dlq", "list")):
        out = cli(*command, DATABASE_URL=empty_database)
        assert out.returncode == 1
        line = one_line(out)
        assert "has no dokstamp-sync schema" in line
        assert line.endswith("run dokstamp-sync db upgrade")


MIGRATIONS = Path(__file__).parents[2] / "src/dokstamp_sync/migrations/versions"


def test_db_upgrade_on_an_empty_database_says_what_it_migrated(cli, empty_database):
    """The first upgrade lists each migration applied; the second says nothing was left."""
    first = cli("db", "upgrade", DATABASE_URL=empty_database + "?password=q-secret")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0].startswith("migrated postgresql+psycopg://")
    assert "?password=***" in lines[0]
    versions = sorted(p.name.split("_")[0] for p in MIGRATIONS.glob("0*.py"))
    assert lines[0].endswith(f"from an empty database to {versions[-1]}:")
    assert [line.split()[0] for line in lines[1:]] == versions
    assert not any(s in first.stdout + first.stderr for s in SECRETS)
    second = cli("db", "upgrade", DATABASE_URL=empty_database)
    assert second.returncode == 0
    assert second.stdout.startswith("schema up to date on ")
    assert cli("status", DATABASE_URL=empty_database).returncode == 0


@pytest.mark.parametrize("command", [("results",), ("enqueue", "-"), ("status",)])
def test_redis_down_is_one_line(cli, command):
    """Redis not reachable: `results`, `enqueue`, `status` end in one line naming the redacted
    REDIS_URL (status prints what the database knows first), exit 1."""
    out = cli(*command, stdin="{}\n", REDIS_URL=DEAD_REDIS)
    assert out.returncode == 1
    line = one_line(out)
    assert "Redis at redis://:***@127.0.0.1:9/0?password=***" in line
    assert "check REDIS_URL" in line


def test_enqueue_a_missing_file_or_a_folder(cli, tmp_path):
    """`enqueue` of a file that does not exist (exit 1) or of a folder (exit 2): one line."""
    missing = cli("enqueue", "nowhere.jsonl")
    assert missing.returncode == 1
    assert one_line(missing).startswith("nowhere.jsonl: no such file")
    folder = cli("enqueue", str(tmp_path))
    assert folder.returncode == 2
    assert one_line(folder).startswith(f"{tmp_path} is a folder")


@pytest.mark.parametrize("command", ["enqueue", "plan"])
def test_enqueue_and_plan_agree_on_a_folder_and_refuse_a_binary_file(cli, wredis_stream_len,
                                                                      tmp_path, command):
    """`plan` answers a folder as `enqueue` does (exit 2); a file that is not UTF-8 text is one
    line saying so and that nothing was sent (exit 2), and the stream is unchanged."""
    folder = cli(command, str(tmp_path))
    assert folder.returncode == 2
    assert one_line(folder).startswith(f"{tmp_path} is a folder")
    good = json.dumps(event("student", "S-1", {"name": "A", "email": "a@example.edu",
                                                "date_of_birth": "2000-01-01"}))
    binary = tmp_path / "events.bin"
    binary.write_bytes(good.encode() + b"\n\xff\xfe\x00garbage\n")
    before = wredis_stream_len()
    out = cli(command, str(binary))
    assert out.returncode == 2
    assert one_line(out).startswith("the input is not UTF-8 text")
    assert "nothing was sent" in out.stderr
    assert wredis_stream_len() == before


def test_results_since_garbage_is_refused_before_redis(cli):
    """`results --since garbage`: argparse's usage error naming the accepted forms, exit 2."""
    out = cli("results", "--since", "garbage")
    assert out.returncode == 2
    assert "'garbage' is not a stream entry id" in out.stderr
    assert "Traceback" not in out.stderr
    assert cli("results", "--since", "1712345678901-0").returncode == 0


def test_debug_shows_the_traceback(cli):
    """--debug, before or after the command, and DOKSTAMP_SYNC_DEBUG=1 add the traceback to
    the line; without them there is none."""
    for out in (cli("--debug", "results", REDIS_URL=DEAD_REDIS),
                cli("results", "--debug", REDIS_URL=DEAD_REDIS),
                cli("results", REDIS_URL=DEAD_REDIS, DOKSTAMP_SYNC_DEBUG="1")):
        assert out.returncode == 1
        assert "Traceback (most recent call last)" in out.stderr
        assert out.stderr.strip().splitlines()[-1].startswith("cannot reach Redis at")


def test_entity_names_are_checked(cli):
    """`mapping Student S-1` and `dlq list --entity studnet`: exit 2, the valid names listed
    (not "not mapped" nor "no open dead letters")."""
    mapping = cli("mapping", "Student", "S-1")
    assert mapping.returncode == 2
    assert "unknown entity 'Student' (did you mean student?): one of institution, module, " \
           "course, cohort, student, enrollment, file, certificate" in mapping.stderr
    listed = cli("dlq", "list", "--entity", "studnet")
    assert listed.returncode == 2
    assert "unknown entity 'studnet'" in listed.stderr
    assert "no open dead letters" not in listed.stdout


def test_no_flag_is_accepted_and_ignored(cli):
    """A flag a subcommand does not use is refused (exit 2): `dlq list --all`,
    `dlq show 1 --entity student`; `dlq discard` without a selection says which to give."""
    assert cli("dlq", "list", "--all").returncode == 2
    assert cli("dlq", "show", "1", "--entity", "student").returncode == 2
    bare = cli("dlq", "discard")
    assert bare.returncode == 2
    assert one_line(bare).startswith("dlq discard: say which letters")
    both = cli("dlq", "replay", "1", "--all")
    assert both.returncode == 2
    assert "not both" in one_line(both)


def test_demo_refuses_a_negative_class(cli):
    """`demo --students -5` is refused before anything starts (exit 2)."""
    out = cli("demo", "--students", "-5")
    assert out.returncode == 2
    assert "-5 is not a whole number of at least 1" in out.stderr


def test_replay_and_discard_twice_follow_one_rule(cli, h):
    """Replaying or discarding a letter twice: both exit 0 and name it "not open" the second
    time; an id that does not exist exits 1 for both; `discard --all` and `--entity` act."""
    h.sync(event("institution", "I", {"name": "I", "country": "BR"}),
           event("student", "S-A", {"name": "x", "email": "a@ex.edu"}),
           event("student", "S-B", {"name": "x", "email": "b@ex.edu"}),
           event("course", "C-1", {"name": "x", "code": "C", "institution_key": "I",
                                   "uuid": "00000000-0000-4000-8000-000000000000"}))
    ids = {d["key"]: str(d["id"]) for d in json.loads(cli("dlq", "list", "--json").stdout)}
    for action in ("replay", "discard"):
        key = "S-A" if action == "replay" else "S-B"
        first, second = cli("dlq", action, ids[key]), cli("dlq", action, ids[key])
        assert (first.returncode, second.returncode) == (0, 0), first.stderr + second.stderr
        assert first.stdout.startswith(f"{action}ed 1")
        assert second.stdout.startswith(f"{action}ed 0; not open [{ids[key]}]")
        assert cli("dlq", action, "99999").returncode == 1
    dry = cli("dlq", "discard", "--entity", "course", "--dry-run")
    assert dry.returncode == 0
    assert dry.stdout.startswith("would discard 1 dead letter(s) (dry run: nothing written)")
    assert len(json.loads(cli("dlq", "list", "--json").stdout)) == 1  # still open
    everything = cli("dlq", "discard", "--all")
    assert (everything.returncode, everything.stdout) == (0, "discarded 1\n")
    assert cli("dlq", "list").stdout.strip() == "no open dead letters"


def _parsers(parser: argparse.ArgumentParser, path: str) -> Iterator[tuple[str, Any]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield from _parsers(child, f"{path} {name}")


def test_every_argument_of_every_command_has_help():
    """`--help` of each command and subcommand explains each of its arguments."""
    from dokstamp_sync.cli import build_parser

    missing = [f"{path}: {action.dest}"
               for path, parser in _parsers(build_parser(), "dokstamp-sync")
               for action in parser._actions
               if not isinstance(action, argparse._HelpAction) and not action.help]
    assert missing == []


def test_dlq_help_explains_its_actions(cli):
    """`dlq --help` names each action with what it does; `dlq replay --help` its arguments."""
    top = cli("dlq", "--help").stdout
    for action in ("list", "show", "replay", "discard"):
        assert f"    {action} " in top
    replay = cli("dlq", "replay", "--help").stdout
    for flag in ("--all", "--entity", "--dry-run", "ID"):
        assert flag in replay



def test_a_schema_newer_than_this_version_is_named_not_upgraded(cli, empty_database):
    """A database a newer dokstamp-sync migrated (a revision this version has no script of):
    `db upgrade` says so in one line, exit 1, not alembic's ResolutionError (`check`'s line:
    tests/ops/test_check.py)."""
    assert cli("db", "upgrade", DATABASE_URL=empty_database).returncode == 0
    set_revision(empty_database, "0099")
    upgrade = cli("db", "upgrade", DATABASE_URL=empty_database)
    assert upgrade.returncode == 1
    line = one_line(upgrade)
    assert "at revision 0099" in line
    assert "migrated by a newer dokstamp-sync" in line



def test_a_metrics_port_in_use_is_one_line_and_not_announced(cli):
    """`metrics --port N` with N taken: one line saying to pick another port, exit 2, and no
    "metrics on http://..." line announcing a server that never listened."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        out = cli("metrics", "--port", str(taken.getsockname()[1]))
    assert out.returncode == 2
    assert one_line(out) == "the port is in use by another program: pick another with --port"
    assert "metrics on" not in out.stdout + out.stderr
