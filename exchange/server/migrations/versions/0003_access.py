"""Access requests, grants and consents.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from exchange.server.models import UTCDateTime

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "access_requests",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("datasets", sa.JSON(), nullable=False),
        sa.Column("operations", sa.JSON(), nullable=False),
        sa.Column("purpose", sa.String(200), nullable=False),
        sa.Column("duration_seconds", sa.BigInteger(), nullable=False),
        sa.Column("justification", sa.Text(), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("decided_at", UTCDateTime(), nullable=True),
        sa.Column("decided_by", sa.String(64), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("provider_approval", sa.Text(), nullable=True),
        sa.Column("grant_id", sa.String(64), nullable=True),
        sa.ForeignKeyConstraint(
            ["consumer"],
            ["principals.key_id"],
            name="fk_access_requests_consumer_principals",
        ),
        sa.ForeignKeyConstraint(["zone"], ["zones.name"], name="fk_access_requests_zone_zones"),
        sa.PrimaryKeyConstraint("id", name="pk_access_requests"),
    )
    op.create_index("ix_access_requests_consumer", "access_requests", ["consumer"])
    op.create_index("ix_access_requests_zone", "access_requests", ["zone"])
    op.create_table(
        "grants",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("datasets", sa.JSON(), nullable=False),
        sa.Column("operations", sa.JSON(), nullable=False),
        sa.Column("purpose", sa.String(200), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("approvals", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.Column("revoked_by", sa.String(64), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["consumer"], ["principals.key_id"], name="fk_grants_consumer_principals"
        ),
        sa.ForeignKeyConstraint(
            ["request_id"], ["access_requests.id"], name="fk_grants_request_id_access_requests"
        ),
        sa.ForeignKeyConstraint(["zone"], ["zones.name"], name="fk_grants_zone_zones"),
        sa.PrimaryKeyConstraint("id", name="pk_grants"),
        sa.UniqueConstraint("request_id", name="uq_grants_request_id"),
    )
    op.create_index("ix_grants_consumer", "grants", ["consumer"])
    op.create_index("ix_grants_zone", "grants", ["zone"])
    op.create_table(
        "consents",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("subject_digest", sa.String(64), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("purpose", sa.String(200), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("recorded_by", sa.String(64), nullable=False),
        sa.Column("withdrawn_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["consumer"], ["principals.key_id"], name="fk_consents_consumer_principals"
        ),
        sa.ForeignKeyConstraint(["zone"], ["zones.name"], name="fk_consents_zone_zones"),
        sa.PrimaryKeyConstraint("id", name="pk_consents"),
    )
    op.create_index("ix_consents_lookup", "consents", ["zone", "subject_digest", "consumer"])


def downgrade() -> None:
    op.drop_table("consents")
    op.drop_table("grants")
    op.drop_table("access_requests")
