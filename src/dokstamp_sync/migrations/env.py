"""Alembic environment: the URL comes from the Alembic config (set by
:func:`dokstamp_sync.migrate.alembic_config`) or, failing that, from the settings' DATABASE_URL."""

from __future__ import annotations

from alembic import context

from dokstamp_sync import models  # noqa: F401  # registers the tables on Base.metadata
from dokstamp_sync.db import Base, make_engine

config = context.config


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from dokstamp_sync.config import load_store_settings

    return load_store_settings().database_url


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=Base.metadata, literal_binds=True,
                      render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is not None:
        context.configure(connection=connectable, target_metadata=Base.metadata,
                          render_as_batch=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = make_engine(_url())
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=Base.metadata,
                              render_as_batch=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:  # a migration that refuses (0005's downgrade) must not leak the connection
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
