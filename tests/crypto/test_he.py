"""Homomorphic encryption helpers: parameter security, exact masked totals, encrypted scoring,
secure sums, and hostile inputs to the loaders.

The security table is the HomomorphicEncryption.org standard (2018), Table 1 (classical,
ternary secret). Accuracy of scoring is measured against numpy's float64 ``X @ w``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import random

import numpy as np
import pytest
import tenseal as ts
import tenseal.sealapi as seal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import crypto.he as he
from crypto.errors import CryptoError, EncodingError, VerificationError

BFV = he.BFV_DEFAULT
CKKS = he.CKKS_DEFAULT
BFV_SLOTS = he.slot_count(BFV)
CKKS_SLOTS = he.slot_count(CKKS)
FEW = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# a secure BFV set that is not in PARAMETER_SETS (another plain modulus)
OTHER_BFV = he.ParameterSet("bfv", 8192, (43, 43, 44, 44, 44), 65537, None)
# the 40-bit chain TenSEAL tutorials use, for the scale-bias check (not an allowed set)
CKKS_40 = he.ParameterSet("ckks", 8192, (60, 40, 40, 60), None, 40)


@pytest.fixture(scope="module")
def bfv_secret() -> object:
    return he.new_context(BFV)


@pytest.fixture(scope="module")
def bfv_public_bytes(bfv_secret: object) -> bytes:
    return he.public_context_bytes(bfv_secret)


@pytest.fixture(scope="module")
def bfv_public(bfv_public_bytes: bytes) -> object:
    return he.load_public_context(
        bfv_public_bytes, max_bytes=he.max_public_context_bytes(BFV), expected=BFV
    )


@pytest.fixture(scope="module")
def ckks_secret() -> object:
    return he.new_context(CKKS)


@pytest.fixture(scope="module")
def ckks_public_bytes(ckks_secret: object) -> bytes:
    return he.public_context_bytes(ckks_secret)


@pytest.fixture(scope="module")
def ckks_public(ckks_public_bytes: bytes) -> object:
    return he.load_public_context(
        ckks_public_bytes, max_bytes=he.max_public_context_bytes(CKKS), expected=CKKS
    )


def _chunked(flat: list[int], size: int = BFV_SLOTS) -> list[list[int]]:
    return [flat[i : i + size] for i in range(0, len(flat), size)]


def _slots(ctx_secret: object, data: bytes) -> list[int]:
    """Every slot of a BFV result, as the key holder can see them."""
    vector = ts.bfv_vector_from(ctx_secret, data)
    return [int(v) for v in vector.decrypt()]


def _is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24."""
    if n < 2:
        return False
    bases = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in bases:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for a in bases:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


# -- parameters and security ----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(he.PARAMETER_SETS))
def test_every_parameter_set_is_128_bit_secure(name: str) -> None:
    params = he.PARAMETER_SETS[name]
    assert params.total_bits <= he.SECURITY_TABLE[128][params.poly_modulus_degree]
    assert he.security_level(params) >= 128
    he.check_security(params)
    assert he.max_public_context_bytes(params) > he.max_ciphertext_bytes(params)


def test_security_table_is_the_standard() -> None:
    assert dict(he.SECURITY_TABLE[128]) == {
        1024: 27,
        2048: 54,
        4096: 109,
        8192: 218,
        16384: 438,
        32768: 881,
    }
    assert he.SECURITY_TABLE[192][4096] == 75 and he.SECURITY_TABLE[256][4096] == 58
    assert he.SECURITY_TABLE[192][8192] == 152 and he.SECURITY_TABLE[256][8192] == 118
    assert he.SECURITY_TABLE[192][16384] == 305 and he.SECURITY_TABLE[256][16384] == 237
    assert he.SECURITY_TABLE[192][32768] == 611 and he.SECURITY_TABLE[256][32768] == 476


@pytest.mark.parametrize(
    ("bits", "level"),
    [
        ((40, 40, 38), 256),
        ((39, 40, 40), 192),
        ((50, 50, 52), 192),
        ((50, 50, 53), 128),
        ((60, 60, 60, 38), 128),
        ((60, 60, 60, 39), 0),
    ],
)
def test_security_level_boundaries(bits: tuple[int, ...], level: int) -> None:
    params = he.ParameterSet("ckks", 8192, bits, None, 40)
    assert he.security_level(params) == level
    if level < 128:
        with pytest.raises(VerificationError, match="below 128"):
            he.check_security(params)
        with pytest.raises(VerificationError):
            he.new_context(params)
    else:
        he.check_security(params)


def test_check_security_minimum() -> None:
    he.check_security(he.ParameterSet("ckks", 8192, (40, 40, 38), None, 40), minimum=256)
    with pytest.raises(VerificationError):
        he.check_security(BFV, minimum=192)


