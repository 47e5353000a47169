"""Routes of published reports (月报季评): a report's digest signed and recorded on the ledger.

``POST /v1/reports`` (the operator and auditors) records ``report.published``
(:mod:`exchange.server.reports`); the report itself stays with its publisher, and anyone
holding a bundle recomputes it.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import Field

from exchange.server.api.deps import Actor, Ex
from exchange.server.api.schemas import In, Out
from exchange.server.reports import publish_report

__all__ = ["PublishedReportOut", "ReportIn", "router"]

router = APIRouter(prefix="/v1/reports")

Hex64 = Annotated[str, Field(min_length=64, max_length=64)]


class ReportIn(In):
    #: ``2026-11`` (a month) or ``2026Q4`` (a quarter)
    period: Annotated[str, Field(min_length=6, max_length=16)]
    #: the number of ledger entries the report was computed over
    bundle_size: Annotated[int, Field(ge=1, le=2**53 - 1)]
    #: hex Merkle root of those entries
    bundle_root: Hex64
    #: hex SHA-256 of the report's canonical measures (report.json)
    digest: Hex64


class PublishedReportOut(Out):
    id: str
    period: str
    bundle_size: int
    bundle_root: str
    digest: str
    #: the ``seq`` of the ``report.published`` entry
    seq: int
    publisher: str


@router.post(
    "",
    response_model=PublishedReportOut,
    status_code=201,
    summary="Publish a report (the operator and auditors)",
    description=(
        "Records `report.published` on the ledger: the report's period, the number of entries it "
        "was computed over, their Merkle root and the SHA-256 of its canonical measures "
        "(`report.json`). The root must be this ledger's at that size (422 `root_mismatch` "
        "otherwise); anyone else than the operator or an auditor gets 403. Verify a report "
        "with `zonex report verify DIR --bundle BUNDLE --log-key log.pub`."
    ),
)
def publish(actor: Actor, ex: Ex, body: ReportIn) -> PublishedReportOut:
    done = publish_report(ex, actor, body.period, body.bundle_size, body.bundle_root, body.digest)
    return PublishedReportOut(
        id=done.id,
        period=done.period,
        bundle_size=done.bundle_size,
        bundle_root=done.bundle_root,
        digest=done.digest,
        seq=done.seq,
        publisher=done.publisher,
    )
