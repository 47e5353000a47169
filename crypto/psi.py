"""ECDH private set intersection over the prime-order subgroup of edwards25519. Pure, no I/O.

The group G is the subgroup of prime order ``ℓ = 2**252 + 27742317777372353535851937790883648493``
of edwards25519 (cofactor 8); an element is its standard 32-byte compressed encoding. Security
rests on decisional Diffie–Hellman in G, with H modelled as a random oracle into G.
``docs/decisions/0002-psi-group.md`` says why this group rather than X25519 on hashed
u-coordinates, and gives the measurements.

- ``H(domain, item)``: ``h = SHA-512(len(domain) as 2 bytes || domain || item)``, then
  ``H = M(h[:32]) + M(h[32:])``, where ``M`` is libsodium's ``crypto_core_ed25519_from_uniform``
  (Elligator 2 on the low 255 bits, the top bit choosing the sign of x, then multiplication by
  the cofactor). Two independent maps and one addition is the shape of RFC 9380's random-oracle
  suites; one map alone reaches only part of the group and is not a random oracle. The bytes
  differ from ``edwards25519_XMD:SHA-512_ELL2_RO_``, hence the version in :func:`session_domain`.
- A :class:`PsiKey` is a scalar ``k`` uniform in ``[1, ℓ)``, fresh for each session.
  :func:`blind` maps items to ``k·H(item)``; :func:`reblind` maps points received from a peer
  to ``k·P``. A received point must be 32 bytes, canonically encoded, on the curve, of
  order exactly ℓ (so neither the identity nor a small-order point, nor one with a small-order
  component). libsodium's scalar multiplication performs these checks on every call, so they
  cost nothing extra; :func:`validate_point` makes them on their own and says which one failed.
- ``a·(b·H(x)) = b·(a·H(x))``, so after both keys are applied two items meet at the same point
  exactly when they are equal (barring a collision of H, probability about ``n²/ℓ``).

Private join (DESIGN.md, "Computations"): the consumer sends ``A = blind(c, shuffled(X))``; the
provider sends ``reblind(p, A)`` to the exchange and ``blind(p, shuffled(Y))`` to the consumer,
who sends ``reblind(c, ·)`` of it to the exchange; the exchange applies
:func:`intersection_mask`. Outputs keep the order of their inputs, so each party shuffles what
it sends: the exchange sees which positions match. Equal items give equal points, so a party
whose multiplicities are private deduplicates before blinding.

Batches of at least :data:`PARALLEL_MIN_BATCH` items are split across threads (one per
available core unless ``workers`` says otherwise): libsodium is called through cffi, which
releases the GIL for the duration of each call, so threads scale without extra processes.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import nacl.exceptions
from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_from_uniform,
    crypto_core_ed25519_is_valid_point,
    crypto_core_ed25519_scalar_reduce,
    crypto_scalarmult_ed25519_noclamp,
)

from crypto.errors import CryptoError, EncodingError, VerificationError

__all__ = [
    "GROUP_ORDER",
    "PARALLEL_MIN_BATCH",
    "POINT_BYTES",
    "SCALAR_BYTES",
    "PsiKey",
    "blind",
    "hash_to_point",
    "intersection_mask",
    "intersection_size",
    "reblind",
    "session_domain",
    "shuffled",
    "validate_point",
]

T = TypeVar("T")

POINT_BYTES = 32
SCALAR_BYTES = 32
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
PARALLEL_MIN_BATCH = 1024
"""Batches smaller than this run on the calling thread (see ``bench/psi.py``)."""

_PROTOCOL = b"zonex-psi-v1"
_MAX_FIELD = 255
_MAX_DOMAIN = 0xFFFF
_CHUNKS_PER_WORKER = 4

_FIELD_PRIME = 2**255 - 19
_D = (-121665 * pow(121666, -1, _FIELD_PRIME)) % _FIELD_PRIME
_Y_MASK = (1 << 255) - 1
# The eight points of order dividing 8, canonically encoded with the x sign bit cleared (the
# sign bit does not change the order, and x = 0 for the identity and the point of order 2).
_SMALL_ORDER = frozenset(
    bytes.fromhex(h)
    for h in (
        "0100000000000000000000000000000000000000000000000000000000000000",  # order 1
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
        "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    )
)


class PsiKey:
    """A secret scalar for one PSI session: uniform in ``[1, ℓ)``, 32 bytes little-endian.

    A party keeps it between the steps of one session (:meth:`to_bytes`, :meth:`from_bytes`)
    and never reuses it in another: with a fresh key, points from different sessions cannot
    be linked. ``repr`` does not show it.
    """

    __slots__ = ("_scalar",)

    def __init__(self, scalar: bytes) -> None:
        if not isinstance(scalar, bytes) or len(scalar) != SCALAR_BYTES:
            raise EncodingError(f"a PSI key is {SCALAR_BYTES} bytes")
        # constant time: a canonical scalar is unchanged by reduction modulo the group order
        reduced = crypto_core_ed25519_scalar_reduce(scalar + bytes(SCALAR_BYTES))
        if not hmac.compare_digest(reduced, scalar):
            raise EncodingError("a PSI key must be below the group order")
        if hmac.compare_digest(scalar, bytes(SCALAR_BYTES)):
            raise EncodingError("a PSI key must not be zero")
        self._scalar = scalar

    @classmethod
    def generate(cls) -> PsiKey:
        """A fresh key from the operating system's random source."""
        return cls((1 + secrets.randbelow(GROUP_ORDER - 1)).to_bytes(SCALAR_BYTES, "little"))

    @classmethod
    def from_bytes(cls, data: bytes) -> PsiKey:
        """The key :meth:`to_bytes` returned; refuses zero and anything not below ℓ."""
        return cls(data)

    def to_bytes(self) -> bytes:
        """The scalar, 32 bytes little-endian. Secret."""
        return self._scalar

    def __repr__(self) -> str:
        return "PsiKey(<secret>)"


