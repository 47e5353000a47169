"""Request authentication: RFC 9421 signatures, skew window, nonces, key status.

Each failure has a precise reason code for the server log and the ledger; the caller only
ever sees the collapsed ``verification_failed`` answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError

from crypto.httpsig import HttpSignatureError, parse_signature, verify_request
from crypto.keys import VerifyKey
from exchange.domain import Principal
from exchange.errors import AuthenticationError
from exchange.models import NonceRow, PrincipalRow
from exchange.node import Exchange
from exchange.services import to_principal
from exchange.storage import WRITE

log = logging.getLogger("zonex.auth")

MAX_NONCE_LENGTH = 128

# Core statements, not ORM sessions: this runs on every request, and the ORM's unit of work
# costs more than the round trips here (bench/load.py)
_PRINCIPALS = PrincipalRow.__table__
_NONCES = NonceRow.__table__


def authenticate(
    ex: Exchange,
    method: str,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    now: int,
    route: str,
) -> Principal:
    """Return the principal that signed this request, or raise :class:`AuthenticationError`.

    Every rejection is recorded (bounded) on the ledger with its reason and key id.
    """
    keyid: str | None = None
    known: str | None = None
    try:
        try:
            sig_input, _ = parse_signature(headers)
        except HttpSignatureError as exc:
            raise AuthenticationError(exc.reason) from exc
        keyid = sig_input.keyid
        row = None
        if len(keyid) == 64:
            with ex.engine.connect() as conn:
                row = conn.execute(select(_PRINCIPALS).where(_PRINCIPALS.c.key_id == keyid)).first()
        principal = None if row is None else to_principal(row)  # type: ignore[arg-type]
        public_key = None if row is None else bytes(row.public_key)
        if principal is None or public_key is None:
            raise AuthenticationError("unknown_key", keyid)
        known = principal.key_id
        try:
            verify_request(
                method,
                url,
                headers,
                body,
                VerifyKey(public_key),
                now=now,
                max_skew=ex.settings.max_skew_seconds,
            )
        except HttpSignatureError as exc:
            raise AuthenticationError(exc.reason, keyid) from exc
        if not principal.active:
            raise AuthenticationError("suspended", keyid)
        nonce = sig_input.nonce
        if not nonce or len(nonce) > MAX_NONCE_LENGTH:
            raise AuthenticationError("malformed", keyid)
        try:
            with ex.engine.execution_options(**WRITE).begin() as conn:
                conn.execute(
                    insert(_NONCES).values(key_id=keyid, nonce=nonce, created=sig_input.created)
                )
        except IntegrityError as exc:
            raise AuthenticationError("replayed", keyid) from exc
        return principal
    except AuthenticationError as exc:
        log.info("rejected request: reason=%s keyid=%s route=%s", exc.reason, keyid, route)
        ex.ledger.rejections.record(exc.reason, known, route)
        raise
