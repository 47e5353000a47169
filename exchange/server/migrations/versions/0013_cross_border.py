"""Cross-border data flows (docs/cross-border.md).

- ``principals.jurisdiction``: ISO 3166-1 alpha-2 code of where the principal is (a zone's
  jurisdiction is its provider's). NULL on rows registered before this migration: read as the
  operator's ``jurisdiction`` setting.
- ``principals.ciio``: the principal is a critical information infrastructure operator.
- ``zones.xborder_negative``: the zone's negative list (a free-trade zone's list of
  ``[operation, data category]`` pairs refused abroad); NULL is an empty list.
- ``xborder_subjects``: one row per data subject a provider has sent abroad in a calendar year
  (China Standard Time), keyed by a digest under the provider's cross-border subject key, never
  the id; flags say whether personal or sensitive personal information of the subject left.
  Unique on (provider, year, digest): a subject is counted once.
- ``xborder_counts``: the number of flagged rows above per (provider, year), kept in the same
  transaction as the rows (the ledger batch that records the release).
- ``xborder_approvals``: compliance approvals the operator recorded (a standard contract filing,
  a certification or a security assessment) for a provider, with the document's SHA-256 and the
  operator's signed envelope.

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # plain ADD COLUMN (no table copy on SQLite): the registry triggers on these tables stay
    op.add_column("principals", sa.Column("jurisdiction", sa.String(2), nullable=True))
    op.add_column(
        "principals",
        sa.Column("ciio", sa.Boolean(), nullable=False, server_default=sa.false()),
    )
    op.add_column("zones", sa.Column("xborder_negative", sa.JSON(), nullable=True))
    op.create_table(
        "xborder_subjects",
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("year", sa.Integer(), nullable=False),
        sa.Column("digest", sa.LargeBinary(32), nullable=False),
        sa.Column("personal", sa.Boolean(), nullable=False),
        sa.Column("sensitive", sa.Boolean(), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("provider", "year", "digest", name="pk_xborder_subjects"),
    )
    op.create_table(
        "xborder_counts",
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("year", sa.Integer(), nullable=False),
        sa.Column("personal", sa.BigInteger(), nullable=False),
        sa.Column("sensitive", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "year", name="pk_xborder_counts"),
    )
    op.create_table(
        "xborder_approvals",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("provider", sa.String(64), nullable=False),
        sa.Column("document", sa.String(16), nullable=False),
        sa.Column("document_digest", sa.String(64), nullable=False),
        sa.Column("valid_from", sa.DateTime(timezone=True), nullable=False),
        sa.Column("valid_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("envelope", sa.Text(), nullable=False),
        sa.Column("recorded_by", sa.String(64), nullable=False),
        sa.Column("recorded_seq", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_xborder_approvals"),
        sa.ForeignKeyConstraint(["provider"], ["principals.key_id"]),
    )
    op.create_index("ix_xborder_approvals_provider", "xborder_approvals", ["provider", "document"])


def downgrade() -> None:
    op.drop_index("ix_xborder_approvals_provider", table_name="xborder_approvals")
    op.drop_table("xborder_approvals")
    op.drop_table("xborder_counts")
    op.drop_table("xborder_subjects")
    op.drop_column("zones", "xborder_negative")
    op.drop_column("principals", "ciio")
    op.drop_column("principals", "jurisdiction")
