"""C2SP tlog-tiles: a Merkle tree stored as tiles of hashes, and proofs read from tiles. Pure.

A tile at level ``L`` and index ``N`` holds up to 256 consecutive hashes of level ``8L`` of the
RFC 9162 tree (level 0: the leaf hashes; level 1: the roots of 256-leaf subtrees; ...), the
hashes ``[256N, 256N + W)`` of that level, ``W`` its width. Only the rightmost tile of each
level is partial, and a partial tile only ever grows: its first ``W`` hashes never change, so
a reader holding any tile at least as wide as it needs can use it.

- :func:`tile_path`, :func:`entries_path` and :func:`parse_tile_path` read and write the
  paths of ``c2sp.org/tlog-tiles`` (``tile/<L>/<N>[.p/<W>]``, ``tile/entries/<N>[.p/<W>]``).
- :class:`TileEdge` is a writer's state: the partial tile of every level. Appending leaf hashes
  returns the tiles that changed; its :meth:`~TileEdge.root` needs nothing else.
- :class:`TiledTree` serves roots and proofs for one tree size from a ``fetch`` callback that
  returns stored tiles, reading O(log n / 8) tiles per proof.
- :func:`entry_bundle` and :func:`split_entry_bundle` encode the ``tile/entries`` format.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, MutableMapping, Sequence

from crypto.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    consistency_path,
    inclusion_path,
    subtree_root,
)

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
#: the bytes of a full tile
FULL_TILE = TILE_WIDTH * HASH_SIZE
#: an entry bundle's entries are each at most this long (a big-endian uint16 length prefix)
MAX_ENTRY_BYTES = 0xFFFF

_sha256 = hashlib.sha256

#: ``fetch(level, index, width)`` returns the stored tile ``(level, index)`` with at least
#: ``width`` hashes (it may return a wider one), or raises if it has none that wide
Fetch = Callable[[int, int, int], bytes]

_INDEX_ELEMENT = re.compile(r"x[0-9]{3}", re.ASCII)
_LAST_ELEMENT = re.compile(r"[0-9]{3}", re.ASCII)
_WIDTH = re.compile(r"[1-9][0-9]{0,2}", re.ASCII)
_LEVEL = re.compile(r"0|[1-9][0-9]?", re.ASCII)


class TilePathError(ValueError):
    """A string that is not a tile path in the exact C2SP encoding."""


def _encode_index(index: int) -> str:
    if index < 0:
        raise ValueError("a tile index is not negative")
    parts = []
    while True:
        parts.append(f"{index % 1000:03d}")
        index //= 1000
        if index == 0:
            break
    parts.reverse()
    return "/".join([*(f"x{p}" for p in parts[:-1]), parts[-1]])


def _suffix(width: int | None) -> str:
    if width is None or width == TILE_WIDTH:
        return ""
    if not 1 <= width < TILE_WIDTH:
        raise ValueError(f"a partial tile's width is in 1..{TILE_WIDTH - 1}")
    return f".p/{width}"


def tile_path(level: int, index: int, width: int | None = None) -> str:
    """``tile/<L>/<N>[.p/<W>]``; a full tile (``width`` None or 256) has no ``.p`` part."""
    if not 0 <= level <= 63:
        raise ValueError("a tile level is in 0..63")
    return f"tile/{level}/{_encode_index(index)}{_suffix(width)}"


def entries_path(index: int, width: int | None = None) -> str:
    """``tile/entries/<N>[.p/<W>]``."""
    return f"tile/entries/{_encode_index(index)}{_suffix(width)}"


def parse_tile_path(path: str) -> tuple[int | None, int, int]:
    """``(level, index, width)`` of a tile path relative to the log prefix; level ``None`` for
    an entry bundle, width 256 for a full tile. Anything but the canonical encoding is refused
    (leading zeros beyond three digits, a ``.p/256``, a missing ``x``): one path, one tile."""
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "tile":
        raise TilePathError("a tile path starts with tile/<level>/ or tile/entries/")
    width = TILE_WIDTH
    if len(parts) >= 4 and parts[-2].endswith(".p"):
        if not _WIDTH.fullmatch(parts[-1]) or int(parts[-1]) >= TILE_WIDTH:
            raise TilePathError(f"a partial tile's width is in 1..{TILE_WIDTH - 1}")
        width = int(parts[-1])
        parts = [*parts[:-2], parts[-2][: -len(".p")]]
    level: int | None
    if parts[1] == "entries":
        level = None
    elif _LEVEL.fullmatch(parts[1]) and int(parts[1]) <= 63:
        level = int(parts[1])
    else:
        raise TilePathError("a tile level is a number in 0..63 or 'entries'")
    elements = parts[2:]
    if not _LAST_ELEMENT.fullmatch(elements[-1]) or not all(
        _INDEX_ELEMENT.fullmatch(e) for e in elements[:-1]
    ):
        raise TilePathError("a tile index is written as x###/.../### (three digits each)")
    if len(elements) > 1 and elements[0] == "x000":
        raise TilePathError("a tile index has no leading x000 element")
    index = 0
    for element in elements:
        index = index * 1000 + int(element.lstrip("x"))
    return level, index, width


def _fold(buf: bytes | bytearray, start: int, count: int) -> bytes:
    """The perfect-subtree hash of ``count`` (a power of two) hashes of ``buf`` from ``start``."""
    row = [bytes(buf[(start + i) * HASH_SIZE : (start + i + 1) * HASH_SIZE]) for i in range(count)]
    while len(row) > 1:
        row = [_sha256(b"\x01" + row[i] + row[i + 1]).digest() for i in range(0, len(row), 2)]
    return row[0]


def tile_root(tile: bytes | bytearray) -> bytes:
    """The hash one level-``L`` full tile contributes to level ``L + 1``."""
    if len(tile) != FULL_TILE:
        raise ValueError("only a full tile has a root")
    return _fold(tile, 0, TILE_WIDTH)


def _pieces(width: int) -> list[tuple[int, int]]:
    """``(start, count)`` of the perfect pieces of the first ``width`` hashes, left to right."""
    out = []
    start = 0
    for r in range(TILE_HEIGHT, -1, -1):
        if width >> r & 1:
            out.append((start, 1 << r))
            start += 1 << r
    return out


class TileEdge:
    """The right edge of a tiled tree: the partial tile of every level, and the size.

    ``extend`` appends leaf hashes and returns every tile it changed, keyed ``(level, index)``,
    with its new bytes: full tiles that it completed and the partial tiles it grew. Writing
    those tiles, in the transaction that adds the leaves, keeps the stored tiles complete.
    Each level also keeps the compact range of its partial tile, so appending costs one hash
    amortized and :meth:`root` O(log n) hashes.
    """

    __slots__ = ("_partial", "_stacks", "size")

    def __init__(self, size: int = 0, partial: Sequence[bytes] = ()) -> None:
        """An edge at ``size``; ``partial[L]`` is level ``L``'s partial tile (its width is
        fixed by ``size``: ``(size >> 8L) % 256`` hashes)."""
        self.size = size
        self._partial = [bytearray(t) for t in partial]
        for level, tile in enumerate(self._partial):
            if len(tile) != HASH_SIZE * edge_width(size, level):
                raise ValueError(f"the level-{level} tile does not fit tree size {size}")
        if len(self._partial) < edge_levels(size):
            raise ValueError(f"tree size {size} needs {edge_levels(size)} edge tiles")
        self._stacks = [
            [_fold(t, start, count) for start, count in _pieces(len(t) // HASH_SIZE)]
            for t in self._partial
        ]

    def extend(self, leaves: Iterable[bytes]) -> dict[tuple[int, int], bytes]:
        changed: dict[tuple[int, int], bytes] = {}
        partial, stacks = self._partial, self._stacks
        size = self.size
        for leaf in leaves:
            if len(leaf) != HASH_SIZE:
                raise ValueError("a leaf hash is 32 bytes")
            node, level, count = leaf, 0, size  # count: hashes at this level before the new one
            while True:
                if len(partial) == level:
                    partial.append(bytearray())
                    stacks.append([])
                tile, stack = partial[level], stacks[level]
                # the new hash completes one perfect piece per trailing one bit of the width
                folded, width = node, len(tile) // HASH_SIZE
                while width & 1:
                    folded = _sha256(b"\x01" + stack.pop() + folded).digest()
                    width >>= 1
                stack.append(folded)
                tile += node
                key = (level, count >> TILE_HEIGHT)
                if len(tile) < FULL_TILE:
                    changed[key] = b""  # the partial tile's final bytes are taken below
                    break
                changed[key] = bytes(tile)
                node = stack.pop()  # a full tile's one piece is its root
                tile.clear()
                level, count = level + 1, count >> TILE_HEIGHT
            size += 1
        self.size = size
        for (level, index), data in changed.items():
            if not data:
                changed[(level, index)] = bytes(partial[level])
        return changed

    def tiles(self) -> dict[tuple[int, int], bytes]:
        """The non-empty partial tiles, keyed ``(level, index)``."""
        return {
            (level, (self.size >> (TILE_HEIGHT * level)) >> TILE_HEIGHT): bytes(tile)
            for level, tile in enumerate(self._partial)
            if tile
        }

    def root(self) -> bytes:
        """The tree's root, from the edge alone: O(log n) hashes."""
        pieces = [piece for stack in reversed(self._stacks) for piece in stack]
        if not pieces:
            return EMPTY_ROOT
        root = pieces[-1]
        for piece in reversed(pieces[:-1]):
            root = _sha256(b"\x01" + piece + root).digest()
        return root


