"""ECDH-PSI over ristretto255 (RFC 9496), hashing with RFC 9380 ``hash_to_ristretto255``.

An independent pure-Python model of ristretto255 (RFC 9496 section 4: decoding, encoding and
the one-way map, over affine edwards25519 arithmetic) recomputes hashing and blinding and
builds hostile encodings of every kind RFC 9496 refuses: non-canonical field elements,
negative ``s``, non-square ``x²``, negative ``xy``, ``y = 0``. Published vectors (RFC 9380
appendix K.3 for ``expand_message_xmd``, RFC 9496 appendix A for the group) pin both the model
and :mod:`crypto.psi`; the pinned PSI values hold the wire format still.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rbcl import crypto_core_ristretto255_from_hash, crypto_scalarmult_ristretto255_base

import crypto.psi as psi
from crypto.errors import EncodingError, VerificationError
from crypto.psi import (
    GROUP_ORDER,
    POINT_BYTES,
    PsiKey,
    blind,
    expand_message_xmd,
    hash_to_point,
    intersection_mask,
    intersection_size,
    reblind,
    session_domain,
    shuffled,
    validate_point,
)

ROOT = Path(__file__).resolve().parents[2]

# -- a reference model of ristretto255 ----------------------------------------------------------

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
D = (-121665 * pow(121666, -1, P)) % P
IDENTITY = (0, 1)
Point = tuple[int, int]  # affine (x, y) on -x² + y² = 1 + d·x²·y²


def is_negative(v: int) -> bool:
    return v % P & 1 == 1


def ct_abs(v: int) -> int:
    return (-v) % P if is_negative(v) else v % P


def sqrt_ratio_m1(u: int, v: int) -> tuple[bool, int]:
    """RFC 9496 section 4.2: (whether u/v is square, the non-negative root of u/v or i·u/v)."""
    r = u * pow(v, 3, P) * pow(u * pow(v, 7, P), (P - 5) // 8, P) % P
    check = v * r * r % P
    correct = check == u % P
    flipped = check == (-u) % P
    flipped_i = check == (-u * SQRT_M1) % P
    if flipped or flipped_i:
        r = r * SQRT_M1 % P
    return correct or flipped, ct_abs(r)


SQRT_M1 = pow(2, (P - 1) // 4, P)
# RFC 9496 section 4.1 fixes these roots, signs included
SQRT_AD_MINUS_ONE = 25063068953384623474111414158702152701244531502492656460079210482610430750235
INVSQRT_A_MINUS_D = 54469307008909316920995813868745141605393597292927456921205312896311721017578
ONE_MINUS_D_SQ = (1 - D * D) % P
D_MINUS_ONE_SQ = (D - 1) * (D - 1) % P


def ref_add(p: Point, q: Point) -> Point:
    (x1, y1), (x2, y2) = p, q
    t = D * x1 * x2 * y1 * y2 % P
    return (
        (x1 * y2 + x2 * y1) * pow(1 + t, -1, P) % P,
        (y1 * y2 + x1 * x2) * pow(1 - t, -1, P) % P,
    )


def ref_mul(k: int, pt: Point) -> Point:
    out = IDENTITY
    while k:
        if k & 1:
            out = ref_add(out, pt)
        pt = ref_add(pt, pt)
        k >>= 1
    return out


def ref_decode(b: bytes) -> Point | None:
    """RFC 9496 section 4.3.1, or None where it fails."""
    s = int.from_bytes(b, "little")
    if len(b) != 32 or s >= P or is_negative(s):
        return None
    ss = s * s % P
    u1, u2 = (1 - ss) % P, (1 + ss) % P
    u2_sqr = u2 * u2 % P
    v = (-(D * u1 * u1) - u2_sqr) % P
    was_square, invsqrt = sqrt_ratio_m1(1, v * u2_sqr % P)
    den_x = invsqrt * u2 % P
    den_y = invsqrt * den_x * v % P
    x = ct_abs(2 * s * den_x)
    y = u1 * den_y % P
    if not was_square or is_negative(x * y) or y == 0:
        return None
    return (x, y)


def ref_encode(pt: Point) -> bytes:
    """RFC 9496 section 4.3.2 with Z = 1, T = x·y."""
    x0, y0 = pt
    z0, t0 = 1, x0 * y0 % P
    u1 = (z0 + y0) * (z0 - y0) % P
    u2 = x0 * y0 % P
    _, invsqrt = sqrt_ratio_m1(1, u1 * u2 * u2 % P)
    den1, den2 = invsqrt * u1 % P, invsqrt * u2 % P
    z_inv = den1 * den2 * t0 % P
    if is_negative(t0 * z_inv):
        x, y, den_inv = y0 * SQRT_M1 % P, x0 * SQRT_M1 % P, den1 * INVSQRT_A_MINUS_D % P
    else:
        x, y, den_inv = x0, y0, den2
    if is_negative(x * z_inv):
        y = (-y) % P
    return ct_abs(den_inv * (z0 - y)).to_bytes(32, "little")


def ref_map(b: bytes) -> Point:
    """RFC 9496 section 4.3.4's MAP, to affine coordinates."""
    t = (int.from_bytes(b, "little") & ((1 << 255) - 1)) % P
    r = SQRT_M1 * t * t % P
    u = (r + 1) * ONE_MINUS_D_SQ % P
    v = (-1 - r * D) * (r + D) % P
    was_square, s = sqrt_ratio_m1(u, v)
    c = (-1) % P
    if not was_square:
        s, c = (-ct_abs(s * t)) % P, r
    n = (c * (r - 1) * D_MINUS_ONE_SQ - v) % P
    w0, w1 = 2 * s * v % P, n * SQRT_AD_MINUS_ONE % P
    w2, w3 = (1 - s * s) % P, (1 + s * s) % P
    z_inv = pow(w1 * w3, -1, P)
    return (w0 * w3 * z_inv % P, w2 * w1 * z_inv % P)


