"""Epoch mode of the private joins: what the consumer, the exchange and the zone share
(``docs/psi.md``, "Epoch mode").

In epoch mode a zone blinds its subjects once per epoch under an epoch key ``k_e``; the image
``I = {k_e·H_e(y)}`` is kept by the exchange as sorted fingerprints, and a session costs the
consumer O(|X|): it sends ``A = c·H_e(x)``, downloads ``A_e = k_e·A``, and uploads
``F = c⁻¹·A_e = k_e·H_e(x)``, which the exchange looks up in the image. ``H_e`` hashes under
:func:`epoch_domain`, the session domain of the epoch id.

The preparation's kernel is here too, shared by the exchange (zones it hosts) and a zone's node:
:func:`keyed_order` (the zone's secret order of its subjects), :func:`blind_image` (the image's
fingerprints in that order, chunk by chunk into a file, resumable) and :func:`sort_image` (the
sorted fingerprints and each one's position). No database, no server; the only file is the one
:func:`blind_image` writes and :func:`sort_image` reads.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crypto import psi as cpsi
from exchange.errors import ZonexError
from exchange.psi_protocol import LABEL

__all__ = [
    "FP_BITS",
    "FP_DTYPE",
    "PROTOCOLS",
    "EpochPreparingError",
    "blind_image",
    "choose_protocol",
    "epoch_domain",
    "false_match_bound",
    "fingerprints",
    "keyed_order",
    "retry_seconds",
    "sort_image",
]

#: ``session`` (fresh keys on both sides, O(|Y|) for the consumer) or ``epoch``
PROTOCOLS = ("session", "epoch")
#: a point's fingerprint: the first 96 bits of SHA-256 over its encoding, as a 64-bit high
#: word and a 32-bit low word (both little-endian). 96 bits bound the chance that any of 10^3
#: consumer points meets any of 10^8 image points by chance at 10^11 / 2^96 < 1.3·10^-18
#: per session (:func:`false_match_bound`); 64 bits would leave 5.4·10^-9
FP_BITS = 96
FP_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u4")])
#: subjects blinded per chunk of a preparation when the caller does not say
DEFAULT_CHUNK = 262_144

#: ``on_chunk(done, seconds_per_item)`` after each chunk is on disk: the subjects done so far
#: (a restart passes it back as ``start``) and the chunk's cost per subject
ChunkCallback = Callable[[int, float], None]


class EpochPreparingError(ZonexError):
    """The zone is preparing the epoch a session needs; the session was not opened. Retry after
    ``retry_after`` seconds (also the ``Retry-After`` header)."""

    code = "epoch_preparing"
    status = 503
    title = "Epoch in preparation"

    def __init__(self, detail: str, *, retry_after: int, done: int = 0, total: int = 0) -> None:
        super().__init__(detail, retry_after=retry_after, done=done, total=total)
        self.retry_after = retry_after


def epoch_domain(epoch: str) -> bytes:
    """``H_e``'s hashing domain: :func:`crypto.psi.session_domain` over the epoch id and the
    label every private join hashes under. Sessions of one epoch share it; epochs do not."""
    return cpsi.session_domain(epoch, LABEL)


def fingerprints(points: Sequence[bytes]) -> np.ndarray[Any, np.dtype[Any]]:
    """Each point's :data:`FP_BITS`-bit fingerprint, in order (a :data:`FP_DTYPE` array)."""
    raw = b"".join(hashlib.sha256(p).digest()[:12] for p in points)
    return np.frombuffer(raw, dtype=FP_DTYPE).copy()


def false_match_bound(x_count: int, y_count: int, bits: int = FP_BITS) -> float:
    """An upper bound on the chance that one of ``x_count`` points that are not in the image
    shares a fingerprint with one of its ``y_count`` points (a union bound over the pairs)."""
    return min(1.0, x_count * y_count / 2.0**bits)


