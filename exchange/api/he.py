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

from exchange.api.deps import Actor, Ex, binary_body
from exchange.compute import contexts, score, secure_sum
from exchange.observability import observe_computation

router = APIRouter(prefix="/v1")

Digest = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


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


@router.post("/he/contexts", status_code=201)
async def register_context(request: Request, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Upload a public context (TenSEAL serialization, ``application/octet-stream``)."""
    body = await binary_body(request)
    info = await run_in_threadpool(contexts.register_context, ex, actor, body)
    return info.to_json()


@router.get("/he/contexts/{digest}")
def get_context(digest: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    return contexts.context_info(ex, digest).to_json()


@router.post("/he/contexts/{digest}/uploads", status_code=201)
async def upload_ciphertexts(digest: str, request: Request, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Upload framed ciphertexts made under context ``digest`` (e.g. encrypted weights)."""
    body = await binary_body(request)
    info = await run_in_threadpool(contexts.store_ciphertexts, ex, actor, digest, body)
    return info.to_json()


@router.post("/he/models", status_code=201)
def commit_model(body: ModelIn, actor: Actor, ex: Ex) -> dict[str, Any]:
    return score.commit_model(ex, actor, body.document)


@router.get("/he/models/{commitment}")
def get_model(commitment: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    return score.get_model(ex, actor, commitment)


@router.post("/he/score")
def he_score(body: ScoreIn, actor: Actor, ex: Ex) -> dict[str, Any]:
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


@router.post("/he/secure-sum")
def run_secure_sum(body: SecureSumIn, actor: Actor, ex: Ex) -> dict[str, Any]:
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
