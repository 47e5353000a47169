"""FastAPI dependencies shared by every router: the authenticated principal and the exchange."""

from __future__ import annotations

import ipaddress
import time
from typing import Annotated

from fastapi import Depends, Request

from exchange.domain import Principal
from exchange.errors import UnsupportedMediaTypeError
from exchange.server.auth import authenticate
from exchange.server.observability import note_key_id
from exchange.server.runtime import Exchange

__all__ = [
    "BINARY",
    "Actor",
    "Ex",
    "addressed_to_socket",
    "binary_body",
    "exchange_of",
    "principal",
    "principal_of_body",
    "registry_version",
]


async def principal(request: Request) -> Principal:
    """Authenticate the request (RFC 9421 signature over the exact body) or raise.

    The principal and the body it signed stay on ``request.state`` (``principal``, ``body``):
    a refusal of the request is recorded against the principal only once its signature
    verified (:mod:`exchange.server.api.refusals`)."""
    return await principal_of_body(request, await request.body())


async def principal_of_body(request: Request, body: bytes) -> Principal:
    """:func:`principal` for a request whose ``body`` was already read: also for one that the
    framework refused before any dependency ran (a body that is not JSON)."""
    ex: Exchange = request.app.state.exchange
    base = ex.settings.public_base_url
    origin = f"{request.url.scheme}://{request.url.netloc}" if base is None else base.rstrip("/")
    # without a configured origin, only a request addressed to this server's own socket address
    # is taken at its Host header: a request signed for another exchange (the same key may be
    # registered with both) and replayed here under that exchange's name is refused
    addressed_here = base is not None or addressed_to_socket(request)
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
        addressed_here=addressed_here,
    )
    request.state.registry_version = signed.registry_version
    # only a verified signer: refusals after this point are ledgered against it
    request.state.principal = signed.principal
    request.state.body = body
    note_key_id(signed.principal.key_id)
    return signed.principal


_LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def addressed_to_socket(request: Request) -> bool:
    """The Host header names the address the connection arrived on (``scope["server"]``), or a
    loopback name for it when that address is loopback; the default port may be left out."""
    server = request.scope.get("server")
    if not server or server[1] is None:
        return True  # not a socket (an in-process transport): nothing to compare with
    host, port = str(server[0]), int(server[1])
    named = request.headers.get("host", "").strip().lower()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"  # IPv6
    names = {host.lower()}
    try:
        if ipaddress.ip_address(host.strip("[]")).is_loopback:
            names.update(_LOOPBACK_NAMES)
    except ValueError:
        pass
    default = {"http": 80, "https": 443}.get(request.url.scheme)
    allowed = {f"{name}:{port}" for name in names}
    if port == default:
        allowed |= names
    return named in allowed


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
