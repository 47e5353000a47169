"""ECDH-PSI over the prime-order subgroup of edwards25519.

An independent pure-Python model of edwards25519 (affine coordinates, RFC 8032 section 5.1
encoding, Elligator 2 as libsodium applies it) recomputes hashing and blinding, generates the
small-order points, and builds hostile points: non-canonical encodings, points off the curve,
points with a small-order component. The pinned values were computed by :mod:`crypto.psi` and
agree with that model; they hold the wire format still.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import threading
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crypto.psi as psi
from crypto.errors import EncodingError, VerificationError
from crypto.psi import (
    GROUP_ORDER,
    POINT_BYTES,
    PsiKey,
    blind,
    hash_to_point,
    intersection_mask,
    intersection_size,
    reblind,
    session_domain,
    shuffled,
    validate_point,
)

# -- a reference model of edwards25519 ----------------------------------------------------------

P = 2**255 - 19
L = 2**252 + 27742317777372353535851937790883648493
A = 486662  # Curve25519, the Montgomery form
D = (-121665 * pow(121666, -1, P)) % P
SQRT_M1 = pow(2, (P - 1) // 4, P)
IDENTITY = (0, 1)
Point = tuple[int, int]


def ref_recover_x(y: int, sign: int) -> int | None:
    """The x of the point with this y and x sign (RFC 8032 5.1.3), or None if there is none."""
    if y >= P:
        return None
    xx = (y * y - 1) * pow(D * y * y + 1, -1, P) % P
    if xx == 0:
        return None if sign else 0
    x = pow(xx, (P + 3) // 8, P)
    if (x * x - xx) % P:
        x = x * SQRT_M1 % P
    if (x * x - xx) % P:
        return None
    return P - x if (x & 1) != sign else x


def ref_decode(s: bytes) -> Point | None:
    v = int.from_bytes(s, "little")
    y, sign = v & ((1 << 255) - 1), v >> 255
    x = ref_recover_x(y, sign)
    return None if x is None else (x, y)


def ref_encode(pt: Point) -> bytes:
    x, y = pt
    return (y | ((x & 1) << 255)).to_bytes(32, "little")


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


def ref_from_uniform(r: bytes) -> Point:
    """libsodium's crypto_core_ed25519_from_uniform: Elligator 2, the top bit as the sign of x,
    then the cofactor."""
    v = int.from_bytes(r, "little")
    t = (v & ((1 << 255) - 1)) % P
    u = -A * pow(1 + 2 * t * t, -1, P) % P
    if pow((u * u * u + A * u * u + u) % P, (P - 1) // 2, P) == P - 1:
        u = (-u - A) % P
    y = (u - 1) * pow(u + 1, -1, P) % P
    x = ref_recover_x(y, v >> 255)
    assert x is not None
    return ref_mul(8, (x, y))


def ref_hash_to_point(domain: bytes, item: bytes) -> Point:
    h = hashlib.sha512(len(domain).to_bytes(2, "big") + domain + item).digest()
    return ref_add(ref_from_uniform(h[:32]), ref_from_uniform(h[32:]))


def ref_small_order_points() -> list[bytes]:
    """The eight points of order dividing 8, found as ℓ·Q for points Q on the curve."""
    for y in range(2, 1000):
        x = ref_recover_x(y, 0)
        if x is None:
            continue
        t = ref_mul(L, (x, y))
        if ref_mul(4, t) != IDENTITY:  # t has order 8 and generates them all
            points, acc = [], IDENTITY
            for _ in range(8):
                points.append(ref_encode(acc))
                acc = ref_add(acc, t)
            return points
    raise AssertionError("no point of order 8 found")


SMALL_ORDER_HEX = [  # libsodium's blocklist, canonical encodings
    "0100000000000000000000000000000000000000000000000000000000000000",  # order 1, identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
]
SMALL_ORDER = ref_small_order_points()

# -- helpers ------------------------------------------------------------------------------------

DOMAIN = session_domain("test-session", "ids")


def key(k: int) -> PsiKey:
    return PsiKey.from_bytes(k.to_bytes(32, "little"))


def items(n: int, prefix: str = "id") -> list[bytes]:
    return [f"{prefix}-{i}".encode() for i in range(n)]


def valid_points(n: int) -> list[bytes]:
    return [hash_to_point(DOMAIN, x) for x in items(n, "pt")]


def not_on_curve() -> bytes:
    for i in range(1000):
        candidate = hashlib.sha256(i.to_bytes(4, "big")).digest()
        y = int.from_bytes(candidate, "little") & ((1 << 255) - 1)
        if y < P and ref_recover_x(y, 0) is None:
            return candidate
    raise AssertionError("no off-curve encoding found")


def with_torsion(base: bytes, torsion: bytes) -> bytes:
    """``base`` plus a small-order point: on the curve, but not in the prime-order subgroup."""
    b, t = ref_decode(base), ref_decode(torsion)
    assert b is not None and t is not None
    return ref_encode(ref_add(b, t))


# -- hashing ------------------------------------------------------------------------------------

PINNED_HASHES = {
    b"": "fa88d07cdd33a5aff7ec99dabd7e9b5d56ecb4a6a5b18a0c4c9b9e38661db806",
    b"alice": "5bd4c537ab2ae3e57d44b19ce53d89edc4f9d4f8fca0a4fde28283a0642aef4a",
    bytes(64): "7c066b164ca9392e0bd8eb8d6c602cafa396537faaf766aed8bf26115ebbf1db",
}
PINNED_KEY = bytes.fromhex("0b" * 31 + "00")
PINNED_BLIND_ALICE = "78c95e48c8d55d8bd0a1d40f8eae1b9a47ef45657ca061c0be2acc7060b1dba5"


def test_session_domain_layout() -> None:
    assert session_domain("kat-session", "ids") == b"zonex-psi-v1\x0bkat-session\x03ids"
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
    decoded = ref_decode(point)
    assert decoded is not None and decoded != IDENTITY
    assert ref_mul(L, decoded) == IDENTITY


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
        hash_to_point(b"d" * 0x10000, b"x")
    with pytest.raises(EncodingError):
        blind(PsiKey.generate(), b"", [b"x"])


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


def test_small_order_list_is_complete() -> None:
    assert len(set(SMALL_ORDER)) == 8
    assert set(SMALL_ORDER) == {bytes.fromhex(h) for h in SMALL_ORDER_HEX}
    for enc in SMALL_ORDER:
        pt = ref_decode(enc)
        assert pt is not None and ref_mul(8, pt) == IDENTITY


def _bad_points() -> list[tuple[str, bytes, str]]:
    base = valid_points(1)[0]
    cases: list[tuple[str, bytes, str]] = [
        ("empty", b"", "is not 32 bytes"),
        ("short", base[:31], "is not 32 bytes"),
        ("long", base + b"\x00", "is not 32 bytes"),
        ("not-on-curve", not_on_curve(), "is not on the curve"),
        ("identity-negative-zero", bytes([1]) + bytes(30) + b"\x80", "has small order"),
        ("all-ff", b"\xff" * 32, "is not canonically encoded"),
    ]
    for i, h in enumerate(SMALL_ORDER_HEX):
        cases.append((f"small-order-{i}", bytes.fromhex(h), "has small order"))
    for i, enc in enumerate(SMALL_ORDER):
        cases.append((f"small-order-generated-{i}", enc, "has small order"))
    # y + p for every y < 19 (the only values with a second encoding), with either x sign
    for y in range(19):
        for sign in (0, 1):
            enc = ((y + P) | (sign << 255)).to_bytes(32, "little")
            cases.append((f"non-canonical-y{y}-s{sign}", enc, "is not canonically encoded"))
    for i, t in enumerate(SMALL_ORDER[1:], 1):
        cases.append(
            (f"torsion-component-{i}", with_torsion(base, t), "is not in the prime-order subgroup")
        )
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
        in_group = (
            decoded is not None
            and int.from_bytes(point, "little") & ((1 << 255) - 1) < P
            and decoded != IDENTITY
            and ref_mul(L, decoded) == IDENTITY
        )
        assert not in_group, name


def test_random_bytes_are_checked() -> None:
    k = PsiKey.generate()
    accepted = refused = 0
    for _ in range(64):
        candidate = secrets.token_bytes(32)
        decoded = ref_decode(candidate)
        in_group = (
            int.from_bytes(candidate, "little") & ((1 << 255) - 1) < P
            and decoded is not None
            and decoded != IDENTITY
            and ref_mul(L, decoded) == IDENTITY
        )
        if in_group:  # about one in 16: half decode, and one point in 8 is in the subgroup
            accepted += 1
            reblind(k, [candidate])
            validate_point(candidate)
        else:
            refused += 1
            with pytest.raises(VerificationError, match=r"^point 0 "):
                reblind(k, [candidate])
    assert refused > 32


def test_reblind_names_the_first_bad_point() -> None:
    good = valid_points(6)
    bad = [*good[:1], b"\x00" * 32, *good[1:3], b"short", *good[3:]]
    with pytest.raises(VerificationError, match=r"^point 1 has small order"):
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

    def randbelow(n: int) -> int:
        calls.append(n)
        return 0

    monkeypatch.setattr(psi.secrets, "randbelow", randbelow)
    assert shuffled([1, 2, 3, 4]) == [2, 3, 4, 1]
    assert calls == [4, 3, 2]


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
    with pytest.raises(VerificationError, match=r"^point 37 is not canonically encoded"):
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
