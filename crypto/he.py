"""Homomorphic encryption for the data plane, over TenSEAL (Microsoft SEAL). Pure, no I/O.

The key holder (the consumer C) makes a secret context with :func:`new_context` and publishes
:func:`public_context_bytes`: parameters and the public key only, never relinearization or
Galois keys, because no computation here multiplies two ciphertexts or rotates one. Everyone
else loads it with :func:`load_public_context`, which checks size, shape and parameters before
and after parsing. Parameter sets are fixed (:data:`PARAMETER_SETS`) and each gives 128-bit
security by the HomomorphicEncryption.org table (:func:`security_level`).

Three computations (decision record 0003 explains the choices):

- **psi_aggregate** (BFV, exact). The provider encrypts clipped integers, one per slot, in its
  shuffled row order (:func:`encrypt_column_chunks`). The exchange multiplies each chunk by the
  0/1 match mask, adds the chunks slot-wise, then adds a plaintext of random values that sum to
  the DP noise (zero-sum masking: every slot is uniform, only the slot total means anything),
  and a fresh encryption of zero (:func:`masked_total`). The consumer decrypts and adds the
  slots modulo t (:func:`decrypt_total`). The total is exact while
  ``|total| <= (t - 1) / 2``: :func:`verify_capacity` refuses bounds that could wrap.
- **he_score** (CKKS, column packing). The consumer encrypts each weight replicated over every
  slot (:func:`encrypt_model`); the provider computes ``sum_j Enc(w_j) * X[:, j]`` for up to
  n/2 entities per ciphertext (:func:`encrypted_scores`); the consumer decrypts and adds its
  bias (:func:`decrypt_scores`). Weights are encrypted at a scale equal to the prime that the
  single rescale divides by, so TenSEAL's reset of the scale after the rescale is exact and the
  scores carry no systematic bias (:func:`scale_bias` is what a default scale would cost).
  Scores are approximate with an absolute error, the noise of each encrypted weight times its
  feature: :func:`score_error_bounds` derives each score's bound from the parameters.
- **secure_sum** (BFV or CKKS). Each zone encrypts its vector (:func:`encrypt_vector`), the
  exchange adds them with optional plaintext noise (:func:`sum_ciphertexts`), the requester
  decrypts the total (:func:`decrypt_vector`).

Every result ends with the addition of a fresh encryption of zero, so its random component is
not a function of ciphertexts the key holder made or could recognise. What this module cannot
give: (1) circuit privacy of the noise term (SEAL has no noise flooding), so the key holder
could in principle study the decryption noise of a result; (2) detection of a ciphertext made
under the right parameters but another key: it loads and decrypts to garbage, for the key holder
only; (3) any check that an encrypted model is an honest one (a one-hot "model" reads a feature).

Every TenSEAL and SEAL call is wrapped: garbage and hostile inputs raise
:class:`~crypto.errors.EncodingError` or :class:`~crypto.errors.VerificationError` with a
one-line message, and the foreign exception stays available as ``__cause__``.
"""

from __future__ import annotations

import hashlib
import math
import operator
import secrets
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import tenseal as ts
import tenseal.sealapi as seal

from crypto.canonical import canonicalize
from crypto.encoding import b64url_encode
from crypto.errors import CryptoError, EncodingError, VerificationError

__all__ = [
    "BFV_DEFAULT",
    "CKKS_DEFAULT",
    "FEATURE_LIMIT",
    "MAX_FEATURES",
    "MODEL_LINKS",
    "MODEL_NONCE_BYTES",
    "MODEL_TYPE",
    "PARAMETER_SETS",
    "SCORE_BOUND_FAILURE",
    "SECURITY_TABLE",
    "WEIGHT_LIMIT",
    "ParameterSet",
    "Scheme",
    "bfv_capacity",
    "bfv_noise_budget",
    "check_security",
    "ckks_capacity",
    "context_digest",
    "decrypt_scores",
    "decrypt_total",
    "decrypt_vector",
    "encrypt_column_chunks",
    "encrypt_model",
    "encrypt_vector",
    "encrypted_scores",
    "fits_exactly",
    "load_ciphertext",
    "load_public_context",
    "masked_total",
    "max_ciphertext_bytes",
    "max_public_context_bytes",
    "model_commitment",
    "model_document",
    "new_context",
    "pack_ciphertexts",
    "parameters_of",
    "parse_model_document",
    "public_context_bytes",
    "scale_bias",
    "score_error_bounds",
    "score_noise_coefficient",
    "security_level",
    "slot_count",
    "sum_ciphertexts",
    "unpack_ciphertexts",
    "verify_capacity",
    "verify_model_commitment",
    "weight_text",
    "weights_digest",
]

Scheme = Literal["bfv", "ckks"]
#: he_score input: one row of feature values per entity
Features = Sequence[Sequence[float]] | npt.NDArray[Any]

# HomomorphicEncryption.org security standard (2018), Table 1: classical attacks, uniform ternary
# secret. Largest total log2(q) (every prime, the key-switching one included) per degree n.
SECURITY_TABLE: Mapping[int, Mapping[int, int]] = MappingProxyType(
    {
        128: MappingProxyType({1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}),
        192: MappingProxyType({1024: 19, 2048: 37, 4096: 75, 8192: 152, 16384: 305, 32768: 611}),
        256: MappingProxyType({1024: 14, 2048: 29, 4096: 58, 8192: 118, 16384: 237, 32768: 476}),
    }
)

# he_score input limits. With CKKS_DEFAULT a score must stay below ckks_capacity = 2**58;
# WEIGHT_LIMIT * sum_j |x_ij| <= 2**58 is checked per entity, these bound each value.
WEIGHT_LIMIT = 2.0**16
FEATURE_LIMIT = 2.0**32
MAX_FEATURES = 1024


@dataclass(frozen=True, slots=True)
class ParameterSet:
    """One fixed choice of HE parameters.

    ``coeff_mod_bit_sizes`` lists every prime of the coefficient modulus; the last one is SEAL's
    key-switching prime and carries no data. BFV needs a ``plain_modulus`` congruent to 1
    modulo 2n, and prime (SEAL checks), for slot packing; CKKS needs ``global_scale_bits``.
    """

    scheme: Scheme
    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    plain_modulus: int | None
    global_scale_bits: int | None

    def __post_init__(self) -> None:
        n = self.poly_modulus_degree
        if self.scheme not in ("bfv", "ckks"):
            raise EncodingError(f"unknown HE scheme {self.scheme!r}")
        if not isinstance(n, int) or n < 1024 or n & (n - 1):
            raise EncodingError("poly_modulus_degree must be a power of two >= 1024")
        bits = self.coeff_mod_bit_sizes
        if len(bits) < 2 or any(not isinstance(b, int) or not 2 <= b <= 60 for b in bits):
            raise EncodingError("coeff_mod_bit_sizes needs >= 2 primes of 2..60 bits")
        if self.scheme == "bfv":
            t = self.plain_modulus
            if not isinstance(t, int) or t < 2 or t >= 1 << 60 or t % (2 * n) != 1:
                raise EncodingError("a BFV plain_modulus must be < 2**60 and 1 modulo 2n")
            if self.global_scale_bits is not None:
                raise EncodingError("BFV has no global scale")
        else:
            s = self.global_scale_bits
            if not isinstance(s, int) or not 20 <= s <= 60:
                raise EncodingError("a CKKS global_scale_bits must be 20..60")
            if self.plain_modulus is not None:
                raise EncodingError("CKKS has no plain modulus")

    @property
    def data_primes(self) -> int:
        """Primes that carry data (all but the key-switching prime)."""
        return len(self.coeff_mod_bit_sizes) - 1

    @property
    def total_bits(self) -> int:
        """log2 of the full coefficient modulus, as the security table counts it."""
        return sum(self.coeff_mod_bit_sizes)


