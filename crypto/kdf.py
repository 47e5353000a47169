"""One key per use: independent keys derived from one secret, and keyed digests over parts.

A zone holds one secret (its subject salt). Every keyed digest made from it (consent digests,
export pseudonyms, anything added later) is made under its **own** key, derived with HKDF-SHA256
(RFC 5869) under a versioned label such as ``b"zonex/v1/pseudonym"``. Keys derived under
different labels are independent (HKDF's ``info`` separates them), so a digest made for one use
can never be produced, confirmed or compared through another use: an answer that names a
consent digest tells nothing about a pseudonym, and the reverse. A new use takes a new label; a
change of what a use digests takes a new version in its label.

A keyed digest covers a sequence of parts, each prefixed by its length as 8 bytes big-endian.
The encoding is injective: ``("ab", "c")`` and ``("a", "bc")`` differ, whatever bytes the parts
hold, so no separator byte can be smuggled into a part to forge another part boundary.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import NewType

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto.errors import EncodingError

__all__ = [
    "KEY_BYTES",
    "MIN_SECRET_BYTES",
    "DigestKey",
    "Label",
    "derive_key",
    "encode_parts",
    "keyed_digest",
    "label",
]

#: the length of every derived key (the HMAC-SHA256 block size is larger; 32 bytes is its output)
KEY_BYTES = 32
#: a secret shorter than this is refused (a zone's subject salt is 32 random bytes)
MIN_SECRET_BYTES = 32
#: ``zonex/v<version>/<use>``: the version is part of the label, so a new version is a new key
_LABEL = re.compile(rb"zonex/v[1-9][0-9]{0,5}/[a-z0-9]+(?:-[a-z0-9]+)*")
#: parts are prefixed by their length in this many bytes, big-endian
_LENGTH_BYTES = 8

Label = NewType("Label", bytes)


def label(text: str) -> Label:
    """A versioned use label, checked: ``zonex/v1/consent-digest``."""
    raw = text.encode("ascii", "replace")
    if not _LABEL.fullmatch(raw):
        raise EncodingError(f"not a versioned key label (zonex/v<N>/<use>): {text!r}")
    return Label(raw)


def _hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF with SHA-256 (checked against the RFC's test vectors)."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt or None, info=info).derive(ikm)


def derive_key(secret: bytes, use: Label) -> bytes:
    """The 32-byte key for one use of ``secret``: HKDF-SHA256 with an empty salt (the secret
    is already uniformly random) and the label as ``info``."""
    if len(secret) < MIN_SECRET_BYTES:
        raise EncodingError(f"a key-derivation secret has at least {MIN_SECRET_BYTES} bytes")
    if not _LABEL.fullmatch(use):
        raise EncodingError("not a versioned key label (zonex/v<N>/<use>)")
    return _hkdf_sha256(secret, b"", use, KEY_BYTES)


def encode_parts(*parts: bytes) -> bytes:
    """Each part prefixed by its length (8 bytes, big-endian): an injective encoding."""
    return b"".join([len(part).to_bytes(_LENGTH_BYTES, "big") + part for part in parts])


def keyed_digest(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 under ``key`` of the length-prefixed ``parts``."""
    return DigestKey(key).digest(*parts)


class DigestKey:
    """One derived key, keyed once: many digests share the keyed HMAC state (``copy``)."""

    __slots__ = ("_mac",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise EncodingError(f"a digest key has {KEY_BYTES} bytes; derive it with derive_key")
        self._mac = hmac.new(key, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return "DigestKey(...)"  # never the key

    def digest(self, *parts: bytes) -> bytes:
        mac = self._mac.copy()
        mac.update(encode_parts(*parts))
        return mac.digest()

    def hexdigest(self, *parts: bytes) -> str:
        mac = self._mac.copy()
        mac.update(encode_parts(*parts))
        return mac.hexdigest()
