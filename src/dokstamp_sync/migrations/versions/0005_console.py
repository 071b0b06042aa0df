"""The dead-letter console and the inbox's retention: a letter's history and three indexes.

``letter_history`` keeps every replay and discard with who did it and when (the console shows
it on the letter's page). ``ix_dead_letters_status_id`` and ``ix_dead_letters_entity_id`` let
the console page newest first by keyset (``id < last``) with a filter; ``ix_inbox_finished``
serves the outcomes per minute and the retention's search for old final events. The
downgrade drops them (the history is lost with its table).

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
    op.create_table(
        "letter_history",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("letter_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
                  nullable=False),
        sa.Column("action", sa.String(length=20), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["letter_id"], ["dead_letters.id"],
                                name=op.f("fk_letter_history_letter_id_dead_letters")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_letter_history")),
    )
    op.create_index(op.f("ix_letter_history_letter_id"), "letter_history", ["letter_id"])
    op.create_index("ix_dead_letters_status_id", "dead_letters", ["status", "id"])
    op.create_index("ix_dead_letters_entity_id", "dead_letters", ["entity", "id"])
    op.create_index("ix_inbox_finished", "inbox", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_inbox_finished", table_name="inbox")
    op.drop_index("ix_dead_letters_entity_id", table_name="dead_letters")
    op.drop_index("ix_dead_letters_status_id", table_name="dead_letters")
    op.drop_index(op.f("ix_letter_history_letter_id"), table_name="letter_history")
    op.drop_table("letter_history")
