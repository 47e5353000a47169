"""Model commitments, ciphertext batch framing, and the security of every parameter set the
exchange's HE computations use."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import crypto.he as he
from crypto.errors import EncodingError, VerificationError

FEATURES = ["tax_paid", "employees", "filing_regularity"]
WEIGHTS = [1.5e-06, 0.02, -3.25]
NONCE = bytes(range(32))


def _document(weights: list[float] = WEIGHTS, bias: float = -1.0) -> dict[str, object]:
    digest = he.weights_digest(weights, bias, NONCE)
    return he.model_document(FEATURES, digest, link="logistic", parameter_set="ckks-8192")


@pytest.mark.parametrize(
    "params",
    [he.CKKS_DEFAULT, he.BFV_DEFAULT],
    ids=["he_score and ckks secure_sum", "bfv secure_sum and psi_aggregate"],
)
def test_parameter_sets_used_by_the_computations_are_listed_and_128_bit(
    params: he.ParameterSet,
) -> None:
    assert params in he.PARAMETER_SETS.values()
    assert he.security_level(params) >= 128
    he.check_security(params, 128)
    # the key-switching prime is counted: n = 8192 allows 218 bits in total
    assert params.total_bits <= he.SECURITY_TABLE[128][params.poly_modulus_degree]


def test_model_document_scoring_names_a_ckks_set() -> None:
    digest = he.weights_digest(WEIGHTS, 0.0, NONCE)
    with pytest.raises(EncodingError):
        he.model_document(FEATURES, digest, parameter_set="bfv-8192")
    with pytest.raises(EncodingError):
        he.model_document(FEATURES, digest, parameter_set="ckks-4096")


def test_commitment_is_stable_and_verifies_the_revealed_model() -> None:
    document = _document()
    commitment = he.model_commitment(document)
    assert commitment == he.model_commitment(dict(reversed(list(document.items()))))
    he.verify_model_commitment(
        commitment,
        document,
        features=FEATURES,
        weights=WEIGHTS,
        bias=-1.0,
        nonce=NONCE,
        link="logistic",
    )


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"weights": [1.5e-06, 0.02, -3.2500000000000004]}, "weights"),
        ({"bias": -1.0000001}, "weights"),
        ({"nonce": bytes(32)}, "weights"),
        ({"features": ["tax_paid", "filing_regularity", "employees"]}, "features"),
        ({"link": "identity"}, "link"),
        ({"weights": [1.5e-06, 0.02]}, "weight count"),
    ],
)
def test_any_change_to_the_revealed_model_fails(change: dict[str, object], match: str) -> None:
    document = _document()
    commitment = he.model_commitment(document)
    revealed: dict[str, object] = {
        "features": FEATURES,
        "weights": WEIGHTS,
        "bias": -1.0,
        "nonce": NONCE,
        "link": "logistic",
        **change,
    }
    with pytest.raises(VerificationError, match=match):
        he.verify_model_commitment(commitment, document, **revealed)  # type: ignore[arg-type]


def test_a_swapped_document_does_not_verify() -> None:
    document = _document()
    other = _document(weights=[1.0, 2.0, 3.0])
    with pytest.raises(VerificationError, match="hash"):
        he.verify_model_commitment(
            he.model_commitment(document),
            other,
            features=FEATURES,
            weights=[1.0, 2.0, 3.0],
            bias=-1.0,
            nonce=NONCE,
            link="logistic",
        )


def test_weights_digest_hides_the_weights_behind_the_nonce() -> None:
    one = he.weights_digest([1.0], 0.0, secrets.token_bytes(32))
    two = he.weights_digest([1.0], 0.0, secrets.token_bytes(32))
    assert one != two  # the same round model commits differently each time


@pytest.mark.parametrize(
    "bad",
    [
        {"weights": [float("nan")]},
        {"weights": [2.0**17]},
        {"weights": ["0.10"]},  # not the shortest round-trip text
        {"weights": []},
        {"bias": float("inf")},
        {"nonce": b"short"},
    ],
)
def test_weights_digest_refuses_bad_models(bad: dict[str, object]) -> None:
    args: dict[str, object] = {"weights": [1.0], "bias": 0.0, "nonce": NONCE, **bad}
    with pytest.raises(EncodingError):
        he.weights_digest(args["weights"], args["bias"], args["nonce"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "document",
    [
        {},
        {**_document(), "extra": 1},
        {**_document(), "type": "zonex.model.v2"},
        {**_document(), "features": "tax_paid"},
        {**_document(), "features": ["a", "a"]},
        {**_document(), "features": [""]},
        {**_document(), "link": "cubic"},
        {**_document(), "weights_digest": "AB" * 32},
    ],
)
def test_malformed_documents_are_refused(document: dict[str, object]) -> None:
    with pytest.raises(EncodingError):
        he.model_commitment(document)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=64), min_size=1, max_size=8))
def test_batches_round_trip(items: list[bytes]) -> None:
    packed = he.pack_ciphertexts(items)
    assert he.unpack_ciphertexts(packed, max_items=8, max_item_bytes=64) == items


def test_batch_limits_apply_before_parsing() -> None:
    packed = he.pack_ciphertexts([b"a" * 10, b"b" * 10])
    with pytest.raises(EncodingError, match="at most 1"):
        he.unpack_ciphertexts(packed, max_items=1, max_item_bytes=64)
    with pytest.raises(EncodingError, match="limit"):
        he.unpack_ciphertexts(packed, max_items=2, max_item_bytes=9)
    for bad in (packed[:-1], packed + b"\x00", b"", b"\x00\x00\x00\x00"):
        with pytest.raises(EncodingError):
            he.unpack_ciphertexts(bad, max_items=2, max_item_bytes=64)
    with pytest.raises(EncodingError):
        he.pack_ciphertexts([b""])