def test_bfv_plain_modulus_is_the_largest_60_bit_batching_prime() -> None:
    t = BFV.plain_modulus
    assert t is not None
    assert t == 2**60 - 2**14 + 1  # the largest 60-bit number that is 1 mod 2n = 16384
    assert _is_prime(t) and t % (2 * 8192) == 1 and t.bit_length() == 60
    assert t == seal.PlainModulus.Batching(8192, 60).value()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"scheme": "rsa"},
        {"poly_modulus_degree": 8000},
        {"coeff_mod_bit_sizes": (61, 40)},
        {"coeff_mod_bit_sizes": (40,)},
        {"plain_modulus": 65536},
        {"plain_modulus": None},
        {"global_scale_bits": 40},
    ],
)
def test_parameter_set_validation(kwargs: dict[str, object]) -> None:
    fields = {
        "scheme": "bfv",
        "poly_modulus_degree": 8192,
        "coeff_mod_bit_sizes": (43, 43, 44, 44, 44),
        "plain_modulus": 65537,
        "global_scale_bits": None,
    }
    fields.update(kwargs)
    with pytest.raises(EncodingError):
        he.ParameterSet(**fields)  # type: ignore[arg-type]


def test_contexts_use_exactly_the_listed_primes(bfv_secret: object, ckks_secret: object) -> None:
    assert he.parameters_of(bfv_secret) == BFV
    assert he.parameters_of(ckks_secret) == CKKS
    primes = seal.CoeffModulus.Create(8192, list(CKKS.coeff_mod_bit_sizes))
    assert [m.bit_count() for m in primes] == list(CKKS.coeff_mod_bit_sizes)
    other = he.new_context(OTHER_BFV)
    with pytest.raises(VerificationError, match="not an allowed parameter set"):
        he.parameters_of(other)


def test_capacity() -> None:
    cap = he.bfv_capacity(BFV)
    assert cap == (BFV.plain_modulus - 1) // 2 > 5 * 10**17  # type: ignore[operator]
    assert he.fits_exactly(BFV, lo=-(10**9), hi=10**9, max_rows=10**6)
    assert he.fits_exactly(BFV, lo=0, hi=cap, max_rows=1)
    assert not he.fits_exactly(BFV, lo=0, hi=cap, max_rows=1, noise_bound=1)
    assert he.fits_exactly(BFV, lo=-cap, hi=0, max_rows=1)
    assert not he.fits_exactly(BFV, lo=-cap - 1, hi=0, max_rows=1)
    rows = cap // 10**9
    assert he.fits_exactly(BFV, lo=-(10**9), hi=10**9, max_rows=rows)
    assert not he.fits_exactly(BFV, lo=-(10**9), hi=10**9, max_rows=rows + 1)
    he.verify_capacity(BFV, lo=1, hi=5, max_rows=0)
    with pytest.raises(EncodingError, match="largest exact total"):
        he.verify_capacity(BFV, lo=0, hi=10**12, max_rows=10**6)
    with pytest.raises(EncodingError):
        he.fits_exactly(BFV, lo=5, hi=1, max_rows=1)
    with pytest.raises(EncodingError):
        he.bfv_capacity(CKKS)


# -- public contexts ------------------------------------------------------------------------


def test_public_context_round_trip(bfv_public_bytes: bytes, bfv_public: object) -> None:
    assert len(bfv_public_bytes) <= he.max_public_context_bytes(BFV)
    assert he.context_digest(bfv_public_bytes) == hashlib.sha256(bfv_public_bytes).hexdigest()
    assert he.parameters_of(bfv_public) == BFV
    assert he.load_public_context(bfv_public_bytes, max_bytes=10**6) is not None


def test_load_public_context_rejects_secret_key(bfv_secret: object) -> None:
    data = bfv_secret.serialize(  # type: ignore[attr-defined]
        save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=False
    )
    with pytest.raises(VerificationError, match="secret key"):
        he.load_public_context(data, max_bytes=10**7)


def test_load_public_context_rejects_evaluation_keys(ckks_secret: object) -> None:
    data = ckks_secret.serialize(  # type: ignore[attr-defined]
        save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=True
    )
    with pytest.raises(VerificationError, match="Galois"):
        he.load_public_context(data, max_bytes=10**8)


def _field(number: int, payload: bytes) -> bytes:
    key, length = (number << 3) | 2, len(payload)
    out = bytearray()
    for value in (key, length):
        while value >= 0x80:
            out.append(value & 0x7F | 0x80)
            value >>= 7
        out.append(value)
    return bytes(out) + payload


