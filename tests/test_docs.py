"""The user docs stand alone: every page under docs/ is reachable from the README, every
relative link and #anchor resolves, nothing cites the contract that is not in the repository,
the README keeps CI's test command, and every setting of the Settings objects is documented."""

from __future__ import annotations

import re
from pathlib import Path

from dokstamp_sync.config import Settings

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    heads = re.findall(r"^#+ (.+)$", page.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _links(page: Path) -> list[tuple[Path, str]]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # not in code blocks
    out = []
    for target in LINK.findall(text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        out.append(((page.parent / path).resolve() if path else page, anchor))
    return out


def test_every_relative_link_and_anchor_resolves():
    """No link to a missing file or heading."""
    broken = [(page.name, str(target), anchor) for page in PAGES
              for target, anchor in _links(page)
              if not target.exists() or (anchor and target.suffix == ".md"
                                         and anchor not in _anchors(target))]
    assert broken == []


def test_every_page_is_reachable_from_the_readme():
    """Following links from README.md reaches every page under docs/."""
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md" or not page.exists():
            continue
        seen.add(page)
        todo += [target for target, _ in _links(page)]
    assert set(PAGES) - seen == set()


def test_no_page_cites_the_contract():
    """The docs are ours: no "CONTRACT §N", nor any other "§N" of a text outside the
    repository, in the README, docs/ or .env.example."""
    for page in [*PAGES, ROOT / ".env.example"]:
        text = page.read_text()
        assert "CONTRACT" not in text, page.name
        assert "§" not in text, page.name


def test_no_help_text_or_docstring_cites_the_contract():
    """The CLI's help, the metrics' help and the code's docstrings point at our own docs/ pages,
    never at a "CONTRACT §N" a user of the repository cannot read."""
    cited = [str(p.relative_to(ROOT)) for p in (ROOT / "src").rglob("*.py")
             if "CONTRACT" in p.read_text()]
    assert cited == []


def test_the_readme_keeps_the_commands_ci_and_a_new_user_run():
    """The test command of .ci/run and the install-and-demo one-liner."""
    readme = (ROOT / "README.md").read_text()
    assert "python -m pytest -q" in (ROOT / ".ci/run").read_text()
    assert "\npython -m pytest -q\n" in readme
    assert ("python3 -m venv .venv && . .venv/bin/activate && pip install -e . && "
            "dokstamp-sync demo") in readme


def test_every_setting_is_documented():
    """Each field of Settings (and so of StoreSettings) has its variable in configuration.md."""
    text = (ROOT / "docs/configuration.md").read_text()
    missing = [name.upper() for name in Settings.model_fields if f"`{name.upper()}`" not in text]
    assert missing == []


def test_every_picture_in_the_docs_is_taken_by_a_test():
    """Each .png the README or docs/ embed is written by a test (so it shows what the code
    does today): its name appears in a test under tests/."""
    tests = "".join(p.read_text() for p in (ROOT / "tests").rglob("test_*.py")
                    if p.name != "test_docs.py")
    pictures = {Path(t).name for page in PAGES for t in LINK.findall(page.read_text())
                if t.endswith(".png")}
    assert pictures >= {"console-letters.png", "console-letter.png", "flower-tasks.png"}
    assert sorted(p for p in pictures if f'"{p}"' not in tests) == []


def test_the_readme_and_the_operator_guide_show_the_console():
    """The README shows the console's two screenshots; the operator guide names the console
    in its commands table and its dead-letter section, and sends Flower's details to
    monitoring.md."""
    readme = (ROOT / "README.md").read_text()
    assert "![Dead letters filtered by entity](docs/console-letters.png)" in readme
    assert "![A dead letter's page](docs/console-letter.png)" in readme
    guide = (ROOT / "docs/operator-guide.md").read_text()
    table = guide.split("## Operator commands")[1].split("\n## ")[0]
    assert "| `dokstamp-sync console" in table
    assert "dokstamp-sync console" in guide.split("## Dead letters")[1].split("\n## ")[0]
    assert "(monitoring.md#flower)" in guide
