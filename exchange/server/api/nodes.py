"""Routes for zone nodes (:mod:`exchange.server.dispatch`): registration by the zone's provider,
approval by the operator, and the node's own calls: its long poll for tasks, its answers, the
metadata of datasets it hosts, and the epochs of private joins it prepares (fingerprints and
positions, then the manifest it signs: :mod:`exchange.server.compute.psi_epoch_node`). Every call is
signed like any other; a node signs with its key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import Field
from starlette.concurrency import run_in_threadpool

from exchange.server import dispatch
from exchange.server.api.deps import BINARY, Actor, Ex, binary_body
from exchange.server.api.schemas import DatasetOut, In, Text
from exchange.server.compute import psi_epoch_node

__all__ = ["router"]

router = APIRouter(prefix="/v1")


class NodeIn(In):
    zone: Annotated[str, Field(min_length=1, max_length=64)]
    #: the node's Ed25519 public key, 32 bytes as unpadded base64url
    public_key: Annotated[str, Field(min_length=43, max_length=44)]


class PollIn(In):
    #: the size of the last checkpoint the node accepted (None: none yet)
    since: Annotated[int, Field(ge=0)] | None = None
    #: seconds to hold the poll open when no task is waiting
    wait: Annotated[float, Field(ge=0, le=60)] = 4.0
    #: the node pinned a witness policy: its bundles' checkpoints are to be cosigned first
    witnessed: bool = False


class OutcomeIn(In):
    result: dict[str, Any] | None = None
    refused: dict[str, str] | None = None


class EpochManifestIn(In):
    #: the node's signed manifest (DSSE, ``application/vnd.zonex.psi-epoch+json``)
    manifest: dict[str, Any]


class NodeColumnIn(In):
    name: Annotated[str, Field(min_length=1, max_length=128)]
    type: Annotated[str, Field(max_length=16)]
    level: Annotated[str, Field(max_length=16)]
    #: personal-information class: none | personal | sensitive
    pi: Annotated[str, Field(max_length=16)] = "none"


class NodeDatasetIn(In):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    description: Text = ""
    subject_column: Annotated[str, Field(min_length=1, max_length=128)]
    columns: Annotated[list[NodeColumnIn], Field(min_length=1, max_length=1000)]
    row_count: Annotated[int, Field(ge=0)]
    digest: Annotated[str, Field(min_length=64, max_length=64)]


@router.post("/nodes", status_code=201, tags=["nodes"])
async def register_node(body: NodeIn, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Register a node key for your zone (provider); it waits for the operator's approval."""
    return await run_in_threadpool(dispatch.register_node, ex, actor, body.zone, body.public_key)


@router.get("/nodes", tags=["nodes"])
async def list_nodes(actor: Actor, ex: Ex) -> list[dict[str, Any]]:
    """Nodes you may see, with whether each is online."""
    return await run_in_threadpool(dispatch.list_nodes, ex, actor)


@router.post("/nodes/{key_id}/approve", tags=["nodes"])
async def approve_node(key_id: str, actor: Actor, ex: Ex) -> dict[str, Any]:
    """Approve a pending node (operator): it then hosts its zone."""
    return await run_in_threadpool(dispatch.approve_node, ex, actor, key_id)


@router.get("/availability", tags=["nodes"])
async def availability(actor: Actor, ex: Ex) -> dict[str, dict[str, Any]]:
    """Node-hosted zones and whether their node is online (zones absent here run in-process)."""
    return await run_in_threadpool(dispatch.availability, ex)


@router.get("/node/self", tags=["nodes"])
async def node_self(actor: Actor, ex: Ex) -> dict[str, Any]:
    """The calling node's registration."""
    return await run_in_threadpool(dispatch.node_self, ex, actor)


@router.post("/node/poll", tags=["nodes"], response_model=None)
async def poll(body: PollIn, actor: Actor, ex: Ex) -> dict[str, Any] | Response:
    """A node's long poll: the next task bundle for it, or 204 after ``wait`` seconds."""
    bundle = await run_in_threadpool(
        dispatch.next_task, ex, actor, body.since, body.wait, body.witnessed
    )
    if bundle is None:
        return Response(status_code=204)
    return bundle


