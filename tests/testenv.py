"""Where the tests find their services and which sandbox accounts they use.

Each test run uses its own Redis database numbers (never the application's 0) and its own
PostgreSQL database (created from the admin URL).
"""

from __future__ import annotations

import os

from dokstamp_sync.sandbox import Account

MAIN = Account()
OTHER = Account(tenant="other-university", tenant_name="Other University",
                email="admin@other.edu", password="other-password",
                client_id="other-client", client_secret="other-secret")

TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
TEST_ENGINE_REDIS_URL = os.environ.get("TEST_ENGINE_REDIS_URL", "redis://127.0.0.1:6379/14")
TEST_WORKER_REDIS_URL = os.environ.get("TEST_WORKER_REDIS_URL", "redis://127.0.0.1:6379/15")
PG_ADMIN_URL = os.environ.get("TEST_PG_ADMIN_URL",
                              "postgresql://postgres@127.0.0.1:5432/postgres")



def set_revision(url: str, revision: str) -> None:
    """Write ``revision`` into the schema's alembic_version (as a newer version would)."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sqlalchemy.text("UPDATE alembic_version SET version_num = :r"),
                     {"r": revision})
    engine.dispose()
