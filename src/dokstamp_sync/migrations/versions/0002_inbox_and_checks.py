"""The inbox is called the inbox (table ``events`` -> ``inbox``), and every state column may
hold only its named values (CHECK constraints from :mod:`dokstamp_sync.states`).

Dead letters gain the status ``superseded`` (resolved by a newer event that synced).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# Spelled out here, not imported: a migration must not change when the code does.
EVENT_STATES = "state IN ('pending', 'waiting', 'synced', 'superseded', 'dead')"
MAPPING_STATUSES = "status IN ('active', 'archived', 'revoked', 'deleted')"
LETTER_STATUSES = "status IN ('open', 'replayed', 'discarded', 'superseded')"
INDEXES = {"due": ["state", "next_attempt_at"],
           "entity_key": ["entity", "erp_key", "occurred_at"],
           "waiting_for": ["waiting_for"]}


def _rename(old: str, new: str) -> None:
    """Rename the inbox table with its indexes, unique constraint and the dead letters' FK."""
    for suffix in INDEXES:
        op.drop_index(f"ix_{old}_{suffix}", table_name=old)
    op.rename_table(old, new)
    for suffix, columns in INDEXES.items():
        op.create_index(f"ix_{new}_{suffix}", new, columns)
    with op.batch_alter_table(new) as batch:
        batch.drop_constraint(f"uq_{old}_event_id", type_="unique")
        batch.create_unique_constraint(batch.f(f"uq_{new}_event_id"), ["event_id"])
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_constraint(f"fk_dead_letters_event_pk_{old}", type_="foreignkey")
        batch.create_foreign_key(batch.f(f"fk_dead_letters_event_pk_{new}"), new, ["event_pk"], ["id"])
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE {new} RENAME CONSTRAINT pk_{old} TO pk_{new}")


def upgrade() -> None:
    _rename("events", "inbox")
    with op.batch_alter_table("inbox") as batch:
        batch.create_check_constraint(batch.f("ck_inbox_state"), EVENT_STATES)
    with op.batch_alter_table("mappings") as batch:
        batch.create_check_constraint(batch.f("ck_mappings_status"), MAPPING_STATUSES)
    with op.batch_alter_table("dead_letters") as batch:
        batch.create_check_constraint(batch.f("ck_dead_letters_status"), LETTER_STATUSES)


def downgrade() -> None:
    with op.batch_alter_table("dead_letters") as batch:
        batch.drop_constraint(batch.f("ck_dead_letters_status"), type_="check")
    op.execute("UPDATE dead_letters SET status = 'replayed' WHERE status = 'superseded'")
    with op.batch_alter_table("mappings") as batch:
        batch.drop_constraint(batch.f("ck_mappings_status"), type_="check")
    with op.batch_alter_table("inbox") as batch:
        batch.drop_constraint(batch.f("ck_inbox_state"), type_="check")
    _rename("inbox", "events")
