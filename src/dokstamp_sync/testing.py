"""Helpers for tests and benchmarks, shipped with the package (as structlog ships its own)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from dokstamp_sync.migrate import upgrade


@contextmanager
def scratch_database(admin_url: str, prefix: str = "dokstamp_sync_scratch") -> Iterator[str]:
    """A new PostgreSQL database, migrated, as a SQLAlchemy URL; dropped on the way out.

    ``admin_url`` is a libpq URL of a database to connect to for CREATE/DROP DATABASE.
    """
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    url = f"{base}/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
