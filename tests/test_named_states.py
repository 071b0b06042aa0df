"""States are named: outside states.py no module of src/ compares, assigns or returns a bare
state string (an event's, a mapping's, a letter's, a run's, or DokStamp's certificate status);
the models' state columns read back as the enums."""

from __future__ import annotations

import ast
from pathlib import Path

import dokstamp_sync
from dokstamp_sync.states import (
    CertificateStatus,
    EventState,
    LetterStatus,
    MappingStatus,
    RunState,
)
from dokstamp_sync.testing import Harness

ROOT = Path(dokstamp_sync.__file__).parent
VALUES = {s.value for enum in (EventState, LetterStatus, MappingStatus, RunState,
                               CertificateStatus) for s in enum}
# Not checked: the sandbox (an imitation of DokStamp, in DokStamp's words), the migrations
# (each frozen at its revision) and states.py itself.
SKIPPED = ("sandbox/", "migrations/", "states.py")
# Words that equal a state's value but are not states, per module: why each is allowed.
ALLOWED: dict[str, set[str]] = {
    "cli_args.py": {"held"},  # the `held` command's name
    "config.py": {"missing"},  # pydantic's error type
    "events.py": {"missing"},  # pydantic's error type
    "console/actions.py": {"replayed", "discarded"},  # the history's verbs (past tense)
    "ops/dlq.py": {"replayed", "discarded"},  # the history's verbs (past tense)
    "sync/letters.py": {"replayed"},  # the history's verb (past tense)
    "ops/held.py": {"discarded"},  # the command's verb in its output
    "ops/metrics.py": {"held"},  # the status facts' key
    "ops/plan.py": {"superseded", "held"},  # plan's actions (docs/guard.md)
    "ops/plan_check.py": {"superseded"},  # plan's action
    "ops/plan_view.py": {"superseded", "held"},  # plan's actions, in print order
    "sync/outcomes.py": {"dead"},  # Next.DEAD: a verdict's name, not a stored state
    "sync/statements.py": {"held"},  # a SQL alias
    "sync/entities.py": {"archived"},  # DokStamp's course status
    "sync/upserts.py": {"active"},  # DokStamp's institution/course status field
    "demo/samples.py": {"active"},  # ERP data: an institution's status
    "demo/walkthrough.py": {"active"},  # ERP data: an institution's and a course's status
}


def bare_states(tree: ast.Module) -> list[str]:
    """String constants equal to a state's value, docstrings aside, as ``"line: value"``."""
    docstrings = {id(node.value) for node in ast.walk(tree)
                  if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)}
    return [f"{node.lineno}: {node.value}" for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and node.value in VALUES and id(node) not in docstrings]


def test_no_bare_state_string_outside_states() -> None:
    """Every module of src/ but those SKIPPED names states; ALLOWED words say why they are not
    states where they appear."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name.startswith(SKIPPED):
            continue
        hits = [hit for hit in bare_states(ast.parse(path.read_text()))
                if hit.split(": ", 1)[1] not in ALLOWED.get(name, set())]
        if hits:
            found[name] = hits
    assert found == {}


def test_a_bare_state_is_found() -> None:
    """The check itself: `status == "open"` is caught, a docstring saying open is not."""
    tree = ast.parse('"""open"""\nif letter.status == "open":\n    pass\n')
    assert bare_states(tree) == ["2: open"]


def test_state_columns_read_back_as_enums(h: Harness) -> None:
    """A letter's and an event's state come back from the database as the StrEnums."""
    from dokstamp_sync.demo.samples import event

    e = event("student", "S-1", {"name": "x", "email": "x@example.edu"})
    h.sync(e)
    (letter,) = h.letters()
    assert type(letter.status) is LetterStatus
    assert type(h.record(e["event_id"]).state) is EventState
