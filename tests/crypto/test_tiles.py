"""Tiles against the in-memory tree of :mod:`crypto.merkle`, over many sizes and batch splits."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.merkle import MerkleTree, verify_consistency, verify_inclusion
from crypto.tiles import (
    TILE_WIDTH,
    TiledTree,
    TileEdge,
    TilePathError,
    edge_tiles,
    entries_path,
    entry_bundle,
    needed_width,
    parse_tile_path,
    split_entry_bundle,
    tile_path,
)


def _leaves(n: int, salt: bytes = b"") -> list[bytes]:
    return [hashlib.sha256(salt + i.to_bytes(8, "big")).digest() for i in range(n)]


class Store:
    """Tiles as a writer stores them: each batch's changed tiles overwrite the stored ones."""

    def __init__(self) -> None:
        self.tiles: dict[tuple[int, int], bytes] = {}
        self.reads = 0

    def write(self, changed: dict[tuple[int, int], bytes]) -> None:
        self.tiles.update(changed)

    def fetch(self, level: int, index: int, width: int) -> bytes:
        self.reads += 1
        tile = self.tiles[(level, index)]
        assert len(tile) >= 32 * width
        return tile

    def edge(self, size: int) -> TileEdge:
        """Reload a writer's edge from the store, as a restarted process does."""
        return TileEdge(
            size, [self.tiles[(lv, ix)][: 32 * w] if w else b"" for lv, ix, w in edge_tiles(size)]
        )


def test_paths_follow_the_c2sp_examples() -> None:
    # c2sp.org/tlog-tiles: "tile/1/x001/x234/067.p/8" is level 1, index 1234067, width 8
    assert tile_path(1, 1234067, 8) == "tile/1/x001/x234/067.p/8"
    assert tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tile_path(0, 0) == "tile/0/000"
    assert entries_path(5, 3) == "tile/entries/005.p/3"
    assert parse_tile_path("tile/1/x001/x234/067.p/8") == (1, 1234067, 8)
    assert parse_tile_path("tile/entries/x001/000") == (None, 1000, TILE_WIDTH)
    assert parse_tile_path("tile/0/000.p/5") == (0, 0, 5)


@pytest.mark.parametrize(
    "path",
    [
        "tile/0/1",  # three digits
        "tile/0/x000/001",  # leading x000
        "tile/0/001/002",  # x missing
        "tile/0/000.p/256",  # a full tile has no .p
        "tile/0/000.p/0",
        "tile/0/000.p/01",
        "tile/00/000",
        "tile/64/000",
        "tiles/0/000",
        "tile/0",
        "tile/entries/x01/000",
    ],
)
def test_non_canonical_paths_are_refused(path: str) -> None:
    with pytest.raises(TilePathError):
        parse_tile_path(path)


@given(st.integers(0, 10**15), st.integers(0, 63), st.integers(1, 256))
def test_paths_round_trip(index: int, level: int, width: int) -> None:
    assert parse_tile_path(tile_path(level, index, width)) == (level, index, width)
    assert parse_tile_path(entries_path(index, width)) == (None, index, width)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=12), st.data())
def test_tiles_serve_the_same_roots_and_proofs_as_the_tree(
    batches: list[int], data: st.DataObject
) -> None:
    leaves = _leaves(sum(batches))
    tree = MerkleTree()
    store = Store()
    size = 0
    edge = TileEdge()
    for batch in batches:
        if data.draw(st.booleans()):
            edge = store.edge(size)  # a restarted writer
        store.write(edge.extend(leaves[size : size + batch]))
        tree.extend(leaves[size : size + batch])
        size += batch
        assert edge.size == size
        assert edge.root() == tree.root()
        tiled = TiledTree(size, store.fetch)
        assert tiled.root() == tree.root()
        index = data.draw(st.integers(0, size - 1))
        proof = tiled.inclusion_proof(index)
        assert proof == tree.inclusion_proof(index, size)
        verify_inclusion(index, size, leaves[index], proof, tree.root())
        old = data.draw(st.integers(0, size))
        assert tiled.consistency_proof(old) == tree.consistency_proof(old, size)
    # every stored tile has exactly the width the final size gives it
    for (level, index), tile in store.tiles.items():
        assert len(tile) == 32 * needed_width(size, level, index)


def test_a_tree_past_two_tile_levels() -> None:
    size = TILE_WIDTH * TILE_WIDTH + 3 * TILE_WIDTH + 17  # three levels of tiles
    leaves = _leaves(size)
    tree = MerkleTree()
    tree.extend(leaves)
    store = Store()
    edge = TileEdge()
    for start in range(0, size, 4093):
        store.write(edge.extend(leaves[start : start + 4093]))
    assert edge.root() == tree.root()
    for old in (1, 255, 256, 65536, 65537, size - 1):
        tiled = TiledTree(size, store.fetch)
        proof = tiled.consistency_proof(old)
        verify_consistency(old, size, tree.root(old), tree.root(), proof)
    store.reads = 0
    TiledTree(size, store.fetch).inclusion_proof(12345)
    assert store.reads <= 2 * 17  # at most one read per proof hash (log2 size ~ 17)


def test_an_edge_that_does_not_fit_its_size_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        TileEdge(3, [b"\x00" * 64])
    with pytest.raises(ValueError, match="needs"):
        TileEdge(300, [b"\x00" * 32 * 44])


def test_entry_bundles_round_trip_and_refuse_truncation() -> None:
    entries = [b"", b"a", b"x" * 300]
    data = entry_bundle(entries)
    assert split_entry_bundle(data) == entries
    with pytest.raises(ValueError):
        split_entry_bundle(data[:-1])
    with pytest.raises(ValueError):
        split_entry_bundle(b"\x00")
    with pytest.raises(ValueError):
        entry_bundle([b"x" * 70000])
