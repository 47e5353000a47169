"""The ledger's Merkle tree stored as C2SP tlog-tiles, so no process holds the whole tree.

- ``ledger_tiles``: one row per hash tile ``(level, idx)``: the concatenated 32-byte hashes
  of the tile (256 when full, fewer for the rightmost tile of a level, which grows in place),
  every full tile and the partial tiles of levels 1 and up (the growing level-0 tile is the
  ``leaf_hash`` column of ``ledger_entries``).

The tiles of an existing ledger are built from its leaf hashes, streamed in order; the upgrade
refuses to finish (and changes nothing) unless the rebuilt root at the size of the latest
signed checkpoint equals that checkpoint's root.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from crypto.tiles import FULL_TILE, TileEdge

#: leaf hashes read per query while building tiles
CHUNK = 65_536

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
    build_tiles(op.get_bind())


def build_tiles(conn: sa.Connection) -> None:
    """Write the tiles of every committed entry; check the root of the latest checkpoint."""
    latest = conn.execute(
        sa.text("SELECT size, root FROM checkpoints ORDER BY size DESC LIMIT 1")
    ).first()
    check_at = 0 if latest is None else int(latest.size)
    edge = TileEdge()
    while True:
        hashes = [
            bytes(digest)
            for (digest,) in conn.execute(
                sa.text(
                    "SELECT leaf_hash FROM ledger_entries WHERE seq >= :start "
                    "ORDER BY seq LIMIT :limit"
                ),
                {"start": edge.size, "limit": CHUNK},
            )
        ]
        if not hashes:
            break
        tiles: dict[tuple[int, int], bytes] = {}
        if edge.size < check_at <= edge.size + len(hashes):
            split = check_at - edge.size
            tiles.update(edge.extend(hashes[:split]))
            hashes = hashes[split:]
            assert latest is not None
            if edge.root() != bytes(latest.root):
                raise RuntimeError(
                    f"the ledger's entries do not hash to its latest checkpoint (size "
                    f"{check_at}): the ledger was altered; restore it from a backup"
                )
        tiles.update(edge.extend(hashes))
        upper = [
            {"level": lv, "idx": ix, "hashes": t}
            for (lv, ix), t in tiles.items()
            if lv or len(t) == FULL_TILE
        ]
        if upper:
            conn.execute(
                sa.text(
                    "INSERT INTO ledger_tiles (level, idx, hashes) VALUES (:level, :idx, :hashes) "
                    "ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes"
                ),
                upper,
            )
    if edge.size < check_at:
        raise RuntimeError(
            f"the ledger holds {edge.size} entries, fewer than its latest checkpoint "
            f"({check_at}): restore it from a backup"
        )


def downgrade() -> None:
    op.drop_table("ledger_tiles")
