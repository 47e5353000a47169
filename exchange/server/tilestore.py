"""The ledger's hash tiles in the control-plane database, and the caches that spare reads.

The tiles are written by the ledger writer in the transaction that adds their leaves
(:meth:`TileStore.write`), so the stored tiles always describe exactly the committed entries.
The growing level-0 tile is not stored twice: its hashes are the ``leaf_hash`` column of
``ledger_entries``, read as a range of rows. ``ledger_tiles`` holds every full tile and the
partial tiles of levels 1 and up, so a batch writes a row there only when it completes a
level-0 tile (every 256 entries): its durable commit carries its entries and almost nothing
else, and a full tile is one row to read.
Readers get tiles through :meth:`TileStore.fetch`, which looks in this order:

1. the tiles this process wrote or read (an LRU of bounded size): a full tile never changes,
   and a partial one only grows, so a cached tile serves every request no wider than it;
2. the partial tiles of the tree this process's writer last committed (its own state: a
   receipt for an entry the writer just committed needs no read at all);
3. the database.

Nothing holds the whole tree: a worker starts without reading it, and memory is bounded by
the cache size.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import cast

from sqlalchemy import Connection, Engine, Table, select, text, tuple_

from crypto.merkle import HASH_SIZE
from crypto.tiles import FULL_TILE, TILE_WIDTH, TiledTree, TileEdge, edge_tiles, tile_path
from exchange.errors import LedgerError
from exchange.server.models import LedgerEntryRow, LedgerTileRow

_TILES = cast(Table, LedgerTileRow.__table__)
_ENTRIES = cast(Table, LedgerEntryRow.__table__)
_UPSERT = text(
    "INSERT INTO ledger_tiles (level, idx, hashes) VALUES (:level, :idx, :hashes) "
    "ON CONFLICT (level, idx) DO UPDATE SET hashes = excluded.hashes"
)


class TileStore:
    """Reads and writes the ``ledger_tiles`` table. Thread-safe."""

    def __init__(self, engine: Engine, cache_tiles: int = 4096) -> None:
        self._engine = engine
        self._cache_tiles = cache_tiles
        self._full: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = threading.Lock()
        #: the partial tiles at the writer's last committed size, replaced whole after a commit
        self._edge: dict[tuple[int, int], bytes] = {}
        self._edge_size = 0
        #: tiles read from the database (not from a cache), for tests and metrics
        self.reads = 0
        #: perfect-subtree hashes computed from tiles, any tree size (about 100 bytes each)
        self._memo: dict[tuple[int, int], bytes] = {}
        self._memo_limit = 16 * cache_tiles

    # -- writing (the writer's transaction) ----------------------------------------------

    def load_edge(self, conn: Connection, size: int) -> TileEdge:
        """The writer's edge at ``size``, read in the writer's transaction (two queries)."""
        wanted = [(level, index) for level, index, width in edge_tiles(size) if width and level]
        stored: dict[tuple[int, int], bytes] = {}
        if size % TILE_WIDTH:
            stored[(0, size // TILE_WIDTH)] = _leaf_hashes(conn, size // TILE_WIDTH)
        if wanted:
            rows = conn.execute(
                select(_TILES.c.level, _TILES.c.idx, _TILES.c.hashes).where(
                    tuple_(_TILES.c.level, _TILES.c.idx).in_(wanted)
                )
            )
            stored.update({(row.level, row.idx): bytes(row.hashes) for row in rows})
        partial = []
        for level, index, width in edge_tiles(size):
            tile = stored.get((level, index), b"")[: width * HASH_SIZE]
            if len(tile) != width * HASH_SIZE:
                raise LedgerError(
                    f"the ledger's tile {tile_path(level, index)} is missing or short: "
                    "run `zonex admin migrate` to rebuild the tiles"
                )
            partial.append(tile)
        return TileEdge(size, partial)

    def write(self, conn: Connection, changed: dict[tuple[int, int], bytes]) -> None:
        """Store the tiles a batch changed, in the batch's transaction (the partial level-0
        tile is the entries' own leaf hashes)."""
        rows = [
            {"level": lv, "idx": ix, "hashes": data}
            for (lv, ix), data in changed.items()
            if lv or len(data) == FULL_TILE
        ]
        if rows:
            conn.execute(_UPSERT, rows)

    def committed(self, edge: TileEdge, changed: dict[tuple[int, int], bytes]) -> None:
        """After the batch committed: keep its full tiles and the new edge for readers."""
        with self._lock:
            for key, data in changed.items():
                if len(data) == FULL_TILE:
                    self._remember(key, data)
            if edge.size >= self._edge_size:
                self._edge, self._edge_size = edge.tiles(), edge.size

    @property
    def known_size(self) -> int:
        """The largest tree size this process's writer committed (0 before its first batch)."""
        return self._edge_size

    # -- reading ---------------------------------------------------------------------------

    def _remember(self, key: tuple[int, int], data: bytes) -> None:
        self._full[key] = data
        self._full.move_to_end(key)
        while len(self._full) > self._cache_tiles:
            self._full.popitem(last=False)

    def fetch(self, level: int, index: int, width: int) -> bytes:
        """A stored tile ``(level, index)`` at least ``width`` hashes wide."""
        key = (level, index)
        need = width * HASH_SIZE
        with self._lock:
            tile = self._full.get(key)
            if tile is not None and len(tile) >= need:
                self._full.move_to_end(key)
                return tile
            edge = self._edge.get(key)
        if edge is not None and len(edge) >= need:
            return edge
        self.reads += 1
        stored: bytes | None
        with self._engine.connect() as conn:
            stored = conn.execute(
                select(_TILES.c.hashes).where(_TILES.c.level == level, _TILES.c.idx == index)
            ).scalar_one_or_none()
            if stored is None and level == 0:
                stored = _leaf_hashes(conn, index)
        if stored is None or len(stored) < width * HASH_SIZE:
            raise LedgerError(f"the ledger's tile {tile_path(level, index)} is missing or short")
        tile = bytes(stored)
        with self._lock:
            cached = self._full.get(key)
            if cached is None or len(cached) < len(tile):
                self._remember(key, tile)
        return tile

    def tree(self, size: int) -> TiledTree:
        """Roots and proofs for the tree of ``size`` committed entries."""
        if len(self._memo) > self._memo_limit:
            self._memo.clear()  # perfect-subtree hashes: recomputed from cached tiles
        return TiledTree(size, self.fetch, self._memo)

    def read_tile(self, level: int, index: int, width: int) -> bytes | None:
        """The first ``width`` hashes of a stored tile, or ``None`` if it is not that wide
        (the tlog-tiles read API)."""
        try:
            return self.fetch(level, index, width)[: width * HASH_SIZE]
        except LedgerError:
            return None


def _leaf_hashes(conn: Connection, index: int) -> bytes:
    """Level-0 tile ``index``: the leaf hashes of entries ``[256 index, 256 index + 256)``."""
    start = index * TILE_WIDTH
    return b"".join(
        bytes(digest)
        for digest in conn.execute(
            select(_ENTRIES.c.leaf_hash)
            .where(_ENTRIES.c.seq >= start, _ENTRIES.c.seq < start + TILE_WIDTH)
            .order_by(_ENTRIES.c.seq)
        ).scalars()
    )
