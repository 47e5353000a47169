"""Routes of cross-border data flows (数据跨境流动): compliance approvals, counts, negative
lists, and what an access request would need abroad (:mod:`exchange.server.xborder`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from crypto.envelope import Envelope
from exchange.server import xborder
from exchange.server.api.deps import Actor, Ex
from exchange.server.api.schemas import In

__all__ = ["ApprovalIn", "NegativeListIn", "router"]

router = APIRouter(prefix="/v1/xborder", tags=["cross-border"])


class ApprovalIn(In):
    #: the operator's DSSE envelope over the approval's terms (policy.xborder.approval_payload)
    approval: Envelope


class NegativeListIn(In):
    #: ``[operation, category]`` pairs refused abroad; category: a level, a PI class or ``*``
    entries: Annotated[
        list[Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=2)]],
        Field(max_length=200),
    ]


@router.post(
    "/approvals",
    status_code=201,
    summary="Record a compliance approval (the operator)",
    description=(
        "Records the operator's signed record of a provider's standard contract filing, "
        "certification or passed security assessment (`xborder.approval_recorded`): the "
        "document's SHA-256 and its validity (an assessment at most three years). Releases "
        "abroad that need that document are allowed while it is live."
    ),
)
async def record_approval(body: ApprovalIn, actor: Actor, ex: Ex) -> dict[str, Any]:
    return await run_in_threadpool(xborder.record_approval, ex, actor, body.approval)


@router.get(
    "/approvals",
    summary="List compliance approvals",
    description="The operator and auditors see every approval; a provider sees its own.",
)
async def list_approvals(
    actor: Actor, ex: Ex, provider: Annotated[str | None, Query(max_length=64)] = None
) -> list[dict[str, Any]]:
    return await run_in_threadpool(xborder.list_approvals, ex, actor, provider)


@router.get(
    "/counts",
    summary="A provider's distinct subjects sent abroad this year",
    description=(
        "Counts of distinct data subjects whose personal (and sensitive personal) information "
        "the provider has sent abroad in a calendar year (China Standard Time), with the "
        "thresholds in force. The operator, auditors and the provider itself."
    ),
)
async def counts(
    actor: Actor,
    ex: Ex,
    provider: Annotated[str, Query(min_length=64, max_length=64)],
    year: Annotated[int | None, Query(ge=2000, le=9999)] = None,
) -> dict[str, Any]:
    return await run_in_threadpool(xborder.yearly_counts, ex, actor, provider, year)


@router.put(
    "/zones/{zone}/negative-list",
    summary="Set a zone's negative list (the operator or the zone's provider)",
    description=(
        "Pairs of (operation, data category) refused abroad from this zone, as a free-trade "
        "zone's negative list publishes them; ledgered as `xborder.negative_list_set`."
    ),
)
async def set_negative_list(
    zone: str, body: NegativeListIn, actor: Actor, ex: Ex
) -> dict[str, Any]:
    entries = await run_in_threadpool(xborder.set_negative_list, ex, actor, zone, body.entries)
    return {"zone": zone, "entries": entries}


@router.get(
    "/requests/{request_id}",
    summary="What an access request would need abroad",
    description=(
        "For each dataset and operation of the request: the decision at the provider's current "
        "counts and whether a live approval covers it (empty when the consumer is in the "
        "zone's jurisdiction). The operator and the zone's provider."
    ),
)
async def check_request(request_id: str, actor: Actor, ex: Ex) -> list[dict[str, Any]]:
    return await run_in_threadpool(xborder.check_request, ex, actor, request_id)
