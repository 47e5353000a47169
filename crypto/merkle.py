"""RFC 9162 Merkle trees: hashing, proofs and their verification. Pure functions.

leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || left || right), empty = SHA-256("").
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from crypto.errors import VerificationError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()


def leaf_hash(entry: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class CompactRange:
    """Incremental accumulator: the roots of the perfect subtrees covering the leaves so far."""

    __slots__ = ("_hashes", "_sizes", "size")

    def __init__(self) -> None:
        self._sizes: list[int] = []
        self._hashes: list[bytes] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        sizes, hashes = self._sizes, self._hashes
        sizes.append(1)
        hashes.append(leaf)
        while len(sizes) > 1 and sizes[-1] == sizes[-2]:
            right = hashes.pop()
            sizes.pop()
            hashes[-1] = hashlib.sha256(b"\x01" + hashes[-1] + right).digest()
            sizes[-1] *= 2
        self.size += 1

    def root(self) -> bytes:
        if not self._hashes:
            return EMPTY_ROOT
        root = self._hashes[-1]
        for left in reversed(self._hashes[:-1]):
            root = node_hash(left, root)
        return root


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    acc = CompactRange()
    for h in hashes:
        acc.append(h)
    return acc.root()


class MerkleTree:
    """In-memory tree keeping every perfect-subtree hash by level; O(log n) proofs at any size."""

    def __init__(self) -> None:
        self._levels: list[list[bytes]] = [[]]

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        if len(leaf) != HASH_SIZE:
            raise ValueError("leaf hashes are 32 bytes")
        levels = self._levels
        levels[0].append(leaf)
        index = len(levels[0]) - 1
        level = 0
        while index & 1:
            if len(levels) == level + 1:
                levels.append([])
            row = levels[level]
            levels[level + 1].append(node_hash(row[index - 1], row[index]))
            index >>= 1
            level += 1

    def extend(self, leaves: Sequence[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def leaf_hash(self, index: int) -> bytes:
        return self._levels[0][index]

    def _range(self, lo: int, hi: int) -> bytes:
        """MTH of leaves [lo, hi); lo is always aligned as the RFC's recursion produces it."""
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            k = n.bit_length() - 1
            return self._levels[k][lo >> k]
        k = _split(n)
        return node_hash(self._range(lo, lo + k), self._range(lo + k, hi))

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise ValueError(f"size {size} outside 0..{self.size}")

    def root(self, size: int | None = None) -> bytes:
        size = self.size if size is None else size
        self._check_size(size)
        return EMPTY_ROOT if size == 0 else self._range(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._check_size(size)
        if not 0 <= index < size:
            raise ValueError("index outside the tree")
        proof: list[bytes] = []
        lo, hi, m = 0, size, index
        while hi - lo > 1:
            k = _split(hi - lo)
            if m < k:
                proof.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._range(lo, lo + k))
                lo, m = lo + k, m - k
        proof.reverse()
        return proof

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        self._check_size(size2)
        if not 0 <= size1 <= size2:
            raise ValueError("need 0 <= size1 <= size2")
        if size1 in (0, size2):
            return []
        proof: list[bytes] = []
        lo, hi, m, whole = 0, size2, size1, True
        while True:
            n = hi - lo
            if m == n:
                if not whole:
                    proof.append(self._range(lo, hi))
                break
            k = _split(n)
            if m <= k:
                proof.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                proof.append(self._range(lo, lo + k))
                lo, m, whole = lo + k, m - k, False
        proof.reverse()
        return proof


def _check_hashes(*hashes: bytes) -> None:
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_SIZE:
            raise VerificationError("hash is not 32 bytes")


def root_from_inclusion_proof(
    leaf_index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes]
) -> bytes:
    """RFC 9162 section 2.1.3.2: the root implied by an inclusion proof."""
    if not 0 <= leaf_index < tree_size:
        raise VerificationError("leaf index outside the tree")
    _check_hashes(leaf, *proof)
    fn, sn, r = leaf_index, tree_size - 1, leaf
    for p in proof:
        if sn == 0:
            raise VerificationError("inclusion proof is too long")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("inclusion proof is too short")
    return r


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf_hash: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Return None if ``proof`` shows ``leaf_hash`` at ``leaf_index`` in the tree ``root``."""
    _check_hashes(root)
    if root_from_inclusion_proof(leaf_index, tree_size, leaf_hash, proof) != root:
        raise VerificationError("inclusion proof does not lead to the root")


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> None:
    """Return None if ``proof`` shows tree ``root1`` of ``size1`` is a prefix of ``root2``."""
    _check_hashes(root1, root2, *proof)
    if size1 < 0 or size2 < size1:
        raise VerificationError("need 0 <= size1 <= size2")
    if size1 == size2:
        if proof:
            raise VerificationError("sizes are equal but the proof is not empty")
        if root1 != root2:
            raise VerificationError("equal sizes with different roots")
        return
    if size1 == 0:
        if proof:
            raise VerificationError("a proof from the empty tree must be empty")
        return
    if not proof:
        raise VerificationError("empty consistency proof")
    path = list(proof)
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise VerificationError("consistency proof is too long")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise VerificationError("consistency proof is too short")
    if fr != root1:
        raise VerificationError("consistency proof does not match the first root")
    if sr != root2:
        raise VerificationError("consistency proof does not match the second root")
