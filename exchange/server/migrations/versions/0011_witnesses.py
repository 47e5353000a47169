"""Witnesses: the exchange submits its checkpoints to c2sp.org/tlog-witness witnesses.

- ``ledger_witnesses``: one row per configured witness: its name, URL and verifier key, the
  size of the latest checkpoint it cosigned for this log, and its retry state. The verified
  cosignatures themselves are appended to the notes in ``checkpoints``.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_witnesses",
        sa.Column("name", sa.String(200), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("verifier_key", sa.Text, nullable=False),
        sa.Column("public_key", sa.LargeBinary(32), nullable=False),
        sa.Column("added_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cosigned_size", sa.BigInteger, nullable=True),
        sa.Column("cosigned_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("public_key", name="uq_ledger_witnesses_public_key"),
    )


def downgrade() -> None:
    op.drop_table("ledger_witnesses")
