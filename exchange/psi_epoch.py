"""Epoch mode of the private joins: what the consumer, the exchange and the zone share
(``docs/psi.md``, "Epoch mode").

In epoch mode a zone blinds its subjects once per epoch under an epoch key ``k_e``; the image
``I = {k_e·H_e(y)}`` is kept by the exchange as sorted fingerprints, and a session costs the
consumer O(|X|): it sends ``A = c·H_e(x)``, downloads ``A_e = k_e·A``, and uploads
``F = c⁻¹·A_e = k_e·H_e(x)``, which the exchange looks up in the image. ``H_e`` hashes under
:func:`epoch_domain`, the session domain of the epoch id. Pure: no database, no files.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
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
    "choose_protocol",
    "epoch_domain",
    "false_match_bound",
    "fingerprints",
    "retry_seconds",
]

#: ``session`` (fresh keys on both sides, O(|Y|) for the consumer) or ``epoch``
PROTOCOLS = ("session", "epoch")
#: a point's fingerprint: the first 96 bits of SHA-256 over its encoding, as a 64-bit high
#: word and a 32-bit low word (both little-endian). 96 bits bound the chance that any of 10^3
#: consumer points meets any of 10^8 image points by chance at 10^11 / 2^96 < 1.3·10^-18
#: per session (:func:`false_match_bound`); 64 bits would leave 5.4·10^-9
FP_BITS = 96
FP_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u4")])


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
