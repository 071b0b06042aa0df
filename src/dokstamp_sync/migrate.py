"""Schema migrations (Alembic), usable from an installed package: ``dokstamp-sync db upgrade``."""

from __future__ import annotations

from alembic import command
from alembic.config import Config


def alembic_config(database_url: str) -> Config:
    """An Alembic config pointing at the packaged migrations and ``database_url``."""
    cfg = Config()
    cfg.set_main_option("script_location", "dokstamp_sync:migrations")
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return cfg


def upgrade(database_url: str, revision: str = "head") -> None:
    """Create or migrate the schema to ``revision``."""
    command.upgrade(alembic_config(database_url), revision)


def check(database_url: str) -> None:
    """Raise if the models and the migrated schema differ (``alembic check``)."""
    command.check(alembic_config(database_url))
