"""Private-join (PSI) sessions.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from exchange.server.models import UTCDateTime

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "psi_sessions",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("consumer", sa.String(64), nullable=False),
        sa.Column("zone", sa.String(64), nullable=False),
        sa.Column("dataset", sa.String(64), nullable=False),
        sa.Column("mode", sa.String(16), nullable=False),
        sa.Column("purpose", sa.String(200), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("step", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.Column("x_count", sa.BigInteger(), nullable=True),
        sa.Column("y_count", sa.BigInteger(), nullable=True),
        sa.Column("a_received", sa.BigInteger(), nullable=False),
        sa.Column("bc_received", sa.BigInteger(), nullable=False),
        sa.Column("digests", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("context_digest", sa.String(64), nullable=True),
        sa.Column("error", sa.String(200), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_psi_sessions"),
    )
    op.create_index("ix_psi_sessions_expiry", "psi_sessions", ["state", "expires_at"])


def downgrade() -> None:
    op.drop_index("ix_psi_sessions_expiry", table_name="psi_sessions")
    op.drop_table("psi_sessions")
