"""Analysis rules per dataset (versioned) and privacy budgets per consumer and window.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from exchange.server.models import UTCDateTime

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analysis_rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("rules", sa.JSON(), nullable=False),
        sa.Column("set_by", sa.String(64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(["zone"], ["zones.name"], name="fk_analysis_rules_zone_zones"),
        sa.PrimaryKeyConstraint("id", name="pk_analysis_rules"),
        sa.UniqueConstraint("zone", "dataset", "version", name="uq_analysis_rules_zone"),
    )
    op.create_table(
        "privacy_budgets",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("spent", sa.String(64), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_privacy_budgets"),
        sa.UniqueConstraint(
            "consumer", "zone", "dataset", "window_start", name="uq_privacy_budgets_consumer"
        ),
    )


def downgrade() -> None:
    op.drop_table("privacy_budgets")
    op.drop_table("analysis_rules")