# t = 2**60 - 2**14 + 1 = 1152921504606830593 is prime and the largest 60-bit number = 1 mod
# 16384 (SEAL's PlainModulus.Batching(8192, 60)); SEAL allows at most 60 bits. Largest exact
# |total|: (t - 1) / 2 ~ 5.76e17.
BFV_DEFAULT = ParameterSet(
    scheme="bfv",
    poly_modulus_degree=8192,
    coeff_mod_bit_sizes=(43, 43, 44, 44, 44),
    plain_modulus=1152921504606830593,
    global_scale_bits=None,
)
# 60 + 50 + 50 data bits: fresh ciphertexts at scale ~2**50; one multiply-and-rescale leaves
# 110 bits, room for |score| < 2**58 at that scale. 58-bit key-switching prime keeps 218 total.
CKKS_DEFAULT = ParameterSet(
    scheme="ckks",
    poly_modulus_degree=8192,
    coeff_mod_bit_sizes=(60, 50, 50, 58),
    plain_modulus=None,
    global_scale_bits=50,
)

PARAMETER_SETS: Mapping[str, ParameterSet] = MappingProxyType(
    {"bfv-8192": BFV_DEFAULT, "ckks-8192": CKKS_DEFAULT}
)

_SCHEMES = {"bfv": ts.SCHEME_TYPE.BFV, "ckks": ts.SCHEME_TYPE.CKKS}


# -- foreign exceptions ---------------------------------------------------------------------


@contextmanager
def _foreign(error: type[CryptoError], message: str) -> Iterator[None]:
    """Translate any TenSEAL/SEAL exception into ``error(message)``; ours pass through."""
    try:
        yield
    except CryptoError:
        raise
    except Exception as exc:  # TenSEAL raises ValueError, RuntimeError, TypeError, MemoryError
        raise error(message) from exc


def _computation_failed(what: str) -> AbstractContextManager[None]:
    return _foreign(CryptoError, f"{what} failed inside SEAL")


# -- security and parameters ----------------------------------------------------------------


def security_level(params: ParameterSet) -> int:
    """The highest standard level (256, 192 or 128 bits) the set reaches, or 0 for none."""
    for level in (256, 192, 128):
        limit = SECURITY_TABLE[level].get(params.poly_modulus_degree)
        if limit is not None and params.total_bits <= limit:
            return level
    return 0


def check_security(params: ParameterSet, minimum: int = 128) -> None:
    """Raise :class:`VerificationError` unless the set reaches ``minimum``-bit security."""
    level = security_level(params)
    if level < minimum:
        raise VerificationError(
            f"{params.scheme} n={params.poly_modulus_degree} with a {params.total_bits}-bit "
            f"modulus gives {level}-bit security, below {minimum}"
        )


def slot_count(params: ParameterSet) -> int:
    """Values per ciphertext: n for BFV, n/2 for CKKS."""
    n = params.poly_modulus_degree
    return n if params.scheme == "bfv" else n // 2


def max_ciphertext_bytes(params: ParameterSet) -> int:
    """An upper bound on a serialized fresh ciphertext: two uncompressed polynomials, framing."""
    return 2 * params.poly_modulus_degree * params.data_primes * 8 + 4096


def max_public_context_bytes(params: ParameterSet) -> int:
    """An upper bound on :func:`public_context_bytes`: the uncompressed public key, framing."""
    return 2 * params.poly_modulus_degree * len(params.coeff_mod_bit_sizes) * 8 + 4096


def bfv_capacity(params: ParameterSet) -> int:
    """The largest |total| a BFV set decodes exactly: (t - 1) // 2 (totals are centered mod t)."""
    if params.scheme != "bfv" or params.plain_modulus is None:
        raise EncodingError("capacity is defined for BFV parameter sets")
    return (params.plain_modulus - 1) // 2


def fits_exactly(
    params: ParameterSet, *, lo: int, hi: int, max_rows: int, noise_bound: int = 0
) -> bool:
    """Whether any sum of at most ``max_rows`` values in [lo, hi], plus noise of magnitude at
    most ``noise_bound``, decodes exactly under ``params``."""
    for name, value in (("lo", lo), ("hi", hi), ("max_rows", max_rows), ("noise", noise_bound)):
        if not _is_int(value):
            raise EncodingError(f"{name} must be an integer")
    if lo > hi or max_rows < 0 or noise_bound < 0:
        raise EncodingError("need lo <= hi, max_rows >= 0 and noise_bound >= 0")
    worst = max(max_rows * max(hi, 0), -max_rows * min(lo, 0)) + noise_bound
    return worst <= bfv_capacity(params)


def verify_capacity(
    params: ParameterSet, *, lo: int, hi: int, max_rows: int, noise_bound: int = 0
) -> None:
    """Raise :class:`EncodingError` if such a sum could wrap modulo the plain modulus."""
    if not fits_exactly(params, lo=lo, hi=hi, max_rows=max_rows, noise_bound=noise_bound):
        raise EncodingError(
            f"{max_rows} values in [{lo}, {hi}] plus noise up to {noise_bound} may exceed "
            f"{bfv_capacity(params)}, the largest exact total of this parameter set"
        )


def ckks_capacity(params: ParameterSet) -> float:
    """The largest |score| :func:`encrypted_scores` decodes. After its one rescale the modulus q
    has ``sum(data bits) - last data bits`` bits and ``|score| * 2**scale_bits`` must stay below
    q / 2; one more bit is kept as margin (2**58 for CKKS_DEFAULT)."""
    if params.scheme != "ckks" or params.global_scale_bits is None:
        raise EncodingError("score capacity is defined for CKKS parameter sets")
    bits = params.coeff_mod_bit_sizes[: params.data_primes]
    return 2.0 ** (sum(bits) - bits[-1] - params.global_scale_bits - 2)


def scale_bias(params: ParameterSet) -> float:
    """The relative bias of a CKKS plain product if both operands use the scale 2**bits: the
    rescale divides by the prime p while TenSEAL resets the scale to 2**bits, so decrypted
    values come out multiplied by 2**bits / p. :func:`encrypt_model` avoids it."""
    if params.scheme != "ckks" or params.global_scale_bits is None:
        raise EncodingError("scale bias is defined for CKKS parameter sets")
    p = _primes(params.poly_modulus_degree, params.coeff_mod_bit_sizes)[params.data_primes - 1]
    return 2.0**params.global_scale_bits / p - 1.0


@lru_cache(maxsize=16)
def _primes(n: int, bits: tuple[int, ...]) -> tuple[int, ...]:
    """The primes SEAL picks for these bit sizes (what an honest context contains)."""
    with _foreign(EncodingError, "SEAL cannot make primes for these bit sizes"):
        return tuple(int(m.value()) for m in seal.CoeffModulus.Create(n, list(bits)))


def _read_parameters(ctx: Any) -> tuple[Scheme, int, tuple[int, ...], int | None]:
    with _foreign(EncodingError, "cannot read the context's encryption parameters"):
        data = ctx.seal_context().data
        if not data.parameters_set():
            raise VerificationError("SEAL rejected the context's encryption parameters")
        parms = data.key_context_data().parms()
        # TenSEAL and its SEAL bindings each have their own enum type: compare names
        scheme_name = str(parms.scheme().name)
        if scheme_name == "BFV":
            scheme: Scheme = "bfv"
            plain: int | None = int(parms.plain_modulus().value())
        elif scheme_name == "CKKS":
            scheme, plain = "ckks", None
        else:
            raise VerificationError("the context uses neither BFV nor CKKS")
        primes = tuple(int(m.value()) for m in parms.coeff_modulus())
        return scheme, int(parms.poly_modulus_degree()), primes, plain


