"""The ledger's Merkle tree stored as C2SP tlog-tiles, so no process holds the whole tree.

- ``ledger_tiles``: one row per hash tile ``(level, idx)``: the concatenated 32-byte hashes
  of the tile (256 when full, fewer for the rightmost tile of a level, which grows in place).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ledger_tiles",
        sa.Column("level", sa.SmallInteger, primary_key=True, autoincrement=False),
        sa.Column("idx", sa.BigInteger, primary_key=True, autoincrement=False),
        sa.Column("hashes", sa.LargeBinary, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("ledger_tiles")
