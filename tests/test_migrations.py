"""The Alembic migrations build exactly the models' schema, and go down again."""

from __future__ import annotations

import psycopg
import pytest
from alembic import command
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError

from dokstamp_sync.migrate import alembic_config, check
from dokstamp_sync.testing import scratch_database
from testenv import PG_ADMIN_URL


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


def test_postgres_downgrade_to_the_first_revision_and_up_again():
    """0002 renames the inbox and adds CHECK constraints; its downgrade restores 0001's schema
    on PostgreSQL (table ``events``) and the upgrade after it matches the models again."""
    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_migrations") as url:
        cfg = alembic_config(url)
        command.downgrade(cfg, "0001")
        engine = create_engine(url)
        tables = inspect(engine).get_table_names()
        engine.dispose()
        assert "events" in tables
        assert "inbox" not in tables
        command.upgrade(cfg, "head")
        check(url)


ROWS = {
    "inbox": "INSERT INTO inbox (event_id, entity, op, erp_key, occurred_at, payload, state, "
             "attempts, deliveries, next_attempt_at, received_at) VALUES ('ck-1', 'student', "
             "'upsert', 'S-1', now(), '{}', :value, 0, 0, now(), now())",
    "mappings": "INSERT INTO mappings (entity, erp_key, dokstamp_uuid, status, synced_at) "
                "VALUES ('student', 'ck-S-1', 'u-1', :value, now())",
    "dead_letters": "INSERT INTO dead_letters (reason, attempts, status, first_failed_at, "
                    "last_failed_at) VALUES ('r', 1, :value, now(), now())",
}


@pytest.mark.parametrize("table", list(ROWS))
def test_a_state_column_refuses_a_value_that_is_not_named(database_url, table):
    """The CHECK constraints keep every state column to its StrEnum's values: the same row
    goes in with a named value and is refused with another."""
    engine = create_engine(database_url)
    named = {"inbox": "pending", "mappings": "active", "dead_letters": "open"}[table]
    with engine.connect() as conn:
        conn.execute(text(ROWS[table]), {"value": named})  # accepted (rolled back below)
        with pytest.raises(IntegrityError) as refused:
            conn.execute(text(ROWS[table]).bindparams(value="bogus"))
        assert isinstance(refused.value.orig, psycopg.errors.CheckViolation)
        conn.rollback()
    engine.dispose()


def _history_is_marked_reported(url: str) -> None:
    cfg = alembic_config(url)
    command.downgrade(cfg, "0003")
    engine = create_engine(url)
    with engine.begin() as conn:
        for event_id, state, finished in [("old-done", "synced", True),
                                          ("old-open", "pending", False)]:
            conn.execute(text(
                "INSERT INTO inbox (event_id, entity, op, erp_key, occurred_at, payload, state, "
                "attempts, deliveries, next_attempt_at, received_at, finished_at) VALUES "
                "(:e, 'student', 'upsert', 'S-1', CURRENT_TIMESTAMP, '{}', :s, 0, 0, "
                "CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, "
                "CASE WHEN :f THEN CURRENT_TIMESTAMP END)"),
                {"e": event_id, "s": state, "f": finished})
        conn.execute(text("INSERT INTO dead_letters (reason, attempts, status, first_failed_at, "
                          "last_failed_at) VALUES ('r', 1, 'open', CURRENT_TIMESTAMP, "
                          "CURRENT_TIMESTAMP)"))
    command.upgrade(cfg, "head")
    with engine.connect() as conn:
        events = dict(conn.execute(text("SELECT event_id, reported_at FROM inbox")).all())
        letters = conn.execute(text("SELECT reported_at FROM dead_letters")).scalars().all()
    engine.dispose()
    assert events["old-done"] is not None
    assert events["old-open"] is None
    assert letters
    assert all(at is not None for at in letters)


def test_0004_marks_the_history_reported_on_postgres():
    """Upgrading to 0004 marks the outcomes recorded before it reported (no flood of history
    on the outcome stream); an event still open stays unreported until it is final."""
    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_migrations") as url:
        _history_is_marked_reported(url)


def test_0004_marks_the_history_reported_on_sqlite(tmp_path):
    """The same on SQLite (the demo's store)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    command.upgrade(alembic_config(url), "head")
    _history_is_marked_reported(url)


def test_0006_refuses_mappings_that_share_a_dokstamp_entity(tmp_path):
    """Two ERP keys mapped to one DokStamp entity: the upgrade to 0006 (one entity per key)
    stops with a message naming the entity and both keys, changing nothing; once the operator
    deleted the extra mapping it upgrades."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "0005")
    engine = create_engine(url)
    insert = text("INSERT INTO mappings (entity, erp_key, dokstamp_uuid, status, synced_at) "
                  "VALUES ('student', :key, 'u-shared', 'active', CURRENT_TIMESTAMP)")
    with engine.begin() as conn:
        for key in ("S-1", "S-2"):
            conn.execute(insert, {"key": key})
    with pytest.raises(RuntimeError, match="student u-shared: ERP keys S-1, S-2"):
        command.upgrade(cfg, "head")
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM mappings WHERE erp_key = 'S-2'"))
    engine.dispose()
    command.upgrade(cfg, "head")
    check(url)


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_0007_downgrade_refuses_while_events_are_held(backend, tmp_path):
    """0007 (held, discarded): the downgrade refuses while an event is held (the old schema
    could neither apply nor drop it safely); once none is, it turns discarded into superseded
    and the old CHECK constraint is back."""
    def run(url: str) -> None:
        cfg = alembic_config(url)
        command.upgrade(cfg, "head")
        engine = create_engine(url)
        insert = text(
            "INSERT INTO inbox (event_id, entity, op, erp_key, occurred_at, payload, state, "
            "attempts, deliveries, next_attempt_at, received_at) VALUES (:e, 'student', "
            "'delete', 'S-1', CURRENT_TIMESTAMP, '{}', :s, 0, 0, CURRENT_TIMESTAMP, "
            "CURRENT_TIMESTAMP)")
        with engine.begin() as conn:
            conn.execute(insert, {"e": "h-1", "s": "held"})
            conn.execute(insert, {"e": "d-1", "s": "discarded"})
        with pytest.raises(RuntimeError, match="1 event"):
            command.downgrade(cfg, "0006")
        with engine.begin() as conn:
            conn.execute(text("UPDATE inbox SET state = 'pending' WHERE event_id = 'h-1'"))
        command.downgrade(cfg, "0006")
        with engine.connect() as conn:
            states = dict(conn.execute(text("SELECT event_id, state FROM inbox")).all())
        assert states == {"h-1": "pending", "d-1": "superseded"}
        with engine.begin() as conn, pytest.raises(IntegrityError):
            conn.execute(insert, {"e": "h-2", "s": "held"})
        engine.dispose()
        command.upgrade(cfg, "head")

    if backend == "sqlite":
        run(f"sqlite:///{tmp_path / 'store.db'}")
    else:
        with scratch_database(PG_ADMIN_URL, "dokstamp_sync_migrations") as url:
            run(url)
