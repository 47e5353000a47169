"""Routes for datasets that change: a provider publishes a new snapshot of a dataset, or
retires it. The rules (same columns, levels kept unless given, no computations once retired)
live in :mod:`exchange.server.services`; these are thin shells."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from exchange.server import services
from exchange.server.api.deps import Actor, Ex
from exchange.server.api.schemas import CsvIn, DatasetOut, In, Out, Text

__all__ = ["RetireIn", "RetiredOut", "SnapshotIn", "router"]

router = APIRouter(prefix="/v1")


class SnapshotIn(In):
    #: a staged upload (``POST /v1/zones/{zone}/uploads``) holding the new content
    upload_id: Annotated[str, Field(min_length=32, max_length=32)]
    #: column -> level for the columns whose level changes; the others keep theirs
    levels: Annotated[dict[Annotated[str, Field(max_length=128)], str], Field(max_length=1000)] = (
        Field(default_factory=dict)
    )
    subject_column: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    description: Text | None = None
    #: for a CSV upload: how the file is written (as for registration)
    csv: CsvIn | None = None


class RetireIn(In):
    reason: Annotated[str, Field(max_length=1000)] = ""


class RetiredOut(Out):
    zone: str
    name: str
    status: str
    #: the last snapshot's digest (receipts made on it keep verifying offline)
    digest: str


@router.post(
    "/zones/{zone}/datasets/{name}/snapshots",
    response_model=DatasetOut,
    status_code=201,
    summary="Publish a new snapshot of a dataset (its provider)",
    description=(
        "Replaces an imported dataset's content with a staged upload: same columns, levels "
        "kept unless given, a new snapshot digest, ledgered as `dataset.snapshot_published` "
        "with the previous digest. Grants carry over (they name the dataset); receipts made on "
        "the previous snapshot keep verifying offline. 409 if the content is already current."
    ),
)
async def publish_snapshot(
    zone: str, name: str, actor: Actor, ex: Ex, body: SnapshotIn
) -> DatasetOut:
    spec = services.SnapshotSpec(
        upload_id=body.upload_id,
        levels=body.levels,
        subject_column=body.subject_column,
        description=body.description,
        csv=services.csv_options(body.csv.model_dump()) if body.csv else None,
    )
    dataset = await run_in_threadpool(services.publish_snapshot, ex, actor, zone, name, spec)
    return DatasetOut.from_domain(dataset)


@router.post(
    "/zones/{zone}/datasets/{name}/retire",
    response_model=RetiredOut,
    summary="Retire a dataset (its provider)",
    description=(
        "No computation runs on it any more (denied with reason `retired`), the catalog no "
        "longer lists it, its name is not reused and an imported dataset's rows leave the "
        "zone's store. Ledgered as `dataset.retired`. Receipts made on it keep verifying."
    ),
)
def retire_dataset(zone: str, name: str, actor: Actor, ex: Ex, body: RetireIn) -> RetiredOut:
    d = services.retire_dataset(ex, actor, zone, name, body.reason)
    return RetiredOut(zone=d.zone, name=d.name, status=services.RETIRED, digest=d.digest)
