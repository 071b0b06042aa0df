"""Mappings keep DokStamp's status and public verification URL of a certificate.

Its downgrade would drop them (no upgrade brings them back): it refuses while any mapping holds
one (see :mod:`dokstamp_sync.migrations.data_loss`).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dokstamp_sync.migrations.data_loss import refuse_if_any

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("mappings") as batch:
        batch.add_column(sa.Column("remote_status", sa.String(20), nullable=True))
        batch.add_column(sa.Column("verification_url", sa.String(500), nullable=True))


def downgrade() -> None:
    refuse_if_any(
        "SELECT count(*) FROM mappings "
        "WHERE remote_status IS NOT NULL OR verification_url IS NOT NULL",
        "certificate mapping(s) with DokStamp's status or verification URL",
        "The schema before 0003 cannot hold them; stay on 0003 or later.")
    with op.batch_alter_table("mappings") as batch:
        batch.drop_column("verification_url")
        batch.drop_column("remote_status")
