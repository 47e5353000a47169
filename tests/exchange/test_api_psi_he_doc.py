"""docs/api-psi-he.md is enough to write a client: the PSI session domain, the hash to the group
and the blinding are rebuilt here from the page's description alone (not from crypto/psi.py)
and compared with what the exchange computes; the page's example and limits are checked."""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

import pytest
from rbcl import crypto_core_ristretto255_from_hash, crypto_scalarmult_ristretto255

from crypto import psi as cpsi
from crypto.errors import EncodingError
from exchange.server.compute.psi import LABEL
from exchange.settings import Settings

DOC = (Path(__file__).resolve().parents[2] / "docs" / "api-psi-he.md").read_text("utf-8")


def domain_from_the_doc(session_id: str, label: str = "ids") -> bytes:
    """ "zonex-psi-v2" || u8 len || session id (UTF-8) || u8 len || label (UTF-8)."""
    sid, lab = session_id.encode("utf-8"), label.encode("utf-8")
    assert 1 <= len(sid) <= 255 and len(lab) <= 255
    return b"zonex-psi-v2" + bytes([len(sid)]) + sid + bytes([len(lab)]) + lab


def expand_message_xmd_sha512(msg: bytes, dst: bytes, length: int) -> bytes:
    """RFC 9380 §5.3.1 with SHA-512 (block 128 bytes), for a DST under 256 bytes."""
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(bytes(128) + msg + length.to_bytes(2, "big") + b"\x00" + dst_prime)
    out = b = hashlib.sha512(b0.digest() + b"\x01" + dst_prime).digest()
    i = 2
    while len(out) < length:
        b = hashlib.sha512(
            bytes(x ^ y for x, y in zip(b0.digest(), b, strict=True)) + bytes([i]) + dst_prime
        ).digest()
        out += b
        i += 1
    return out[:length]


def hash_from_the_doc(session_id: str, item: str) -> bytes:
    uniform = expand_message_xmd_sha512(item.encode("utf-8"), domain_from_the_doc(session_id), 64)
    point: bytes = crypto_core_ristretto255_from_hash(uniform)
    return point


@pytest.mark.parametrize(
    "session_id",
    [
        "psi_Zq3v9sLx0T7bWc1kP4nRe8yA2dF6hJ5m",
        # what the exchange issues; a fixed id, as pytest-xdist workers must collect the same names
        pytest.param("psi_" + secrets.token_urlsafe(24), id="issued"),
        "psi_é",  # a two-byte UTF-8 character: lengths count bytes, not characters
        "会话-ü",
        "x",
        "s" * 255,
    ],
)
def test_session_domain_built_from_the_doc_matches(session_id: str) -> None:
    assert domain_from_the_doc(session_id) == cpsi.session_domain(session_id, LABEL)
    assert domain_from_the_doc(session_id) == cpsi.session_domain(session_id.encode(), LABEL)


def test_the_doc_states_the_limits_of_the_layout() -> None:
    with pytest.raises(EncodingError):
        cpsi.session_domain("", LABEL)
    with pytest.raises(EncodingError):
        cpsi.session_domain("s" * 256, LABEL)
    with pytest.raises(EncodingError):
        cpsi.session_domain("é" * 128, LABEL)  # 128 characters, 256 bytes


def test_the_docs_example_domain_is_right() -> None:
    sid = re.search(r"for the session id\s+`([^`]+)`", DOC).group(1)  # type: ignore[union-attr]
    shown = re.search(r"```\n([0-9a-f]+)\n```", DOC).group(1)  # type: ignore[union-attr]
    assert bytes.fromhex(shown) == domain_from_the_doc(sid) == cpsi.session_domain(sid, LABEL)
    assert f"({len(bytes.fromhex(shown))} bytes)" in DOC
    assert LABEL == "ids" and "label `ids`" in DOC


def test_hash_and_blinding_built_from_the_doc_match() -> None:
    sid = "psi_" + secrets.token_urlsafe(24)
    key = cpsi.PsiKey.generate()
    ids = ["91310000000000000X", "Müller GmbH", "123"]
    points = cpsi.blind(key, cpsi.session_domain(sid, LABEL), [i.encode("utf-8") for i in ids])
    for item, point in zip(ids, points, strict=True):
        assert cpsi.hash_to_point(cpsi.session_domain(sid, LABEL), item.encode()) == (
            hash_from_the_doc(sid, item)
        )
        # blinding is scalar multiplication by the 32-byte little-endian scalar
        assert crypto_scalarmult_ristretto255(key.to_bytes(), hash_from_the_doc(sid, item)) == (
            point
        )


def test_the_limits_table_matches_the_settings() -> None:
    defaults = Settings.model_fields
    rows = re.findall(r"^\| `([a-z_]+)` \| ([0-9][0-9,.]*)", DOC, re.MULTILINE)
    assert {name for name, _ in rows} >= {"psi_session_seconds", "max_psi_batch_bytes"}
    for name, value in rows:
        default = defaults[name].default
        assert str(default) == value.replace(",", ""), name
    assert "config.json" in DOC and "psi_session_seconds" in DOC
