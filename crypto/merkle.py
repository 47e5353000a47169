"""RFC 9162 Merkle trees: hashing, proofs and their verification. Pure, no I/O.

leaf = SHA-256(0x00 || entry), node = SHA-256(0x01 || left || right), empty root = SHA-256("").

- :func:`verify_inclusion` and :func:`verify_consistency` return ``None`` or raise
  :class:`~crypto.errors.VerificationError` saying why; they follow RFC 9162 sections 2.1.3.2
  and 2.1.4.2 step by step and refuse any hash that is not 32 bytes.
- :class:`CompactRange` folds a stream of leaf hashes into a root with O(log n) memory.
- :class:`MerkleTree` keeps every perfect-subtree hash so it can serve roots and proofs for any
  size it has seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

from crypto.errors import VerificationError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = hashlib.sha256


def leaf_hash(entry: bytes) -> bytes:
    """The RFC 9162 hash of one log entry."""
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 hash of an interior node."""
    return _sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_hash(value: object, what: str) -> None:
    if not isinstance(value, bytes) or len(value) != HASH_SIZE:
        raise VerificationError(f"{what} is not a {HASH_SIZE}-byte hash")


def _check_proof(proof: Sequence[bytes]) -> None:
    for i, item in enumerate(proof):
        _check_hash(item, f"proof[{i}]")


class CompactRange:
    """The roots of the perfect subtrees covering the leaves appended so far (left to right).

    Appending costs one hash amortized; :meth:`root` costs at most log2(size) hashes.
    """

    __slots__ = ("_stack", "size")

    def __init__(self) -> None:
        self._stack: list[bytes] = []
        self.size = 0

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash (32 bytes)."""
        if len(leaf) != HASH_SIZE:
            raise ValueError("a leaf hash is 32 bytes")
        stack = self._stack
        n = self.size
        # every trailing one bit of the old size is a perfect subtree the new leaf completes
        while n & 1:
            leaf = _sha256(b"\x01" + stack.pop() + leaf).digest()
            n >>= 1
        stack.append(leaf)
        self.size += 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        """Add leaf hashes in order (the same as :meth:`append` for each, only faster)."""
        stack = self._stack
        n = self.size
        sha256 = _sha256
        try:
            for leaf in leaves:
                if len(leaf) != HASH_SIZE:
                    raise ValueError("a leaf hash is 32 bytes")
                m = n
                while m & 1:
                    leaf = sha256(b"\x01" + stack.pop() + leaf).digest()
                    m >>= 1
                stack.append(leaf)
                n += 1
        finally:
            self.size = n

    def root(self) -> bytes:
        """The root of the tree of the leaves so far."""
        stack = self._stack
        if not stack:
            return EMPTY_ROOT
        root = stack[-1]
        for left in reversed(stack[:-1]):
            root = _sha256(b"\x01" + left + root).digest()
        return root


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """The root of the tree whose leaves have these hashes."""
    acc = CompactRange()
    acc.extend(hashes)
    return acc.root()


class _Hashes:
    """A growable array of 32-byte hashes in one ``bytearray``: 32 bytes per hash, where a list
    of ``bytes`` objects costs about 73 (object header and pointer)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def __len__(self) -> int:
        return len(self._buf) // HASH_SIZE

    def append(self, digest: bytes) -> None:
        self._buf += digest

    def __getitem__(self, index: int) -> bytes:
        start = index * HASH_SIZE
        if index < 0 or start >= len(self._buf):
            raise IndexError(index)
        return bytes(self._buf[start : start + HASH_SIZE])