def parameters_of(ctx: Any) -> ParameterSet:
    """The entry of :data:`PARAMETER_SETS` a context uses, prime by prime; else raise
    :class:`VerificationError`."""
    scheme, n, primes, plain = _read_parameters(ctx)
    for params in PARAMETER_SETS.values():
        if (
            params.scheme == scheme
            and params.poly_modulus_degree == n
            and params.plain_modulus == plain
            and _primes(n, params.coeff_mod_bit_sizes) == primes
        ):
            return params
    raise VerificationError(
        f"{scheme} context with n={n} and a {sum(p.bit_length() for p in primes)}-bit modulus "
        "is not an allowed parameter set"
    )


# -- contexts -------------------------------------------------------------------------------


def new_context(params: ParameterSet) -> Any:
    """A fresh secret context (the key holder's; never leaves it). Only the public key and the
    relinearization keys TenSEAL always makes are generated; no Galois keys (nothing rotates)."""
    check_security(params)
    with _foreign(EncodingError, "TenSEAL refused the parameter set"):
        ctx = ts.context(
            _SCHEMES[params.scheme],
            poly_modulus_degree=params.poly_modulus_degree,
            plain_modulus=params.plain_modulus,
            coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
            n_threads=1,
        )
    _normalize(ctx, params)
    _, n, primes, plain = _read_parameters(ctx)
    if primes != _primes(n, params.coeff_mod_bit_sizes) or plain != params.plain_modulus:
        raise CryptoError("TenSEAL built a context other than the parameter set asked for")
    return ctx


def _normalize(ctx: Any, params: ParameterSet) -> None:
    """Set the flags and scale the computations here assume (a sender's flags are not trusted)."""
    with _foreign(EncodingError, "cannot configure the context"):
        ctx.auto_relin = False
        ctx.auto_rescale = True
        ctx.auto_mod_switch = True
        if params.global_scale_bits is not None:
            ctx.global_scale = 2.0**params.global_scale_bits


def public_context_bytes(ctx: Any) -> bytes:
    """The context without its secret key, relinearization or Galois keys: what others receive."""
    with _foreign(EncodingError, "cannot serialize the context"):
        if not ctx.has_public_key():
            raise EncodingError("the context has no public key")
        data = ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=False,
        )
    return bytes(data)


def context_digest(data: bytes) -> str:
    """Hex SHA-256 of serialized context bytes, as received (for receipts and the ledger)."""
    return hashlib.sha256(data).hexdigest()


