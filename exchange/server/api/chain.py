"""Routes of the catalog chain (:mod:`exchange.server.chain`).

- ``GET /v1/chain/published`` (unsigned): the catalog this exchange publishes for its parent,
  metadata only, in a DSSE envelope signed by the log key (:mod:`exchange.published`), made
  once per registry version with the ledger size it was made at.
- ``GET /v1/chain/children`` (any registered principal): the child exchanges whose checkpoints
  this exchange records, each with its latest recorded checkpoint, the catalog it published
  (the envelope, to check with the child's log key, and its payload) and the latest fork seen.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from pydantic import ValidationError
from sqlalchemy import Connection
from sqlalchemy.orm import Session

from crypto.encoding import b64_encode
from crypto.envelope import Envelope
from exchange.errors import NotFoundError
from exchange.published import PublishedCatalog
from exchange.server import services
from exchange.server.api.deps import Actor, Ex
from exchange.server.api.schemas import Out
from exchange.server.children import ChildInfo, list_children
from exchange.server.publishing import render_published
from exchange.server.registry import registry_version
from exchange.server.runtime import Exchange

__all__ = ["ChildOut", "router"]

router = APIRouter(prefix="/v1/chain")

#: the registry snapshot holding the rendered envelope
PUBLISHED_SNAPSHOT = "chain.published"


class RecordedCheckpointOut(Out):
    size: int
    #: standard base64, as in the note
    root: str
    #: the signed checkpoint note as recorded (with the child's witnesses' cosignatures)
    note: str
    #: the ``chain.checkpoint`` entry that recorded it
    seq: int | None
    recorded_at: datetime | None


class PublishedOut(Out):
    #: the DSSE envelope as the child signed it: check it with the child's log key
    envelope: Envelope
    #: its payload
    catalog: PublishedCatalog
    #: SHA-256 (hex) of the payload bytes, as in the ``chain.checkpoint`` entry
    digest: str | None
    fetched_at: datetime | None


class ForkOut(Out):
    size: int
    root: str
    #: the child's signed checkpoint that does not extend the recorded one
    note: str
    #: the ``chain.fork`` entry
    seq: int | None
    detected_at: datetime | None


class ChildOut(Out):
    name: str
    url: str
    origin: str
    #: the child's log verifier key (its log.pub)
    log_key: str
    added_at: datetime
    checkpoint: RecordedCheckpointOut | None
    published: PublishedOut | None
    fork: ForkOut | None
    failures: int
    last_error: str | None
    retry_at: datetime | None

    @classmethod
    def from_domain(cls, child: ChildInfo) -> ChildOut:
        cp, fork = child.checkpoint, child.fork
        published = None
        if child.published is not None:
            try:
                envelope = Envelope.model_validate_json(child.published)
                catalog = PublishedCatalog.model_validate_json(envelope.payload_bytes())
            except (ValidationError, ValueError):  # verified when fetched: never expected
                envelope = None
            if envelope is not None:
                published = PublishedOut(
                    envelope=envelope,
                    catalog=catalog,
                    digest=child.published_digest,
                    fetched_at=child.published_at,
                )
        return cls(
            name=child.name,
            url=child.url,
            origin=child.origin,
            log_key=child.log_key,
            added_at=child.added_at,
            checkpoint=None
            if cp is None
            else RecordedCheckpointOut(
                size=cp.size,
                root=b64_encode(cp.root),
                note=cp.note,
                seq=cp.seq,
                recorded_at=cp.recorded_at,
            ),
            published=published,
            fork=None
            if fork is None
            else ForkOut(
                size=fork.size,
                root=b64_encode(fork.root),
                note=fork.note,
                seq=fork.seq,
                detected_at=fork.detected_at,
            ),
            failures=child.failures,
            last_error=child.last_error,
            retry_at=child.retry_at,
        )


def _published(ex: Exchange) -> bytes:
    signer = ex.log_signer
    if signer is None:
        raise NotFoundError("this process holds no log key: it publishes no catalog")
    with ex.engine.connect() as conn:
        version = registry_version(conn)
    cached: bytes | None = ex.registry.peek(PUBLISHED_SNAPSHOT, version)
    if cached is not None:
        return cached
    size = ex.ledger.size()

    def render(conn: Connection, current: int) -> bytes:
        with Session(bind=conn) as session:
            zones = services.load_catalog(session)
        return render_published(zones, signer.name, size, current, signer.key)

    rendered: bytes = ex.registry.snapshot(PUBLISHED_SNAPSHOT, version, render)
    return rendered


@router.get(
    "/published",
    response_model=Envelope,
    summary="The catalog this exchange publishes (catalog chain)",
    description=(
        "The exchange's catalog as metadata only (zones, datasets, column names, types and "
        "levels, row-count bands; no row, salt or snapshot digest) in a DSSE envelope of "
        "payload type `application/vnd.zonex.published-catalog+json` signed by the log key "
        "(`GET /v1/log/key`, `log.pub`), with the ledger size it was made at. Unsigned "
        "request: a parent exchange fetches it to list what its children publish. Served "
        "only when the operator set `chain_publish_catalog` (404 otherwise)."
    ),
    openapi_extra={"security": []},
)
async def published(request: Request) -> Response:
    ex: Exchange = request.app.state.exchange
    if not ex.settings.chain_publish_catalog:
        raise NotFoundError(
            "this exchange publishes no catalog (its operator has not set chain_publish_catalog)"
        )
    body = await run_in_threadpool(_published, ex)
    return Response(body, media_type="application/json", headers={"Cache-Control": "no-cache"})


@router.get(
    "/children",
    response_model=list[ChildOut],
    summary="The child exchanges whose checkpoints this exchange records",
    description=(
        "Each child of the catalog chain (`zonex chain add-child`): its URL and log key, the "
        "latest checkpoint recorded for it (`chain.checkpoint`), the catalog it published "
        "(the envelope as signed, to be checked with its log key, and the payload) and the "
        "latest checkpoint it showed that does not extend the recorded one (`chain.fork`). "
        "Any registered principal may read it."
    ),
)
def children(actor: Actor, ex: Ex) -> list[ChildOut]:
    return [ChildOut.from_domain(child) for child in list_children(ex.engine)]
