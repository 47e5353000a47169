"""Routes for the private-join computations (``psi_cardinality``, ``psi_members``,
``psi_aggregate``).

A session is opened with JSON; blinded points travel as ``application/octet-stream`` bodies of
concatenated 32-byte points on the routes ending in ``/points`` (the only ones the body-limit
middleware lets carry up to ``max_psi_batch_bytes``), in ordered batches named by ``offset``.
The protocol and its checks live in :mod:`exchange.server.compute.psi`; these are thin shells that
run it off the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from exchange.psi_epoch import PROTOCOLS, EpochPreparingError
from exchange.server.api.deps import BINARY, Actor, Ex, binary_body
from exchange.server.api.schemas import ReceiptOut
from exchange.server.compute import psi, psi_epoch
from exchange.server.observability import observe_computation

router = APIRouter(prefix="/v1", tags=["private joins (PSI)"])

#: a batch of points: the concatenation of 32-byte ristretto255 encodings (RFC 9496)
POINTS_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "concatenated 32-byte ristretto255 points (RFC 9496 encodings), no "
        "framing; at most max_psi_batch_bytes (64 MiB) and the session's max_batch_points",
        "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
    }
}


class SessionIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    zone: str = Field(min_length=1, max_length=64)
    dataset: str = Field(min_length=1, max_length=64)
    mode: str = Field(
        min_length=1, max_length=16, description="`cardinality`, `members` or `aggregate`"
    )
    purpose: str = Field(min_length=1, max_length=200)
    x_count: int = Field(
        description="|X|: the number of distinct normalized ids the consumer will send"
    )
    sums: list[str] = Field(
        default_factory=list,
        max_length=psi.MAX_SUM_COLUMNS,
        description="aggregate only: the numeric columns to sum over the intersection",
    )
    #: a decimal string (no floats in anything that ends up signed)
    epsilon: str | None = Field(
        default=None,
        max_length=40,
        description="ε as a decimal string (required where the release must be DP)",
    )
    context: str | None = Field(
        default=None,
        max_length=64,
        description="aggregate only: hex SHA-256 digest of the consumer's uploaded BFV context",
    )
    protocol: str | None = Field(
        default=None,
        max_length=16,
        description=f"one of {', '.join(PROTOCOLS)}; left out: `epoch` when the dataset has a "
        "prepared epoch and |Y| >= psi_epoch_ratio (16) x |X|, else `session`",
    )


class EpochIn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    zone: str = Field(min_length=1, max_length=64)
    dataset: str = Field(min_length=1, max_length=64)


class SumPlanOut(BaseModel):
    column: str
    lower: str = Field(description="declared lower bound (decimal string); values are clipped")
    upper: str = Field(description="declared upper bound (decimal string)")


class SessionOut(BaseModel):
    session: str = Field(description="the session id; also the PSI hashing domain's input")
    mode: str
    zone: str
    dataset: str
    label: str = Field(description="the label hashed into the session domain: `ids`")
    x_count: int
    k: int = Field(description="the minimum group size in force")
    epsilon: str | None
    sums: list[SumPlanOut]
    max_batch_points: int = Field(description="the most points one batch may carry")
    expires_at: str = Field(description="RFC 3339; psi_session_seconds after creation")
    protocol: str = Field(description="`session` or `epoch`")
    epoch: str | None = Field(
        description="epoch mode: the epoch id, hashed into the domain in place of the session id"
    )
    y_count: int | None = Field(description="epoch mode: |Y| of the epoch's image")


class SessionInfoOut(BaseModel):
    session: str
    mode: str
    zone: str
    dataset: str
    state: str = Field(description="open, busy, done, failed or expired")
    step: str = Field(description="created, b_ready, bc_done or result")
    x_count: int
    y_count: int | None = Field(description="|Y| once the zone answered A")
    a_received: int
    bc_received: int
    expires_at: str
    error: str | None = Field(description="the reason code of a failed session")


class BatchOut(BaseModel):
    received: int = Field(description="points received so far (the next batch's offset)")
    complete: bool = Field(description="the whole list has arrived")
    y_count: int | None = Field(
        default=None, description="A's last batch only: |Y|, the number of points of B"
    )


class PsiResultOut(BaseModel):
    result: dict[str, Any] = Field(
        description="zone, dataset, mode, session, x_count, y_count, k, epsilon, level and, per "
        "mode: `intersection` and `noised` (cardinality); `members` and `mask` (members); "
        "`count`, `suppressed`, `noised`, `sums` (column -> standard base64 BFV ciphertext), "
        "`bounds` and `he_context` (aggregate)"
    )
    receipt: ReceiptOut


@router.post(
    "/psi/sessions",
    status_code=201,
    summary="Open a private-join session",
    response_model=None,
    responses={201: {"model": SessionOut, "description": "the session, open"}},
)
def create_session(actor: Actor, ex: Ex, body: SessionIn) -> dict[str, Any] | JSONResponse:
    """Authorizes the mode on the dataset, checks the limits, k, the rules and (aggregate) the
    HE context, and opens a session that lives psi_session_seconds. No data moves yet. In epoch
    mode, while the zone prepares the epoch: 503 ``epoch_preparing`` with Retry-After."""
    try:
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
            protocol=body.protocol,
        )
    except EpochPreparingError as exc:
        return _retry_later(exc)


def _retry_later(exc: EpochPreparingError) -> JSONResponse:
    from exchange.server.api.app import problem  # the app imports this router

    extra = {k: v for k, v in exc.extra.items() if isinstance(v, int)}
    response = problem(exc.status, exc.code, exc.title, exc.detail, **extra)
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


@router.post(
    "/psi/epochs",
    status_code=202,
    summary="Prepare an epoch of a dataset (its provider)",
    response_model=None,
)
def prepare_epoch(actor: Actor, ex: Ex, body: EpochIn) -> dict[str, Any]:
    """The zone's provider asks for an epoch: unless one is ready and current, the zone starts
    preparing it in the background. Answers the dataset's epochs (``current`` and ``epochs``:
    id, snapshot, state, |Y|, subjects blinded so far, sessions served)."""
    return psi_epoch.request_preparation(ex, actor, body.zone, body.dataset)


@router.get("/psi/epochs", summary="A dataset's epochs (its provider)", response_model=None)
def get_epochs(
    actor: Actor,
    ex: Ex,
    zone: str = Query(min_length=1, max_length=64),
    dataset: str = Query(min_length=1, max_length=64),
) -> dict[str, Any]:
    """The dataset's epochs and which one serves new sessions (never a key)."""
    return psi_epoch.epoch_status(ex, actor, zone, dataset)