# TenSEAL 0.3 serializes a context as protobuf: 1 = SEAL encryption parameters, 2 = public part
# {1 = public key, 2 = flags, 3 = global scale, 4 = relinearization keys, 5 = Galois keys},
# 3 = private part {1 = secret key, ...}.
_CONTEXT_FIELDS = {1: 2, 2: 2}
_PUBLIC_FIELDS = {1: 2, 2: 0, 3: 1}


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = 0
    for shift in range(0, 70, 7):
        if i >= len(data):
            raise EncodingError("public context: truncated protobuf varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
    raise EncodingError("public context: overlong protobuf varint")


def _fields(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(field number, wire type, payload) of one protobuf message level."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            start = i
            _, i = _varint(data, i)
            yield number, wire, data[start:i]
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if i + size > len(data):
                raise EncodingError("public context: truncated protobuf field")
            yield number, wire, data[i : i + size]
            i += size
        elif wire == 2:
            size, i = _varint(data, i)
            if i + size > len(data):
                raise EncodingError("public context: truncated protobuf field")
            yield number, wire, data[i : i + size]
            i += size
        else:
            raise EncodingError("public context: unsupported protobuf wire type")


def _check_context_shape(data: bytes) -> None:
    """Refuse secret and evaluation keys before SEAL parses (or decompresses) anything."""
    seen: set[int] = set()
    for number, wire, payload in _fields(data):
        if number == 3:
            raise VerificationError("the context contains a secret key")
        if _CONTEXT_FIELDS.get(number) != wire or number in seen:
            raise EncodingError("not a TenSEAL public context")
        seen.add(number)
        if number == 2:
            inner: set[int] = set()
            for sub, sub_wire, _ in _fields(payload):
                if sub in (4, 5):
                    raise VerificationError(
                        "the context carries relinearization or Galois keys; send the public "
                        "key only"
                    )
                if _PUBLIC_FIELDS.get(sub) != sub_wire or sub in inner:
                    raise EncodingError("not a TenSEAL public context")
                inner.add(sub)
            if 1 not in inner:
                raise VerificationError("the context has no public key")
    if seen != {1, 2}:
        raise EncodingError("not a TenSEAL public context")


def load_public_context(
    data: bytes, *, max_bytes: int, expected: ParameterSet | None = None
) -> Any:
    """Parse a key holder's public context and check it is safe to compute under.

    Refuses (before parsing) more than ``max_bytes``, a secret key, relinearization or Galois
    keys, and (after parsing) parameters other than ``expected`` or, when it is None, other than
    one of :data:`PARAMETER_SETS`, down to the exact primes. Flags and scale are reset to what
    the computations here assume. Garbage raises :class:`EncodingError`; a well-formed context
    that breaks a rule raises :class:`VerificationError`.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodingError("a public context is bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise EncodingError(f"public context is {len(data)} bytes, over the {max_bytes} limit")
    _check_context_shape(data)
    with _foreign(EncodingError, "not a valid TenSEAL public context"):
        ctx = ts.context_from(data, n_threads=1)
    with _foreign(EncodingError, "not a valid TenSEAL public context"):
        private = ctx.has_secret_key() or ctx.is_private() or not ctx.is_public()
        extra = ctx.has_galois_keys() or ctx.has_relin_keys()
        has_public = ctx.has_public_key()
    if private:
        raise VerificationError("the context contains a secret key")
    if extra:
        raise VerificationError("the context carries relinearization or Galois keys")
    if not has_public:
        raise VerificationError("the context has no public key")
    params = parameters_of(ctx)
    if expected is not None and params != expected:
        raise VerificationError(f"context uses {_name(params)}, expected {_name(expected)}")
    check_security(params)
    _normalize(ctx, params)
    return ctx


def _name(params: ParameterSet) -> str:
    for name, known in PARAMETER_SETS.items():
        if known == params:
            return name
    return f"{params.scheme}-{params.poly_modulus_degree} (unlisted)"


# -- ciphertexts ----------------------------------------------------------------------------


def load_ciphertext(ctx: Any, data: bytes, *, max_bytes: int, kind: Scheme) -> Any:
    """Parse one serialized TenSEAL vector of ``kind`` under ``ctx``.

    SEAL checks that the ciphertext was made under this context's exact parameters (their hash
    is in every ciphertext) and that each coefficient is reduced; this also refuses transparent
    ciphertexts, more than two polynomials and a vector size beyond the slot count. Not
    detectable: right parameters, another key. Such a ciphertext decrypts to garbage, for the
    key holder only.
    """
    if kind not in _SCHEMES:
        raise EncodingError(f"unknown ciphertext kind {kind!r}")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodingError("a ciphertext is bytes")
    data = bytes(data)
    if len(data) > max_bytes:
        raise EncodingError(f"ciphertext is {len(data)} bytes, over the {max_bytes} limit")
    scheme, n, _, _ = _read_parameters(ctx)
    if scheme != kind:
        raise VerificationError(f"a {kind} ciphertext cannot be used with a {scheme} context")
    loader = ts.bfv_vector_from if kind == "bfv" else ts.ckks_vector_from
    with _foreign(EncodingError, f"not a {kind} ciphertext for this context's parameters"):
        vector = loader(ctx, data)
        size = int(vector.size())
        (raw,) = vector.ciphertext()
        polys = int(raw.size())
        transparent = bool(raw.is_transparent())
        ntt = bool(raw.is_ntt_form())
        scale = float(raw.scale)
    slots = n if kind == "bfv" else n // 2
    if not 1 <= size <= slots:
        raise EncodingError(f"ciphertext claims {size} values; a ciphertext holds 1..{slots}")
    if polys != 2:
        raise EncodingError(f"ciphertext has {polys} polynomials, expected 2")
    if ntt != (kind == "ckks"):  # SEAL keeps CKKS ciphertexts in NTT form, BFV ones not
        raise EncodingError("ciphertext is in the wrong polynomial representation")
    if transparent:
        raise VerificationError("ciphertext is transparent (it hides nothing)")
    if kind == "ckks" and not (math.isfinite(scale) and scale > 1.0):
        raise EncodingError("CKKS ciphertext has an invalid scale")
    return vector


def _level(vector: Any) -> int:
    """How many primes the ciphertext still has."""
    with _computation_failed("reading a ciphertext"):
        (raw,) = vector.ciphertext()
        return int(raw.coeff_modulus_size())


def _load_fresh(ctx: Any, params: ParameterSet, data: bytes, what: str) -> Any:
    vector = load_ciphertext(ctx, data, max_bytes=max_ciphertext_bytes(params), kind=params.scheme)
    if vector.size() != slot_count(params):
        raise EncodingError(f"{what} must fill all {slot_count(params)} slots")
    if _level(vector) != params.data_primes:
        raise VerificationError(f"{what} is not a fresh ciphertext (wrong modulus level)")
    return vector


def bfv_noise_budget(ctx_secret: Any, data: bytes) -> int:
    """Bits of noise budget left in a BFV ciphertext (0: it may no longer decrypt correctly)."""
    params = parameters_of(ctx_secret)
    vector = load_ciphertext(ctx_secret, data, max_bytes=max_ciphertext_bytes(params), kind="bfv")
    return _budget(ctx_secret, vector)


def _budget(ctx_secret: Any, vector: Any) -> int:
    with _foreign(EncodingError, "the context has no secret key"):
        key = ctx_secret.secret_key().data
    with _computation_failed("measuring the noise budget"):
        decryptor = seal.Decryptor(ctx_secret.seal_context().data, key)
        (raw,) = vector.ciphertext()
        return int(decryptor.invariant_noise_budget(raw))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _as_int(value: object, what: str) -> int:
    """An integer (Python or numpy), never a bool or a float."""
    if isinstance(value, bool):
        raise EncodingError(f"{what} is not an integer")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError as exc:
        raise EncodingError(f"{what} is not an integer") from exc


def _centered(value: int, modulus: int) -> int:
    value %= modulus
    return value - modulus if value > modulus // 2 else value


def _require(ctx: Any, scheme: Scheme) -> ParameterSet:
    params = parameters_of(ctx)
    if params.scheme != scheme:
        raise VerificationError(f"this computation needs a {scheme} context, not {params.scheme}")
    return params


def _encrypt_zero(ctx: Any, params: ParameterSet, scale: float | None = None) -> Any:
    """A fresh encryption of zero under the public key, for re-randomizing a result."""
    slots = slot_count(params)
    with _computation_failed("encrypting zero"):
        if params.scheme == "bfv":
            return ts.bfv_vector(ctx, [0] * slots)
        return ts.ckks_vector(ctx, [0.0] * slots, scale)


# -- (A) psi_aggregate: masked exact totals (BFV) -------------------------------------------


def encrypt_column_chunks(
    ctx: Any, values: Sequence[int], *, bounds: tuple[int, int] | None = None
) -> list[bytes]:
    """Encrypt one column, one value per slot, in the given (shuffled) row order.

    Chunk k holds rows ``k * n .. k * n + n - 1``; the last chunk is padded with zeros. With
    ``bounds`` every value must lie in it and ``len(values)`` such values must fit
    (:func:`verify_capacity`); without, every value must be representable.
    """
    params = _require(ctx, "bfv")
    capacity = bfv_capacity(params)
    if bounds is not None:
        lo, hi = bounds
        verify_capacity(params, lo=lo, hi=hi, max_rows=len(values))
    else:
        lo, hi = -capacity, capacity
    ints = [_as_int(value, f"value {i}") for i, value in enumerate(values)]
    for i, value in enumerate(ints):
        if not lo <= value <= hi:
            raise EncodingError(f"value {i} is outside the declared bounds [{lo}, {hi}]")
    slots = slot_count(params)
    chunks: list[bytes] = []
    for start in range(0, len(ints), slots):
        part = ints[start : start + slots]
        part.extend([0] * (slots - len(part)))
        with _computation_failed("BFV encryption"):
            chunks.append(bytes(ts.bfv_vector(ctx, part).serialize()))
    return chunks


def masked_total(
    ctx_public: Any,
    chunks: Sequence[bytes],
    masks: Sequence[Sequence[int]],
    noise: int = 0,
    *,
    bounds: tuple[int, int] | None = None,
) -> bytes:
    """One ciphertext from which the key holder learns ``sum(mask * value) + noise`` and
    nothing else.

    ``masks[k]`` gives 0/1 for the rows of chunk k (at most n entries; missing ones are 0).
    After the masked chunks are added slot-wise, a plaintext of uniformly random values whose
    sum is ``noise`` is added, so each slot on its own is uniform modulo t and only the total
    of all slots carries information; then a fresh encryption of zero. With ``bounds``
    (the provider's declared clipping range) the matched rows times the bounds, plus the
    noise, are checked not to wrap (:func:`verify_capacity`).
    """
    params = _require(ctx_public, "bfv")
    if len(chunks) != len(masks):
        raise EncodingError(f"{len(chunks)} ciphertext chunks but {len(masks)} masks")
    noise = _as_int(noise, "BFV noise")
    capacity = bfv_capacity(params)
    if abs(noise) > capacity:
        raise EncodingError("noise exceeds the exact capacity of the parameter set")
    slots = slot_count(params)
    matched = 0
    bits: list[list[int]] = []
    for k, mask in enumerate(masks):
        if len(mask) > slots:
            raise EncodingError(f"mask {k} has {len(mask)} entries; a chunk holds {slots}")
        row = [_as_int(b, f"mask {k} entry") for b in mask]
        if any(b != 0 and b != 1 for b in row):
            raise EncodingError(f"mask {k} must contain only 0 and 1")
        bits.append(row + [0] * (slots - len(row)))
        matched += sum(row)
    if bounds is not None:
        lo, hi = bounds
        verify_capacity(params, lo=lo, hi=hi, max_rows=matched, noise_bound=abs(noise))

    total: Any = None
    for k, (chunk, full) in enumerate(zip(chunks, bits, strict=True)):
        vector = _load_fresh(ctx_public, params, chunk, f"chunk {k}")
        if not any(full):
            continue  # contributes nothing; was still checked to be a valid ciphertext
        with _computation_failed("masking a chunk"):
            vector.mul_(full)
            total = vector if total is None else total.add_(vector)
    t = params.plain_modulus
    assert t is not None
    shares = [_centered(secrets.randbelow(t), t) for _ in range(slots - 1)]
    shares.insert(0, _centered(noise - sum(shares), t))
    with _computation_failed("adding the zero-sum mask"):
        if total is None:
            total = _encrypt_zero(ctx_public, params)
        total.add_(shares)
        total.add_(_encrypt_zero(ctx_public, params))
        return bytes(total.serialize())


def decrypt_total(ctx_secret: Any, data: bytes) -> int:
    """The exact total of a :func:`masked_total` result: the slots' sum, centered mod t."""
    params = _require(ctx_secret, "bfv")
    vector = load_ciphertext(ctx_secret, data, max_bytes=max_ciphertext_bytes(params), kind="bfv")
    if vector.size() != slot_count(params):
        raise EncodingError("a masked total fills every slot")
    if _budget(ctx_secret, vector) <= 0:
        raise VerificationError("the result is too noisy to decrypt exactly")
    with _foreign(EncodingError, "cannot decrypt the total with this context"):
        values = vector.decrypt(ctx_secret.secret_key())
    t = params.plain_modulus
    assert t is not None
    return _centered(sum(int(v) for v in values), t)


# -- (B) he_score: encrypted linear scores (CKKS, column packing) ----------------------------


def _rescale_prime(params: ParameterSet) -> int:
    """The prime the first rescale divides by: the last data prime."""
    return _primes(params.poly_modulus_degree, params.coeff_mod_bit_sizes)[params.data_primes - 1]


def _finite(value: object, limit: float, what: str) -> float:
    """A real number (Python or numpy) as a float, refusing text, NaN, infinities and excess."""
    if isinstance(value, str | bytes):
        raise EncodingError(f"{what} is not a number")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise EncodingError(f"{what} is not a number") from exc
    if not math.isfinite(number) or abs(number) > limit:
        raise EncodingError(f"{what} must be finite with magnitude <= {limit:g}")
    return number


def encrypt_model(ctx: Any, weights: Sequence[float]) -> list[bytes]:
    """One ciphertext per weight, the weight in every slot, at scale p (the rescale prime).

    The encrypting side holds the secret context. The bias stays with it: add it to the
    decrypted scores (:func:`decrypt_scores`), so it is never sent.
    """
    params = _require(ctx, "ckks")
    if not 1 <= len(weights) <= MAX_FEATURES:
        raise EncodingError(f"a model has 1..{MAX_FEATURES} weights")
    values = [_finite(w, WEIGHT_LIMIT, f"weight {j}") for j, w in enumerate(weights)]
    slots = slot_count(params)
    scale = float(_rescale_prime(params))
    out = []
    for w in values:
        with _computation_failed("CKKS encryption"):
            out.append(bytes(ts.ckks_vector(ctx, [w] * slots, scale).serialize()))
    return out


def _feature_row(row: Sequence[float], d: int, i: int, capacity: float) -> list[float]:
    """One entity's features as floats, refusing any that could overflow the score."""
    if isinstance(row, str | bytes) or len(row) != d:
        raise EncodingError(f"entity {i} does not have the model's {d} features")
    try:
        values = [float(x) for x in row]
    except (TypeError, ValueError) as exc:
        raise EncodingError(f"entity {i}: a feature is not a number") from exc
    if any(issubclass(kind, str | bytes) for kind in set(map(type, row))):
        raise EncodingError(f"entity {i}: a feature is not a number")
    norm = sum(map(abs, values))  # NaN and infinities propagate into it
    if not math.isfinite(norm) or max(map(abs, values)) > FEATURE_LIMIT:
        raise EncodingError(f"entity {i}: features must be finite with magnitude <= 2**32")
    if norm * WEIGHT_LIMIT > capacity:
        raise EncodingError(f"entity {i}: features too large for an exact-scale score")
    return values


def _feature_matrix(features: Features, d: int, capacity: float) -> npt.NDArray[np.float64]:
    """Entities x features as float64, refusing any entity whose score could overflow; an
    error names the first such entity."""
    if not (
        isinstance(features, np.ndarray) and features.ndim == 2 and features.dtype.kind in "biuf"
    ):
        rows = [_feature_row(row, d, i, capacity) for i, row in enumerate(features)]
        return np.array(rows, dtype=np.float64).reshape(len(rows), d)
    if len(features) and features.shape[1] != d:
        raise EncodingError(f"entity 0 does not have the model's {d} features")
    matrix = features.astype(np.float64, copy=False)
    with np.errstate(over="ignore", invalid="ignore"):
        magnitude = np.abs(matrix)
        norm = magnitude.sum(axis=1)  # NaN and infinities propagate into it
        bad_value = ~np.isfinite(norm) | (magnitude.max(axis=1, initial=0.0) > FEATURE_LIMIT)
        too_large = norm * WEIGHT_LIMIT > capacity
    bad = np.flatnonzero(bad_value | too_large)
    if len(bad):
        i = int(bad[0])
        if bad_value[i]:
            raise EncodingError(f"entity {i}: features must be finite with magnitude <= 2**32")
        raise EncodingError(f"entity {i}: features too large for an exact-scale score")
    return matrix


def encrypted_scores(
    ctx_public: Any, enc_weights: Sequence[bytes], features: Features
) -> list[bytes]:
    """``Enc(sum_j w_j * x_ij)`` for each entity i (row of ``features``: a sequence of rows or
    a 2-D numeric numpy array, the faster input), n/2 entities per ciphertext.

    Ciphertext-by-plaintext products and additions only: no relinearization or Galois keys.
    The products of a chunk are summed at scale p**2 and rescaled once (:func:`_rescale_sum`).
    Each result gets a fresh encryption of zero, so its random part is not a known function of
    the weight ciphertexts (which would let the key holder solve for the features).
    """
    params = _require(ctx_public, "ckks")
    d = len(enc_weights)
    if not 1 <= d <= MAX_FEATURES:
        raise EncodingError(f"a model has 1..{MAX_FEATURES} weights")
    scale = float(_rescale_prime(params))
    # a private copy (public key only, ~10 ms) whose rescaling flag this call may switch: the
    # caller's context, perhaps shared with other requests, is never changed
    with _computation_failed("copying the context"):
        work = ctx_public.copy()
        work.auto_rescale = False
    weights = []
    for j, blob in enumerate(enc_weights):
        vector = _load_fresh(work, params, blob, f"weight {j}")
        with _computation_failed("reading a ciphertext"):
            (raw,) = vector.ciphertext()
            weight_scale = float(raw.scale)
        if not math.isclose(weight_scale, scale, rel_tol=1e-12):
            raise VerificationError(f"weight {j} was not encrypted at the scale encrypt_model uses")
        weights.append(vector.data)  # TenSEAL's own vector: given a list, no PlainTensor on the way
    matrix = _feature_matrix(features, d, ckks_capacity(params))
    slots = slot_count(params)
    out: list[bytes] = []
    for start in range(0, len(matrix), slots):
        block = matrix[start : start + slots]
        columns = np.zeros((d, slots))  # zero padding: TenSEAL would replicate a short vector
        columns[:, : len(block)] = block.T
        acc: Any = None
        for weight, column in zip(weights, columns, strict=True):
            term = _product(weight, column, scale, params.poly_modulus_degree)
            if term is not None:
                with _computation_failed("scoring"):
                    acc = term if acc is None else acc.add_(term)
        with _computation_failed("rescaling scores"):
            if acc is None:  # every product is zero
                acc = _encrypt_zero(work, params, scale).data
            else:
                _rescale_sum(work, acc, params, scale)
        with _computation_failed("re-randomizing scores"):
            acc.add_(_encrypt_zero(work, params, scale).data)
            out.append(bytes(acc.serialize()))
    return out


def _product(weight: Any, column: npt.NDArray[np.float64], scale: float, n: int) -> Any:
    """``Enc(w) * column`` at scale p**2 (no rescale), or None when the product is zero."""
    peak = float(np.max(np.abs(column)))
    if peak == 0.0:
        return None
    with _computation_failed("scoring"):
        term = weight.mul_plain(column.tolist())  # a new vector; the weight is reused
        # a column this small may encode to the zero polynomial (a larger one cannot: its
        # canonical embedding would be too large); TenSEAL then returns a fresh zero at scale p
        # in place of SEAL's transparent product, which adds nothing
        if peak * scale < n:
            (raw,) = term.ciphertext()
            if float(raw.scale) < scale * 2:
                return None
    return term


def _rescale_sum(work: Any, acc: Any, params: ParameterSet, scale: float) -> None:
    """Rescale a sum of products at scale p**2 to scale p, in place: one multiply by the
    constant 1/p, which encodes at scale p as the integer 1 (exact), with TenSEAL's rescale on.
    The rescale divides by p; TenSEAL then records the vector's initial scale, p, which is the
    true one. Checked afterwards, so a TenSEAL that records anything else fails here."""
    work.auto_rescale = True
    try:
        acc.mul_plain_(1.0 / scale)
    finally:
        work.auto_rescale = False
    (raw,) = acc.ciphertext()
    if raw.coeff_modulus_size() != params.data_primes - 1 or not math.isclose(
        float(raw.scale), scale, rel_tol=1e-12
    ):
        raise VerificationError("the scores were not rescaled once to scale p")


def decrypt_scores(
    ctx_secret: Any, chunks: Sequence[bytes], n: int, *, bias: float = 0.0
) -> list[float]:
    """The first ``n`` scores of :func:`encrypted_scores` chunks, plus ``bias``.

    Checks each chunk went through exactly one rescale at scale p, so its recorded scale is its
    true scale and no correction is needed. For a logistic model apply the sigmoid to the result.
    """
    params = _require(ctx_secret, "ckks")
    slots = slot_count(params)
    if not _is_int(n) or n < 0 or len(chunks) != -(-n // slots):
        raise EncodingError(f"{n} scores come in {-(-n // slots)} chunks, got {len(chunks)}")
    offset = _finite(bias, ckks_capacity(params), "bias")
    scale = float(_rescale_prime(params))
    scores: list[float] = []
    for k, blob in enumerate(chunks):
        vector = load_ciphertext(
            ctx_secret, blob, max_bytes=max_ciphertext_bytes(params), kind="ckks"
        )
        with _computation_failed("reading a ciphertext"):
            (raw,) = vector.ciphertext()
            chunk_scale = float(raw.scale)
        # one rescale; a chunk whose every product was zero skipped it (SEAL made a fresh zero)
        if vector.size() != slots or _level(vector) not in (
            params.data_primes - 1,
            params.data_primes,
        ):
            raise VerificationError(f"score chunk {k} is not the result of one scoring pass")
        if not math.isclose(chunk_scale, scale, rel_tol=1e-12):
            raise VerificationError(f"score chunk {k} has scale {chunk_scale:g}, expected p")
        with _foreign(EncodingError, "cannot decrypt the scores with this context"):
            values = vector.decrypt(ctx_secret.secret_key())
        scores.extend(float(v) + offset for v in values[: min(slots, n - k * slots)])
    return scores


# -- he_score accuracy: a derived error bound ------------------------------------------------

#: the probability that :func:`score_error_bounds` is exceeded by some score of one call
SCORE_BOUND_FAILURE = 1e-9
_UNIT_ROUNDOFF = 2.0**-53
# SEAL samples encryption errors from a centered binomial distribution over 42 bits: |e| <= 21
_SEAL_NOISE_MAX = 21


def _fft_error(n: int) -> float:
    """Relative 2-norm error of SEAL's float64 encoding or decoding transform of size n.

    Radix-2 FFT with twiddle factors accurate to mu: ``log2(n) * eta / (1 - log2(n) * eta)``
    with ``eta = mu + gamma_4 * (sqrt 2 + mu)`` (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., Theorem 24.2); mu = 4u is taken for SEAL's tabulated roots, and 3u
    more for the scaling multiply and the conversions between doubles and integers."""
    u = _UNIT_ROUNDOFF
    mu = 4 * u
    eta = mu + 4 * u / (1 - 4 * u) * (math.sqrt(2) + mu)
    stages = math.log2(n)
    return stages * eta / (1 - stages * eta) + 3 * u


def _key_norm_bound(n: int, slots_used: int, failure: float) -> float:
    """S with ``P(max over the used slots of |s(zeta)|^2 > S) <= failure`` for a uniform ternary
    secret key s (SEAL's), zeta the slot's root of unity.

    Each coefficient of s is strictly sub-Gaussian with variance proxy 2/3, so any real
    projection of s(zeta) is sub-Gaussian with proxy sigma^2 = n/3, and for that 2-dimensional
    vector ``E exp(lambda |s(zeta)|^2) <= 1 / (1 - 2 lambda sigma^2)``. Chernoff gives
    ``P(|s(zeta)|^2 > 2 sigma^2 y) <= y e^(1 - y)``; a union bound over the used slots."""
    log_target = math.log(slots_used / failure)
    y = log_target + 2.0
    for _ in range(64):  # y = 1 + log_target + ln y, a contraction for y > 1
        y = 1.0 + log_target + math.log(y)
    return 2.0 * n * y / 3.0


def _failure(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise EncodingError("failure is a probability")
    if not 0.0 < float(value) < 1.0:
        raise EncodingError("failure must lie strictly between 0 and 1")
    return float(value)


def score_noise_coefficient(
    params: ParameterSet, *, scores: int, failure: float = SCORE_BOUND_FAILURE
) -> float:
    """C in :func:`score_error_bounds`: the random part of a score's error is at most
    ``C * sqrt(2 + sum_j x_ij^2)`` for all ``scores`` scores of one call and one key, except
    with probability ``failure``.

    ``C = t * sqrt(n / 24 * (1 + S)) / p``: p the rescale prime (the scores' scale), S a bound
    on the key's canonical norm squared that fails with probability failure / 2
    (:func:`_key_norm_bound`), and t the sub-Gaussian tail factor for failure / (2 * scores)
    per score, ``2 exp(-t^2 / 2)``."""
    if params.scheme != "ckks" or params.global_scale_bits is None:
        raise EncodingError("the score error bound is defined for CKKS parameter sets")
    if not _is_int(scores) or scores < 1:
        raise EncodingError("scores must be a positive integer")
    risk = _failure(failure)
    n = params.poly_modulus_degree
    key_norm = _key_norm_bound(n, min(scores, slot_count(params)), risk / 2)
    tail = math.sqrt(2.0 * math.log(4.0 * scores / risk))
    return tail * math.sqrt(n / 24.0 * (1.0 + key_norm)) / _rescale_prime(params)


def score_error_bounds(
    params: ParameterSet,
    weights: Sequence[float],
    features: Features,
    *,
    bias: float = 0.0,
    failure: float = SCORE_BOUND_FAILURE,
) -> npt.NDArray[np.float64]:
    """Per entity, a bound on ``|decrypted score - (bias + sum_j w_j x_ij)|`` for
    :func:`encrypt_model`, :func:`encrypted_scores` and :func:`decrypt_scores` with a fresh key,
    holding for every entity of the call at once except with probability ``failure``.

    CKKS error is absolute, not relative to the score: each encrypted weight carries noise of
    about 1.2e-12 (one standard deviation with ``ckks-8192``) that is multiplied by the feature
    it meets, so small weights on large features lose their relative accuracy. With p the
    rescale prime (the scale of weights, features and scores), n the ring degree, s the secret
    key and zeta a slot's root of unity, the error of entity i is the sum of:

    - **noise** (random). A fresh encryption is made one level up and divided by the
      key-switching prime, and the rescale divides by p; each leaves ``r0 + r1 * s`` with
      r0, r1 rounding residuals uniform on [-1/2, 1/2] (ciphertexts are pseudorandom). In a
      slot its real part is sub-Gaussian with variance proxy ``n / 24 * (1 + |s(zeta)|^2)``.
      Weight j's noise is multiplied by the encoded feature, the rescale's and the final
      zero's by 1: proxy ``n / 24 * (1 + |s(zeta)|^2) * (2 + sum_j x~_ij^2) / p^2``, bounded
      by ``C * sqrt(2 + sum_j x~_ij^2)`` (:func:`score_noise_coefficient`; ``x~_ij = |x_ij| +
      e_j`` bounds the encoded feature).
    - **encoding** (deterministic). A feature column is encoded to within
      ``e_j = n / (2 sqrt 2 p) + g * ||x_j||`` per slot (rounding each of n coefficients by at
      most 1/2, float64 transform error g = :func:`_fft_error` times the column's 2-norm over
      the ciphertext); a weight, a constant, to within ``a_j = 1 / (2p) + (1 + 2 sqrt(n/2)) *
      g * |w_j|``. The product's error is at most ``a_j * x~_ij + |w_j| * e_j``.
    - the public-key error, divided by the key-switching prime q: at most
      ``21 * (2n + 1) * n / (q * p)`` per fresh ciphertext and unit of its multiplier.
    - **decoding**: g times the 2-norm of the decrypted slots of the chunk (bounded with the
      worst-case noise, ``n (n + 1) / 2`` per ciphertext and unit), and one rounding of the
      bias addition.

    Products, sums and the rescale by the exact constant 1 are exact modulo q (capacity is
    checked). So ``bound_i = C * sqrt(2 + sum_j x~_ij^2) + D_i`` with D_i the deterministic
    terms, and since ``sqrt(2 + sum x~^2) <= sqrt 2 + sum_j x~_ij`` also
    ``bound_i <= C * (sqrt 2 + sum_j |x_ij|) + D'_i``. For ``ckks-8192`` C is 4.6e-11 for 24
    scores and 5.5e-11 for 4096 (docs/he.md). A float64 reference computation has its own
    error (about d * 2**-53 * sum_j |w_j x_ij|), which a caller comparing with one adds.
    """
    if params.scheme != "ckks" or params.global_scale_bits is None:
        raise EncodingError("the score error bound is defined for CKKS parameter sets")
    d = len(weights)
    if not 1 <= d <= MAX_FEATURES:
        raise EncodingError(f"a model has 1..{MAX_FEATURES} weights")
    w = np.abs([_finite(x, WEIGHT_LIMIT, f"weight {j}") for j, x in enumerate(weights)])
    offset = abs(_finite(bias, ckks_capacity(params), "bias"))
    risk = _failure(failure)
    x = np.abs(_feature_matrix(features, d, ckks_capacity(params)))
    if not len(x):
        return np.zeros(0)
    n, slots = params.poly_modulus_degree, slot_count(params)
    p = float(_rescale_prime(params))
    q_special = float(_primes(n, params.coeff_mod_bit_sizes)[-1])
    g = _fft_error(n)
    coefficient = score_noise_coefficient(params, scores=len(x), failure=risk)
    weight_error = 1 / (2 * p) + (1 + 2 * math.sqrt(n / 2)) * g * w
    public_key = _SEAL_NOISE_MAX * (2 * n + 1) * n / (q_special * p)
    worst_noise = n * (n + 1) / 2 / p + public_key
    bounds = np.empty(len(x))
    for start in range(0, len(x), slots):
        block = x[start : start + slots]
        feature_error = n / (2 * math.sqrt(2) * p) + g * np.sqrt(np.sum(block**2, axis=0))
        encoded = block + feature_error
        noise = coefficient * np.sqrt(2 + np.sum(encoded**2, axis=1))
        encoding = encoded @ weight_error + float(w @ feature_error)
        extra = public_key * (1 + encoded.sum(axis=1))
        # every decrypted slot of the chunk, bounded deterministically (padding slots too)
        slot_norm = encoded @ (w + weight_error) + worst_noise * (2 + encoded.sum(axis=1))
        padding = (slots - len(block)) * (2 * worst_noise) ** 2
        decoding = g * math.sqrt(float(np.sum(slot_norm**2)) + padding)
        bounds[start : start + slots] = noise + encoding + extra + decoding
    magnitude = offset + x @ w + bounds
    return bounds + _UNIT_ROUNDOFF * magnitude


# -- (C) secure_sum -------------------------------------------------------------------------


def _plain_values(
    params: ParameterSet, values: Sequence[float] | Sequence[int], what: str
) -> list[Any]:
    if params.scheme == "bfv":
        capacity = bfv_capacity(params)
        out_int: list[Any] = []
        for i, v in enumerate(values):
            number = _as_int(v, f"{what} {i} (BFV is exact)")
            if abs(number) > capacity:
                raise EncodingError(f"{what} {i} exceeds the exact capacity {capacity}")
            out_int.append(number)
        return out_int
    limit = _ckks_value_limit(params)
    return [_finite(v, limit, f"{what} {i}") for i, v in enumerate(values)]


def _ckks_value_limit(params: ParameterSet) -> float:
    """Per-value bound for fresh CKKS vectors: sums of up to 2**10 of them still decode."""
    assert params.global_scale_bits is not None
    data_bits = sum(params.coeff_mod_bit_sizes[: params.data_primes])
    return 2.0 ** (data_bits - params.global_scale_bits - 12)


def encrypt_vector(ctx: Any, values: Sequence[float] | Sequence[int]) -> bytes:
    """Encrypt a zone's aggregate vector (integers for BFV, numbers for CKKS) under a public
    context. The vector is padded with zeros to every slot, so TenSEAL does not replicate it
    into the unused slots (where noise added later would not reach)."""
    params = parameters_of(ctx)
    slots = slot_count(params)
    if not 1 <= len(values) <= slots:
        raise EncodingError(f"a vector has 1..{slots} values")
    plain = _plain_values(params, values, "value")
    with _computation_failed("encryption"):
        if params.scheme == "bfv":
            vector = ts.bfv_vector(ctx, plain + [0] * (slots - len(plain)))
        else:
            vector = ts.ckks_vector(ctx, plain + [0.0] * (slots - len(plain)), _fresh_scale(params))
        return bytes(vector.serialize())


def _fresh_scale(params: ParameterSet) -> float:
    assert params.global_scale_bits is not None
    return 2.0**params.global_scale_bits


def sum_ciphertexts(
    ctx_public: Any,
    items: Sequence[bytes],
    noise: Sequence[int] | Sequence[float] | None = None,
) -> bytes:
    """Add :func:`encrypt_vector` ciphertexts slot-wise, then optional plaintext noise (one
    value per position, at most the slot count), then a fresh encryption of zero."""
    params = parameters_of(ctx_public)
    if not items:
        raise EncodingError("nothing to sum")
    total: Any = None
    for k, blob in enumerate(items):
        vector = _load_fresh(ctx_public, params, blob, f"item {k}")
        if params.scheme == "ckks":
            with _computation_failed("reading a ciphertext"):
                (raw,) = vector.ciphertext()
                item_scale = float(raw.scale)
            if item_scale != _fresh_scale(params):
                raise VerificationError(f"item {k} was not encrypted by encrypt_vector")
        with _computation_failed("adding ciphertexts"):
            total = vector if total is None else total.add_(vector)
    slots = slot_count(params)
    with _computation_failed("adding noise"):
        if noise is not None:
            if len(noise) > slots:
                raise EncodingError(f"noise has {len(noise)} values; a ciphertext holds {slots}")
            plain = _plain_values(params, noise, "noise")
            total.add_(plain + [0 if params.scheme == "bfv" else 0.0] * (slots - len(plain)))
        scale = None if params.scheme == "bfv" else _fresh_scale(params)
        total.add_(_encrypt_zero(ctx_public, params, scale))
        return bytes(total.serialize())


def decrypt_vector(ctx_secret: Any, data: bytes, n: int) -> list[int] | list[float]:
    """The first ``n`` values of a sum: exact integers (BFV, centered mod t) or floats (CKKS).

    Round CKKS results before publishing them: exact CKKS decryptions can leak key material.
    """
    params = parameters_of(ctx_secret)
    slots = slot_count(params)
    if not _is_int(n) or not 1 <= n <= slots:
        raise EncodingError(f"n must be 1..{slots}")
    vector = load_ciphertext(
        ctx_secret, data, max_bytes=max_ciphertext_bytes(params), kind=params.scheme
    )
    if vector.size() != slots:
        raise EncodingError("a summed vector fills every slot")
    if params.scheme == "bfv" and _budget(ctx_secret, vector) <= 0:
        raise VerificationError("the result is too noisy to decrypt exactly")
    with _foreign(EncodingError, "cannot decrypt with this context"):
        values = vector.decrypt(ctx_secret.secret_key())[:n]
    if params.scheme == "bfv":
        return [int(v) for v in values]
    return [float(v) for v in values]


# -- (D) model commitments and ciphertext batches -------------------------------------------

MODEL_TYPE = "zonex.model.v1"
MODEL_WEIGHTS_TYPE = "zonex.model-weights.v1"
#: how the consumer turns a decrypted linear score into its output (applied locally)
MODEL_LINKS = ("identity", "logistic")
MODEL_NONCE_BYTES = 32
_FEATURE_NAME_MAX = 128
#: a batch frame: 4-byte big-endian length, then that many ciphertext bytes
_FRAME_HEADER = 4


def _number_text(value: object, limit: float, what: str) -> str:
    """A finite number within ``limit`` as the shortest decimal text that reads back to the
    same float; text must already be in that form (so one model has one encoding)."""
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError as exc:
            raise EncodingError(f"{what} is not a number") from exc
        if value != repr(number):
            raise EncodingError(f"{what} is not in shortest round-trip form ({number!r})")
    else:
        number = _finite(value, limit, what)
    if not math.isfinite(number) or abs(number) > limit:
        raise EncodingError(f"{what} must be finite with magnitude <= {limit:g}")
    return repr(number)


def weight_text(value: object, what: str = "weight") -> str:
    """A weight as decimal text. Commitments hash text, never floats (canonical JSON refuses
    them), and ``repr`` of a float is exact: an auditor holding the model's floats rebuilds
    the same strings."""
    return _number_text(value, WEIGHT_LIMIT, what)


def _features(features: Sequence[str]) -> list[str]:
    if isinstance(features, str) or not 1 <= len(features) <= MAX_FEATURES:
        raise EncodingError(f"a model names 1..{MAX_FEATURES} features")
    out = []
    for j, name in enumerate(features):
        if not isinstance(name, str) or not 1 <= len(name) <= _FEATURE_NAME_MAX:
            raise EncodingError(f"feature {j} is not a name of 1..{_FEATURE_NAME_MAX} characters")
        out.append(name)
    if len(set(out)) != len(out):
        raise EncodingError("a model names each feature once")
    return out


def weights_digest(weights: Sequence[object], bias: object, nonce: bytes) -> str:
    """Hex SHA-256 over the canonical JSON of the weights, the bias and a secret nonce.

    The nonce (32 random bytes the model owner keeps with the weights) makes the digest hiding:
    without it nobody can confirm a guessed model, even one with a few round weights."""
    if not isinstance(nonce, bytes) or len(nonce) != MODEL_NONCE_BYTES:
        raise EncodingError(f"a model nonce is {MODEL_NONCE_BYTES} bytes")
    if isinstance(weights, str | bytes) or not 1 <= len(weights) <= MAX_FEATURES:
        raise EncodingError(f"a model has 1..{MAX_FEATURES} weights")
    body = {
        "type": MODEL_WEIGHTS_TYPE,
        "weights": [weight_text(w, f"weight {j}") for j, w in enumerate(weights)],
        "bias": _bias_text(bias),
        "nonce": b64url_encode(nonce),
    }
    return hashlib.sha256(canonicalize(body)).hexdigest()


def _bias_text(bias: object) -> str:
    """The bias may be as large as a score: it is never encrypted, only added locally."""
    return _number_text(bias, 2.0**58, "bias")


def model_document(
    features: Sequence[str], digest: str, *, link: str = "identity", parameter_set: str
) -> dict[str, Any]:
    """The public half of a model commitment: feature names, link, parameters, and the hiding
    :func:`weights_digest`. The exchange stores and ledgers this; it never sees weights."""
    if link not in MODEL_LINKS:
        raise EncodingError(f"link must be one of {', '.join(MODEL_LINKS)}")
    if parameter_set not in PARAMETER_SETS or PARAMETER_SETS[parameter_set].scheme != "ckks":
        raise EncodingError("a scoring model names a CKKS parameter set")
    if not isinstance(digest, str) or len(digest) != 64 or digest.strip("0123456789abcdef"):
        raise EncodingError("weights_digest is 64 lowercase hex digits")
    return {
        "type": MODEL_TYPE,
        "features": _features(features),
        "link": link,
        "parameter_set": parameter_set,
        "weights_digest": digest,
    }


def parse_model_document(document: object) -> dict[str, Any]:
    """Check a received :func:`model_document` (exact keys, valid fields); return it rebuilt."""
    keys = {"type", "features", "link", "parameter_set", "weights_digest"}
    if not isinstance(document, Mapping) or set(document) != keys:
        raise EncodingError(f"a model document has exactly the keys {sorted(keys)}")
    if document["type"] != MODEL_TYPE:
        raise EncodingError(f"a model document has type {MODEL_TYPE}")
    features = document["features"]
    if not isinstance(features, list):
        raise EncodingError("features is a list of column names")
    return model_document(
        features,
        document["weights_digest"],
        link=document["link"],
        parameter_set=document["parameter_set"],
    )


def model_commitment(document: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical model document: the id receipts and the ledger cite."""
    return hashlib.sha256(canonicalize(parse_model_document(document))).hexdigest()


def verify_model_commitment(
    commitment: str,
    document: Mapping[str, Any],
    *,
    features: Sequence[str],
    weights: Sequence[object],
    bias: object,
    nonce: bytes,
    link: str = "identity",
) -> None:
    """Check a revealed model (its features, weights, bias, link and nonce) against a
    commitment and its public document; raise :class:`VerificationError` naming the mismatch.

    This is the auditor's check after the fact: the cryptography cannot tell an honest model
    from a feature-reading one, but a committed model cannot be swapped afterwards."""
    try:
        expected = model_commitment(document)
    except EncodingError as exc:
        raise VerificationError(f"the model document is malformed: {exc}") from exc
    if expected != commitment:
        raise VerificationError("the model document does not hash to the commitment")
    if _features(features) != document["features"]:
        raise VerificationError("the revealed features differ from the committed ones")
    if link != document["link"]:
        raise VerificationError("the revealed link differs from the committed one")
    if len(weights) != len(document["features"]):
        raise VerificationError("the revealed model has a weight count other than its features")
    if weights_digest(weights, bias, nonce) != document["weights_digest"]:
        raise VerificationError("the revealed weights, bias or nonce differ from the committed")


def pack_ciphertexts(items: Sequence[bytes]) -> bytes:
    """Frame serialized ciphertexts into one body: each as a 4-byte big-endian length, then
    its bytes. Unframed concatenation could not be split without parsing SEAL's format."""
    out = bytearray()
    for k, item in enumerate(items):
        if not isinstance(item, bytes | bytearray) or not 0 < len(item) < 1 << 32:
            raise EncodingError(f"ciphertext {k} is not 1..2**32-1 bytes")
        out += len(item).to_bytes(_FRAME_HEADER, "big") + item
    return bytes(out)


def unpack_ciphertexts(data: bytes, *, max_items: int, max_item_bytes: int) -> list[bytes]:
    """Split a :func:`pack_ciphertexts` body, refusing more than ``max_items`` frames, a frame
    over ``max_item_bytes``, a truncated frame and trailing bytes, before anything is parsed."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise EncodingError("a ciphertext batch is bytes")
    view = memoryview(data)
    items: list[bytes] = []
    i = 0
    while i < len(view):
        if len(items) >= max_items:
            raise EncodingError(f"a batch holds at most {max_items} ciphertexts")
        if i + _FRAME_HEADER > len(view):
            raise EncodingError("truncated ciphertext batch")
        size = int.from_bytes(view[i : i + _FRAME_HEADER], "big")
        i += _FRAME_HEADER
        if not 0 < size <= max_item_bytes:
            raise EncodingError(f"a ciphertext in the batch is over the {max_item_bytes} limit")
        if i + size > len(view):
            raise EncodingError("truncated ciphertext batch")
        items.append(bytes(view[i : i + size]))
        i += size
    if not items:
        raise EncodingError("the ciphertext batch is empty")
    return items