def _split(data: bytes) -> list[tuple[int, bytes]]:
    """Top-level length-delimited fields of a TenSEAL context (wire type 2 only)."""
    fields, i = [], 0
    while i < len(data):
        key, i = _read_varint(data, i)
        size, i = _read_varint(data, i)
        fields.append((key >> 3, data[i : i + size]))
        i += size
    return fields


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def test_hostile_context_with_galois_field_is_refused_before_parsing(
    bfv_public_bytes: bytes,
) -> None:
    (n1, params), (n2, public) = _split(bfv_public_bytes)
    assert (n1, n2) == (1, 2)
    # a Galois-keys field that is not even valid SEAL data: refused before SEAL sees it
    forged = _field(1, params) + _field(2, public + _field(5, b"\x00" * 64))
    with pytest.raises(VerificationError, match="Galois"):
        he.load_public_context(forged, max_bytes=10**7)
    secret = _field(1, params) + _field(2, public) + _field(3, _field(1, b"junk"))
    with pytest.raises(VerificationError, match="secret key"):
        he.load_public_context(secret, max_bytes=10**7)
    twice = _field(1, params) + _field(2, public) + _field(2, public)
    with pytest.raises(EncodingError):
        he.load_public_context(twice, max_bytes=10**7)
    without_key = _field(1, params) + _field(2, b"")
    with pytest.raises(VerificationError, match="no public key"):
        he.load_public_context(without_key, max_bytes=10**7)


def test_load_public_context_size_limit_applies_before_parsing(bfv_public_bytes: bytes) -> None:
    with pytest.raises(EncodingError, match="limit"):
        he.load_public_context(bfv_public_bytes, max_bytes=len(bfv_public_bytes) - 1)
    with pytest.raises(EncodingError, match="limit"):
        he.load_public_context(b"\x00" * 100, max_bytes=99)


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\x0a\xff\xff\xff\xff\x0f", bytes(range(256)), b"\x00" * 1000],
)
def test_load_public_context_rejects_garbage(data: bytes) -> None:
    with pytest.raises(EncodingError):
        he.load_public_context(data, max_bytes=10**6)


def test_load_public_context_rejects_truncated(bfv_public_bytes: bytes) -> None:
    for cut in (10, 100, 1000, len(bfv_public_bytes) // 2, len(bfv_public_bytes) - 1):
        with pytest.raises(EncodingError):
            he.load_public_context(bfv_public_bytes[:cut], max_bytes=10**6)
    with pytest.raises(EncodingError):
        he.load_public_context("text", max_bytes=10**6)  # type: ignore[arg-type]


def test_load_public_context_rejects_wrong_scheme_and_unlisted_sets(
    bfv_public_bytes: bytes, ckks_public_bytes: bytes
) -> None:
    with pytest.raises(VerificationError, match="expected bfv-8192"):
        he.load_public_context(ckks_public_bytes, max_bytes=10**6, expected=BFV)
    with pytest.raises(VerificationError, match="expected ckks-8192"):
        he.load_public_context(bfv_public_bytes, max_bytes=10**6, expected=CKKS)
    other = he.public_context_bytes(he.new_context(OTHER_BFV))
    with pytest.raises(VerificationError, match="not an allowed parameter set"):
        he.load_public_context(other, max_bytes=10**6)
    tutorial_chain = he.public_context_bytes(he.new_context(CKKS_40))
    with pytest.raises(VerificationError, match="not an allowed parameter set"):
        he.load_public_context(tutorial_chain, max_bytes=10**6)


@FEW
@given(st.data())
def test_flipped_context_bytes_never_escape_as_foreign_errors(
    bfv_public_bytes: bytes, data: st.DataObject
) -> None:
    blob = bytearray(bfv_public_bytes)
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, 300))
        blob[i] ^= data.draw(st.integers(1, 255))
    try:
        ctx = he.load_public_context(bytes(blob), max_bytes=10**6)
    except CryptoError:
        return
    assert he.parameters_of(ctx) in he.PARAMETER_SETS.values()


# -- ciphertexts ----------------------------------------------------------------------------


