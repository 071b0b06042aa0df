"""The change guard (docs/guard.md): events may be ``held`` for an operator, or ``discarded`` by
one, and the inbox notes when the guard admitted a destructive event (``admitted_at``: counted
within the threshold, or released by an operator), so that it is never held afterwards.

The downgrade refuses while events are held (an operator releases or discards them first: the
older schema has no state that neither applies nor drops them); discarded events become
``superseded`` (final, never applied).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# Spelled out here, not imported: a migration must not change when the code does.
BEFORE = "state IN ('pending', 'waiting', 'synced', 'superseded', 'dead')"
AFTER = ("state IN ('pending', 'waiting', 'synced', 'superseded', 'dead', 'held', "
         "'discarded')")


def upgrade() -> None:
    with op.batch_alter_table("inbox") as batch:
        batch.add_column(sa.Column("admitted_at", sa.DateTime(timezone=True), nullable=True))
        batch.drop_constraint(batch.f("ck_inbox_state"), type_="check")
        batch.create_check_constraint(batch.f("ck_inbox_state"), AFTER)


def downgrade() -> None:
    held = op.get_bind().scalar(sa.text("SELECT count(*) FROM inbox WHERE state = 'held'"))
    if held:
        raise RuntimeError(f"{held} event(s) are held by the change guard: release or discard "
                           "them (dokstamp-sync held ...) before downgrading")
    op.execute("UPDATE inbox SET state = 'superseded' WHERE state = 'discarded'")
    with op.batch_alter_table("inbox") as batch:
        batch.drop_constraint(batch.f("ck_inbox_state"), type_="check")
        batch.create_check_constraint(batch.f("ck_inbox_state"), BEFORE)
        batch.drop_column("admitted_at")
