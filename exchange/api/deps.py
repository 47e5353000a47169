"""FastAPI dependencies shared by every router: the authenticated principal and the exchange."""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request
from starlette.concurrency import run_in_threadpool

from exchange.auth import authenticate
from exchange.domain import Principal
from exchange.errors import UnsupportedMediaTypeError
from exchange.node import Exchange

__all__ = ["BINARY", "Actor", "Ex", "binary_body", "exchange_of", "principal"]


async def principal(request: Request) -> Principal:
    """Authenticate the request (RFC 9421 signature over the exact body) or raise."""
    ex: Exchange = request.app.state.exchange
    body = await request.body()
    base = ex.settings.public_base_url
    url = (
        str(request.url)
        if base is None
        else base.rstrip("/")
        + request.url.path
        + ("?" + request.url.query if request.url.query else "")
    )
    route = request.scope.get("route")
    route_name = getattr(route, "path", request.url.path)
    return await run_in_threadpool(
        authenticate,
        ex,
        request.method,
        url,
        request.headers,
        body,
        int(time.time()),
        f"{request.method} {route_name}",
    )


def exchange_of(request: Request) -> Exchange:
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