def ref_from_hash(h: bytes) -> Point:
    return ref_add(ref_map(h[:32]), ref_map(h[32:]))


def ref_expand(msg: bytes, dst: bytes, n: int) -> bytes:
    """RFC 9380 section 5.3.1, written out independently of crypto.psi."""
    if len(dst) > 255:
        dst = hashlib.sha512(b"H2C-OVERSIZE-DST-" + dst).digest()
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(bytes(128) + msg + n.to_bytes(2, "big") + b"\x00" + dst_prime).digest()
    blocks = [hashlib.sha512(b0 + b"\x01" + dst_prime).digest()]
    while len(blocks) * 64 < n:
        mixed = bytes(a ^ b for a, b in zip(b0, blocks[-1], strict=True))
        blocks.append(hashlib.sha512(mixed + bytes([len(blocks) + 1]) + dst_prime).digest())
    return b"".join(blocks)[:n]


def ref_hash_to_point(domain: bytes, item: bytes) -> Point:
    return ref_from_hash(ref_expand(item, domain, 64))


#: RFC 9496 appendix A.1: the first multiples of the generator
GENERATOR_MULTIPLES = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "e2f2ae0a6abc4e71a884a961c500515f58e30b6aa582dd8db6a65945e08d2d76",
    "6a493210f7499cd17fecb510ae0cea23a110e8d5b901f8acadd3095c73a3b919",
    "94741f5d5d52755ece4f23f044ee27d5d1ea1e2bd196b462166b16152a9d0259",
]
BASE = ref_decode(bytes.fromhex(GENERATOR_MULTIPLES[1]))
#: the points of order dividing 4: adding one does not change a ristretto255 element
FOUR_TORSION = [(0, 1), (0, P - 1), (SQRT_M1, 0), (P - SQRT_M1, 0)]

# -- helpers ------------------------------------------------------------------------------------

DOMAIN = session_domain("test-session", "ids")


def key(k: int) -> PsiKey:
    return PsiKey.from_bytes(k.to_bytes(32, "little"))


def items(n: int, prefix: str = "id") -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def valid_points(n: int) -> list[bytes]:
    return [hash_to_point(DOMAIN, x) for x in items(n, "pt")]


def find_encoding(reason: Callable[[int], bool]) -> bytes:
    """The first even s < p, counting from 2, that decodes to nothing and meets ``reason``."""
    for s in range(2, 10_000, 2):
        enc = s.to_bytes(32, "little")
        if ref_decode(enc) is None and reason(s):
            return enc
    raise AssertionError("no such encoding")


def _decode_parts(s: int) -> tuple[bool, int, int]:
    ss = s * s % P
    u1, u2 = (1 - ss) % P, (1 + ss) % P
    v = (-(D * u1 * u1) - u2 * u2) % P
    was_square, invsqrt = sqrt_ratio_m1(1, v * u2 * u2 % P)
    den_x = invsqrt * u2 % P
    x = ct_abs(2 * s * den_x)
    y = u1 * (invsqrt * den_x * v) % P
    return was_square, x, y


NON_SQUARE = find_encoding(lambda s: not _decode_parts(s)[0])
NEGATIVE_XY = find_encoding(
    lambda s: _decode_parts(s)[0] and is_negative(_decode_parts(s)[1] * _decode_parts(s)[2])
)
Y_ZERO = (P - 1).to_bytes(32, "little")  # s = -1: u1 = 0, so y = 0

# -- published vectors --------------------------------------------------------------------------

