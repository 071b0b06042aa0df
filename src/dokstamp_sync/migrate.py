"""Schema migrations (Alembic), usable from an installed package: ``dokstamp-sync db upgrade``,
and the check every command that reads the store makes first: the schema is at this version's
head revision (else one line saying to run ``dokstamp-sync db upgrade``)."""

from __future__ import annotations

from dataclasses import dataclass

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from dokstamp_sync.config import redact_url


class SchemaNotCurrent(Exception):
    """The database's schema is not this version's; the message is one line for the operator."""


@dataclass(frozen=True)
class Revisions:
    """Where a database's schema stands: its revision (None: no schema) and this version's."""

    current: str | None
    head: str

    @property
    def at_head(self) -> bool:
        return self.current == self.head


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and ``database_url``."""
    cfg = Config()
    cfg.set_main_option("script_location", "dokstamp_sync:migrations")
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def _scripts(database_url: str) -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config(database_url))


def revisions(engine: Engine) -> Revisions:
    """The schema's revision and the head revision (one short query)."""
    head = _scripts(str(engine.url)).get_current_head()
    assert head is not None  # the package ships its migrations
    with engine.connect() as conn:
        return Revisions(MigrationContext.configure(conn).get_current_revision(), head)


def require_current(engine: Engine) -> None:
    """Raise :class:`SchemaNotCurrent` unless the schema is at the head revision."""
    found = revisions(engine)
    if found.at_head:
        return
    where = redact_url(engine.url.render_as_string(hide_password=False))
    scripts = _scripts(str(engine.url))
    if found.current is None:
        raise SchemaNotCurrent(f"the database at {where} has no dokstamp-sync schema: "
                               "run dokstamp-sync db upgrade")
    if not _known(scripts, found.current):
        raise SchemaNotCurrent(f"the database at {where} is at revision {found.current}, "
                               f"{NEWER_SCHEMA}; this version's newest is {found.head}")
    raise SchemaNotCurrent(f"the database at {where} is at revision {found.current}, this "
                           f"version needs {found.head}: run dokstamp-sync db upgrade")


def newer_than_this(database_url: str, current: str | None) -> bool:
    """The schema is at a revision this version has no migration of: a newer dokstamp-sync
    migrated it (``db upgrade`` cannot help; run that version, or downgrade with it)."""
    return current is not None and not _known(_scripts(database_url), current)


NEWER_SCHEMA = ("which this version does not know: it was migrated by a newer dokstamp-sync "
                "(run that version, or downgrade the schema with it)")


def _known(scripts: ScriptDirectory, revision: str) -> bool:
    try:
        return scripts.get_revision(revision) is not None
    except Exception:  # alembic's ResolutionError/CommandError: a revision it has no script of
        return False


def upgrade(database_url: str, revision: str = "head") -> None:
    """Create or migrate the schema to ``revision``."""
    command.upgrade(alembic_config(database_url), revision)


def pending(database_url: str, current: str | None) -> list[tuple[str, str]]:
    """(revision, its docstring's first paragraph, shortened) of each migration from
    ``current`` to head, oldest first: what an upgrade applies."""
    scripts = _scripts(database_url)
    steps = scripts.iterate_revisions("head", current or "base")
    return [(s.revision, _summary(s.doc)) for s in reversed(list(steps))]


def _summary(doc: str | None, width: int = 90) -> str:
    """A migration's first paragraph on one line, cut at a word past ``width`` characters."""
    text = " ".join((doc or "").strip().split("\n\n")[0].split())
    if len(text) <= width:
        return text
    return text[:width].rsplit(" ", 1)[0].rstrip(",;:") + " …"


def check(database_url: str) -> None:
    """Raise if the models and the migrated schema differ (``alembic check``)."""
    command.check(alembic_config(database_url))
