"""The worker's PostgreSQL connections plan each statement with its own values and the tables'
present size, never with a generic plan cached while a table was nearly empty (a first import
would otherwise scan a table that has grown since: see db.make_engine)."""

from __future__ import annotations

from sqlalchemy import text

from dokstamp_sync.db import make_engine, reader_of


def test_every_connection_plans_each_statement_anew(database_url, sessions):
    """A fresh engine's connections, a transaction's and an autocommit reader's, say
    ``force_custom_plan`` (PostgreSQL's default, ``auto``, may keep a generic plan)."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
        with reader_of(sessions)() as session:
            assert session.scalar(text("SHOW plan_cache_mode")) == "force_custom_plan"
    finally:
        engine.dispose()
