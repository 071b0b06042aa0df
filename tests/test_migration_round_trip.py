"""A downgrade never loses data silently (issue 17, item 13): going below 0004 while outcomes
are still unwritten to the outcome stream, or below 0003 while certificate mappings hold
DokStamp's status or verification URL, is refused with a message naming what would be lost,
or below 0006 while mappings record which event produced their entity (``produced_by``,
``produced_at``), and the data stays as it was; ``-x lose_data=yes`` is the operator's explicit
way through."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import create_engine, text

from dokstamp_sync.migrate import alembic_config
from dokstamp_sync.testing import scratch_database
from testenv import PG_ADMIN_URL

URL = "https://verify.example/c/1"


def _seed(url: str) -> None:
    """An event synced but not yet reported, and a certificate mapping with its URL."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO inbox (event_id, entity, op, erp_key, occurred_at, payload, state, "
            "attempts, deliveries, next_attempt_at, received_at, finished_at) VALUES "
            "('unsent-1', 'certificate', 'upsert', 'C-1', CURRENT_TIMESTAMP, '{}', 'synced', "
            "0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)"))
        conn.execute(text(
            "INSERT INTO mappings (entity, erp_key, dokstamp_uuid, status, synced_at, "
            "remote_status, verification_url) VALUES ('certificate', 'C-1', 'u-1', 'active', "
            "CURRENT_TIMESTAMP, 'issued', :url)"), {"url": URL})
    engine.dispose()


def _held(url: str) -> tuple[object, object, object]:
    engine = create_engine(url)
    with engine.connect() as conn:
        reported = conn.execute(text(
            "SELECT reported_at FROM inbox WHERE event_id = 'unsent-1'")).scalar_one()
        status, link = conn.execute(text(
            "SELECT remote_status, verification_url FROM mappings WHERE erp_key = 'C-1'")).one()
    engine.dispose()
    return reported, status, link


def _round_trip_keeps_the_data(url: str) -> None:
    cfg = alembic_config(url)
    _seed(url)
    with pytest.raises(RuntimeError, match=r"1 outcome.* not yet written to the outcome stream"):
        command.downgrade(cfg, "0003")
    with pytest.raises(RuntimeError, match="1 outcome"):
        command.downgrade(cfg, "base")
    command.upgrade(cfg, "head")
    assert _held(url) == (None, "issued", URL)

    engine = create_engine(url)
    with engine.begin() as conn:  # the sweeper wrote it: 0004 may go now, not 0003
        conn.execute(text("UPDATE inbox SET reported_at = CURRENT_TIMESTAMP"))
    engine.dispose()
    command.downgrade(cfg, "0003")
    with pytest.raises(RuntimeError, match=r"1 certificate mapping.* verification URL"):
        command.downgrade(cfg, "0002")
    command.upgrade(cfg, "head")
    reported, status, link = _held(url)
    assert reported is not None
    assert (status, link) == ("issued", URL)

    cfg.cmd_opts = argparse.Namespace(x=["lose_data=yes"])  # the operator insists
    command.downgrade(cfg, "0002")
    command.upgrade(cfg, "head")
    assert _held(url)[1:] == (None, None)


def test_a_downgrade_that_would_lose_data_is_refused_on_postgres() -> None:
    """On PostgreSQL: refused below 0004 while an outcome is unwritten, below 0003 while a
    certificate mapping has its URL; after each refusal the upgrade finds the data intact."""
    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_migrations") as url:
        _round_trip_keeps_the_data(url)


def test_a_downgrade_that_would_lose_data_is_refused_on_sqlite(tmp_path: Path) -> None:
    """The same on SQLite (the demo's store)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    command.upgrade(alembic_config(url), "head")
    _round_trip_keeps_the_data(url)


def _producers(url: str) -> list[tuple[object, object]]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = [tuple(row) for row in conn.execute(text(
            "SELECT produced_by, produced_at FROM mappings ORDER BY erp_key"))]
    engine.dispose()
    return rows


def _producers_are_kept_or_refused(url: str) -> None:
    cfg = alembic_config(url)
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO mappings (entity, erp_key, dokstamp_uuid, status, synced_at, "
            "produced_by, produced_at) VALUES ('certificate', 'C-2', 'u-2', 'active', "
            "CURRENT_TIMESTAMP, 'erp-u2', CURRENT_TIMESTAMP)"))
    engine.dispose()
    ((by, at),) = _producers(url)
    assert (by, at is not None) == ("erp-u2", True)
    with pytest.raises(RuntimeError, match=r"1 mapping\(s\) recording which event produced"):
        command.downgrade(cfg, "0005")
    command.upgrade(cfg, "head")
    assert _producers(url) == [(by, at)]
    cfg.cmd_opts = argparse.Namespace(x=["lose_data=yes"])  # the operator insists
    command.downgrade(cfg, "0005")
    command.upgrade(cfg, "head")
    assert _producers(url) == [(None, None)]


def test_0006_downgrade_refuses_to_drop_the_producers_on_postgres() -> None:
    """On PostgreSQL: a mapping records its producer (``produced_by``/``produced_at``); the
    downgrade below 0006 is refused, naming them, and the upgrade finds them intact; with
    ``-x lose_data=yes`` they are dropped (NULL after the next upgrade)."""
    with scratch_database(PG_ADMIN_URL, "dokstamp_sync_migrations") as url:
        command.upgrade(alembic_config(url), "head")
        _producers_are_kept_or_refused(url)


def test_0006_downgrade_refuses_to_drop_the_producers_on_sqlite(tmp_path: Path) -> None:
    """The same on SQLite (the demo's store)."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    command.upgrade(alembic_config(url), "head")
    _producers_are_kept_or_refused(url)


def test_0006_downgrade_refuses_an_expired_mapping_naming_the_right_revisions(
        tmp_path: Path) -> None:
    """A mapping saying ``expired``: refused below 0006, the message naming 0006 and 0005."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    cfg = alembic_config(url)
    command.upgrade(cfg, "head")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO mappings (entity, erp_key, dokstamp_uuid, status, synced_at) VALUES "
            "('certificate', 'C-3', 'u-3', 'expired', CURRENT_TIMESTAMP)"))
    engine.dispose()
    with pytest.raises(RuntimeError, match=r"below 0006: 1 mapping.* which 0005 cannot record"):
        command.downgrade(cfg, "0005")