def test_load_ciphertext_limits_and_garbage(bfv_public: object) -> None:
    (chunk,) = he.encrypt_column_chunks(bfv_public, [1, 2, 3])
    assert len(chunk) <= he.max_ciphertext_bytes(BFV)
    vector = he.load_ciphertext(bfv_public, chunk, max_bytes=len(chunk), kind="bfv")
    assert vector.size() == BFV_SLOTS
    with pytest.raises(EncodingError, match="limit"):
        he.load_ciphertext(bfv_public, chunk, max_bytes=len(chunk) - 1, kind="bfv")
    for bad in (b"", b"junk", chunk[: len(chunk) // 2], chunk[:-1], b"\x12\x05hello"):
        with pytest.raises(EncodingError):
            he.load_ciphertext(bfv_public, bad, max_bytes=10**6, kind="bfv")
    with pytest.raises(VerificationError, match="ckks ciphertext cannot be used"):
        he.load_ciphertext(bfv_public, chunk, max_bytes=10**6, kind="ckks")
    with pytest.raises(EncodingError):
        he.load_ciphertext(bfv_public, chunk, max_bytes=10**6, kind="rsa")  # type: ignore[arg-type]


def test_load_ciphertext_rejects_other_parameters(
    bfv_public: object, ckks_public: object, ckks_secret: object
) -> None:
    other = he.new_context(OTHER_BFV)
    foreign = bytes(ts.bfv_vector(other, [1] * BFV_SLOTS).serialize())
    with pytest.raises(EncodingError, match="parameters"):
        he.load_ciphertext(bfv_public, foreign, max_bytes=10**6, kind="bfv")
    ckks_ct = he.encrypt_vector(ckks_public, [1.0])
    with pytest.raises(EncodingError):
        # same bytes read as BFV under the BFV context: SEAL refuses the CKKS parameters
        he.load_ciphertext(bfv_public, ckks_ct, max_bytes=10**6, kind="bfv")
    bfv_ct = he.encrypt_vector(bfv_public, [1])
    with pytest.raises(EncodingError):
        he.load_ciphertext(ckks_secret, bfv_ct, max_bytes=10**6, kind="ckks")


def test_ciphertext_under_another_key_decrypts_to_garbage(bfv_secret: object) -> None:
    """Same parameters, another key: it loads (undetectable), then yields garbage or a noise
    error for the key holder, never the stranger's values."""
    stranger = he.new_context(BFV)
    blob = he.encrypt_vector(stranger, [42, 43])
    he.load_ciphertext(bfv_secret, blob, max_bytes=he.max_ciphertext_bytes(BFV), kind="bfv")
    try:
        got = he.decrypt_vector(bfv_secret, blob, 2)
    except VerificationError:  # noise budget 0 under the wrong key
        return
    assert got != [42, 43]


@FEW
@given(st.data())
def test_flipped_ciphertext_bytes_never_escape_as_foreign_errors(
    bfv_public: object, data: st.DataObject
) -> None:
    (chunk,) = he.encrypt_column_chunks(bfv_public, [5])
    blob = bytearray(chunk)
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, 120))
        blob[i] ^= data.draw(st.integers(1, 255))
    with contextlib.suppress(CryptoError):
        he.masked_total(bfv_public, [bytes(blob)], [[1]])


# -- (A) psi_aggregate ----------------------------------------------------------------------


def _run_total(
    public: object, secret: object, values: list[int], mask: list[int], noise: int = 0
) -> int:
    chunks = he.encrypt_column_chunks(public, values)
    result = he.masked_total(public, chunks, _chunked(mask), noise)
    return he.decrypt_total(secret, result)


def test_masked_total_with_negative_values_and_noise(
    bfv_public: object, bfv_secret: object
) -> None:
    rng = random.Random(7)
    values = [rng.randint(-(10**9), 10**9) for _ in range(1000)]
    mask = [rng.randint(0, 1) for _ in values]
    expected = sum(v for v, m in zip(values, mask, strict=True) if m)
    assert _run_total(bfv_public, bfv_secret, values, mask) == expected
    assert _run_total(bfv_public, bfv_secret, values, mask, noise=-12345) == expected - 12345
    assert _run_total(bfv_public, bfv_secret, [-5, -7, 3], [1, 1, 0]) == -12


def test_masked_total_empty_and_full_masks(bfv_public: object, bfv_secret: object) -> None:
    values = [3, -1, 4, -1, 5, -9, 2, 6]
    assert _run_total(bfv_public, bfv_secret, values, [0] * len(values)) == 0
    assert _run_total(bfv_public, bfv_secret, values, [0] * len(values), noise=9) == 9
    assert _run_total(bfv_public, bfv_secret, values, [1] * len(values)) == sum(values)
    # nothing encrypted at all (a provider with no rows): only the noise
    assert he.decrypt_total(bfv_secret, he.masked_total(bfv_public, [], [], noise=-3)) == -3


def test_masked_total_over_several_chunks(bfv_public: object, bfv_secret: object) -> None:
    rng = random.Random(11)
    n = 2 * BFV_SLOTS + 123  # three chunks, the last one partial
    values = [rng.randint(-1000, 1000) for _ in range(n)]
    mask = [rng.randint(0, 1) for _ in range(n)]
    chunks = he.encrypt_column_chunks(bfv_public, values, bounds=(-1000, 1000))
    assert len(chunks) == 3
    result = he.masked_total(bfv_public, chunks, _chunked(mask), 0, bounds=(-1000, 1000))
    expected = sum(v * m for v, m in zip(values, mask, strict=True))
    assert he.decrypt_total(bfv_secret, result) == expected
    # a short last mask means "the rest did not match"
    short = _chunked(mask)
    short[-1] = short[-1][:50]
    expected_short = sum(v * m for v, m in zip(values[: 2 * BFV_SLOTS + 50], mask, strict=False))
    result = he.masked_total(bfv_public, chunks, short)
    assert he.decrypt_total(bfv_secret, result) == expected_short


@FEW
@given(
    st.lists(st.tuples(st.integers(-(10**12), 10**12), st.integers(0, 1)), min_size=1, max_size=40),
    st.integers(-(10**6), 10**6),
)
def test_masked_total_property(
    bfv_public: object, bfv_secret: object, rows: list[tuple[int, int]], noise: int
) -> None:
    values = [v for v, _ in rows]
    mask = [m for _, m in rows]
    expected = sum(v * m for v, m in rows) + noise
    assert _run_total(bfv_public, bfv_secret, values, mask, noise) == expected


