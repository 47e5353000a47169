"""Strict byte/text encodings used on the wire: unpadded base64url, standard base64, hex."""

from __future__ import annotations

import base64
import binascii
import re

from crypto.errors import EncodingError

_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_B64STD = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")


def b64url_encode(data: bytes) -> str:
    """Unpadded base64url (RFC 4648 section 5), as used in every signed zonex object."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode unpadded base64url; padding, whitespace and foreign characters are refused."""
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise EncodingError("not unpadded base64url")
    decoded = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # non-canonical trailing bits would let two strings decode to the same bytes
    if b64url_encode(decoded) != text:
        raise EncodingError("non-canonical base64url")
    return decoded


def b64_encode(data: bytes) -> str:
    """Standard padded base64 (RFC 4648 section 4), as used by signed notes and RFC 9421."""
    return base64.b64encode(data).decode("ascii")


def b64_decode(text: str) -> bytes:
    """Decode standard padded base64 strictly (no whitespace, correct padding, canonical bits)."""
    if not isinstance(text, str) or not _B64STD.fullmatch(text):
        raise EncodingError("not standard base64")
    try:
        decoded = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise EncodingError("not standard base64") from exc
    if base64.b64encode(decoded).decode("ascii") != text:
        raise EncodingError("non-canonical base64")
    return decoded


def hex_decode(text: str, length: int | None = None) -> bytes:
    """Decode lowercase hex, optionally of an exact byte length."""
    # bytes.fromhex alone would also accept whitespace between bytes
    if not isinstance(text, str) or not _HEX.fullmatch(text):
        raise EncodingError("not lowercase hex")
    data = bytes.fromhex(text)
    if length is not None and len(data) != length:
        raise EncodingError(f"expected {length} bytes of hex, got {len(data)}")
    return data
