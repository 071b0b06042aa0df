"""The Alembic migrations build exactly the models' schema, and go down again."""

from __future__ import annotations

from alembic import command

from dokstamp_sync.migrate import alembic_config, check


def test_migrated_schema_matches_the_models(database_url):
    """`alembic check`: no difference between the models and the migrated database."""
    check(database_url)


def test_sqlite_upgrade_downgrade_upgrade(tmp_path):
    """On SQLite (the demo's store) the migration upgrades, downgrades and upgrades again."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    check(url)
    command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
