"""Routes for homomorphic computations and the HE public contexts they encrypt under."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from exchange.api.deps import Actor, Ex
from exchange.compute import contexts
from exchange.errors import UnsupportedMediaTypeError

router = APIRouter(prefix="/v1")

BINARY = "application/octet-stream"


@router.post("/he/contexts", status_code=201)
async def register_context(request: Request, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Upload a public context (TenSEAL serialization, ``application/octet-stream``)."""
    if request.headers.get("content-type", "").split(";")[0].strip() != BINARY:
        raise UnsupportedMediaTypeError(f"send the context as {BINARY}")
    body = await request.body()
    info = await run_in_threadpool(contexts.register_context, ex, actor, body)
    return info.to_json()


@router.get("/he/contexts/{digest}")
def get_context(digest: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    return contexts.context_info(ex, digest).to_json()