def edge_levels(size: int) -> int:
    """How many levels hold hashes at ``size`` (each level's partial tile may be empty)."""
    levels = 0
    while size >> (TILE_HEIGHT * levels):
        levels += 1
    return levels


def edge_width(size: int, level: int) -> int:
    """The width of level ``level``'s partial tile at ``size`` (0: no partial tile)."""
    return (size >> (TILE_HEIGHT * level)) % TILE_WIDTH


def edge_tiles(size: int) -> list[tuple[int, int, int]]:
    """``(level, index, width)`` of the partial tiles a writer needs to extend a tree of
    ``size``, including empty ones (width 0), one per level."""
    return [
        (level, (size >> (TILE_HEIGHT * level)) >> TILE_HEIGHT, edge_width(size, level))
        for level in range(edge_levels(size))
    ]


class TiledTree:
    """Roots and RFC 9162 proofs for the tree of ``size`` leaves, read from stored tiles.

    A perfect subtree of height ``8L + r`` is ``2**r`` consecutive hashes of one level-``L``
    tile, folded; so a proof reads at most two tiles per level. A perfect subtree's hash never
    changes once its leaves exist, so ``memo`` (shared by every tree of one log, any size)
    keeps each one computed: the border pieces every proof at one size shares, and the upper
    levels, are hashed once.
    """

    __slots__ = ("_fetch", "_memo", "size")

    def __init__(
        self, size: int, fetch: Fetch, memo: MutableMapping[tuple[int, int], bytes] | None = None
    ) -> None:
        self.size = size
        self._fetch = fetch
        self._memo: MutableMapping[tuple[int, int], bytes] = {} if memo is None else memo

    def perfect(self, height: int, index: int) -> bytes:
        found = self._memo.get((height, index))
        if found is not None:
            return found
        level, r = divmod(height, TILE_HEIGHT)
        tile_index, offset = divmod(index << r, TILE_WIDTH)
        tile = self._fetch(level, tile_index, offset + (1 << r))
        if len(tile) < (offset + (1 << r)) * HASH_SIZE:
            raise ValueError(f"tile {tile_path(level, tile_index)} is too short")
        if r == 0:  # a stored hash: nothing to remember
            return bytes(tile[offset * HASH_SIZE : (offset + 1) * HASH_SIZE])
        # folded row by row (2**r - 1 hashes, no call per node); only the subtree asked for is
        # remembered, so random proofs do not flood the memo with interior nodes of leaf tiles
        found = self._memo[(height, index)] = _fold(tile, offset, 1 << r)
        return found

    def root(self) -> bytes:
        return subtree_root(self.size, self.perfect)

    def inclusion_proof(self, index: int) -> list[bytes]:
        if not 0 <= index < self.size:
            raise ValueError(f"leaf index {index} outside 0..{self.size - 1}")
        return inclusion_path(index, self.size, self.perfect)

    def consistency_proof(self, size1: int) -> list[bytes]:
        if not 0 <= size1 <= self.size:
            raise ValueError(f"need 0 <= size1 <= {self.size}")
        return consistency_path(size1, self.size, self.perfect)