def test_key_holder_sees_only_the_total(bfv_public: object, bfv_secret: object) -> None:
    """Every slot of the result is uniform modulo t; only their sum carries information."""
    rng = random.Random(3)
    values = [rng.randint(-1000, 1000) for _ in range(BFV_SLOTS)]
    mask = [rng.randint(0, 1) for _ in values]
    chunks = he.encrypt_column_chunks(bfv_public, values)
    first = he.masked_total(bfv_public, chunks, [mask])
    second = he.masked_total(bfv_public, chunks, [mask])
    expected = sum(v * m for v, m in zip(values, mask, strict=True))
    t = BFV.plain_modulus
    assert t is not None
    for result in (first, second):
        slots = _slots(bfv_secret, result)
        assert len(slots) == BFV_SLOTS
        # a row value (|v| <= 1000) shows up in a uniform slot with probability ~1e-13
        assert not any(abs(s) <= 10**6 for s in slots)
        assert 0.45 < sum(s > 0 for s in slots) / BFV_SLOTS < 0.55
        assert abs(float(np.mean(np.array(slots, dtype=np.float64) / t))) < 0.02
        total = sum(slots) % t
        assert (total - t if total > t // 2 else total) == expected
    pairs = zip(_slots(bfv_secret, first), _slots(bfv_secret, second), strict=True)
    assert all(a != b for a, b in pairs)
    assert first != second


def test_capacity_boundary_is_exact(bfv_public: object, bfv_secret: object) -> None:
    cap = he.bfv_capacity(BFV)
    assert _run_total(bfv_public, bfv_secret, [cap], [1]) == cap
    assert _run_total(bfv_public, bfv_secret, [-cap], [1]) == -cap
    assert _run_total(bfv_public, bfv_secret, [cap - 10, 10], [1, 1]) == cap
    with pytest.raises(EncodingError):
        he.encrypt_column_chunks(bfv_public, [cap + 1])
    chunks = he.encrypt_column_chunks(bfv_public, [cap], bounds=(0, cap))
    with pytest.raises(EncodingError, match="largest exact total"):
        he.masked_total(bfv_public, chunks, [[1]], noise=1, bounds=(0, cap))
    # the exchange's check counts matched rows: one of two rows at the bound fits, two do not
    half = cap // 2 + 1
    chunks = he.encrypt_column_chunks(bfv_public, [half, half])  # two such rows: no bounds
    result = he.masked_total(bfv_public, chunks, [[1, 0]], bounds=(0, half))
    assert he.decrypt_total(bfv_secret, result) == half
    with pytest.raises(EncodingError, match="largest exact total"):
        he.masked_total(bfv_public, chunks, [[1, 1]], bounds=(0, half))
    with pytest.raises(EncodingError, match="largest exact total"):
        he.encrypt_column_chunks(bfv_public, [half, half], bounds=(0, half))


@pytest.mark.slow
def test_largest_case_a_million_rows_of_a_billion(bfv_public: object, bfv_secret: object) -> None:
    """10**6 rows with |v| <= 10**9 (123 chunks): exact, with ample noise budget left."""
    rows, bound = 10**6, 10**9
    he.verify_capacity(BFV, lo=-bound, hi=bound, max_rows=rows, noise_bound=10**6)
    rng = random.Random(5)
    values = [bound] * (rows // 2) + [rng.randint(-bound, bound) for _ in range(rows // 2)]
    rng.shuffle(values)
    values[0], values[1] = -bound, bound
    chunks = he.encrypt_column_chunks(bfv_public, values, bounds=(-bound, bound))
    assert len(chunks) == math.ceil(rows / BFV_SLOTS) == 123
    everything = he.masked_total(
        bfv_public, chunks, _chunked([1] * rows), 0, bounds=(-bound, bound)
    )
    assert he.decrypt_total(bfv_secret, everything) == sum(values)
    mask = [rng.randint(0, 1) for _ in range(rows)]
    some = he.masked_total(bfv_public, chunks, _chunked(mask), 999, bounds=(-bound, bound))
    assert (
        he.decrypt_total(bfv_secret, some)
        == sum(v for v, m in zip(values, mask, strict=True) if m) + 999
    )
    assert he.bfv_noise_budget(bfv_secret, some) >= 20
    # the largest total this set can hold: 10**9 * (576 460 752 rows)
    assert he.bfv_capacity(BFV) // bound == 576_460_752


def test_masked_total_refuses_bad_inputs(bfv_public: object, ckks_public: object) -> None:
    chunks = he.encrypt_column_chunks(bfv_public, [1, 2, 3])
    with pytest.raises(EncodingError, match="masks"):
        he.masked_total(bfv_public, chunks, [])
    with pytest.raises(EncodingError, match="only 0 and 1"):
        he.masked_total(bfv_public, chunks, [[1, 2, 0]])
    with pytest.raises(EncodingError, match="not an integer"):
        he.masked_total(bfv_public, chunks, [[True, False]])
    with pytest.raises(EncodingError, match="entries"):
        he.masked_total(bfv_public, chunks, [[0] * (BFV_SLOTS + 1)])
    with pytest.raises(EncodingError):
        he.masked_total(bfv_public, chunks, [[1]], noise=0.5)  # type: ignore[arg-type]
    with pytest.raises(EncodingError, match="capacity"):
        he.masked_total(bfv_public, chunks, [[1]], noise=he.bfv_capacity(BFV) + 1)
    with pytest.raises(VerificationError, match="needs a bfv context"):
        he.masked_total(ckks_public, chunks, [[1]])
    short = bytes(ts.bfv_vector(bfv_public, [1, 2, 3]).serialize())  # replicated, not padded
    with pytest.raises(EncodingError, match="fill all"):
        he.masked_total(bfv_public, [short], [[1]])
    with pytest.raises(EncodingError, match="bounds"):
        he.encrypt_column_chunks(bfv_public, [1, 20], bounds=(0, 10))
    with pytest.raises(EncodingError, match="not an integer"):
        he.encrypt_column_chunks(bfv_public, [1.5])  # type: ignore[list-item]
    assert he.encrypt_column_chunks(bfv_public, np.array([1, 2], dtype=np.int64)) != []


# -- (B) he_score ---------------------------------------------------------------------------


def _model(rng: np.random.Generator, d: int) -> np.ndarray:
    """Weights of magnitude 1e-5 .. 1e3 (log-uniform), random signs."""
    return rng.choice([-1.0, 1.0], d) * 10.0 ** rng.uniform(-5, 3, d)


def _reference_slack(x: np.ndarray, w: np.ndarray, bias: float) -> np.ndarray:
    """The rounding error of numpy's float64 ``x @ w + bias`` itself: gamma_(d+1) times the
    magnitudes (Higham 3.1), added to the bound when comparing with it."""
    k = x.shape[1] + 1
    gamma = k * 2.0**-53 / (1 - k * 2.0**-53)
    return gamma * (np.abs(x) @ np.abs(w) + abs(bias))


@pytest.mark.slow
def test_scores_match_numpy_within_the_derived_bound(
    ckks_public: object, ckks_secret: object
) -> None:
    """Features |x| <= 1e6, weights 1e-5 <= |w| <= 1e3, 6000 entities in two ciphertexts: every
    score within he.score_error_bounds (exceeded with probability below 1e-9 per call)."""
    rng = np.random.default_rng(2026)
    n, d = 6000, 24
    features = rng.uniform(-1e6, 1e6, (n, d))
    weights = _model(rng, d)
    bias = -3.25
    enc = he.encrypt_model(ckks_secret, weights.tolist())
    chunks = he.encrypted_scores(ckks_public, enc, features.tolist())
    assert len(chunks) == 2
    got = np.array(he.decrypt_scores(ckks_secret, chunks, n, bias=bias))
    expected = features @ weights + bias
    magnitude = np.abs(features) @ np.abs(weights) + abs(bias)
    assert got.shape == (n,)
    bound = he.score_error_bounds(CKKS, weights.tolist(), features, bias=bias)
    assert np.all(np.abs(got - expected) <= bound + _reference_slack(features, weights, bias))
    assert abs(float(np.mean((got - expected) / magnitude))) < 1e-10  # no systematic bias
    # positive data, no cancellation
    pos_x, pos_w = np.abs(features[:2000]), np.abs(weights)
    enc = he.encrypt_model(ckks_secret, pos_w.tolist())
    got = np.array(
        he.decrypt_scores(ckks_secret, he.encrypted_scores(ckks_public, enc, pos_x), 2000)
    )
    bound = he.score_error_bounds(CKKS, pos_w.tolist(), pos_x)
    assert np.all(np.abs(got - pos_x @ pos_w) <= bound + _reference_slack(pos_x, pos_w, 0.0))
    # logistic model: the consumer applies the sigmoid to its decrypted scores
    probs = 1 / (1 + np.exp(-np.clip(got * 1e-9, -50, 50)))
    assert np.allclose(probs, 1 / (1 + np.exp(-np.clip((pos_x @ pos_w) * 1e-9, -50, 50))))


def test_default_scale_would_bias_scores_by_the_predicted_amount() -> None:
    """TenSEAL resets the scale to 2**bits after the rescale by p: scores come out times
    2**bits / p. With the 40-bit chain this is the known 1.341e-7; encrypting the weights at
    scale p (what encrypt_model does) removes it."""
    assert he.scale_bias(CKKS_40) == pytest.approx(1.3411e-7, rel=1e-4)
    assert 0 < he.scale_bias(CKKS) < 1e-10
    ctx = he.new_context(CKKS_40)
    p = seal.CoeffModulus.Create(8192, [60, 40, 40, 60])[2].value()
    rng = np.random.default_rng(1)
    x = rng.uniform(1, 1000, (4096, 2))
    w = np.array([3.0, 7.0])
    exact = x @ w
    for scale, bias in ((2.0**40, he.scale_bias(CKKS_40)), (float(p), 0.0)):
        acc = None
        for j in range(2):
            term = ts.ckks_vector(ctx, [w[j]] * 4096, scale).mul(x[:, j].tolist())
            acc = term if acc is None else acc.add_(term)
        assert acc is not None
        got = np.array(acc.decrypt())
        assert float(np.mean(got / exact - 1)) == pytest.approx(bias, abs=2e-10)


def test_score_limits_are_consistent() -> None:
    """The largest features and weights the checks admit still decode."""
    assert he.ckks_capacity(CKKS) >= he.MAX_FEATURES * he.FEATURE_LIMIT * he.WEIGHT_LIMIT
    assert he.ckks_capacity(CKKS) == 2.0**58


def test_score_capacity_is_where_decoding_stops(ckks_secret: object) -> None:
    """A constant score (the worst case: one polynomial coefficient carries it all) decodes at
    ckks_capacity and wraps at four times it."""
    p = float(seal.CoeffModulus.Create(8192, list(CKKS.coeff_mod_bit_sizes))[-2].value())
    cap = he.ckks_capacity(CKKS)
    for score, fits in ((cap, True), (-cap, True), (4 * cap, False)):
        weight = ts.ckks_vector(ckks_secret, [score / 2.0**32] * CKKS_SLOTS, p)
        got = weight.mul([2.0**32] * CKKS_SLOTS).decrypt()[0]
        assert (got == pytest.approx(score, rel=1e-12)) is fits


def test_scores_edge_cases(ckks_public: object, ckks_secret: object) -> None:
    enc = he.encrypt_model(ckks_secret, [2.0, -1.0])
    assert he.encrypted_scores(ckks_public, enc, []) == []
    assert he.decrypt_scores(ckks_secret, [], 0) == []
    zeros = he.encrypted_scores(ckks_public, enc, [[0.0, 0.0]] * 3)
    got = np.array(he.decrypt_scores(ckks_secret, zeros, 3, bias=1.5))
    bound = he.score_error_bounds(CKKS, [2.0, -1.0], [[0.0, 0.0]] * 3, bias=1.5)
    assert np.all(np.abs(got - 1.5) <= bound)
    one = he.encrypted_scores(ckks_public, enc, [[10.0, 4.0]])
    (score,) = he.decrypt_scores(ckks_secret, one, 1)
    assert abs(score - 16.0) <= he.score_error_bounds(CKKS, [2.0, -1.0], [[10.0, 4.0]])[0]


def test_zero_and_vanishing_columns_add_nothing(ckks_public: object, ckks_secret: object) -> None:
    """Products are summed unrescaled and rescaled once per chunk; a zero column, one so small
    it encodes to the zero polynomial (TenSEAL then hands back a fresh zero at another scale)
    and an all-zero chunk still give the right scores, and the caller's context is unchanged."""
    rng = np.random.default_rng(5)
    x = rng.uniform(-1e3, 1e3, (CKKS_SLOTS + 10, 3))
    x[:, 1] = 0.0
    x[:CKKS_SLOTS, 2] = 1e-17
    x[CKKS_SLOTS:] = 0.0
    w = np.array([1.5, -2.0, 3.0])
    enc = he.encrypt_model(ckks_secret, w.tolist())
    chunks = he.encrypted_scores(ckks_public, enc, x)
    got = np.array(he.decrypt_scores(ckks_secret, chunks, len(x)))
    bound = he.score_error_bounds(CKKS, w.tolist(), x)  # covers a column encoded to zero
    assert np.all(np.abs(got - x @ w) <= bound + _reference_slack(x, w, 0.0))
    assert ckks_public.auto_rescale is True  # type: ignore[attr-defined]
    # the same scores from a list of rows, checked row by row (two runs: two bounds apart)
    again = he.encrypted_scores(ckks_public, enc, x.tolist())
    assert np.all(
        np.abs(np.array(he.decrypt_scores(ckks_secret, again, len(x))) - got) <= 2 * bound
    )


def test_feature_matrix_refusals_name_the_first_bad_entity(
    ckks_public: object, ckks_secret: object
) -> None:
    enc = he.encrypt_model(ckks_secret, [1.0, 2.0])
    x = np.ones((5000, 2))
    x[4500, 1] = math.inf
    x[4700, 0] = -(2.0**33)
    with pytest.raises(EncodingError, match="entity 4500: features must be finite"):
        he.encrypted_scores(ckks_public, enc, x)
    x[4500] = 2.0**32  # both at the limit: admitted
    with pytest.raises(EncodingError, match="entity 4700: features must be finite"):
        he.encrypted_scores(ckks_public, enc, x)
    with pytest.raises(EncodingError, match="entity 0 does not have the model's 2 features"):
        he.encrypted_scores(ckks_public, enc, np.ones((3, 3)))
    with pytest.raises(EncodingError, match="not a number"):
        he.encrypted_scores(ckks_public, enc, np.array([["1", "2"]]))
    assert he.encrypted_scores(ckks_public, enc, np.zeros((0, 2))) == []


def test_scores_refuse_bad_inputs(ckks_public: object, ckks_secret: object) -> None:
    enc = he.encrypt_model(ckks_secret, [1.0, 2.0])
    with pytest.raises(EncodingError, match="features"):
        he.encrypted_scores(ckks_public, enc, [[1.0]])
    with pytest.raises(EncodingError, match="finite"):
        he.encrypted_scores(ckks_public, enc, [[1.0, math.nan]])
    with pytest.raises(EncodingError, match="finite"):
        he.encrypted_scores(ckks_public, enc, [[1.0, 2.0**33]])
    with pytest.raises(EncodingError, match="not a number"):
        he.encrypted_scores(ckks_public, enc, [[1.0, "2"]])
    with pytest.raises(EncodingError, match="not a number"):
        he.encrypt_model(ckks_secret, ["1"])
    with pytest.raises(EncodingError, match="finite"):
        he.encrypt_model(ckks_secret, [1e9])
    with pytest.raises(EncodingError):
        he.encrypt_model(ckks_secret, [])
    # a weight at TenSEAL's default scale would carry the scale bias: refused
    default = bytes(ts.ckks_vector(ckks_secret, [1.0] * CKKS_SLOTS).serialize())
    with pytest.raises(VerificationError, match="scale"):
        he.encrypted_scores(ckks_public, [default, enc[1]], [[1.0, 1.0]])
    # a fresh vector is not a score chunk
    with pytest.raises(VerificationError):
        he.decrypt_scores(ckks_secret, [he.encrypt_vector(ckks_public, [1.0])], 1)
    chunks = he.encrypted_scores(ckks_public, enc, [[1.0, 1.0]])
    with pytest.raises(EncodingError, match="chunks"):
        he.decrypt_scores(ckks_secret, chunks, CKKS_SLOTS + 1)
    bfv_ctx = he.new_context(BFV)
    with pytest.raises(VerificationError, match="needs a ckks context"):
        he.encrypt_model(bfv_ctx, [1.0])


# -- (C) secure_sum -------------------------------------------------------------------------


def test_secure_sum_of_three_zones_bfv(bfv_public: object, bfv_secret: object) -> None:
    parts = [[10, -20, 30, 0], [1, 2, 3, 4], [-(10**15), 5, 0, 7]]
    blobs = [he.encrypt_vector(bfv_public, p) for p in parts]
    total = he.sum_ciphertexts(bfv_public, blobs, noise=[1, 0, -1])
    assert he.decrypt_vector(bfv_secret, total, 4) == [-(10**15) + 11 + 1, -13, 32, 11]
    assert he.decrypt_vector(bfv_secret, he.sum_ciphertexts(bfv_public, blobs), 2) == [
        -(10**15) + 11,
        -13,
    ]
    # the unused slots hold zeros, not unnoised copies of the values
    assert set(_slots(bfv_secret, total)[4:]) == {0}


def test_secure_sum_of_three_zones_ckks(ckks_public: object, ckks_secret: object) -> None:
    rng = np.random.default_rng(9)
    parts = rng.uniform(-1e6, 1e6, (3, 100))
    noise = rng.laplace(0, 10, 100)
    blobs = [he.encrypt_vector(ckks_public, p.tolist()) for p in parts]
    total = he.decrypt_vector(ckks_secret, he.sum_ciphertexts(ckks_public, blobs, noise), 100)
    expected = parts.sum(axis=0) + noise
    assert np.max(np.abs(np.array(total) - expected) / np.maximum(np.abs(expected), 1)) < 1e-6


def test_secure_sum_refuses_bad_inputs(bfv_public: object, ckks_public: object) -> None:
    blob = he.encrypt_vector(bfv_public, [1])
    with pytest.raises(EncodingError, match="nothing"):
        he.sum_ciphertexts(bfv_public, [])
    with pytest.raises(EncodingError, match="integer"):
        he.sum_ciphertexts(bfv_public, [blob], [0.5])
    with pytest.raises(EncodingError, match="holds"):
        he.sum_ciphertexts(bfv_public, [blob], [0] * (BFV_SLOTS + 1))
    with pytest.raises(EncodingError, match="integer"):
        he.encrypt_vector(bfv_public, [1.5])
    with pytest.raises(EncodingError, match=r"1\.\."):
        he.encrypt_vector(bfv_public, [])
    with pytest.raises(CryptoError):  # a BFV ciphertext in a CKKS sum
        he.sum_ciphertexts(ckks_public, [blob])
    with pytest.raises(EncodingError, match="finite"):
        he.encrypt_vector(ckks_public, [math.inf])
    odd = bytes(ts.ckks_vector(ckks_public, [1.0] * CKKS_SLOTS, 2.0**45).serialize())
    with pytest.raises(VerificationError, match="encrypt_vector"):
        he.sum_ciphertexts(ckks_public, [odd])


def test_public_context_cannot_decrypt(bfv_public: object) -> None:
    blob = he.encrypt_vector(bfv_public, [1, 2])
    with pytest.raises(EncodingError, match="secret key"):
        he.decrypt_vector(bfv_public, blob, 2)
