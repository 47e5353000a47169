"""Ed25519 identities. Every principal, zone and log has one; its key id is the lowercase hex
SHA-256 of the raw 32-byte public key."""

from __future__ import annotations

import hashlib
from typing import NewType

import nacl.exceptions
import nacl.signing
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from crypto.errors import EncodingError, VerificationError

KeyId = NewType("KeyId", str)


def key_id(public_key: bytes) -> KeyId:
    """Key id of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise EncodingError("an Ed25519 public key is 32 bytes")
    return KeyId(hashlib.sha256(public_key).hexdigest())


class VerifyKey:
    """An Ed25519 public key."""

    __slots__ = ("_key", "key_id", "raw")

    def __init__(self, raw: bytes) -> None:
        if not isinstance(raw, bytes) or len(raw) != 32:
            raise EncodingError("an Ed25519 public key is 32 bytes")
        try:
            self._key = nacl.signing.VerifyKey(raw)
        except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
            raise EncodingError("not an Ed25519 public key") from exc
        self.raw = raw
        self.key_id = key_id(raw)

    def verify(self, message: bytes, signature: bytes) -> None:
        """Return ``None`` if ``signature`` is valid for ``message``; raise otherwise."""
        if len(signature) != 64:
            raise VerificationError("an Ed25519 signature is 64 bytes")
        try:
            self._key.verify(message, signature)
        except (nacl.exceptions.BadSignatureError, nacl.exceptions.CryptoError) as exc:
            raise VerificationError("bad Ed25519 signature") from exc

    def to_pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM, readable by OpenSSL."""
        return ed25519.Ed25519PublicKey.from_public_bytes(self.raw).public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @classmethod
    def from_pem(cls, data: bytes) -> VerifyKey:
        try:
            key = serialization.load_pem_public_key(data)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise EncodingError("not a PEM public key") from exc
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise EncodingError("not an Ed25519 public key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VerifyKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"VerifyKey({self.key_id[:16]}...)"


class SigningKey:
    """An Ed25519 private key (32-byte seed)."""

    __slots__ = ("_key", "public_key")

    def __init__(self, seed: bytes) -> None:
        if not isinstance(seed, bytes) or len(seed) != 32:
            raise EncodingError("an Ed25519 private key seed is 32 bytes")
        self._key = nacl.signing.SigningKey(seed)
        self.public_key = VerifyKey(bytes(self._key.verify_key))

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(bytes(nacl.signing.SigningKey.generate()))

    @property
    def key_id(self) -> KeyId:
        return self.public_key.key_id

    def seed(self) -> bytes:
        return bytes(self._key)

    def sign(self, message: bytes) -> bytes:
        """Detached 64-byte Ed25519 signature."""
        return bytes(self._key.sign(message).signature)

    def to_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM, readable by OpenSSL."""
        return ed25519.Ed25519PrivateKey.from_private_bytes(self.seed()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @classmethod
    def from_pem(cls, data: bytes) -> SigningKey:
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise EncodingError("not an unencrypted PEM private key") from exc
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise EncodingError("not an Ed25519 private key")
        return cls(
            key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            )
        )

    def __repr__(self) -> str:  # never print the seed
        return f"SigningKey({self.key_id[:16]}...)"