def needed_width(size: int, level: int, index: int) -> int:
    """The width tile ``(level, index)`` has in the tree of ``size`` leaves (0: none yet)."""
    hashes = size >> (TILE_HEIGHT * level)
    return max(0, min(TILE_WIDTH, hashes - index * TILE_WIDTH))


def entry_bundle(entries: Iterable[bytes]) -> bytes:
    """The ``tile/entries`` encoding: each entry as a big-endian uint16 length and its bytes."""
    out = bytearray()
    for entry in entries:
        if len(entry) > MAX_ENTRY_BYTES:
            raise ValueError(f"an entry in a bundle is at most {MAX_ENTRY_BYTES} bytes")
        out += len(entry).to_bytes(2, "big") + entry
    return bytes(out)


def split_entry_bundle(data: bytes) -> list[bytes]:
    """The entries of a ``tile/entries`` bundle; raise ``ValueError`` if it is truncated."""
    entries = []
    at = 0
    while at < len(data):
        if at + 2 > len(data):
            raise ValueError("an entry bundle ends inside a length prefix")
        length = int.from_bytes(data[at : at + 2], "big")
        if at + 2 + length > len(data):
            raise ValueError("an entry bundle ends inside an entry")
        entries.append(data[at + 2 : at + 2 + length])
        at += 2 + length
    return entries
