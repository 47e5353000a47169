"""Authenticated refusals onto the ledger.

Every 4xx answer to a request whose signature verified is recorded as a ``request.refused``
entry: the signer's key id, the route template, the problem's code, a reason code, the status,
and the SHA-256 of the query when the request carried SQL that parses. Never the body, a value,
an identifier or the problem's detail. Entries are bounded per key and interval (the rest is
counted in a summary, see :class:`exchange.server.ledger.RejectionCounter`).

Not recorded here: refusals the domain has already put on the ledger (``exc.ledgered``, e.g.
``access.denied``), and answers to requests that never authenticated (401 is recorded by
:mod:`exchange.server.auth`; an unknown route's 404 or 405 names nobody).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from functools import partial

import sqlglot
from fastapi import Request
from sqlglot.errors import ErrorLevel
from starlette.concurrency import run_in_threadpool

from exchange.domain import Principal
from exchange.errors import ZonexError
from exchange.node.sqlcheck import MAX_SQL_LENGTH
from exchange.server.ledger import Refusal
from exchange.server.runtime import Exchange

__all__ = ["query_digest", "reason_of", "record_refusal", "sql_digest"]

log = logging.getLogger("zonex.api")

#: what a reason code looks like; anything else (free text) is recorded as ``other``
_CODE = re.compile(r"[a-z0-9][a-z0-9_.:-]{0,63}")
OTHER = "other"
JSON_MEDIA = "application/json"
#: the dialect the SQL checker reads, and the canonical form it digests
DIALECT = "duckdb"


def reason_of(exc: ZonexError) -> str:
    """The error's stable reason code: its ``reason`` attribute or ``extra["reason"]``, else
    its ``code``."""
    reason = getattr(exc, "reason", None)
    if not isinstance(reason, str):
        reason = exc.extra.get("reason")
    return reason if isinstance(reason, str) and reason else exc.code


def _code(value: str) -> str:
    return value if _CODE.fullmatch(value) else OTHER


def sql_digest(sql: str) -> str | None:
    """SHA-256 (hex) of sqlglot's canonical form of ``sql`` (DuckDB dialect, normalized,
    comments dropped, constants kept: for one statement, the ``canonical`` form the SQL checker
    digests and releases), or None if it does not parse. Statements are joined with ``; ``."""
    if not sql or len(sql) > MAX_SQL_LENGTH:
        return None
    try:
        parsed = sqlglot.parse(sql, read=DIALECT, error_level=ErrorLevel.RAISE)
        statements = [s for s in parsed if s is not None]
        if not statements:
            return None
        canonical = "; ".join(
            s.sql(dialect=DIALECT, normalize=True, comments=False) for s in statements
        )
    except Exception:  # RecursionError included
        # foreign code fed hostile text: a query that cannot be parsed simply has no digest
        return None
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def query_digest(body: bytes, content_type: str, max_bytes: int) -> str | None:
    """The :func:`sql_digest` of a JSON body's top-level ``"sql"`` string, if there is one."""
    if content_type.split(";")[0].strip().lower() != JSON_MEDIA or len(body) > max_bytes:
        return None
    try:
        document = json.loads(body)
    except Exception:  # not JSON, not UTF-8, nested too deep
        return None
    sql = document.get("sql") if isinstance(document, dict) else None
    return sql_digest(sql) if isinstance(sql, str) else None


def _route(request: Request) -> str:
    path = getattr(request.scope.get("route"), "path", None)
    return f"{request.method} {path if isinstance(path, str) else request.url.path}"


async def record_refusal(request: Request, status: int, code: str, reason: str) -> None:
    """Ledger a 4xx answer to ``request`` if its signature verified (bounded per key).

    Never raises: the caller is answering with a problem already."""
    actor: Principal | None = getattr(request.state, "principal", None)
    if actor is None or not 400 <= status < 500:
        return
    try:
        ex: Exchange = request.app.state.exchange
        refusal = Refusal(actor.key_id, _route(request), _code(code), _code(reason), status)
        body: bytes = getattr(request.state, "body", b"")
        counter = ex.ledger.rejections
        if not body:
            counter.record_refusal(refusal)
            return
        digest = partial(
            query_digest,
            body,
            request.headers.get("content-type", ""),
            ex.settings.max_json_bytes,
        )
        # parsing a query is CPU work: off the event loop, and only for an entry of its own
        await run_in_threadpool(counter.record_refusal, refusal, digest)
    except Exception:  # pragma: no cover - the refusal is answered regardless
        log.exception("could not record a refusal")
