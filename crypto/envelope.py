"""DSSE-style signed envelopes.

The signature covers the pre-authentication encoding (PAE) of ``payloadType`` and the payload
bytes, so an object of one type can never verify as another. Verify the bytes, then parse.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

from crypto.canonical import canonicalize, parse_canonical
from crypto.encoding import b64url_decode, b64url_encode
from crypto.errors import EncodingError, VerificationError
from crypto.keys import KeyId, SigningKey, VerifyKey


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(payload), payload)


class EnvelopeSignature(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    keyid: str
    sig: str


class Envelope(BaseModel):
    """A signed envelope: ``payload`` is unpadded base64url of canonical JSON."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    payloadType: str
    payload: str
    signatures: tuple[EnvelopeSignature, ...]

    def payload_bytes(self) -> bytes:
        return b64url_decode(self.payload)


def sign_envelope(payload_type: str, payload: Any, signers: Sequence[SigningKey]) -> Envelope:
    """Canonicalize ``payload`` and sign it with every key in ``signers``."""
    if not signers:
        raise ValueError("at least one signer is needed")
    body = canonicalize(payload)
    message = pae(payload_type, body)
    return Envelope(
        payloadType=payload_type,
        payload=b64url_encode(body),
        signatures=tuple(
            EnvelopeSignature(keyid=key.key_id, sig=b64url_encode(key.sign(message)))
            for key in signers
        ),
    )


def verify_envelope(
    envelope: Envelope,
    payload_type: str,
    trusted: Mapping[KeyId, VerifyKey],
    threshold: int = 1,
) -> Any:
    """Verify at least ``threshold`` distinct trusted signatures, then parse the payload.

    Returns the parsed canonical payload. Raises :class:`VerificationError` otherwise.
    """
    if threshold < 1:
        raise ValueError("threshold must be at least 1")
    if envelope.payloadType != payload_type:
        raise VerificationError(
            f"payload type {envelope.payloadType!r} where {payload_type!r} was expected"
        )
    try:
        body = envelope.payload_bytes()
    except EncodingError as exc:
        raise VerificationError("payload is not base64url") from exc
    message = pae(payload_type, body)
    # count distinct verifying keys, not key ids: one key listed under two ids counts once
    good: set[bytes] = set()
    for signature in envelope.signatures:
        key = trusted.get(KeyId(signature.keyid))
        if key is None or key.raw in good:
            continue
        try:
            key.verify(message, b64url_decode(signature.sig))
        except (VerificationError, EncodingError):
            continue
        good.add(key.raw)
    if len(good) < threshold:
        raise VerificationError(f"{len(good)} valid trusted signatures, {threshold} required")
    # verify before parse: only now are the bytes known to be the signed ones
    try:
        return parse_canonical(body)
    except EncodingError as exc:
        raise VerificationError(f"signed payload is not canonical JSON: {exc}") from exc
