"""FastAPI dependencies shared by every router: the authenticated principal and the exchange."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request

from exchange.auth import authenticate
from exchange.domain import Principal
from exchange.errors import UnsupportedMediaTypeError
from exchange.node import Exchange
from exchange.observability import note_key_id

__all__ = [
    "BINARY",
    "Actor",
    "Ex",
    "binary_body",
    "exchange_of",
    "principal",
    "registry_version",
]


async def principal(request: Request) -> Principal:
    """Authenticate the request (RFC 9421 signature over the exact body) or raise."""
    ex: Exchange = request.app.state.exchange
    body = await request.body()
    base = ex.settings.public_base_url
    origin = f"{request.url.scheme}://{request.url.netloc}" if base is None else base.rstrip("/")
    # the path as it arrived (percent-encoded), not re-encoded from its decoded form: the
    # client signed the bytes it sent
    raw_path = request.scope.get("raw_path")
    path = raw_path.decode("latin-1") if isinstance(raw_path, bytes) else request.url.path
    url = origin + path + ("?" + request.url.query if request.url.query else "")
    route = request.scope.get("route")
    route_name = getattr(route, "path", request.url.path)
    signed = await authenticate(
        ex,
        request.method,
        url,
        request.headers,
        body,
        int(time.time()),
        f"{request.method} {route_name}",
    )
    request.state.registry_version = signed.registry_version
    note_key_id(signed.principal.key_id)
    return signed.principal


def registry_version(request: Request) -> int:
    """The registry version this (authenticated) request's nonce was recorded at: registry
    reads for it must be at least that new."""
    version: int = request.state.registry_version
    return version


async def exchange_of(request: Request) -> Exchange:
    # async: FastAPI would run a plain function in a worker thread on every request
    ex: Exchange = request.app.state.exchange
    return ex


Actor = Annotated[Principal, Depends(principal)]
Ex = Annotated[Exchange, Depends(exchange_of)]


BINARY = "application/octet-stream"


async def binary_body(request: Request, what: str = "the body") -> bytes:
    """The body of a route that takes ``application/octet-stream`` (PSI points, HE contexts and
    ciphertexts); anything else is refused with 415 before the body is used."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != BINARY:
        raise UnsupportedMediaTypeError(f"send {what} as {BINARY}")
    return await request.body()