XMD_DST = b"QUUX-V01-CS02-with-expander-SHA512-256"
XMD_VECTORS = [  # RFC 9380 appendix K.3
    (b"", 0x20, "6b9a7312411d92f921c6f68ca0b6380730a1a4d982c507211a90964c394179ba"),
    (b"abc", 0x20, "0da749f12fbe5483eb066a5f595055679b976e93abe9be6f0f6318bce7aca8dc"),
    (
        b"abcdef0123456789",
        0x20,
        "087e45a86e2939ee8b91100af1583c4938e0f5fc6c9db4b107b83346bc967f58",
    ),
    (
        b"",
        0x80,
        "41b037d1734a5f8df225dd8c7de38f851efdb45c372887be655212d07251b921"
        "b052b62eaed99b46f72f2ef4cc96bfaf254ebbbec091e1a3b9e4fb5e5b619d2e"
        "0c5414800a1d882b62bb5cd1778f098b8eb6cb399d5d9d18f5d5842cf5d13d7e"
        "b00a7cff859b605da678b318bd0e65ebff70bec88c753b159a805d2c89c55961",
    ),
]
FROM_HASH_VECTORS = [  # RFC 9496 appendix A.3: from_hash(SHA-512(label))
    (
        "Ristretto is traditionally a short shot of espresso coffee",
        "3066f82a1a747d45120d1740f14358531a8f04bbffe6a819f86dfe50f44a0a46",
    ),
    (
        "made with the normal amount of ground coffee but extracted with",
        "f26e5b6f7d362d2d2a94c5d0e7602cb4773c95a2e5c31a64f133189fa76ed61b",
    ),
    (
        "about half the amount of water in the same amount of time",
        "006ccd2a9e6867e6a2c5cea83d3302cc9de128dd2a9a57dd8ee7b9d7ffe02826",
    ),
    (
        "by using a finer grind.",
        "f8f0c87cf237953c5890aec3998169005dae3eca1fbb04548c635953c817f92a",
    ),
    (
        "This produces a concentrated shot of coffee per volume.",
        "ae81e7dedf20a497e10c304a765c1767a42d6e06029758d2d7e8ef7cc4c41179",
    ),
    (
        "Just pulling a normal shot short will produce a weaker shot",
        "e2705652ff9f5e44d3e841bf1c251cf7dddb77d140870d1ab2ed64f1a9ce8628",
    ),
    (
        "and is not a Ristretto as some believe.",
        "80bd07262511cdde4863f8a7434cef696750681cb9510eea557088f76d9e5065",
    ),
]


@pytest.mark.parametrize(("msg", "length", "expected"), XMD_VECTORS)
def test_expand_message_xmd_vectors(msg: bytes, length: int, expected: str) -> None:
    assert expand_message_xmd(msg, XMD_DST, length).hex() == expected
    assert ref_expand(msg, XMD_DST, length).hex() == expected


def test_expand_message_xmd_refuses_bad_lengths() -> None:
    for n in (0, 255 * 64 + 1):
        with pytest.raises(ValueError, match="length"):
            expand_message_xmd(b"x", XMD_DST, n)
    with pytest.raises(EncodingError):
        expand_message_xmd(b"x", b"", 64)


@pytest.mark.parametrize(("label", "expected"), FROM_HASH_VECTORS)
def test_one_way_map_vectors(label: str, expected: str) -> None:
    h = hashlib.sha512(label.encode()).digest()
    assert crypto_core_ristretto255_from_hash(h).hex() == expected
    assert ref_encode(ref_from_hash(h)).hex() == expected


def test_generator_multiples() -> None:
    assert BASE is not None
    for k, expected in enumerate(GENERATOR_MULTIPLES):
        assert ref_encode(ref_mul(k, BASE)).hex() == expected
        if k:
            assert crypto_scalarmult_ristretto255_base(k.to_bytes(32, "little")).hex() == expected
            assert ref_decode(bytes.fromhex(expected)) is not None
    assert ref_encode(ref_mul(L, BASE)) == bytes(32)


def test_reference_constants() -> None:
    assert SQRT_M1 * SQRT_M1 % P == P - 1
    assert SQRT_AD_MINUS_ONE * SQRT_AD_MINUS_ONE % P == (-D - 1) % P
    assert INVSQRT_A_MINUS_D * INVSQRT_A_MINUS_D * (-1 - D) % P == 1


def test_encoding_forgets_the_four_torsion() -> None:
    for p in valid_points(5):
        pt = ref_decode(p)
        assert pt is not None
        for t in FOUR_TORSION:
            assert ref_encode(ref_add(pt, t)) == p


# -- hashing ------------------------------------------------------------------------------------

PINNED_HASHES = {
    b"": "222482f762c635863c4d49fe65ee6239cc8a31c147fab638dbe2c22b8acb4416",
    b"alice": "ea8ce01ede6e7525524bf0444ee5aa33a1a710d141b8e2fe5e0d28afaab2743b",
    bytes(64): "b6da273478c9904707a49371b899c2692046258ee09f5b5c13d5c4d354034a67",
}
PINNED_KEY = bytes.fromhex("0b" * 31 + "00")
PINNED_BLIND_ALICE = "1a67eb8619bbab87ed8d37f65f1365afee486da955e482ea38ec7ff35ac15461"


def test_session_domain_layout() -> None:
    assert session_domain("kat-session", "ids") == b"zonex-psi-v2\x0bkat-session\x03ids"
    assert session_domain(b"kat-session", "ids") == session_domain("kat-session", "ids")


