"""The C2SP tlog-tiles read API under ``/v1/log/``: the log as standard tooling reads it.

- ``GET /v1/log/checkpoint``: the latest signed checkpoint note (``text/plain``).
- ``GET /v1/log/tile/<L>/<N>[.p/<W>]``: a hash tile: ``W`` (256 when full) concatenated
  32-byte hashes of level ``8L`` of the tree.
- ``GET /v1/log/tile/entries/<N>[.p/<W>]``: an entry bundle: entries ``[256N, 256N + W)``, each
  as a big-endian uint16 length and the entry's canonical bytes.

The checkpoint and the hash tiles carry only hashes and a signature, so they are served to
anyone, unsigned, and may be cached: a tile's bytes never change (a partial tile is a
different path from the full one). Entry bundles hold who did what, so they need a signed
request from a principal who may read ledger entries (the operator and auditors), as
``GET /v1/log/entries/{seq}`` does.

A tile is served once the entries it covers are committed, which may be a little beyond the
latest checkpoint: a client reads the tiles a checkpoint's size calls for.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import select

from crypto.tiles import TILE_WIDTH, TilePathError, entry_bundle, needed_width, parse_tile_path
from exchange.domain import PrincipalKind
from exchange.errors import ForbiddenError, InvalidInputError, NotFoundError
from exchange.server.api.deps import Actor, Ex
from exchange.server.api.log import AUDIT_KINDS
from exchange.server.models import LedgerEntryRow
from exchange.server.runtime import Exchange

__all__ = ["router"]

router = APIRouter(prefix="/v1/log")

CHECKPOINT_MEDIA_TYPE = "text/plain; charset=utf-8"
TILE_MEDIA_TYPE = "application/octet-stream"
#: tiles are immutable: a client may keep them
IMMUTABLE = "public, max-age=31536000, immutable"


def _parse(level: str, rest: str) -> tuple[int | None, int, int]:
    try:
        return parse_tile_path(f"tile/{level}/{rest}")
    except TilePathError as exc:
        raise InvalidInputError(f"not a tile path: {exc}") from exc


@router.get(
    "/checkpoint",
    response_class=Response,
    summary="The latest signed checkpoint (C2SP tlog-tiles)",
    description=(
        "The log's latest signed checkpoint note (C2SP tlog-checkpoint), unsigned request, "
        "`text/plain`. Verify it with the log's verifier key (`GET /v1/log/key`, `log.pub`)."
    ),
    responses={200: {"content": {"text/plain": {}}, "description": "the checkpoint note"}},
    openapi_extra={"security": []},
)
async def checkpoint(request: Request) -> Response:
    ex: Exchange = request.app.state.exchange

    def latest() -> str:
        cp = ex.ledger.latest_checkpoint()
        return (cp if cp is not None else ex.ledger.checkpoint()).note

    note = await run_in_threadpool(latest)
    return Response(note, media_type=CHECKPOINT_MEDIA_TYPE, headers={"Cache-Control": "no-cache"})


@router.get(
    "/tile/entries/{rest:path}",
    response_class=Response,
    summary="An entry bundle (C2SP tlog-tiles; operator and auditors)",
    description=(
        "Entries `[256N, 256N + W)`, each a big-endian uint16 length and the entry's canonical "
        "JSON bytes (the Merkle leaf input). Signed request; only the operator and auditors "
        "read ledger entries."
    ),
    responses={200: {"content": {TILE_MEDIA_TYPE: {}}, "description": "the entry bundle"}},
)
def entries(rest: str, actor: Actor, ex: Ex) -> Response:
    if actor.kind not in (*AUDIT_KINDS, PrincipalKind.MONITOR):
        raise ForbiddenError("only the operator, auditors and monitors read ledger entries")
    _, index, width = _parse("entries", rest)
    start = index * TILE_WIDTH
    if needed_width(ex.ledger.size(), 0, index) < width:
        raise NotFoundError("the log has no such entry bundle yet")
    with ex.engine.connect() as conn:
        bodies = [
            bytes(body)
            for body in conn.execute(
                select(LedgerEntryRow.body)
                .where(LedgerEntryRow.seq >= start, LedgerEntryRow.seq < start + width)
                .order_by(LedgerEntryRow.seq)
            ).scalars()
        ]
    return Response(entry_bundle(bodies), media_type=TILE_MEDIA_TYPE)


@router.get(
    "/tile/{level}/{rest:path}",
    response_class=Response,
    summary="A hash tile (C2SP tlog-tiles)",
    description=(
        "`W` (256 for a full tile) concatenated 32-byte hashes of level `8L` of the log's "
        "RFC 9162 tree, starting at hash `256N`. Unsigned request; immutable."
    ),
    responses={200: {"content": {TILE_MEDIA_TYPE: {}}, "description": "the tile"}},
    openapi_extra={"security": []},
)
async def tile(level: str, rest: str, request: Request) -> Response:
    ex: Exchange = request.app.state.exchange
    tile_level, index, width = _parse(level, rest)
    if tile_level is None:  # "entries" is routed above
        raise NotFoundError("no such tile")
    if index >= (1 << 63) >> (8 * (tile_level + 1)):  # beyond any ledger (seq is a BIGINT)
        raise NotFoundError("the log has no such tile")
    data = await run_in_threadpool(ex.ledger.tiles.read_tile, tile_level, index, width)
    if data is None:
        raise NotFoundError("the log has no such tile yet")
    return Response(data, media_type=TILE_MEDIA_TYPE, headers={"Cache-Control": IMMUTABLE})
