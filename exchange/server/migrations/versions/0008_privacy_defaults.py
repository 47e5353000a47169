"""Privacy by construction: δ accounted per budget window, consent digests versioned by key.

- ``privacy_budgets.delta_spent``: the δ releases spent in the window (decimal string), beside
  ``spent`` (ε). Every noisy gate over groups found in the data spends the release's δ.
- ``consents.digest_version``: which key made ``subject_digest``. Version 0 is the zone's raw
  subject salt (before keys were separated per use); version 1 is the consent-digest key derived
  from it (``exchange.subjects``). Rows written before this migration are version 0 and are
  still honoured by lookups until they expire or are withdrawn; new consents are version 1.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("privacy_budgets") as batch:
        batch.add_column(
            sa.Column("delta_spent", sa.String(64), nullable=False, server_default="0")
        )
    with op.batch_alter_table("consents") as batch:
        batch.add_column(
            sa.Column("digest_version", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("consents") as batch:
        batch.drop_column("digest_version")
    with op.batch_alter_table("privacy_budgets") as batch:
        batch.drop_column("delta_spent")