@pytest.mark.parametrize(
    ("item", "expected"), list(PINNED_HASHES.items()), ids=["empty", "alice", "zeros64"]
)
def test_hash_to_point_pinned(item: bytes, expected: str) -> None:
    domain = session_domain("kat-session", "ids")
    assert hash_to_point(domain, item).hex() == expected
    assert ref_encode(ref_hash_to_point(domain, item)) == bytes.fromhex(expected)


def test_blind_pinned() -> None:
    domain = session_domain("kat-session", "ids")
    assert blind(PsiKey.from_bytes(PINNED_KEY), domain, [b"alice"])[0].hex() == PINNED_BLIND_ALICE
    h = ref_decode(bytes.fromhex(PINNED_HASHES[b"alice"]))
    assert h is not None
    k = int.from_bytes(PINNED_KEY, "little")
    assert ref_encode(ref_mul(k, h)).hex() == PINNED_BLIND_ALICE


@settings(max_examples=25, deadline=None)
@given(item=st.binary(max_size=80), session=st.binary(min_size=1, max_size=40))
def test_hash_to_point_matches_reference(item: bytes, session: bytes) -> None:
    domain = session_domain(session, "ids")
    point = hash_to_point(domain, item)
    assert point == ref_encode(ref_hash_to_point(domain, item))
    validate_point(point)
    assert point == crypto_core_ristretto255_from_hash(expand_message_xmd(item, domain, 64))
    decoded = ref_decode(point)
    assert decoded is not None and decoded != IDENTITY
    assert ref_encode(ref_mul(L, decoded)) == bytes(32)


def test_domains_give_unrelated_points() -> None:
    xs = items(200)
    domains = [
        session_domain("s1", "ids"),
        session_domain("s2", "ids"),
        session_domain("s1", "phones"),
        session_domain("s1i", "ds"),  # the same bytes as s1 || ids without the length prefixes
    ]
    assert len(set(domains)) == len(domains)
    sets = [{hash_to_point(d, x) for x in xs} for d in domains]
    assert all(len(s) == len(xs) for s in sets)
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            assert not sets[i] & sets[j]


def test_session_domain_refuses_bad_input() -> None:
    with pytest.raises(EncodingError):
        session_domain("", "ids")
    with pytest.raises(EncodingError):
        session_domain(b"", "ids")
    with pytest.raises(EncodingError):
        session_domain("x" * 256, "ids")
    with pytest.raises(EncodingError):
        session_domain("s", "l" * 256)
    with pytest.raises(EncodingError):
        session_domain("\ud800", "ids")
    assert session_domain("x" * 255, "l" * 255)


def test_hash_to_point_refuses_bad_domain() -> None:
    with pytest.raises(EncodingError):
        hash_to_point(b"", b"x")
    with pytest.raises(EncodingError):
        hash_to_point("text", b"x")  # type: ignore[arg-type]
    with pytest.raises(EncodingError):
        blind(PsiKey.generate(), b"", [b"x"])


def test_long_domains_are_shortened_as_rfc_9380_says() -> None:
    long = session_domain("s" * 255, "l" * 255)
    assert len(long) > 255
    expected = ref_encode(ref_hash_to_point(long, b"alice"))
    assert hash_to_point(long, b"alice") == expected
    shortened = hashlib.sha512(b"H2C-OVERSIZE-DST-" + long).digest()
    assert hash_to_point(shortened, b"alice") == expected
    assert blind(key(1), long, [b"alice"]) == [expected]


# -- keys ---------------------------------------------------------------------------------------


def test_key_round_trip_and_range() -> None:
    keys = [PsiKey.generate() for _ in range(50)]
    assert len({k.to_bytes() for k in keys}) == 50
    for k in keys:
        assert 0 < int.from_bytes(k.to_bytes(), "little") < L
        assert PsiKey.from_bytes(k.to_bytes()).to_bytes() == k.to_bytes()
    assert key(1).to_bytes() == (1).to_bytes(32, "little")
    assert key(L - 1).to_bytes() == (L - 1).to_bytes(32, "little")


@pytest.mark.parametrize(
    "raw",
    [
        bytes(32),
        L.to_bytes(32, "little"),
        (L + 1).to_bytes(32, "little"),
        (2 * L).to_bytes(32, "little"),
        b"\xff" * 32,
        bytes(31) + b"\x80",  # 2**255: below ℓ once the top bit is masked away
        b"\x01" * 31,
        b"\x01" * 33,
        b"",
    ],
    ids=["zero", "order", "order+1", "2*order", "all-ff", "top-bit", "short", "long", "empty"],
)
def test_key_from_bytes_refuses(raw: bytes) -> None:
    with pytest.raises(EncodingError):
        PsiKey.from_bytes(raw)


def test_key_from_bytes_refuses_non_bytes() -> None:
    with pytest.raises(EncodingError):
        PsiKey.from_bytes(bytearray(key(5).to_bytes()))  # type: ignore[arg-type]


