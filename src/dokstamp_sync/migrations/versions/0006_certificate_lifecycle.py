"""A mapping remembers which event produced its DokStamp entity; one DokStamp entity belongs to
one ERP key (docs/erp-guide.md).

``produced_by`` (the event's ``event_id``) and ``produced_at`` (its ``occurred_at``) are set when
a mapping gets a DokStamp UUID, or an upsert writes the certificate (creates, changes or issues
it), and kept while other events only act on the same entity: a revoke or delete acts on the
mapped certificate only when it was produced by an upsert before it. Rows
that exist at the upgrade keep NULL, read as "produced before any event" (today's behaviour).

``uq_mappings_entity_dokstamp_uuid``: no two ERP keys map to one DokStamp entity (files apart:
DokStamp deduplicates uploads, so equal contents share one record), ``ix_mappings_dokstamp_uuid``
and ``ix_natural_keys_entity_dokstamp_uuid`` serve the lookups by UUID. When mappings already share an entity, the upgrade refuses and lists them: an operator
decides which key keeps the entity (docs/certificates.md, "One DokStamp entity per ERP key"),
deletes the other keys' mapping rows, and upgrades again.

A mapping's status may be ``expired`` (a certificate DokStamp expired and would not revoke): the
CHECK constraint names it. The downgrade refuses while a mapping says ``expired`` (0005 has no
word for it, and calling it revoked would claim what DokStamp does not say). It also refuses
while any mapping records its producer (``produced_by``/``produced_at`` set): dropped, they come
back NULL, read as "produced before any event", and a late revoke could then revoke a newer
upsert's certificate. ``-x lose_data=yes`` drops them anyway (as 0003 and 0004 allow).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from dokstamp_sync.migrations.data_loss import refuse_if_any

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


SHARED = sa.text("SELECT entity, dokstamp_uuid, erp_key FROM mappings WHERE (entity, "
                 "dokstamp_uuid) IN (SELECT entity, dokstamp_uuid FROM mappings WHERE entity <> "
                 "'file' GROUP BY entity, dokstamp_uuid HAVING COUNT(*) > 1) ORDER BY entity, "
                 "dokstamp_uuid, erp_key")
NOT_FILES = sa.text("entity <> 'file'")
STATUSES = "status IN ('active', 'archived', 'revoked', {}'deleted')"


def refuse_shared_entities() -> None:
    """Stop, naming them, when several ERP keys map to one DokStamp entity."""
    rows = op.get_bind().execute(SHARED).all()
    if not rows:
        return
    shared: dict[tuple[str, str], list[str]] = {}
    for entity, uuid, key in rows:
        shared.setdefault((entity, uuid), []).append(key)
    lines = [f"  {entity} {uuid}: ERP keys {', '.join(keys)}"
             for (entity, uuid), keys in shared.items()]
    raise RuntimeError(
        "cannot upgrade: one DokStamp entity belongs to one ERP key, but these mappings "
        "share one:\n" + "\n".join(lines) + "\nFor each, keep the mapping of the key that "
        "owns the entity, delete the other keys' rows from the mappings table, fix those "
        "keys in the ERP, then run the upgrade again (docs/certificates.md).")


def upgrade() -> None:
    refuse_shared_entities()
    with op.batch_alter_table("mappings") as batch:
        batch.drop_constraint(batch.f("ck_mappings_status"), type_="check")
        batch.create_check_constraint(batch.f("ck_mappings_status"),
                                      STATUSES.format("'expired', "))
        batch.add_column(sa.Column("produced_by", sa.String(255), nullable=True))
        batch.add_column(sa.Column("produced_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index("uq_mappings_entity_dokstamp_uuid", "mappings", ["entity", "dokstamp_uuid"],
                    unique=True, postgresql_where=NOT_FILES, sqlite_where=NOT_FILES)
    op.create_index("ix_mappings_dokstamp_uuid", "mappings", ["dokstamp_uuid"])
    op.create_index("ix_natural_keys_entity_dokstamp_uuid", "natural_keys",
                    ["entity", "dokstamp_uuid"])


def downgrade() -> None:
    expired = op.get_bind().execute(
        sa.text("SELECT COUNT(*) FROM mappings WHERE status = 'expired'")).scalar()
    if expired:
        raise RuntimeError(f"cannot downgrade below 0006: {expired} mapping(s) say 'expired', "
                           "which 0005 cannot record")
    refuse_if_any(
        "SELECT count(*) FROM mappings WHERE produced_by IS NOT NULL OR produced_at IS NOT NULL",
        "mapping(s) recording which event produced their DokStamp entity (produced_by, "
        "produced_at)",
        "The schema before 0006 cannot hold them, and without them a late revoke cannot tell a "
        "newer upsert's certificate apart; stay on 0006 or later.")
    op.drop_index("ix_natural_keys_entity_dokstamp_uuid", table_name="natural_keys")
    op.drop_index("ix_mappings_dokstamp_uuid", table_name="mappings")
    op.drop_index("uq_mappings_entity_dokstamp_uuid", table_name="mappings")
    with op.batch_alter_table("mappings") as batch:
        batch.drop_constraint(batch.f("ck_mappings_status"), type_="check")
        batch.create_check_constraint(batch.f("ck_mappings_status"), STATUSES.format(""))
        batch.drop_column("produced_at")
        batch.drop_column("produced_by")
