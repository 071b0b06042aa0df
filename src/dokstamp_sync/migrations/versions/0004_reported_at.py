"""The outbox of the outcome stream: when each final outcome was reported (docs/erp-guide.md).

``reported_at`` stays NULL from the moment an outcome is recorded until its XADD succeeded; a
partial index keeps "final but not reported" cheap to find. Rows that exist at the upgrade are
marked reported, so that the upgrade does not flood the stream with history.

Its downgrade would forget which outcomes are still unwritten (the upgrade after it would mark
them reported, and they would never be written): it refuses while any is (see
:mod:`dokstamp_sync.migrations.data_loss`).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-12
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dokstamp_sync.migrations.data_loss import refuse_if_any

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

UNREPORTED = sa.text("reported_at IS NULL")


def upgrade() -> None:
    for table in ("inbox", "dead_letters"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("reported_at", sa.DateTime(timezone=True),
                                       nullable=True))
    op.execute("UPDATE inbox SET reported_at = COALESCE(finished_at, CURRENT_TIMESTAMP) "
               "WHERE state IN ('synced', 'superseded', 'dead')")
    op.execute("UPDATE dead_letters "
               "SET reported_at = COALESCE(resolved_at, last_failed_at, CURRENT_TIMESTAMP)")
    op.create_index("ix_inbox_unreported", "inbox", ["finished_at"],
                    postgresql_where=UNREPORTED, sqlite_where=UNREPORTED)
    op.create_index("ix_dead_letters_unreported", "dead_letters", ["last_failed_at"],
                    postgresql_where=UNREPORTED, sqlite_where=UNREPORTED)


def downgrade() -> None:
    refuse_if_any(
        "SELECT (SELECT count(*) FROM inbox WHERE reported_at IS NULL "
        "AND state IN ('synced', 'superseded', 'dead')) + "
        "(SELECT count(*) FROM dead_letters WHERE reported_at IS NULL)",
        "outcome(s) not yet written to the outcome stream",
        "Let the worker's sweeper write them first (with Redis reachable), then downgrade.")
    op.drop_index("ix_dead_letters_unreported", table_name="dead_letters")
    op.drop_index("ix_inbox_unreported", table_name="inbox")
    for table in ("dead_letters", "inbox"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("reported_at")
