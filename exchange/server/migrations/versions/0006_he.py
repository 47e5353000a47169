"""Model commitments for encrypted scoring.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from exchange.server.models import UTCDateTime

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "he_models",
        sa.Column("commitment", sa.String(64), nullable=False),
        sa.Column("owner", sa.String(64), nullable=False),
        sa.Column("document", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("commitment", name="pk_he_models"),
    )
    op.create_index("ix_he_models_owner", "he_models", ["owner"])


def downgrade() -> None:
    op.drop_index("ix_he_models_owner", table_name="he_models")
    op.drop_table("he_models")
