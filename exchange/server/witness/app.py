"""The witness's HTTP interface (Starlette), with the submission and monitoring prefixes both at
the root (c2sp.org/tlog-witness, "HTTP Interface"):

- ``POST /add-checkpoint``: 200 with the cosignature line(s); 400 a malformed request or an
  old size above the checkpoint's; 403 no or a failing signature from a trusted log key; 404 an
  unknown log; 409 (``text/x.tlog.size``) the old size is not the stored one; 422 not
  consistent with the stored checkpoint; 413 a body over the size limit.
- ``GET /<origin hash>/checkpoint``: the latest cosigned checkpoint of a log, 404 if none.

Requests are not authenticated beyond the log's signature on the checkpoint, as the spec
says. Bodies of refusals are one line of plain text.
"""

from __future__ import annotations

import logging
import re

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from exchange.server.witness.decision import Refusal, RefusalKind
from exchange.server.witness.protocol import (
    ADD_CHECKPOINT_PATH,
    SIZE_MEDIA_TYPE,
    ProtocolError,
    format_size,
    parse_add_checkpoint,
)
from exchange.server.witness.service import Witness

__all__ = ["create_witness_app"]

log = logging.getLogger("zonex.witness")

_ORIGIN_HASH = re.compile(r"[0-9a-f]{64}")
#: tlog-witness does not name the media type of a 200 answer: signature lines are text
_TEXT = "text/plain; charset=utf-8"


class _TooLargeError(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLargeError
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _TooLargeError
    return bytes(body)


def _text(status: int, detail: str) -> Response:
    return PlainTextResponse(detail + "\n", status_code=status)


def _refusal(refusal: Refusal) -> Response:
    if refusal.kind is RefusalKind.OLD_SIZE_MISMATCH:
        assert refusal.stored_size is not None
        # set as a header, not a media type: Starlette would append "; charset=utf-8"
        return Response(
            format_size(refusal.stored_size),
            status_code=409,
            headers={"content-type": SIZE_MEDIA_TYPE},
        )
    return _text(refusal.kind.status, refusal.detail)


def create_witness_app(witness: Witness) -> Starlette:
    """The ASGI app serving ``witness``."""
    limit = witness.settings.max_body_bytes

    async def add_checkpoint(request: Request) -> Response:
        try:
            body = await _read_body(request, limit)
        except _TooLargeError:
            return _text(413, f"the body exceeds {limit} bytes")
        try:
            parsed = parse_add_checkpoint(body)
        except ProtocolError as exc:
            log.info("refused a malformed add-checkpoint request: %s", exc)
            return _text(400, str(exc))
        # signature and proof checks are CPU work and the store is a blocking file
        outcome = await run_in_threadpool(witness.add_checkpoint, parsed)
        if isinstance(outcome, Refusal):
            return _refusal(outcome)
        return Response("".join(line + "\n" for line in outcome.lines), media_type=_TEXT)

    async def checkpoint(request: Request) -> Response:
        digest = request.path_params["origin_hash"]
        if not _ORIGIN_HASH.fullmatch(digest):
            return _text(404, "no such log")
        note = await run_in_threadpool(witness.checkpoint, digest)
        if note is None:
            return _text(404, "this witness has cosigned no checkpoint of that log")
        return Response(note, media_type=_TEXT)

    return Starlette(
        routes=[
            Route(ADD_CHECKPOINT_PATH, add_checkpoint, methods=["POST"]),
            Route("/{origin_hash}/checkpoint", checkpoint, methods=["GET"]),
        ]
    )