def test_key_repr_hides_secret() -> None:
    k = PsiKey.generate()
    secret = k.to_bytes()
    for text in (repr(k), str(k), f"{k!r} {k}"):
        assert secret.hex() not in text
        assert repr(secret) not in text
        assert str(int.from_bytes(secret, "little")) not in text
    assert repr(k) == "PsiKey(<secret>)"


# -- blinding -----------------------------------------------------------------------------------


def test_commutative_for_many_items() -> None:
    a, b = PsiKey.generate(), PsiKey.generate()
    xs = items(300)
    ab = reblind(b, blind(a, DOMAIN, xs))
    ba = reblind(a, blind(b, DOMAIN, xs))
    assert ab == ba
    assert len(set(ab)) == len(xs)


@settings(max_examples=30, deadline=None)
@given(
    a=st.integers(1, L - 1),
    b=st.integers(1, L - 1),
    xs=st.lists(st.binary(max_size=40), max_size=8),
)
def test_commutative_property(a: int, b: int, xs: list[bytes]) -> None:
    ka, kb = key(a), key(b)
    assert reblind(kb, blind(ka, DOMAIN, xs)) == reblind(ka, blind(kb, DOMAIN, xs))
    # and both equal (a·b)·H(x), computed in one step
    ab = key(a * b % L)
    assert reblind(kb, blind(ka, DOMAIN, xs)) == blind(ab, DOMAIN, xs)


def test_blind_matches_reference() -> None:
    k = PsiKey.generate()
    scalar = int.from_bytes(k.to_bytes(), "little")
    xs = [b"", b"alice", b"bob", os.urandom(100)]
    for x, point in zip(xs, blind(k, DOMAIN, xs), strict=True):
        assert point == ref_encode(ref_mul(scalar, ref_hash_to_point(DOMAIN, x)))
        validate_point(point)


def test_blind_keeps_order_and_equality() -> None:
    k = PsiKey.generate()
    xs = [b"b", b"a", b"b", b"c"]
    out = blind(k, DOMAIN, xs)
    assert out == [blind(k, DOMAIN, [x])[0] for x in xs]
    assert out[0] == out[2]
    assert len({out[0], out[1], out[3]}) == 3
    assert blind(k, DOMAIN, []) == []
    assert reblind(k, []) == []


def test_keys_give_unrelated_points() -> None:
    xs = items(100)
    first = set(blind(PsiKey.generate(), DOMAIN, xs))
    second = set(blind(PsiKey.generate(), DOMAIN, xs))
    assert not first & second
    assert not first & {hash_to_point(DOMAIN, x) for x in xs}


def test_reblind_accepts_bytes_subclasses_only_as_bytes() -> None:
    k = PsiKey.generate()
    p = valid_points(1)[0]
    with pytest.raises(VerificationError, match="point 0 is not bytes"):
        reblind(k, [bytearray(p)])  # type: ignore[list-item]


# -- hostile points -----------------------------------------------------------------------------


def _bad_points() -> list[tuple[str, bytes, str]]:
    base = valid_points(1)[0]
    invalid = "is not a valid ristretto255 encoding"
    cases: list[tuple[str, bytes, str]] = [
        ("empty", b"", "is not 32 bytes"),
        ("short", base[:31], "is not 32 bytes"),
        ("long", base + b"\x00", "is not 32 bytes"),
        ("identity", bytes(32), "is the identity"),
        ("all-ff", b"\xff" * 32, invalid),
        ("s-is-p", P.to_bytes(32, "little"), invalid),
        ("s-is-p-plus-2", (P + 2).to_bytes(32, "little"), invalid),
        ("top-bit", (int.from_bytes(base, "little") | 1 << 255).to_bytes(32, "little"), invalid),
        ("negative-s", (P - int.from_bytes(base, "little")).to_bytes(32, "little"), invalid),
        ("s-is-one", (1).to_bytes(32, "little"), invalid),
        ("non-square", NON_SQUARE, invalid),
        ("negative-xy", NEGATIVE_XY, invalid),
        ("y-zero", Y_ZERO, invalid),
    ]
    # an edwards25519 encoding of the same group element is not its ristretto255 encoding
    pt = ref_decode(base)
    assert pt is not None
    edwards = (pt[1] | (pt[0] & 1) << 255).to_bytes(32, "little")
    if ref_decode(edwards) is None:
        cases.append(("edwards-encoding", edwards, invalid))
    return cases


BAD_POINTS = _bad_points()


@pytest.mark.parametrize(
    ("point", "reason"), [(p, r) for _, p, r in BAD_POINTS], ids=[n for n, _, _ in BAD_POINTS]
)
def test_reblind_refuses_bad_point(point: bytes, reason: str) -> None:
    good = valid_points(4)
    with pytest.raises(VerificationError, match=rf"^point 2 {reason}"):
        reblind(PsiKey.generate(), [*good[:2], point, *good[2:]])
    with pytest.raises(VerificationError, match=rf"^point {reason}"):
        validate_point(point)