@router.post("/node/tasks/{task_id}/outcome", status_code=204, tags=["nodes"])
async def outcome(task_id: str, body: OutcomeIn, actor: Actor, ex: Ex) -> None:
    """A node's answer to a task it claimed: a signed result envelope, or a refusal."""
    given = body.model_dump(exclude_none=True)
    await run_in_threadpool(dispatch.finish_task, ex, actor, task_id, given)


@router.get(
    "/node/tasks/{task_id}/inputs/{name}",
    tags=["nodes"],
    response_class=Response,
    responses={
        200: {
            "description": "bytes of the task's input from offset, at most limit",
            "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def task_input(
    task_id: str,
    name: str,
    actor: Actor,
    ex: Ex,
    offset: int = Query(0, ge=0, description="the first byte"),
    limit: int | None = Query(None, ge=1, description="the most bytes (capped)"),
) -> Response:
    """A task's bulk input (a PSI session's A, the consumer's public HE context): only for the
    node the task is addressed to, only while the task runs."""
    data = await run_in_threadpool(dispatch.task_input, ex, actor, task_id, name, offset, limit)
    return Response(content=data, media_type=BINARY)


@router.put("/node/tasks/{task_id}/outputs/{name}", tags=["nodes"])
async def task_output(
    task_id: str,
    name: str,
    request: Request,
    actor: Actor,
    ex: Ex,
    offset: int = Query(ge=0, description="the bytes received so far (0 starts over)"),
) -> dict[str, Any]:
    """One chunk of a task's bulk output (``application/octet-stream``): only from the node the
    task is addressed to, only while the task runs; its signed result names each output's
    SHA-256, checked before the answer is accepted."""
    body = await binary_body(request, "the output")
    result: dict[str, Any] = await run_in_threadpool(
        dispatch.task_output, ex, actor, task_id, name, offset, body
    )
    return result


@router.post("/node/datasets", status_code=201, tags=["nodes"])
async def register_dataset(body: NodeDatasetIn, actor: Actor, ex: Ex) -> DatasetOut:
    """Register a dataset the calling node hosts (metadata and snapshot digest only)."""
    dataset = await run_in_threadpool(
        lambda: dispatch.register_node_dataset(
            ex,
            actor,
            name=body.name,
            description=body.description,
            subject_column=body.subject_column,
            columns=[c.model_dump() for c in body.columns],
            row_count=body.row_count,
            digest=body.digest,
        )
    )
    return DatasetOut.from_domain(dataset)


@router.put("/node/psi/epochs/{epoch}/files/{name}", tags=["nodes"])
async def epoch_file(
    epoch: str,
    name: str,
    request: Request,
    actor: Actor,
    ex: Ex,
    offset: int = Query(ge=0, description="the bytes received so far (0 starts over)"),
) -> dict[str, Any]:
    """One chunk of a prepared epoch's ``fp`` (sorted 96-bit fingerprints) or ``pos`` (their
    positions in the image's order), ``application/octet-stream``: only from an approved node,
    for its own zone; used once the node's signed manifest names its digest."""
    body = await binary_body(request, "the epoch's file")
    result: dict[str, Any] = await run_in_threadpool(
        psi_epoch_node.receive_epoch_file, ex, actor, epoch, name, offset, body
    )
    return result


@router.post("/node/psi/epochs", status_code=201, tags=["nodes"])
async def epoch_manifest(body: EpochManifestIn, actor: Actor, ex: Ex) -> dict[str, Any]:
    """A prepared epoch: the manifest the node signed (epoch, dataset, snapshot, |Y|, each
    uploaded file's SHA-256 and size). Checked against the uploads, then the epoch serves new
    sessions of the dataset. The node keeps the epoch key; it never comes here."""
    result: dict[str, Any] = await run_in_threadpool(
        psi_epoch_node.receive_epoch, ex, actor, body.manifest
    )
    return result


@router.get("/node/psi/epochs", tags=["nodes"])
async def node_epochs(actor: Actor, ex: Ex) -> dict[str, Any]:
    """The calling node's zone's epochs as the exchange keeps them, and their longest life: the
    node deletes the key of an epoch no longer listed or past that life."""
    result: dict[str, Any] = await run_in_threadpool(psi_epoch_node.node_epochs, ex, actor)
    return result
