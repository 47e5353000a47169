"""The catalog chain: the child exchanges whose checkpoints this exchange records.

- ``chain_children``: one row per child (a district under a city, a street under a district):
  its name, URL and log verifier key, the latest checkpoint recorded for it (size, root, note
  and the ``chain.checkpoint`` entry's seq), the catalog it published (the signed envelope),
  the latest checkpoint it showed that does not extend the recorded one (``chain.fork``), and
  its retry state.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chain_children",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("log_key", sa.Text, nullable=False),
        sa.Column("public_key", sa.LargeBinary(32), nullable=False),
        sa.Column("added_by", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("size", sa.BigInteger, nullable=True),
        sa.Column("root", sa.LargeBinary(32), nullable=True),
        sa.Column("note", sa.Text, nullable=True),
        sa.Column("recorded_seq", sa.BigInteger, nullable=True),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("published", sa.Text, nullable=True),
        sa.Column("published_digest", sa.String(64), nullable=True),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("fork_size", sa.BigInteger, nullable=True),
        sa.Column("fork_root", sa.LargeBinary(32), nullable=True),
        sa.Column("fork_note", sa.Text, nullable=True),
        sa.Column("fork_seq", sa.BigInteger, nullable=True),
        sa.Column("fork_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("failures", sa.Integer, nullable=False),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_until", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("public_key", name="uq_chain_children_public_key"),
    )


def downgrade() -> None:
    op.drop_table("chain_children")