def test_reference_agrees_on_hostile_points() -> None:
    for name, point, _ in BAD_POINTS:
        decoded = ref_decode(point) if len(point) == 32 else None
        assert decoded is None or decoded == IDENTITY, name


def test_random_bytes_are_checked() -> None:
    k = PsiKey.generate()
    scalar = int.from_bytes(k.to_bytes(), "little")
    accepted = refused = 0
    for _ in range(64):
        candidate = secrets.token_bytes(32)
        decoded = ref_decode(candidate)
        if decoded is not None and decoded != IDENTITY:  # about one in 16 random strings
            accepted += 1
            assert reblind(k, [candidate]) == [ref_encode(ref_mul(scalar, decoded))]
            validate_point(candidate)
        else:
            refused += 1
            with pytest.raises(VerificationError, match=r"^point 0 "):
                reblind(k, [candidate])
    assert refused > 32


def test_reblind_names_the_first_bad_point() -> None:
    good = valid_points(6)
    bad = [*good[:1], b"\x00" * 32, *good[1:3], b"short", *good[3:]]
    with pytest.raises(VerificationError, match=r"^point 1 is the identity"):
        reblind(PsiKey.generate(), bad)


def test_validate_point_accepts_group_elements() -> None:
    for p in valid_points(20):
        validate_point(p)
    for p in blind(PsiKey.generate(), DOMAIN, items(20)):
        validate_point(p)


# -- the protocol, end to end -------------------------------------------------------------------


def run_join(
    xs: Sequence[bytes], rows: Sequence[tuple[bytes, int]], session: str = "join-1"
) -> tuple[int, list[bool], int]:
    """DESIGN.md's private join between consumer C (ids ``xs``), provider P (``rows``) and the
    exchange E; returns what E computes (|X∩Y| and the sum of matched values) and what C
    learns in the members variant (which of its ids are in Y)."""
    domain = session_domain(session, "ids")
    # C, sending its ids in a secret order that it keeps
    c = PsiKey.generate()
    perm = shuffled(range(len(xs)))
    a = blind(c, domain, [xs[i] for i in perm])
    c_saved = c.to_bytes()
    # P
    p = PsiKey.generate()
    a_p = reblind(p, a)  # to E (and to C in the members variant)
    order = shuffled(range(len(rows)))
    b = blind(p, domain, [rows[i][0] for i in order])  # to C
    values = [rows[i][1] for i in order]  # to E, encrypted under C's key in the real protocol
    # C, later
    b_c = reblind(PsiKey.from_bytes(c_saved), b)  # to E
    # E
    mask = intersection_mask(a_p, b_c)
    size = intersection_size(a_p, b_c)
    total = sum(v for v, m in zip(values, mask, strict=True) if m)
    # C, members variant: answers in its secret order, mapped back
    members = [False] * len(xs)
    for i, found in zip(perm, intersection_mask(b_c, a_p), strict=True):
        members[i] = found
    return size, members, total


JOIN_CASES = {
    "both-empty": ([], []),
    "consumer-empty": ([], [("a", 1), ("b", 2)]),
    "provider-empty": (["a", "b"], []),
    "no-overlap": (["a", "b", "c"], [("x", 1), ("y", 2)]),
    "full-overlap": (["a", "b", "c"], [("c", 3), ("a", 1), ("b", 2)]),
    "partial": (["a", "b", "c", "d"], [("b", 10), ("d", 20), ("e", 40)]),
    "provider-duplicates": (["a", "b"], [("a", 1), ("a", 2), ("b", 4), ("z", 8)]),
    "consumer-duplicates": (["a", "a", "b"], [("a", 1), ("c", 2)]),
    "single": (["a"], [("a", 7)]),
}


@pytest.mark.parametrize(("xs", "rows"), list(JOIN_CASES.values()), ids=list(JOIN_CASES))
def test_join(xs: list[str], rows: list[tuple[str, int]]) -> None:
    x = [s.encode() for s in xs]
    r = [(s.encode(), v) for s, v in rows]
    size, members, total = run_join(x, r)
    ys = {y for y, _ in r}
    assert size == len(set(x) & ys)
    assert members == [item in ys for item in x]
    assert total == sum(v for y, v in r if y in set(x))


@settings(max_examples=20, deadline=None)
@given(
    xs=st.lists(st.integers(0, 40), max_size=25),
    ys=st.lists(st.tuples(st.integers(0, 40), st.integers(0, 1000)), max_size=25),
)
def test_join_property(xs: list[int], ys: list[tuple[int, int]]) -> None:
    x = [str(i).encode() for i in xs]
    r = [(str(i).encode(), v) for i, v in ys]
    size, members, total = run_join(x, r)
    yset = {y for y, _ in r}
    assert size == len(set(x) & yset)
    assert members == [item in yset for item in x]
    assert total == sum(v for y, v in r if y in set(x))


def test_sessions_do_not_match_each_other() -> None:
    xs = items(50)
    c, p = PsiKey.generate(), PsiKey.generate()
    one = reblind(p, blind(c, session_domain("s1", "ids"), xs))
    two = reblind(c, blind(p, session_domain("s2", "ids"), xs))
    assert intersection_size(one, two) == 0


