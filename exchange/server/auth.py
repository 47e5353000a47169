"""Request authentication: RFC 9421 signatures, skew window, nonces, key status.

Each failure has a precise reason code for the server log and the ledger; the caller only
ever sees the collapsed ``verification_failed`` answer.

The hot path touches the database once per request, and shares even that: the nonce goes into
the process's group-committed :class:`~exchange.server.registry.NonceLog`, whose transaction also
reads the registry version. The principal comes from the
:class:`~exchange.server.registry.RegistryCache` and is used only if it was read at that version or
later; otherwise it is read again before any decision is made on it. So a suspension committed
anywhere stops the next request everywhere.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool

from crypto.httpsig import HttpSignatureError, parse_signature, verify_request
from crypto.keys import VerifyKey
from exchange.domain import Principal
from exchange.errors import AuthenticationError, UnavailableError
from exchange.server.registry import KnownKey, Recorded
from exchange.server.runtime import Exchange

__all__ = ["Authenticated", "authenticate"]

log = logging.getLogger("zonex.auth")

MAX_NONCE_LENGTH = 128
#: bodies up to this size are hashed and verified on the event loop; larger ones in a thread
INLINE_VERIFY_BYTES = 64 * 1024
KEY_ID_LENGTH = 64


@dataclass(frozen=True)
class Authenticated:
    """Who signed the request, and the registry version its nonce was recorded at: anything
    this request reads from the registry must be at least that new."""

    principal: Principal
    registry_version: int


async def authenticate(
    ex: Exchange,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    now: int,
    route: str,
    *,
    addressed_here: bool = True,
) -> Authenticated:
    """Return the principal that signed this request, or raise :class:`AuthenticationError`.

    ``addressed_here=False`` (the request names another host than this server's) refuses it
    with ``wrong_origin`` whatever its signature. Every rejection is recorded (bounded) on the
    ledger with its reason and key id.
    """
    keyid: str | None = None
    known: str | None = None
    try:
        try:
            sig_input, _ = parse_signature(headers)
        except HttpSignatureError as exc:
            raise AuthenticationError(exc.reason) from exc
        keyid = sig_input.keyid
        if not addressed_here:
            raise AuthenticationError("wrong_origin", keyid)
        key = await _key(ex, keyid)
        known = key.principal.key_id
        check = (method, url, headers, body, VerifyKey(key.public_key))
        skew = ex.settings.max_skew_seconds
        try:
            if len(body) <= INLINE_VERIFY_BYTES:
                verify_request(*check, now=now, max_skew=skew)
            else:  # hashing a large body would stall every other request on the loop
                await run_in_threadpool(verify_request, *check, now=now, max_skew=skew)
        except HttpSignatureError as exc:
            raise AuthenticationError(exc.reason, keyid) from exc
        nonce = sig_input.nonce
        if not nonce or len(nonce) > MAX_NONCE_LENGTH:
            raise AuthenticationError("malformed", keyid)
        loop = asyncio.get_running_loop()
        try:
            # on a loop the waiter is an asyncio future
            waiter = ex.nonces.submit(keyid, nonce, sig_input.created, loop)
            recorded: Recorded = await cast("asyncio.Future[Recorded]", waiter)
        except SQLAlchemyError as exc:  # nothing recorded: refuse rather than act unprotected
            raise UnavailableError("the request could not be recorded; retry it") from exc
        if not recorded.fresh:
            raise AuthenticationError("replayed", keyid)
        if key.version < recorded.registry_version:
            # the registry changed since this key was cached: decide on a fresh read
            fresh = await run_in_threadpool(
                ex.registry.current_key, keyid, recorded.registry_version
            )
            # the key id is the public key's digest, so the key the signature was checked with
            # cannot change; a row that says otherwise is not this principal
            if fresh is None or fresh.public_key != key.public_key:
                raise AuthenticationError("unknown_key", keyid)
            key = fresh
        if not key.principal.active:
            reason = "pending" if key.principal.status == "pending" else "suspended"
            raise AuthenticationError(reason, keyid, signed=True)
        return Authenticated(key.principal, recorded.registry_version)
    except AuthenticationError as exc:
        log.info("rejected request: reason=%s keyid=%s route=%s", exc.reason, keyid, route)
        ex.ledger.rejections.record(exc.reason, known, route)
        raise


async def _key(ex: Exchange, keyid: str) -> KnownKey:
    key = ex.registry.cached_key(keyid) if len(keyid) == KEY_ID_LENGTH else None
    if key is None and len(keyid) == KEY_ID_LENGTH:
        key = await run_in_threadpool(ex.registry.load_key, keyid)
    if key is None:
        raise AuthenticationError("unknown_key", keyid)
    return key