class MerkleTree:
    """An append-only in-memory tree of leaf hashes, about 64 bytes per leaf in all.

    ``levels[k][i]`` is the hash of the perfect subtree over leaves ``[i * 2**k, (i + 1) * 2**k)``.
    Roots and proofs for any size up to :attr:`size` cost O(log n) hashes: every subtree in the
    RFC 9162 recursion is either perfect (a lookup) or ends at the tree's right border, and the
    border hashes for one size are computed once per call.
    """

    __slots__ = ("_levels",)

    def __init__(self) -> None:
        self._levels: list[_Hashes] = [_Hashes()]

    @property
    def size(self) -> int:
        return len(self._levels[0])

    def append(self, leaf: bytes) -> None:
        """Add the next leaf hash (32 bytes)."""
        if not isinstance(leaf, bytes) or len(leaf) != HASH_SIZE:
            raise ValueError("a leaf hash is 32 bytes")
        levels = self._levels
        row = levels[0]._buf
        row += leaf
        index = len(row) // HASH_SIZE - 1
        level = 0
        while index & 1:
            if len(levels) == level + 1:
                levels.append(_Hashes())
            # the two children are adjacent: one 64-byte slice
            start = (index - 1) * HASH_SIZE
            digest = _sha256(b"\x01" + row[start : start + 2 * HASH_SIZE]).digest()
            level += 1
            row = levels[level]._buf
            row += digest
            index >>= 1

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def leaf_hash(self, index: int) -> bytes:
        if not _is_size(index) or index >= self.size:
            raise ValueError(f"leaf index {index} outside 0..{self.size - 1}")
        return self._levels[0][index]

    def _check_size(self, size: int) -> None:
        if not _is_size(size) or size > self.size:
            raise ValueError(f"size {size} outside 0..{self.size}")

    def _perfect(self, height: int, index: int) -> bytes:
        return self._levels[height][index]

    def root(self, size: int | None = None) -> bytes:
        """The root at ``size`` (default: the current size)."""
        size = self.size if size is None else size
        self._check_size(size)
        return subtree_root(size, self._perfect)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 section 2.1.3.1 PATH(index, D[0:size]), leaf side first."""
        self._check_size(size)
        if not _is_size(index) or index >= size:
            raise ValueError(f"leaf index {index} outside 0..{size - 1}")
        return inclusion_path(index, size, self._perfect)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """RFC 9162 section 2.1.4.1 PROOF(size1, D[0:size2]); empty when size1 is 0 or size2."""
        self._check_size(size2)
        if not _is_size(size1) or size1 > size2:
            raise ValueError(f"need 0 <= size1 <= size2, got {size1} and {size2}")
        return consistency_path(size1, size2, self._perfect)


#: ``perfect(k, i)`` is the hash of the perfect subtree over leaves ``[i * 2**k, (i + 1) * 2**k)``
PerfectHash = Callable[[int, int], bytes]


def _border(size: int, perfect: PerfectHash) -> dict[int, bytes]:
    """Hashes of ``[lo, size)`` for every ``lo`` where the recursion meets the right border.

    ``size`` splits into perfect subtrees of decreasing powers of two; the border ranges are
    the suffixes starting at each of their left edges.
    """
    starts: list[tuple[int, int]] = []  # (lo, k) of each perfect piece, left to right
    lo = 0
    for k in range(size.bit_length() - 1, -1, -1):
        if size >> k & 1:
            starts.append((lo, k))
            lo += 1 << k
    border: dict[int, bytes] = {}
    acc: bytes | None = None
    for lo, k in reversed(starts):
        piece = perfect(k, lo >> k)
        acc = piece if acc is None else node_hash(piece, acc)
        border[lo] = acc
    return border


def _range(lo: int, hi: int, border: dict[int, bytes], perfect: PerfectHash) -> bytes:
    n = hi - lo
    if n & (n - 1) == 0 and lo % n == 0:
        k = n.bit_length() - 1
        return perfect(k, lo >> k)
    return border[lo]  # only border ranges are not perfect


def subtree_root(size: int, perfect: PerfectHash) -> bytes:
    """The root of the first ``size`` leaves, from perfect-subtree hashes (O(log n) lookups)."""
    if size == 0:
        return EMPTY_ROOT
    return _border(size, perfect)[0]


def inclusion_path(index: int, size: int, perfect: PerfectHash) -> list[bytes]:
    """RFC 9162 PATH(index, D[0:size]) from perfect-subtree hashes; ``0 <= index < size``.

    Every subtree in the RFC's recursion is either perfect (a lookup) or ends at the tree's
    right border, and the border hashes for one size are computed once per call.
    """
    border = _border(size, perfect)
    proof: list[bytes] = []
    lo, hi, m = 0, size, index
    while hi - lo > 1:
        k = _split(hi - lo)
        if m < k:
            proof.append(_range(lo + k, hi, border, perfect))
            hi = lo + k
        else:
            proof.append(_range(lo, lo + k, border, perfect))
            lo, m = lo + k, m - k
    proof.reverse()
    return proof


def consistency_path(size1: int, size2: int, perfect: PerfectHash) -> list[bytes]:
    """RFC 9162 PROOF(size1, D[0:size2]) from perfect-subtree hashes; ``0 <= size1 <= size2``."""
    if size1 in (0, size2):
        return []
    border = _border(size2, perfect)
    proof: list[bytes] = []
    lo, hi, m, whole = 0, size2, size1, True
    while True:
        n = hi - lo
        if m == n:
            if not whole:
                proof.append(_range(lo, hi, border, perfect))
            break
        k = _split(n)
        if m <= k:
            proof.append(_range(lo + k, hi, border, perfect))
            hi = lo + k
        else:
            proof.append(_range(lo, lo + k, border, perfect))
            lo, m, whole = lo + k, m - k, False
    proof.reverse()
    return proof


def root_from_inclusion_proof(
    leaf_index: int, tree_size: int, leaf_hash: bytes, proof: Sequence[bytes]
) -> bytes:
    """RFC 9162 section 2.1.3.2: the root an inclusion proof leads to (or raise)."""
    if not _is_size(tree_size) or not _is_size(leaf_index):
        raise VerificationError("leaf index and tree size must be non-negative integers")
    if leaf_index >= tree_size:
        raise VerificationError(f"leaf index {leaf_index} is not below tree size {tree_size}")
    _check_hash(leaf_hash, "leaf hash")
    _check_proof(proof)
    fn, sn, r = leaf_index, tree_size - 1, leaf_hash
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
    """Return ``None`` if ``proof`` shows ``leaf_hash`` at ``leaf_index`` in the tree ``root``."""
    _check_hash(root, "root")
    if root_from_inclusion_proof(leaf_index, tree_size, leaf_hash, proof) != root:
        raise VerificationError("inclusion proof does not lead to the root")


def verify_consistency(
    size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]
) -> None:
    """Return ``None`` if ``proof`` shows the tree ``root1`` of ``size1`` is a prefix of ``root2``.

    Equal sizes need an empty proof and equal roots. Every tree extends the empty tree, so from
    size 0 the proof must be empty and ``root1`` must be the empty root.
    """
    if not _is_size(size1) or not _is_size(size2):
        raise VerificationError("tree sizes must be non-negative integers")
    _check_hash(root1, "first root")
    _check_hash(root2, "second root")
    _check_proof(proof)
    if size1 > size2:
        raise VerificationError(f"first size {size1} exceeds second size {size2}")
    if size1 == 0 and root1 != EMPTY_ROOT:
        raise VerificationError("the first root is not the empty tree's root")
    if size1 == size2:
        if proof:
            raise VerificationError("sizes are equal but the proof is not empty")
        if root1 != root2:
            raise VerificationError("sizes are equal but the roots differ")
        return
    if size1 == 0:
        if proof:
            raise VerificationError("a proof from the empty tree must be empty")
        return
    # RFC 9162 section 2.1.4.2, 0 < size1 < size2
    if not proof:  # step 1
        raise VerificationError("consistency proof is empty")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # step 2
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1  # step 3
    while fn & 1:  # step 4
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]  # step 5
    for c in path[1:]:  # step 6
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
    if sn != 0:  # step 7
        raise VerificationError("consistency proof is too short")
    if fr != root1:
        raise VerificationError("consistency proof does not lead to the first root")
    if sr != root2:
        raise VerificationError("consistency proof does not lead to the second root")