def test_intersection_duplicates() -> None:
    a = [b"1", b"2", b"2", b"3"]
    b = [b"2", b"4", b"2", b"1", b"5"]
    assert intersection_mask(a, b) == [True, False, True, True, False]
    assert intersection_size(a, b) == 2
    assert intersection_size(b, a) == 2
    assert intersection_mask(a, []) == []
    assert intersection_mask([], b) == [False] * 5
    assert intersection_size([], []) == 0


# -- shuffling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 10, 1000])
def test_shuffled_is_a_permutation(n: int) -> None:
    xs = list(range(n))
    out = shuffled(xs)
    assert sorted(out) == xs
    assert xs == list(range(n))  # the input is not touched
    assert sorted(shuffled(tuple(xs))) == xs


def test_shuffled_does_not_keep_order() -> None:
    xs = list(range(10))
    runs = [tuple(shuffled(xs)) for _ in range(200)]
    assert sum(r == tuple(xs) for r in runs) < 3
    assert len(set(runs)) > 190


def test_shuffled_reaches_every_permutation() -> None:
    seen = {tuple(shuffled("abc")) for _ in range(2000)}
    assert len(seen) == 6


def test_shuffled_uses_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    keys = [30, 10, 40, 20]

    def token_bytes(n: int) -> bytes:
        calls.append(n)
        return b"".join(k.to_bytes(8, "little") for k in keys)

    monkeypatch.setattr(psi.secrets, "token_bytes", token_bytes)
    assert shuffled(["a", "b", "c", "d"]) == ["b", "d", "a", "c"]  # ordered by key
    assert calls == [32]


def test_shuffled_draws_again_on_a_tie(monkeypatch: pytest.MonkeyPatch) -> None:
    draws = iter([[7, 7, 1], [3, 1, 2]])
    calls: list[int] = []

    def token_bytes(n: int) -> bytes:
        calls.append(n)
        return b"".join(k.to_bytes(8, "little") for k in next(draws))

    monkeypatch.setattr(psi.secrets, "token_bytes", token_bytes)
    assert shuffled("xyz") == ["y", "z", "x"]
    assert calls == [24, 24]


def test_shuffled_positions_are_uniform() -> None:
    n, runs = 5, 5000
    counts = [[0] * n for _ in range(n)]
    for _ in range(runs):
        for pos, item in enumerate(shuffled(range(n))):
            counts[item][pos] += 1
    expected = runs / n  # 1000 each; a binomial standard deviation of about 28
    assert all(abs(c - expected) < 150 for row in counts for c in row)


# -- parallel batches ---------------------------------------------------------------------------


def test_parallel_equals_serial_at_threshold() -> None:
    k = PsiKey.generate()
    xs = items(psi.PARALLEL_MIN_BATCH + 7)
    serial = blind(k, DOMAIN, xs, workers=1)
    parallel = blind(k, DOMAIN, xs, workers=2)
    assert parallel == serial
    k2 = PsiKey.generate()
    assert reblind(k2, serial, workers=2) == reblind(k2, serial, workers=1)


@pytest.mark.parametrize("workers", [2, 3, 8, None])
def test_parallel_equals_serial(monkeypatch: pytest.MonkeyPatch, workers: int | None) -> None:
    monkeypatch.setattr(psi, "PARALLEL_MIN_BATCH", 16)
    k, k2 = PsiKey.generate(), PsiKey.generate()
    xs = items(203)
    serial = blind(k, DOMAIN, xs, workers=1)
    assert blind(k, DOMAIN, xs, workers=workers) == serial
    assert reblind(k2, serial, workers=workers) == reblind(k2, serial, workers=1)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str) -> set[str]:
    """Record the names of the threads that run ``psi.<name>``."""
    threads: set[str] = set()
    original: Callable[..., list[bytes]] = getattr(psi, name)

    def spy(*args: object) -> list[bytes]:
        threads.add(threading.current_thread().name)
        return original(*args)

    monkeypatch.setattr(psi, name, spy)
    return threads


def test_big_batches_use_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psi, "PARALLEL_MIN_BATCH", 16)
    threads = _spy(monkeypatch, "_blind_chunk")
    blind(PsiKey.generate(), DOMAIN, items(64), workers=2)
    assert threads and all(t.startswith("psi") for t in threads)
    threads.clear()
    blind(PsiKey.generate(), DOMAIN, items(15), workers=2)
    assert threads == {threading.current_thread().name}
    threads.clear()
    blind(PsiKey.generate(), DOMAIN, items(64), workers=1)
    assert threads == {threading.current_thread().name}


