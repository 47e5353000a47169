"""crypto.kdf: HKDF-SHA256 as RFC 5869 specifies it, one independent key per label, and keyed
digests whose part encoding cannot be forged by moving a boundary."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from crypto import kdf
from crypto.errors import EncodingError

VECTORS = json.loads(
    (Path(__file__).parents[1] / "vectors" / "kdf" / "hkdf-sha256.json").read_text("utf-8")
)
CONSENT = kdf.label("zonex/v1/consent-digest")
PSEUDONYM = kdf.label("zonex/v1/pseudonym")

secrets_ = st.binary(min_size=32, max_size=64)
parts_ = st.lists(st.binary(max_size=12), max_size=5)
labels_ = st.from_regex(
    r"zonex/v[1-9][0-9]{0,2}/[a-z0-9]{1,8}(-[a-z0-9]{1,8}){0,2}", fullmatch=True
)


def _hkdf_reference(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 section 2 written out with hmac, independent of the module under test."""
    prk = hmac.new(salt or bytes(32), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm, counter = okm + block, counter + 1
    return okm[:length]


def _decode_parts(data: bytes) -> list[bytes]:
    """The inverse of encode_parts: if it exists, the encoding is injective."""
    parts, i = [], 0
    while i < len(data):
        n = int.from_bytes(data[i : i + 8], "big")
        parts.append(data[i + 8 : i + 8 + n])
        i += 8 + n
    assert i == len(data)
    return parts


# -- vectors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", VECTORS["rfc5869_sha256"], ids=lambda c: c["name"])
def test_hkdf_reproduces_rfc_5869(case: dict[str, Any]) -> None:
    args = (bytes.fromhex(case["ikm"]), bytes.fromhex(case["salt"]), bytes.fromhex(case["info"]))
    assert kdf._hkdf_sha256(*args, case["length"]).hex() == case["okm"]
    assert _hkdf_reference(*args, case["length"]).hex() == case["okm"]


def test_zonex_keys_and_digests_match_the_vectors() -> None:
    zonex = VECTORS["zonex"]
    secret = bytes.fromhex(zonex["secret"])
    for name, key in zonex["keys"].items():
        assert kdf.derive_key(secret, kdf.label(name)).hex() == key
        assert _hkdf_reference(secret, b"", name.encode(), 32).hex() == key
    for case in zonex["digests"]:
        key = bytes.fromhex(zonex["keys"][case["label"]])
        parts = [p.encode() for p in case["parts_utf8"]]
        assert kdf.keyed_digest(key, *parts).hex() == case["digest"]
        assert kdf.DigestKey(key).hexdigest(*parts) == case["digest"]
    # the vectors hold the boundary-moving pair and they differ
    by_parts = {tuple(c["parts_utf8"]): c["digest"] for c in zonex["digests"]}
    assert by_parts[("ab", "c")] != by_parts[("a", "bc")]
    assert by_parts[()] != by_parts[("",)]


# -- properties -------------------------------------------------------------------------------


@given(parts_)
def test_the_part_encoding_round_trips(parts: list[bytes]) -> None:
    assert _decode_parts(kdf.encode_parts(*parts)) == parts


@given(parts_, parts_, secrets_)
def test_different_parts_never_share_a_digest(
    a: list[bytes], b: list[bytes], secret: bytes
) -> None:
    key = kdf.derive_key(secret, PSEUDONYM)
    assert (kdf.encode_parts(*a) == kdf.encode_parts(*b)) == (a == b)
    assert (kdf.keyed_digest(key, *a) == kdf.keyed_digest(key, *b)) == (a == b)


@given(st.binary(max_size=16), st.binary(max_size=16), st.integers(0, 16), secrets_)
def test_moving_a_boundary_changes_the_digest(x: bytes, y: bytes, cut: int, secret: bytes) -> None:
    """("ab", "c") != ("a", "bc"): the same bytes split elsewhere are another message, and no
    separator byte inside a part (the old 0x00 join) can pass for a boundary."""
    whole = x + y
    cut = min(cut, len(whole))
    key = kdf.derive_key(secret, PSEUDONYM)
    other = (whole[:cut], whole[cut:])
    if other != (x, y):
        assert kdf.keyed_digest(key, x, y) != kdf.keyed_digest(key, *other)
    assert kdf.keyed_digest(key, x + b"\x00" + y) != kdf.keyed_digest(key, x, y)


@given(secrets_, labels_, labels_, parts_)
def test_each_label_has_its_own_key(secret: bytes, a: str, b: str, parts: list[bytes]) -> None:
    ka, kb = kdf.derive_key(secret, kdf.label(a)), kdf.derive_key(secret, kdf.label(b))
    assert len(ka) == kdf.KEY_BYTES
    assert (ka == kb) == (a == b)
    assert ka != secret[: kdf.KEY_BYTES]
    if a != b:
        assert kdf.keyed_digest(ka, *parts) != kdf.keyed_digest(kb, *parts)
    # neither key is the other's digest of anything a caller could name through it
    assert kdf.keyed_digest(ka, *parts) != hmac.new(secret, b"".join(parts), "sha256").digest()


@given(secrets_, secrets_)
def test_each_secret_has_its_own_keys(s1: bytes, s2: bytes) -> None:
    assert (kdf.derive_key(s1, CONSENT) == kdf.derive_key(s2, CONSENT)) == (s1 == s2)


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "pseudonym",
        "zonex/pseudonym",
        "zonex/v0/pseudonym",
        "zonex/v01/pseudonym",
        "zonex/v1/",
        "zonex/v1/Pseudonym",
        "zonex/v1/pseudo nym",
        "zonex/v1/pseudonym-",
        "zonex/v1/-pseudonym",
        "zonex/v1/pseudonym\n",
        "zonex/v1/pseudonym/x",
        "zonex/v1/psеudonym",  # a Cyrillic е
    ],
)
def test_unversioned_or_malformed_labels_are_refused(text: str) -> None:
    with pytest.raises(EncodingError, match="label"):
        kdf.label(text)
    with pytest.raises(EncodingError, match="label"):
        kdf.derive_key(bytes(32), kdf.Label(text.encode("utf-8")))


def test_short_secrets_and_keys_are_refused() -> None:
    with pytest.raises(EncodingError, match="at least 32"):
        kdf.derive_key(bytes(31), CONSENT)
    for key in (b"", bytes(31), bytes(33), bytes(64)):
        with pytest.raises(EncodingError, match="32 bytes"):
            kdf.DigestKey(key)
    key = kdf.derive_key(bytes(32), CONSENT)
    assert key.hex() not in repr(kdf.DigestKey(key))
