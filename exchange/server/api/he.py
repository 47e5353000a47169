"""Routes for homomorphic computations and the HE public contexts they encrypt under.

Binary bodies: a public context (``POST /v1/he/contexts``) and a framed batch of ciphertexts
(``POST /v1/he/contexts/{digest}/uploads``, :func:`crypto.he.pack_ciphertexts`); the app's
body limits key on those path suffixes. Everything else is JSON within the JSON limit; result
ciphertexts come back base64url in the JSON response.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from exchange.server.api.deps import BINARY, Actor, Ex, binary_body
from exchange.server.api.schemas import ReceiptOut
from exchange.server.compute import contexts, score, secure_sum
from exchange.server.observability import observe_computation

router = APIRouter(prefix="/v1", tags=["homomorphic encryption (HE)"])

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


def _binary_body(description: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        }
    }


class ContextOut(BaseModel):
    digest: str = Field(description="hex SHA-256 of the context bytes: its name from now on")
    scheme: str = Field(description="`ckks` or `bfv`")
    parameter_set: str = Field(description="`ckks-8192` or `bfv-8192`")
    size: int = Field(description="bytes")


class UploadOut(BaseModel):
    digest: str = Field(description="hex SHA-256 of the upload: its name in a score request")
    context: str = Field(description="the context digest the ciphertexts were made under")
    count: int = Field(description="ciphertexts in the upload")
    size: int = Field(description="bytes")


class ModelOut(BaseModel):
    commitment: str = Field(description="hex SHA-256 of the canonical model document")
    owner: str = Field(description="the committing consumer's key id")
    document: dict[str, Any]
    created_at: str


class ScoreOut(BaseModel):
    result: dict[str, Any] = Field(
        description="zone, dataset, model, context, weights, features, entities, subjects "
        "(commitment to the ids), slots, ciphertexts (hex SHA-256 of each), level"
    )
    receipt: ReceiptOut
    ciphertexts: list[str] = Field(
        description="CKKS score ciphertexts, unpadded base64url, 4096 entities each, in order"
    )
    subjects_nonce: str = Field(
        description="unpadded base64url nonce opening result.subjects: keep it for an auditor"
    )


class SecureSumOut(BaseModel):
    result: dict[str, Any]
    receipt: ReceiptOut
    ciphertext: str = Field(description="the encrypted total, unpadded base64url")
    contributions: list[Any] = Field(
        description="each zone's signed contribution (DSSE envelopes), checkable with the "
        "zones' public keys from the catalog"
    )


class ModelIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    #: the public model document (:func:`crypto.he.model_document`)
    document: dict[str, Any]


class ScoreIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zone: str = Field(max_length=63)
    dataset: str = Field(max_length=64)
    purpose: str = Field(max_length=200)
    #: the model commitment, the public context and the upload of encrypted weights
    model: Digest
    context: Digest
    weights: Digest
    #: entity ids in the dataset's subject column; scores come back in this order
    ids: list[str]


class SecureSumIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    zones: list[str] = Field(min_length=1, max_length=64)
    sql: str = Field(max_length=20_000)
    purpose: str = Field(max_length=200)
    context: Digest
    #: the group keys to fill, one list of values per cell (``[[]]`` without GROUP BY)
    cells: list[list[str]]
    epsilon: str | None = Field(default=None, max_length=32)


@router.post(
    "/he/contexts",
    status_code=201,
    summary="Register a public HE context",
    response_model=None,
    responses={201: {"model": ContextOut, "description": "the registered context"}},
    openapi_extra=_binary_body(
        "a TenSEAL public context (parameters and public key, no secret key), at most "
        "max_he_context_bytes (1 MiB)"
    ),
)
async def register_context(request: Request, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Upload a public context (TenSEAL serialization, ``application/octet-stream``); it is
    checked (parameters, 128-bit security, no secret key), ledgered and named by its SHA-256."""
    body = await binary_body(request)
    info = await run_in_threadpool(contexts.register_context, ex, actor, body)
    return info.to_json()


@router.get(
    "/he/contexts/{digest}",
    summary="Read a registered HE context",
    response_model=None,
    responses={200: {"model": ContextOut, "description": "the context's parameters"}},
)
def get_context(digest: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    """The scheme, parameter set and size of a registered context (hex SHA-256 digest)."""
    return contexts.context_info(ex, digest).to_json()


@router.post(
    "/he/contexts/{digest}/uploads",
    status_code=201,
    summary="Upload ciphertexts under a context",
    response_model=None,
    responses={201: {"model": UploadOut, "description": "the stored upload"}},
    openapi_extra=_binary_body(
        "framed ciphertexts: per ciphertext a 4-byte big-endian length then its SEAL bytes "
        "(crypto.he.pack_ciphertexts); at most 1024 frames and max_he_upload_bytes (128 MiB)"
    ),
)
async def upload_ciphertexts(digest: str, request: Request, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Upload framed ciphertexts made under context ``digest`` (e.g. encrypted weights); the
    upload is bound to the uploader and the context and kept for upload_ttl_seconds."""
    body = await binary_body(request)
    info = await run_in_threadpool(contexts.store_ciphertexts, ex, actor, digest, body)
    return info.to_json()


@router.post(
    "/he/models",
    status_code=201,
    summary="Commit to a scoring model",
    response_model=None,
    responses={201: {"model": ModelOut, "description": "the stored commitment"}},
)
def commit_model(body: ModelIn, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Register the public model document (features, link, parameter set, weights digest);
    the weights never leave the consumer. Idempotent for its owner; ledgered."""
    return score.commit_model(ex, actor, body.document)


@router.get(
    "/he/models/{commitment}",
    summary="Read a model commitment",
    response_model=None,
    responses={200: {"model": ModelOut, "description": "the commitment and its document"}},
)
def get_model(commitment: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    """A committed model document by its hex SHA-256 commitment."""
    return score.get_model(ex, actor, commitment)


@router.post(
    "/he/score",
    summary="Score consented entities under encryption",
    response_model=None,
    responses={200: {"model": ScoreOut, "description": "encrypted scores and the receipt"}},
)
def he_score(body: ScoreIn, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Computes Enc(w·x) for each id with a live consent naming the caller and the purpose;
    if any id lacks one (or a single complete row) the whole call is refused, naming the
    positions and the count only."""
    with observe_computation("he_score"):
        return score.run_score(
            ex,
            actor,
            zone=body.zone,
            dataset=body.dataset,
            purpose=body.purpose,
            model=body.model,
            context=body.context,
            weights=body.weights,
            ids=body.ids,
        )


@router.post(
    "/he/secure-sum",
    summary="Sum an aggregate over zones under encryption",
    response_model=None,
    responses={200: {"model": SecureSumOut, "description": "the encrypted total and receipt"}},
)
def run_secure_sum(body: SecureSumIn, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Each zone runs the query under its own rules, encrypts its cells under the caller's
    key and signs its part; the exchange adds the parts (and DP noise) without reading them.
    All or nothing."""
    with observe_computation("secure_sum"):
        return secure_sum.run_secure_sum(
            ex,
            actor,
            zones=body.zones,
            sql=body.sql,
            purpose=body.purpose,
            context=body.context,
            cells=body.cells,
            epsilon=body.epsilon,
        )