def test_parallel_reblind_names_the_first_bad_point(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(psi, "PARALLEL_MIN_BATCH", 16)
    points = valid_points(200)
    points[190] = b"\x01" + bytes(31)
    points[37] = b"\xff" * 32
    with pytest.raises(VerificationError, match=r"^point 37 is not a valid ristretto255"):
        reblind(PsiKey.generate(), points, workers=4)


def test_workers_must_be_positive() -> None:
    with pytest.raises(ValueError, match="workers"):
        blind(PsiKey.generate(), DOMAIN, [b"x"], workers=0)
    with pytest.raises(ValueError, match="workers"):
        reblind(PsiKey.generate(), [], workers=-1)


def test_constants() -> None:
    assert POINT_BYTES == 32
    assert GROUP_ORDER == L
    assert psi.PARALLEL_MIN_BATCH >= 1


def test_import_leaves_no_copy_of_libsodium(tmp_path: Path) -> None:
    """rbcl writes its libsodium to a temporary file on import; crypto.psi removes it."""
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    code = "import crypto.psi as p; p.blind(p.PsiKey.generate(), b'd', [b'x'])"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=ROOT)
    assert list(tmp_path.iterdir()) == []


def test_blind_digests_are_the_points_digests() -> None:
    key = PsiKey.generate()
    items = [b"a", b"b", b"", b"a"]
    points = blind(key, DOMAIN, items)
    for size in (1, 12, 32):
        out = psi.blind_digests(key.to_bytes(), DOMAIN, items, size)
        assert out == b"".join(hashlib.sha256(p).digest()[:size] for p in points)
    assert psi.blind_digests(key.to_bytes(), DOMAIN, [], 12) == b""
    # another key or another domain: unrelated digests
    mine = psi.blind_digests(key.to_bytes(), DOMAIN, items, 12)
    assert psi.blind_digests(PsiKey.generate().to_bytes(), DOMAIN, items, 12)[:12] != mine[:12]
    assert psi.blind_digests(key.to_bytes(), b"other", items, 12)[:12] != mine[:12]
    with pytest.raises(ValueError, match="1 to 32 bytes"):
        psi.blind_digests(key.to_bytes(), DOMAIN, items, 33)
    # a scalar no PsiKey accepts is refused here too (zero, not below ℓ, not 32 bytes)
    for bad in (bytes(32), L.to_bytes(32, "little"), b"short"):
        with pytest.raises(EncodingError):
            psi.blind_digests(bad, DOMAIN, items, 12)


def test_helper_processes_compute_what_threads_do() -> None:
    key = PsiKey.generate()
    n = psi.PROCESS_MIN_BATCH + 1000
    items = [b"C%09d" % i for i in range(n)]
    scalar, dst_prime = key.to_bytes(), psi._dst_prime(DOMAIN)
    points = blind(key, DOMAIN, items, workers=2)
    assert not psi._helpers_failed and psi._helpers is not None  # they did the work
    # every 13th item computed here, on the calling thread: each slice, in its place
    assert len(points) == n
    assert points[::13] == psi._blind_chunk(scalar, dst_prime, items[::13])
    again = reblind(key, points, workers=2)
    assert len(again) == n and again[::13] == psi._reblind_chunk(scalar, points[::13], 0)
    digests = psi.blind_to_digests(key, DOMAIN, items, 12, workers=2)
    assert digests == b"".join(hashlib.sha256(p).digest()[:12] for p in points)
    assert psi.blind_to_digests(key, DOMAIN, items[:10], 12) == digests[:120]  # no helpers
    # a bad point in the second helper's slice is named by its index in the whole batch
    bad = list(points)
    bad[n - 5] = bytes([1]) + bytes(30) + bytes([0x80])  # the top bit set
    with pytest.raises(VerificationError, match=f"point {n - 5} is not a valid"):
        reblind(key, bad, workers=2)


def test_a_script_without_an_entry_point_guard_runs_once() -> None:
    """The helpers are not forks of the caller and do not import its main module: a script's
    top level runs once however many helpers blind for it."""
    code = (
        "import crypto.psi as p\n"
        "print('top level ran')\n"
        f"items = [b'%d' % i for i in range({psi.PROCESS_MIN_BATCH})]\n"
        "pts = p.blind(p.PsiKey.generate(), b'd', items, workers=2)\n"
        "assert p._helpers is not None and not p._helpers_failed\n"
        "print(len(pts))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["top", "level", "ran", str(psi.PROCESS_MIN_BATCH)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_does_not_share_its_parents_helpers() -> None:
    key = PsiKey.generate()
    items = [b"%d" % i for i in range(psi.PROCESS_MIN_BATCH)]
    expected = blind(key, DOMAIN, items, workers=2)
    parents = psi._helpers
    assert parents is not None
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its own helpers, the same points
        ok = psi._helpers is None and blind(key, DOMAIN, items, workers=2) == expected
        ok = ok and psi._helpers is not None and psi._helpers is not parents
        os.write(write, b"1" if ok else b"0")
        os._exit(0)
    os.close(write)
    assert os.read(read, 1) == b"1"
    os.waitpid(pid, 0)
    os.close(read)
    # the parent's helpers still answer it
    assert psi._helpers is parents and blind(key, DOMAIN, items, workers=2) == expected
