"""Routes for the private-join computations (``psi_cardinality``, ``psi_members``,
``psi_aggregate``).

A session is opened with JSON; blinded points travel as ``application/octet-stream`` bodies of
concatenated 32-byte points on the routes ending in ``/points`` (the only ones the body-limit
middleware lets carry up to ``max_psi_batch_bytes``), in ordered batches named by ``offset``.
The protocol and its checks live in :mod:`exchange.compute.psi`; these are thin shells that
run it off the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from exchange.api.deps import BINARY, Actor, Ex, binary_body
from exchange.compute import psi
from exchange.observability import observe_computation

router = APIRouter(prefix="/v1")


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    zone: str = Field(min_length=1, max_length=64)
    dataset: str = Field(min_length=1, max_length=64)
    mode: str = Field(min_length=1, max_length=16)
    purpose: str = Field(min_length=1, max_length=200)
    x_count: int
    sums: list[str] = Field(default_factory=list, max_length=psi.MAX_SUM_COLUMNS)
    #: a decimal string (no floats in anything that ends up signed)
    epsilon: str | None = Field(default=None, max_length=40)
    context: str | None = Field(default=None, max_length=64)


@router.post("/psi/sessions", status_code=201)
def create_session(actor: Actor, ex: Ex, body: SessionIn) -> dict[str, Any]:
    return psi.create_session(
        ex,
        actor,
        zone=body.zone,
        dataset=body.dataset,
        mode=body.mode,
        purpose=body.purpose,
        x_count=body.x_count,
        sums=body.sums,
        epsilon=body.epsilon,
        context=body.context,
    )


@router.get("/psi/sessions/{session}")
def get_session(session: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    return psi.session_info(ex, actor, session)


@router.post("/psi/sessions/{session}/a/points")
async def put_a(
    session: str, request: Request, actor: Actor, ex: Ex, offset: int = Query(ge=0)
) -> dict[str, Any]:
    body = await binary_body(request, "points")
    with observe_computation("psi_reblind"):  # the zone's re-blinding (and answer, at the end)
        result: dict[str, Any] = await run_in_threadpool(
            psi.put_a_points, ex, actor, session, offset, body
        )
    return result


@router.get("/psi/sessions/{session}/b/points")
def get_b(
    session: str,
    actor: Actor,
    ex: Ex,
    offset: int = Query(ge=0),
    limit: int = Query(ge=1),
) -> Response:
    data = psi.get_b_points(ex, actor, session, offset, limit)
    return Response(content=data, media_type=BINARY)


@router.post("/psi/sessions/{session}/bc/points")
async def put_bc(
    session: str, request: Request, actor: Actor, ex: Ex, offset: int = Query(ge=0)
) -> dict[str, Any]:
    body = await binary_body(request, "points")
    result: dict[str, Any] = await run_in_threadpool(
        psi.put_bc_points, ex, actor, session, offset, body
    )
    return result


@router.post("/psi/sessions/{session}/result")
def finish(session: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    with observe_computation("psi_result"):
        return psi.finish_session(ex, actor, session)
