"""The operator commands, run as an operator runs them, against the test database."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from dokstamp_sync.demo import samples
from dokstamp_sync.demo.samples import event
from testenv import TEST_ENGINE_REDIS_URL

EXE = shutil.which("dokstamp-sync") or os.path.join(os.path.dirname(sys.executable),
                                                    "dokstamp-sync")


@pytest.fixture
def cli(database_url, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOKSTAMP")} | {
        "DATABASE_URL": database_url, "REDIS_URL": TEST_ENGINE_REDIS_URL,
        "DOKSTAMP_SYNC_STREAM": "test:events"}

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([EXE, *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, input=stdin, timeout=60, check=False)

    return run


def test_status_counts_events_by_state(cli, h):
    """`status --json` prints the CONTRACT's event counts, queue depths and dead letters."""
    cls = samples.graduating_class(1)
    h.sync(*cls, event("student", "S-BAD", {"name": "x", "email": "x@ex.edu"}))
    h.send("not json")
    out = cli("status", "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["events"] == {"pending": 0, "waiting": 0, "synced": len(cls),
                                "superseded": 0, "dead": 2, "held": 0, "discarded": 0}
    assert status["dead_letters_open"] == 2
    assert status["stream_depth"] == 0
    text = cli("status").stdout
    assert f"synced {len(cls)}" in text
    assert "open dead letters: 2" in text


def test_dlq_list_show_replay_discard(cli, h):
    """The dead-letter commands show reason, status and body, and replay/discard by id."""
    bad = event("student", "S-BAD", {"name": "x", "email": "x@ex.edu"})
    h.sync(bad)
    listed = json.loads(cli("dlq", "list", "--json").stdout)
    assert [(d["entity"], d["key"], d["http_status"]) for d in listed] == [
        ("student", "S-BAD", 422)]
    ident = str(listed[0]["id"])
    shown = json.loads(cli("dlq", "show", ident).stdout)
    assert shown["request"] == "POST /students"
    assert shown["response_body"]["errors"]["date_of_birth"]
    assert shown["event"]["key"] == "S-BAD"
    assert "date of birth" in cli("dlq", "list").stdout
    assert cli("dlq", "replay").returncode == 2  # says which
    assert cli("dlq", "replay", ident).stdout.startswith("replayed 1")
    again = cli("dlq", "replay", ident)
    assert again.stdout.startswith("replayed 0; not open")
    assert h.state(bad["event_id"]) == "pending"
    h.drain()
    (second,) = json.loads(cli("dlq", "list", "--json").stdout)
    assert cli("dlq", "discard", str(second["id"])).stdout == "discarded 1\n"
    assert cli("dlq", "list").stdout.strip() == "no open dead letters"


def test_dlq_list_finds_invalid_events_by_entity_and_shows_an_excerpt(cli, h):
    """An invalid event's dead letter keeps its event_id, entity and key, so `dlq list
    --entity student` finds it; `dlq list --json` carries a short excerpt of a malformed
    entry's raw text (the first 200 characters)."""
    invalid = event("student", "S-BAD1", {"name": "No email"})
    garbage = "not json " + "x" * 400
    h.send(invalid, garbage)
    out = cli("dlq", "list", "--entity", "student", "--json")
    assert out.returncode == 0, out.stderr
    (student,) = json.loads(out.stdout)
    assert (student["event_id"], student["entity"], student["key"]) == (
        invalid["event_id"], "student", "S-BAD1")
    assert student["reason"] == "invalid event: data.email is required for a student"
    assert json.loads(student["excerpt"]) == invalid
    assert "S-BAD1" in cli("dlq", "list", "--entity", "student").stdout
    listed = json.loads(cli("dlq", "list", "--json").stdout)
    assert [d["excerpt"] for d in listed][1] == garbage[:200] + "…"


def test_mapping_command(cli, h):
    """`mapping ENTITY KEY` prints the UUID, or fails clearly when unmapped."""
    h.sync(event("student", "S-1", {"name": "M", "email": "m@ex.edu",
                                    "date_of_birth": "2000-01-01"}))
    out = cli("mapping", "student", "S-1")
    assert out.returncode == 0
    assert out.stdout.strip() == h.mapping("student", "S-1").dokstamp_uuid
    missing = cli("mapping", "student", "S-404")
    assert missing.returncode == 1
    assert missing.stderr.startswith("student S-404 is not mapped (")
    assert len(missing.stderr.splitlines()) == 1