@router.get(
    "/psi/sessions/{session}",
    summary="Read a private-join session",
    response_model=None,
    responses={200: {"model": SessionInfoOut, "description": "the session's state"}},
)
def get_session(session: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    """The session's state, step and counts (only its consumer may read it)."""
    return psi.session_info(ex, actor, session)


@router.post(
    "/psi/sessions/{session}/a/points",
    summary="Upload a batch of A",
    response_model=None,
    responses={200: {"model": BatchOut, "description": "the batch was accepted"}},
    openapi_extra=POINTS_BODY,
)
async def put_a(
    session: str,
    request: Request,
    actor: Actor,
    ex: Ex,
    offset: int = Query(ge=0, description="the index of the batch's first point in A"),
) -> dict[str, Any]:
    """A = c·H(x) over the consumer's shuffled, distinct ids, in order. The zone re-blinds each
    point; the last batch makes it compute B (the answer then carries ``y_count``)."""
    body = await binary_body(request, "points")
    with observe_computation("psi_reblind"):  # the zone's re-blinding (and answer, at the end)
        result: dict[str, Any] = await run_in_threadpool(
            psi.put_a_points, ex, actor, session, offset, body
        )
    return result


@router.get(
    "/psi/sessions/{session}/b/points",
    summary="Download a slice of B",
    response_class=Response,
    responses={
        200: {
            "description": "concatenated 32-byte points of B, from offset, at most limit",
            "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
def get_b(
    session: str,
    actor: Actor,
    ex: Ex,
    offset: int = Query(ge=0, description="the index of the first point of B"),
    limit: int = Query(ge=1, description="the most points (capped at max_batch_points)"),
) -> Response:
    """B = p·H(y) in the zone's secret order; a read, may be repeated until the session ends."""
    data = psi.get_b_points(ex, actor, session, offset, limit)
    return Response(content=data, media_type=BINARY)


@router.post(
    "/psi/sessions/{session}/bc/points",
    summary="Upload a batch of B^c",
    response_model=None,
    responses={200: {"model": BatchOut, "description": "the batch was accepted"}},
    openapi_extra=POINTS_BODY,
)
async def put_bc(
    session: str,
    request: Request,
    actor: Actor,
    ex: Ex,
    offset: int = Query(ge=0, description="the index of the batch's first point in B"),
) -> dict[str, Any]:
    """B^c = c·B in B's order; the whole list is checked (|Y| distinct points) when complete."""
    body = await binary_body(request, "points")
    result: dict[str, Any] = await run_in_threadpool(
        psi.put_bc_points, ex, actor, session, offset, body
    )
    return result


@router.get(
    "/psi/sessions/{session}/ae/points",
    summary="Download a slice of A_e (epoch mode)",
    response_class=Response,
    responses={
        200: {
            "description": "concatenated 32-byte points of A_e = k_e·A, from offset, at most limit",
            "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
def get_ae(
    session: str,
    actor: Actor,
    ex: Ex,
    offset: int = Query(ge=0, description="the index of the first point of A_e"),
    limit: int = Query(ge=1, description="the most points (capped at max_batch_points)"),
) -> Response:
    """A_e in A's order (|X| points); a read, may be repeated until the session ends."""
    data = psi_epoch.get_ae_points(ex, actor, session, offset, limit)
    return Response(content=data, media_type=BINARY)


@router.post(
    "/psi/sessions/{session}/f/points",
    summary="Upload a batch of F (epoch mode)",
    response_model=None,
    responses={200: {"model": BatchOut, "description": "the batch was accepted"}},
    openapi_extra=POINTS_BODY,
)
async def put_f(
    session: str,
    request: Request,
    actor: Actor,
    ex: Ex,
    offset: int = Query(ge=0, description="the index of the batch's first point in A's order"),
) -> dict[str, Any]:
    """F = c⁻¹·A_e in A's order; every point checked, the whole list (|X| distinct points)
    when complete."""
    body = await binary_body(request, "points")
    result: dict[str, Any] = await run_in_threadpool(
        psi_epoch.put_f_points, ex, actor, session, offset, body
    )
    return result


@router.post(
    "/psi/sessions/{session}/result",
    summary="Match and release",
    response_model=None,
    responses={200: {"model": PsiResultOut, "description": "the release and its receipt"}},
)
def finish(session: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Matches A' with B^c, releases what the mode allows (DP by default from L3) with a
    signed receipt, and deletes every artefact of the session. No body."""
    with observe_computation("psi_result"):
        return psi.finish_session(ex, actor, session)
