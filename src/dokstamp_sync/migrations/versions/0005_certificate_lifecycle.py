"""A mapping remembers which event produced its DokStamp entity (CONTRACT §2).

``produced_by`` (the event's ``event_id``) and ``produced_at`` (its ``occurred_at``) are set when
a mapping gets a DokStamp UUID and kept while later events act on the same entity: a revoke or
delete acts on the mapped certificate only when it was produced by an upsert before it. Rows
that exist at the upgrade keep NULL, read as "produced before any event" (today's behaviour).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mappings") as batch:
        batch.add_column(sa.Column("produced_by", sa.String(255), nullable=True))
        batch.add_column(sa.Column("produced_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("mappings") as batch:
        batch.drop_column("produced_at")
        batch.drop_column("produced_by")