def choose_protocol(requested: str | None, *, x_count: int, y_count: int | None, ratio: int) -> str:
    """The protocol of a session. ``requested`` wins when given; otherwise ``epoch`` when a
    prepared epoch is usable (``y_count`` is its |Y|, else ``None``) and |Y| ≥ ``ratio``·|X|
    (the unbalanced case, where the consumer would otherwise download and re-blind |Y| points
    to send |X|), and ``session`` for balanced sizes."""
    if requested is not None:
        return requested
    if y_count is not None and y_count >= ratio * x_count:
        return "epoch"
    return "session"


def retry_seconds(remaining: int, seconds_per_item: float) -> int:
    """A ``Retry-After`` for a preparation with ``remaining`` subjects left to blind."""
    return max(1, min(3600, math.ceil(remaining * seconds_per_item)))


# -- the preparation's kernel ---------------------------------------------------------------


def keyed_order(seed: bytes, ids: Sequence[str]) -> list[int]:
    """The zone's secret order of its subjects: the indices of ``ids`` sorted by a keyed
    BLAKE2b (key ``seed``, 16 bytes) of each id, so the same ids give the same order whenever
    they are read (a resumed preparation, a session's values in the image's order)."""
    tags = [hashlib.blake2b(i.encode("utf-8"), key=seed, digest_size=16).digest() for i in ids]
    return sorted(range(len(ids)), key=tags.__getitem__)


def blind_image(
    key: cpsi.PsiKey,
    seed: bytes,
    epoch: str,
    ids: Sequence[str],
    path: Path,
    *,
    start: int = 0,
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
    max_chunks: int | None = None,
    on_chunk: ChunkCallback | None = None,
) -> bool:
    """Write the fingerprints of the image ``I = k_e·H_e(y)`` of ``ids`` in the zone's order
    (:func:`keyed_order` under ``seed``) to ``path``: :data:`FP_DTYPE` records, the i-th being
    the fingerprint of the i-th subject in that order. Returns whether every subject is done.

    Resumable: the first ``start`` records (an earlier call's last ``on_chunk``) are kept and
    the rest written ``chunk`` subjects at a time, each chunk flushed to disk before
    ``on_chunk`` is told; ``max_chunks`` stops after that many chunks (returning ``False``).
    ``key`` is ``k_e``, ``epoch`` the epoch id (``H_e`` hashes under :func:`epoch_domain` of
    it); ``workers`` caps the cores used (default: every available one).
    """
    n = len(ids)
    if not 0 <= start <= n:
        raise ValueError(f"start {start} is outside 0..{n}")
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    if start == n and path.exists() and path.stat().st_size == n * FP_DTYPE.itemsize:
        return True
    order = keyed_order(seed, ids)
    domain = epoch_domain(epoch)
    chunks = 0
    with path.open("r+b" if path.exists() else "w+b") as f:
        f.truncate(start * FP_DTYPE.itemsize)
        for begin in range(start, n, chunk):
            if max_chunks is not None and chunks >= max_chunks:
                return False
            end = min(begin + chunk, n)
            began = time.perf_counter()
            items = [ids[i].encode("utf-8") for i in order[begin:end]]
            points = cpsi.blind(key, domain, items, workers=workers)
            f.seek(begin * FP_DTYPE.itemsize)
            f.write(fingerprints(points).tobytes())
            f.flush()
            os.fsync(f.fileno())
            if on_chunk is not None:
                on_chunk(end, (time.perf_counter() - began) / (end - begin))
            chunks += 1
    return True


def sort_image(path: Path) -> tuple[np.ndarray[Any, np.dtype[Any]], np.ndarray[Any, np.dtype[Any]]]:
    """The fingerprints :func:`blind_image` wrote to ``path``, sorted for lookup, and each
    one's position in the image's order (``uint32`` below 2^32 subjects, else ``uint64``):
    ``fp[k]`` is the fingerprint of the ``pos[k]``-th subject in the zone's order."""
    fp = np.fromfile(path, dtype=FP_DTYPE)
    rank = np.lexsort((fp["lo"], fp["hi"]))
    return fp[rank], rank.astype(np.uint32 if len(fp) < 2**32 else np.uint64)