def _length_prefixed(field: bytes, what: str) -> bytes:
    if len(field) > _MAX_FIELD:
        raise EncodingError(f"{what} is longer than {_MAX_FIELD} bytes")
    return bytes((len(field),)) + field


def session_domain(session_id: bytes | str, label: str) -> bytes:
    """The hashing domain of one PSI session: ``"zonex-psi-v1" || session id || label``.

    Both sides of a session hash with the same domain (else nothing matches); different
    sessions or labels hash every item to unrelated points. The session id (text is taken as
    UTF-8) must be non-empty; it and the label are at most 255 bytes each and length-prefixed,
    so distinct pairs give distinct domains.
    """
    try:
        sid = session_id.encode("utf-8") if isinstance(session_id, str) else bytes(session_id)
        text = label.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise EncodingError("session id and label must be encodable as UTF-8") from exc
    if not sid:
        raise EncodingError("the session id is empty")
    return _PROTOCOL + _length_prefixed(sid, "the session id") + _length_prefixed(text, "the label")


def _hash_prefix(domain: bytes) -> bytes:
    if not domain:
        raise EncodingError("the hashing domain is empty")
    if len(domain) > _MAX_DOMAIN:
        raise EncodingError(f"the hashing domain is longer than {_MAX_DOMAIN} bytes")
    return len(domain).to_bytes(2, "big") + domain


def hash_to_point(domain: bytes, item: bytes) -> bytes:
    """``H(domain, item)``: the item's point in the prime-order group (see the module notes)."""
    h = hashlib.sha512(_hash_prefix(domain) + item).digest()
    return crypto_core_ed25519_add(
        crypto_core_ed25519_from_uniform(h[:32]), crypto_core_ed25519_from_uniform(h[32:])
    )