def test_mapping_command_shows_a_certificates_status_and_verification_url(cli, h):
    """`mapping certificate KEY` prints the UUID, DokStamp's status and the public
    verification URL (CONTRACT §4)."""
    h.sync(*samples.graduating_class(1, courses=1, modules_per_course=1))
    m = h.mapping("certificate", "CERT-00001")
    out = cli("mapping", "certificate", "CERT-00001")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [m.dokstamp_uuid, "status in DokStamp: issued",
                                       f"verification URL: {m.verification_url}"]
    assert m.verification_url.startswith("http")


def test_enqueue_command_from_stdin(cli, ctx):
    """`enqueue -` sends each line, reports a bad one (which is still sent)."""
    lines = [json.dumps(event("student", "S-1", {"name": "M", "email": "m@ex.edu"})), "{bad"]
    out = cli("enqueue", "-", stdin="\n".join(lines))
    assert out.returncode == 0
    assert "enqueued 2 events" in out.stdout
    assert "line 2: invalid" in out.stderr
    assert ctx.redis.xlen("test:events") == 2


def test_enqueue_strict_refuses_a_file_with_any_invalid_line(cli, ctx, tmp_path):
    """`enqueue --strict FILE` sends nothing when any line is invalid: exit 1, every bad line
    named with its reason, the stream untouched; a clean file goes through as without it."""
    good = json.dumps(event("student", "S-1", {"name": "M", "email": "m@ex.edu"}))
    bad = json.dumps(event("student", "S-2", {"name": "M"}))  # no email
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join([good, "{bad", "", bad]) + "\n")
    out = cli("enqueue", "--strict", str(path))
    assert out.returncode == 1
    assert "line 2: invalid, nothing sent" in out.stderr
    assert "line 4: invalid, nothing sent" in out.stderr
    assert "email" in out.stderr
    assert "enqueued" not in out.stdout
    assert not ctx.redis.exists("test:events")
    path.write_text(good + "\n")
    assert cli("enqueue", "--strict", str(path)).returncode == 0
    assert ctx.redis.xlen("test:events") == 1


def test_db_upgrade_is_idempotent(cli):
    """`db upgrade` on an up-to-date schema succeeds and prints no password."""
    out = cli("db", "upgrade")
    assert out.returncode == 0, out.stderr
    assert "schema up to date" in out.stdout


def test_results_command_prints_the_outcome_stream(cli, h):
    """`results` prints one readable line per outcome; `--json` the §5 objects; a dead letter
    resolved by a corrected event is listed only with `dlq list --include-resolved`."""
    from datetime import timedelta

    from dokstamp_sync.testing import T0, student

    h.sync(event("student", "S-BAD", {"name": "x", "email": "x@ex.edu"}, at=T0))
    h.sync(student("S-BAD", email="x@ex.edu", at=T0 + timedelta(hours=1)))
    out = cli("results")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["dead", "synced", "superseded"]
    assert "HTTP 422" in lines[0]
    assert "student S-BAD" in lines[1]
    assert "uuid " in lines[1]
    as_json = [json.loads(line) for line in cli("results", "--json").stdout.splitlines()]
    assert [r["state"] for r in as_json] == ["dead", "synced", "superseded"]
    assert cli("dlq", "list").stdout.strip() == "no open dead letters"
    assert "[superseded]" in cli("dlq", "list", "--include-resolved").stdout


def test_dlq_show_and_list_hide_secret_named_fields(cli, h):
    """`dlq show` and `dlq list --json` show a secret-named field of the event or of a
    malformed entry as ***, as the console does."""
    leaky = event("student", "S-LEAK", {"name": "x", "password": "hunter2"})
    h.send(leaky, '{"entity": "student", "key": "S-RAW", "token": "tok-secret", ')
    listed = json.loads(cli("dlq", "list", "--json").stdout)
    shown = [cli("dlq", "show", str(d["id"])).stdout for d in listed]
    text = "".join(shown) + json.dumps(listed)
    assert "hunter2" not in text
    assert "tok-secret" not in text
    assert '\\"password\\": \\"***\\"' in shown[0]  # the invalid event's raw text
    assert '\\"token\\": \\"***\\"' in shown[1]  # the malformed entry's
