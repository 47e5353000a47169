"""The key holder's side of ``he_score`` and ``secure_sum``: secret contexts stay here.

Everything that touches a secret key runs in the consumer's process: making the context
(:func:`crypto.he.new_context`), encrypting the model, decrypting scores and totals. The
exchange receives the public context, ciphertexts and the public half of a model commitment.

A model file (JSON) holds the secret model and the nonce that makes its commitment hiding::

    {"features": ["tax_paid_2025", "employees"], "weights": [1.5e-06, 0.02],
     "bias": -1.2, "link": "logistic", "nonce": "<43 characters of base64url>"}

Keep it private; reveal it to an auditor, who checks it against the ledgered commitment with
:func:`crypto.he.verify_model_commitment` (``zonex model verify``).

A score's signed result commits to the ids scored, ``subjects`` = SHA-256(nonce || canonical
JSON of the ids); the exchange returns the nonce to the consumer alone. :func:`score` checks the
commitment opens to the ids it sent, in order (:func:`verify_subjects`), and keeps the nonce
with each response: it is what shows an auditor which ids a receipt covers. A refusal names
positions in the caller's list (:class:`exchange.client.sdk.ScoreRefusedError`), nothing else.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crypto import he
from crypto.encoding import b64url_decode, b64url_encode
from crypto.errors import EncodingError, VerificationError
from crypto.keys import VerifyKey
from exchange.client.sdk import Client, ScoreRefusedError
from exchange.subjects import NONCE_BYTES, commit_ids

__all__ = [
    "Model",
    "Progress",
    "ScoreOutcome",
    "SumOutcome",
    "id_batches",
    "load_model",
    "new_model",
    "save_model",
    "score",
    "secure_sum",
    "verify_contributions",
    "verify_subjects",
]

#: called as ``progress(step, done, total)`` while a computation runs
Progress = Callable[[str, int, int], None]
SCORE_PARAMETER_SET = "ckks-8192"
#: a score request's JSON body stays below the exchange's 1 MiB limit with room to spare
MAX_IDS_BODY = 900_000
#: decimal places kept of a CKKS total (exact CKKS decryptions can leak key material)
CKKS_DIGITS = 6


def _quiet(step: str, done: int, total: int) -> None:
    pass


@dataclass(frozen=True)
class Model:
    """A secret linear model: ``score = link(bias + sum_j weights[j] * x[features[j]])``."""

    features: tuple[str, ...]
    weights: tuple[float, ...]
    bias: float = 0.0
    link: str = "identity"
    nonce: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        if len(self.weights) != len(self.features):
            raise EncodingError("a model has one weight per feature")
        self.document()  # checks names, weights, bias, link and nonce

    def document(self) -> dict[str, Any]:
        """The public half of the commitment (what the exchange stores)."""
        digest = he.weights_digest(self.weights, self.bias, self.nonce)
        return he.model_document(
            self.features, digest, link=self.link, parameter_set=SCORE_PARAMETER_SET
        )

    @property
    def commitment(self) -> str:
        return he.model_commitment(self.document())

    def apply(self, linear: float) -> float:
        """The link on a decrypted linear score (bias already added)."""
        if self.link == "logistic":
            if linear < -700:
                return 0.0
            return 1.0 / (1.0 + math.exp(-linear))
        return linear

    def to_json(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "weights": list(self.weights),
            "bias": self.bias,
            "link": self.link,
            "nonce": b64url_encode(self.nonce),
        }

    @classmethod
    def from_json(cls, data: object) -> Model:
        if not isinstance(data, Mapping):
            raise EncodingError("a model file holds a JSON object")
        unknown = set(data) - {"features", "weights", "bias", "link", "nonce"}
        if unknown:
            raise EncodingError(f"unknown model keys: {', '.join(sorted(unknown))}")
        features, weights = data.get("features"), data.get("weights")
        if not isinstance(features, list) or not isinstance(weights, list):
            raise EncodingError("a model has lists 'features' and 'weights'")
        if any(isinstance(w, bool) or not isinstance(w, int | float) for w in weights):
            raise EncodingError("weights are numbers")
        bias = data.get("bias", 0.0)
        if isinstance(bias, bool) or not isinstance(bias, int | float):
            raise EncodingError("bias is a number")
        nonce = data.get("nonce")
        return cls(
            features=tuple(features),
            weights=tuple(float(w) for w in weights),
            bias=float(bias),
            link=str(data.get("link", "identity")),
            nonce=b64url_decode(nonce) if isinstance(nonce, str) else b"",
        )


def new_model(
    features: Sequence[str], weights: Sequence[float], *, bias: float = 0.0, link: str = "identity"
) -> Model:
    """A model with a fresh random nonce."""
    return Model(
        tuple(features),
        tuple(float(w) for w in weights),
        float(bias),
        link,
        secrets.token_bytes(he.MODEL_NONCE_BYTES),
    )


def load_model(path: Path) -> tuple[Model, bool]:
    """A model file; when it has no nonce yet, one is drawn (second value True: save it)."""
    data = json.loads(path.read_text("utf-8"))
    if isinstance(data, dict) and not data.get("nonce"):
        data = {**data, "nonce": b64url_encode(secrets.token_bytes(he.MODEL_NONCE_BYTES))}
        return Model.from_json(data), True
    return Model.from_json(data), False


def save_model(path: Path, model: Model) -> None:
    path.write_text(json.dumps(model.to_json(), indent=2) + "\n", "utf-8")
    path.chmod(0o600)


def id_batches(ids: Sequence[str], limit: int = MAX_IDS_BODY) -> list[list[str]]:
    """Split ids into requests whose JSON stays under ``limit`` bytes, in whole 4096-entity
    ciphertexts where the ids are short enough."""
    if not ids:
        return []
    widest = max(len(json.dumps(i)) + 2 for i in ids)
    per = max(1, (limit - 4096) // widest)
    if per >= 4096:
        per -= per % 4096
    return [list(ids[i : i + per]) for i in range(0, len(ids), per)]


def _upload_context(client: Client, ctx: Any) -> str:
    public = he.public_context_bytes(ctx)
    info = client.upload_context(public)
    if info.get("digest") != he.context_digest(public):
        raise VerificationError("the exchange registered another context digest")
    return he.context_digest(public)


@dataclass(frozen=True)
class ScoreOutcome:
    ids: list[str]
    #: after the bias and link
    scores: list[float]
    #: one ``{"result", "receipt", "subjects_nonce"}`` per request (large id lists go in
    #: several); the nonce opens the result's commitment to that request's ids
    responses: list[dict[str, Any]]


def verify_subjects(result: Mapping[str, Any], ids: Sequence[str], nonce: str) -> None:
    """Check a score result's ``subjects`` commitment opens to ``ids`` (in this order) with
    ``nonce`` (base64url); raise :class:`VerificationError`. For the consumer and an auditor."""
    raw = b64url_decode(nonce)
    if len(raw) != NONCE_BYTES or result.get("subjects") != commit_ids(raw, ids):
        raise VerificationError("the result commits to other ids than these")


def score(
    client: Client,
    *,
    zone: str,
    dataset: str,
    purpose: str,
    model: Model,
    ids: Sequence[str],
    progress: Progress = _quiet,
) -> ScoreOutcome:
    """Score ``ids`` under ``model`` (committed already). The secret context is made here and
    never leaves; each response is checked against its signed result before decryption.

    A refusal raises :class:`exchange.client.sdk.ScoreRefusedError` with positions in ``ids`` (the
    requests before the refused one were scored)."""
    commitment = model.commitment
    stored = client.model(commitment)
    if stored.get("document") != model.document():
        raise VerificationError("the exchange holds another document for this commitment")
    steps = 3 + len(id_batches(ids))
    progress("context", 0, steps)
    ctx = he.new_context(he.PARAMETER_SETS[SCORE_PARAMETER_SET])
    context = _upload_context(client, ctx)
    progress("encrypting the model", 1, steps)
    packed = he.pack_ciphertexts(he.encrypt_model(ctx, model.weights))
    progress("uploading the encrypted model", 2, steps)
    weights = client.upload_ciphertexts(context, packed)["digest"]
    scores: list[float] = []
    responses: list[dict[str, Any]] = []
    offset = 0
    for n, batch in enumerate(id_batches(ids)):
        progress(f"scoring {len(batch)} entities", 3 + n, steps)
        try:
            response = client.he_score(
                zone=zone,
                dataset=dataset,
                purpose=purpose,
                model=commitment,
                context=context,
                weights=weights,
                ids=batch,
            )
        except ScoreRefusedError as exc:  # positions in this request -> positions in ids
            raise ScoreRefusedError(exc, [offset + p for p in exc.positions], exc.count) from None
        offset += len(batch)
        result = response["result"]
        chunks = [b64url_decode(c) for c in response["ciphertexts"]]
        if (
            result.get("model") != commitment
            or result.get("context") != context
            or result.get("entities") != len(batch)
            or result.get("ciphertexts") != [hashlib.sha256(c).hexdigest() for c in chunks]
        ):
            raise VerificationError("the scores do not match their signed result")
        nonce = str(response.get("subjects_nonce", ""))
        verify_subjects(result, batch, nonce)
        linear = he.decrypt_scores(ctx, chunks, len(batch), bias=model.bias)
        scores.extend(model.apply(s) for s in linear)
        responses.append(
            {"result": result, "receipt": response["receipt"], "subjects_nonce": nonce}
        )
    progress("done", steps, steps)
    return ScoreOutcome(list(ids), scores, responses)


@dataclass(frozen=True)
class SumOutcome:
    cells: list[list[str]]
    values: list[str]
    #: ``totals[i][v]``: value ``v`` of cell ``i`` summed over the zones (+ noise)
    totals: list[list[int | float]]
    response: dict[str, Any]


def secure_sum(
    client: Client,
    *,
    zones: Sequence[str],
    sql: str,
    cells: Sequence[Sequence[str]],
    purpose: str,
    scheme: str = "bfv",
    epsilon: str | None = None,
    progress: Progress = _quiet,
) -> SumOutcome:
    """Ask ``zones`` for the encrypted total of ``sql`` over ``cells``; decrypt it here.

    ``scheme`` ``bfv`` sums integers exactly; ``ckks`` takes decimals (rounded to
    :data:`CKKS_DIGITS` places after decryption)."""
    names = {"bfv": "bfv-8192", "ckks": "ckks-8192"}
    if scheme not in names:
        raise EncodingError("scheme is bfv or ckks")
    progress("context", 0, 3)
    ctx = he.new_context(he.PARAMETER_SETS[names[scheme]])
    context = _upload_context(client, ctx)
    progress(f"summing over {len(zones)} zones", 1, 3)
    response = client.secure_sum(
        zones=list(zones),
        sql=sql,
        purpose=purpose,
        context=context,
        cells=[list(c) for c in cells],
        epsilon=epsilon,
    )
    result = response["result"]
    total = b64url_decode(response["ciphertext"])
    if result.get("context") != context or result.get("ciphertext") != (
        hashlib.sha256(total).hexdigest()
    ):
        raise VerificationError("the total does not match its signed result")
    progress("decrypting", 2, 3)
    width = len(result["values"])
    flat = he.decrypt_vector(ctx, total, int(result["length"]))
    if scheme == "ckks":
        flat = [round(float(v), CKKS_DIGITS) for v in flat]
    totals = [list(flat[i * width : (i + 1) * width]) for i in range(len(result["cells"]))]
    progress("done", 3, 3)
    return SumOutcome(result["cells"], result["values"], totals, response)


def verify_contributions(response: Mapping[str, Any], zone_keys: Mapping[str, bytes]) -> None:
    """Check every zone's signed contribution in a secure-sum response against the zones'
    public keys (from the catalog) and the signed result; raise :class:`VerificationError`."""
    from crypto.envelope import Envelope, verify_envelope
    from exchange.domain import CONTRIBUTION_TYPE

    result = response["result"]
    listed = {c["zone"]: c for c in result["contributions"]}
    envelopes = response.get("contributions", [])
    if len(envelopes) != len(listed):
        raise VerificationError("the response does not carry one contribution per zone")
    for raw in envelopes:
        envelope = Envelope.model_validate(raw)
        for zone, public in zone_keys.items():
            key = VerifyKey(public)
            try:
                payload = verify_envelope(envelope, CONTRIBUTION_TYPE, {key.key_id: key})
            except VerificationError:
                continue
            entry = listed.get(zone)
            if (
                entry is None
                or payload.get("zone") != zone
                or payload.get("computation") != result["computation"]
                or payload.get("ciphertext") != entry["ciphertext"]
            ):
                raise VerificationError(f"zone {zone}'s contribution does not match the result")
            break
        else:
            raise VerificationError("a contribution is not signed by any listed zone key")
