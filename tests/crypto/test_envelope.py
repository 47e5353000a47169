"""DSSE-style signed envelopes: PAE, round trips, thresholds and hostile envelopes.

Vector: the DSSE v1 specification's PAE example (protocol.md, "Test vectors").
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from crypto.canonical import canonicalize
from crypto.encoding import b64url_decode, b64url_encode
from crypto.envelope import Envelope, EnvelopeSignature, pae, sign_envelope, verify_envelope
from crypto.errors import VerificationError
from crypto.keys import KeyId, SigningKey, VerifyKey

A, B, C, D = (SigningKey(bytes([i]) * 32) for i in range(1, 5))
TYPE = "application/vnd.zonex.grant+json"
PAYLOAD = {"type": "grant", "version": 1, "dataset": "tax/companies", "purpose": "credit-risk"}


def trust(*keys: SigningKey) -> dict[KeyId, VerifyKey]:
    return {k.key_id: k.public_key for k in keys}


def test_pae_dsse_spec_vector() -> None:
    assert pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )


def test_pae_counts_bytes_not_characters() -> None:
    assert pae("t\u00e9", "\u4e2d".encode()) == b"DSSEv1 3 t\xc3\xa9 3 \xe4\xb8\xad"
    assert pae("", b"") == b"DSSEv1 0  0 "


def test_sign_verify_round_trip() -> None:
    env = sign_envelope(TYPE, PAYLOAD, [A])
    assert env.payloadType == TYPE
    assert b64url_decode(env.payload) == canonicalize(PAYLOAD)
    assert [s.keyid for s in env.signatures] == [A.key_id]
    assert verify_envelope(env, TYPE, trust(A)) == PAYLOAD


def test_round_trip_through_json() -> None:
    env = sign_envelope(TYPE, PAYLOAD, [A, B])
    again = Envelope.model_validate_json(env.model_dump_json())
    assert again == env
    assert verify_envelope(again, TYPE, trust(A, B), threshold=2) == PAYLOAD


def test_a_different_payload_type_fails() -> None:
    env = sign_envelope(TYPE, PAYLOAD, [A])
    with pytest.raises(VerificationError):
        verify_envelope(env, "application/vnd.zonex.receipt+json", trust(A))
    # relabelled: the signature covers the type, so it no longer verifies under the new one
    relabelled = env.model_copy(update={"payloadType": "application/vnd.zonex.receipt+json"})
    with pytest.raises(VerificationError):
        verify_envelope(relabelled, "application/vnd.zonex.receipt+json", trust(A))


def test_a_different_payload_fails() -> None:
    env = sign_envelope(TYPE, PAYLOAD, [A])
    other = sign_envelope(TYPE, {**PAYLOAD, "purpose": "marketing"}, [B])
    swapped = env.model_copy(update={"payload": other.payload})
    with pytest.raises(VerificationError):
        verify_envelope(swapped, TYPE, trust(A))


ENVELOPE = sign_envelope(TYPE, PAYLOAD, [A])


@settings(max_examples=300)
@given(
    field=st.sampled_from(["payload", "sig"]),
    where=st.integers(min_value=0),
    mask=st.integers(min_value=1, max_value=255),
)
def test_any_flipped_byte_fails(field: str, where: int, mask: int) -> None:
    if field == "payload":
        data = bytearray(b64url_decode(ENVELOPE.payload))
        data[where % len(data)] ^= mask
        env = ENVELOPE.model_copy(update={"payload": b64url_encode(bytes(data))})
    else:
        sig = ENVELOPE.signatures[0]
        data = bytearray(b64url_decode(sig.sig))
        data[where % len(data)] ^= mask
        env = ENVELOPE.model_copy(
            update={"signatures": (sig.model_copy(update={"sig": b64url_encode(bytes(data))}),)}
        )
    with pytest.raises(VerificationError):
        verify_envelope(env, TYPE, trust(A))


@pytest.mark.parametrize(
    ("signers", "trusted", "threshold", "ok"),
    [
        ([A, B, C], [A, B, C], 3, True),
        ([A, B, C], [A, B, C], 2, True),
        ([A, B], [A, B, C], 2, True),
        ([A], [A, B, C], 2, False),
        ([A, B, C], [A, B], 3, False),
        ([A, D], [A, B, C], 2, False),
        ([D], [A, B, C], 1, False),
        ([A, B, C, D], [A, B, C, D], 4, True),
        ([A, B], [A, B], 3, False),
    ],
)
def test_k_of_n_threshold(
    signers: list[SigningKey], trusted: list[SigningKey], threshold: int, ok: bool
) -> None:
    env = sign_envelope(TYPE, PAYLOAD, signers)
    if ok:
        assert verify_envelope(env, TYPE, trust(*trusted), threshold=threshold) == PAYLOAD
    else:
        with pytest.raises(VerificationError):
            verify_envelope(env, TYPE, trust(*trusted), threshold=threshold)


@pytest.mark.parametrize("threshold", [0, -1])
def test_threshold_must_be_positive(threshold: int) -> None:
    with pytest.raises(ValueError):
        verify_envelope(ENVELOPE, TYPE, trust(A), threshold=threshold)


def test_untrusted_key_is_ignored() -> None:
    env = sign_envelope(TYPE, PAYLOAD, [D, A])
    assert verify_envelope(env, TYPE, trust(A)) == PAYLOAD
    with pytest.raises(VerificationError):
        verify_envelope(env, TYPE, trust(A), threshold=2)


def test_untrusted_key_claiming_a_trusted_key_id_is_ignored() -> None:
    forged = sign_envelope(TYPE, PAYLOAD, [D])
    claim = EnvelopeSignature(keyid=A.key_id, sig=forged.signatures[0].sig)
    env = forged.model_copy(update={"signatures": (claim,)})
    with pytest.raises(VerificationError):
        verify_envelope(env, TYPE, trust(A))


def test_duplicate_signatures_from_one_key_count_once() -> None:
    env = sign_envelope(TYPE, PAYLOAD, [A])
    doubled = env.model_copy(update={"signatures": env.signatures * 3})
    assert verify_envelope(doubled, TYPE, trust(A)) == PAYLOAD
    with pytest.raises(VerificationError):
        verify_envelope(doubled, TYPE, trust(A), threshold=2)
    twice = sign_envelope(TYPE, PAYLOAD, [A, A])
    with pytest.raises(VerificationError):
        verify_envelope(twice, TYPE, trust(A, B), threshold=2)


def test_one_key_trusted_under_two_ids_counts_once() -> None:
    env = sign_envelope(TYPE, PAYLOAD, [A])
    alias = EnvelopeSignature(keyid="alias", sig=env.signatures[0].sig)
    aliased = env.model_copy(update={"signatures": (*env.signatures, alias)})
    trusted = {**trust(A), KeyId("alias"): A.public_key}
    assert verify_envelope(aliased, TYPE, trusted) == PAYLOAD
    with pytest.raises(VerificationError):
        verify_envelope(aliased, TYPE, trusted, threshold=2)


def test_a_bad_signature_does_not_hide_a_good_one() -> None:
    env = sign_envelope(TYPE, PAYLOAD, [A])
    junk = [
        EnvelopeSignature(keyid=A.key_id, sig="not base64url!"),
        EnvelopeSignature(keyid=A.key_id, sig=b64url_encode(bytes(64))),
        EnvelopeSignature(keyid=A.key_id, sig=""),
    ]
    messy = env.model_copy(update={"signatures": (*junk, *env.signatures)})
    assert verify_envelope(messy, TYPE, trust(A)) == PAYLOAD


def test_no_signatures_fails() -> None:
    with pytest.raises(VerificationError):
        verify_envelope(ENVELOPE.model_copy(update={"signatures": ()}), TYPE, trust(A))


def test_payload_that_is_not_base64url_fails() -> None:
    for payload in ("eyJ9=", "ey J9", "ey+9", "a"):
        env = ENVELOPE.model_copy(update={"payload": payload})
        with pytest.raises(VerificationError):
            verify_envelope(env, TYPE, trust(A))


@pytest.mark.parametrize(
    "body", [b'{"b":1, "a":2}', b'{"b":1,"a":2}', b'{"a":1.5}', b"\xff", b'{"a":1}\n']
)
def test_signed_but_non_canonical_payload_fails(body: bytes) -> None:
    # a hostile signer with a trusted key still cannot get non-canonical bytes accepted
    env = Envelope(
        payloadType=TYPE,
        payload=b64url_encode(body),
        signatures=(EnvelopeSignature(keyid=A.key_id, sig=b64url_encode(A.sign(pae(TYPE, body)))),),
    )
    with pytest.raises(VerificationError):
        verify_envelope(env, TYPE, trust(A))


def test_sign_envelope_needs_a_signer_and_canonical_payload() -> None:
    with pytest.raises(ValueError):
        sign_envelope(TYPE, PAYLOAD, [])
    with pytest.raises(ValueError):  # EncodingError is a ValueError
        sign_envelope(TYPE, {"price": 1.5}, [A])


@pytest.mark.parametrize(
    "data",
    [
        {"payloadType": TYPE, "payload": "e30", "signatures": [], "extra": 1},
        {"payloadType": TYPE, "payload": "e30"},
        {"payloadType": TYPE, "payload": "e30", "signatures": [{"keyid": "k"}]},
        {"payloadType": TYPE, "payload": "e30", "signatures": [{"keyid": "k", "sig": "", "x": 1}]},
    ],
)
def test_envelope_schema_is_closed(data: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Envelope.model_validate(data)


def test_envelopes_are_frozen() -> None:
    with pytest.raises(ValidationError):
        ENVELOPE.payload = "e30"