def _point_problem(p: object) -> str | None:
    """Why ``p`` is not an element of G of order ℓ, or ``None`` if it is one."""
    if not isinstance(p, bytes):
        return "is not bytes"
    if len(p) != POINT_BYTES:
        return f"is not {POINT_BYTES} bytes"
    if crypto_core_ed25519_is_valid_point(p):
        return None
    # The checks below run only for a refused point, to say why, in libsodium's order.
    y = int.from_bytes(p, "little") & _Y_MASK
    if y >= _FIELD_PRIME:
        return "is not canonically encoded"
    if y.to_bytes(POINT_BYTES, "little") in _SMALL_ORDER:
        return "has small order"
    p_ = _FIELD_PRIME
    xx = (y * y - 1) * pow(_D * y * y + 1, -1, p_) % p_
    if xx and pow(xx, (p_ - 1) // 2, p_) != 1:
        return "is not on the curve"
    return "is not in the prime-order subgroup"


def validate_point(p: bytes) -> None:
    """Return ``None`` if ``p`` encodes an element of G of order ℓ; raise otherwise.

    Raises :class:`~crypto.errors.VerificationError` saying which check failed: length,
    canonical encoding, small order (the identity among them), on the curve, in the subgroup.
    """
    problem = _point_problem(p)
    if problem is not None:
        raise VerificationError(f"point {problem}")


def _refuse(index: int, p: object) -> CryptoError:
    problem = _point_problem(p)
    if problem is None:  # pragma: no cover - libsodium refused a point its own check accepts
        return CryptoError(f"scalar multiplication failed on point {index}")
    return VerificationError(f"point {index} {problem}")


def _blind_chunk(scalar: bytes, prefix: bytes, items: Sequence[bytes]) -> list[bytes]:
    sha512 = hashlib.sha512
    from_uniform = crypto_core_ed25519_from_uniform
    add = crypto_core_ed25519_add
    mult = crypto_scalarmult_ed25519_noclamp
    out: list[bytes] = []
    append = out.append
    try:
        for item in items:
            h = sha512(prefix + item).digest()
            append(mult(scalar, add(from_uniform(h[:32]), from_uniform(h[32:]))))
    except nacl.exceptions.CryptoError as exc:  # pragma: no cover - H(item) = identity, p ~ 1/ℓ
        raise CryptoError("hashed an item to the identity") from exc
    return out


def _reblind_chunk(scalar: bytes, points: Sequence[bytes], offset: int) -> list[bytes]:
    mult = crypto_scalarmult_ed25519_noclamp
    out: list[bytes] = []
    append = out.append
    for i, p in enumerate(points):
        try:
            # libsodium checks the point (length, encoding, order) before multiplying
            append(mult(scalar, p))
        except nacl.exceptions.CryptoError as exc:
            raise _refuse(offset + i, p) from exc
    return out


def _available_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _split(n: int, workers: int | None, run: Callable[[int, int], list[bytes]]) -> list[bytes]:
    """``run(0, n)``, or the same computed over slices on a pool of threads for big batches."""
    if workers is not None and workers < 1:
        raise ValueError("workers must be at least 1")
    threads = 1 if n < PARALLEL_MIN_BATCH else (workers or _available_cores())
    if threads == 1:
        return run(0, n)
    size = -(-n // (threads * _CHUNKS_PER_WORKER))
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    out: list[bytes] = []
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="psi") as pool:
        futures: list[Future[list[bytes]]] = [pool.submit(run, a, b) for a, b in bounds]
        try:
            # in order, so an error names the first bad point of the whole batch
            for future in futures:
                out.extend(future.result())
        finally:
            for future in futures:
                future.cancel()
    return out


def blind(
    key: PsiKey, domain: bytes, items: Sequence[bytes], *, workers: int | None = None
) -> list[bytes]:
    """``[k·H(domain, item) for item in items]``, in the order of ``items``.

    ``workers`` caps the threads used for a batch of at least :data:`PARALLEL_MIN_BATCH`
    items (default: every available core); smaller batches run on the calling thread.
    """
    prefix = _hash_prefix(domain)
    scalar = key.to_bytes()
    return _split(len(items), workers, lambda a, b: _blind_chunk(scalar, prefix, items[a:b]))


def reblind(key: PsiKey, points: Sequence[bytes], *, workers: int | None = None) -> list[bytes]:
    """``[k·P for P in points]`` for points received from a peer, in the same order.

    Every point is checked first (see :func:`validate_point`); the first bad one raises
    :class:`~crypto.errors.VerificationError` naming its index, and nothing is returned.
    ``workers`` as for :func:`blind`.
    """
    scalar = key.to_bytes()
    return _split(len(points), workers, lambda a, b: _reblind_chunk(scalar, points[a:b], a))


def shuffled(items: Sequence[T]) -> list[T]:
    """A uniformly random permutation of ``items`` (Fisher–Yates over ``secrets.randbelow``)."""
    out = list(items)
    for i in range(len(out) - 1, 0, -1):
        j = secrets.randbelow(i + 1)
        out[i], out[j] = out[j], out[i]
    return out


def intersection_mask(a: Sequence[bytes], b: Sequence[bytes]) -> list[bool]:
    """For each element of ``b``, in order, whether it occurs in ``a``.

    Duplicates in ``b`` are each marked (a provider row per matching occurrence); duplicates
    in ``a`` count as one.
    """
    members = set(a)
    return [p in members for p in b]


def intersection_size(a: Sequence[bytes], b: Sequence[bytes]) -> int:
    """The number of distinct values in both ``a`` and ``b`` (duplicates count once).

    With duplicates in ``b`` this can be less than ``sum(intersection_mask(a, b))``.
    """
    return len(set(a).intersection(b))
