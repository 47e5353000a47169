"""Policy rules (every value column kept), policy version and change history.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "policy_rules",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("ptype", sa.String(8), nullable=False),
        sa.Column("rule", sa.String(200), nullable=False),
        sa.Column("added_in", sa.Integer(), nullable=False),
        *[sa.Column(f"v{i}", sa.String(255), nullable=True) for i in range(10)],
        sa.PrimaryKeyConstraint("id", name="pk_policy_rules"),
    )
    op.create_index("ix_policy_rules_rule", "policy_rules", ["rule"])
    op.create_table(
        "policy_state",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.CheckConstraint("id = 1", name="ck_policy_state_single_row"),
        sa.PrimaryKeyConstraint("id", name="pk_policy_state"),
    )
    op.create_table(
        "policy_changes",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("action", sa.String(8), nullable=False),
        sa.Column("rule", sa.String(200), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_policy_changes"),
    )
    op.create_index("ix_policy_changes_version", "policy_changes", ["version"])
    op.execute("INSERT INTO policy_state (id, version) VALUES (1, 0)")


def downgrade() -> None:
    op.drop_table("policy_changes")
    op.drop_table("policy_state")
    op.drop_table("policy_rules")
