"""Operations signals: request ids, structured logs, Prometheus metrics, readiness.

Every HTTP request gets an id (the caller's ``X-Request-Id`` when it is a sane token, else a
fresh one), returned in the response and carried by a context variable into every log record
written while the request runs. :class:`RequestContextMiddleware` writes one access-log line
per request (never a body or a query value) and counts it in the metrics.

Metrics use ``prometheus_client``. When ``PROMETHEUS_MULTIPROC_DIR`` is set (``zonex serve
--workers N`` sets it), each worker writes its samples to files there and ``/metrics``
aggregates every worker. Label values are bounded: route templates (never raw paths), methods,
status codes, decision outcomes and reason codes, computation kinds; no key ids, zone or
dataset names.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess
from sqlalchemy import text
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "METRICS_CONTENT_TYPE",
    "REQUEST_ID_HEADER",
    "JsonFormatter",
    "RequestContextMiddleware",
    "RequestIdFilter",
    "current_request_id",
    "logging_config",
    "note_key_id",
    "observe_computation",
    "prepare_multiprocess_metrics",
    "readiness_problem",
    "record_decision",
    "render_metrics",
]

REQUEST_ID_HEADER = "X-Request-Id"
METRICS_CONTENT_TYPE = CONTENT_TYPE_LATEST
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
#: a caller's request id is echoed only if it is a short plain token (no log injection)
_SANE_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED_ROUTE = "<unmatched>"

access_log = logging.getLogger("zonex.access")


# -- request context ---------------------------------------------------------------------------


@dataclass
class RequestContext:
    """What the access log learns while a request runs. Mutable on purpose: threads that serve
    the request see copies of the context variable, but all share this one object."""

    request_id: str
    key_id: str | None = None


_context: ContextVar[RequestContext | None] = ContextVar("zonex_request", default=None)


def current_request_id() -> str | None:
    ctx = _context.get()
    return None if ctx is None else ctx.request_id


def note_key_id(key_id: str) -> None:
    """Record the authenticated signer of the current request (for the access log)."""
    ctx = _context.get()
    if ctx is not None:
        ctx.key_id = key_id


def _request_id_from(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = bytes(value).decode("latin-1")
            if _SANE_ID.match(candidate):
                return candidate
            break
    return secrets.token_hex(16)


def _route_template(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED_ROUTE


class RequestContextMiddleware:
    """Request id in and out, one access-log line and the HTTP metrics per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = RequestContext(_request_id_from(scope))
        token = _context.set(ctx)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER.lower() not in headers:
                    headers.append(REQUEST_ID_HEADER, ctx.request_id)
            await send(message)

        failed = False
        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            failed = True
            status = 500
            raise
        finally:
            elapsed = time.perf_counter() - started
            method = str(scope.get("method", "GET")).upper()
            route = _route_template(scope)
            metrics = get_metrics()
            label = method if method in _METHODS else "OTHER"
            metrics.http_requests.labels(label, route, str(status)).inc()
            metrics.http_latency.labels(label, route).observe(elapsed)
            access_log.log(
                logging.ERROR if status >= 500 else logging.INFO,
                "%s %s %d %.1fms",
                method,
                scope.get("path", ""),
                status,
                elapsed * 1000,
                extra={
                    "method": method,
                    "path": scope.get("path", ""),  # never the query string
                    "route": route,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                    "key_id": ctx.key_id,
                },
            )
            if not failed:
                # on an unhandled error the id stays set for the outer error handler's log line
                _context.reset(token)


# -- logging -----------------------------------------------------------------------------------

#: attributes every LogRecord has; anything else was passed with ``extra=`` and is a field
_RECORD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message"}  # uvicorn's ANSI-coloured copy of msg
)


class RequestIdFilter(logging.Filter):
    """Stamp every record with the current request id (``-`` outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id() or "-"
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None) or current_request_id()
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if rid and rid != "-":
            out["request_id"] = rid
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRS and key != "request_id" and value is not None:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def logging_config(fmt: str = "json", level: str = "INFO") -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for ``zonex serve`` (applied in every worker by uvicorn).

    uvicorn's own access log is switched off: :class:`RequestContextMiddleware` writes one line
    per request with the request id and the signer's key id instead."""
    if fmt not in ("json", "text"):
        raise ValueError(f"unknown log format {fmt!r} (json or text)")
    handler = {
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
        "formatter": fmt,
        "filters": ["request_id"],
    }
    logger = {"handlers": ["default"], "level": level, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"request_id": {"()": "exchange.server.observability.RequestIdFilter"}},
        "formatters": {
            "json": {"()": "exchange.server.observability.JsonFormatter"},
            "text": {"format": TEXT_FORMAT},
        },
        "handlers": {"default": handler},
        "loggers": {
            "zonex": logger,
            "exchange": logger,
            "uvicorn": logger,
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"handlers": [], "level": "WARNING", "propagate": False},
        },
    }


# -- metrics -----------------------------------------------------------------------------------

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_COMPUTE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass(frozen=True)
class Metrics:
    http_requests: Counter
    http_latency: Histogram
    policy_decisions: Counter
    ledger_size: Gauge
    ledger_append: Histogram
    ledger_commit: Histogram
    computations: Histogram


@lru_cache(maxsize=1)
def get_metrics() -> Metrics:
    """The process's metrics, registered on first use (not at import)."""
    return Metrics(
        http_requests=Counter(
            "zonex_http_requests",
            "HTTP requests by method, route template and status",
            ["method", "route", "status"],
        ),
        http_latency=Histogram(
            "zonex_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            ["method", "route"],
            buckets=_LATENCY_BUCKETS,
        ),
        policy_decisions=Counter(
            "zonex_policy_decisions",
            "authorization decisions by outcome and reason code",
            ["outcome", "reason"],
        ),
        ledger_size=Gauge(
            "zonex_ledger_size",
            "entries in the ledger (its sequence length) as last seen by this process",
            multiprocess_mode="max",
        ),
        ledger_append=Histogram(
            "zonex_ledger_append_seconds",
            "time from queueing a ledger entry to its durable commit",
            buckets=_LATENCY_BUCKETS,
        ),
        ledger_commit=Histogram(
            "zonex_ledger_commit_seconds",
            "time to commit one group-commit batch",
            buckets=_LATENCY_BUCKETS,
        ),
        computations=Histogram(
            "zonex_computation_duration_seconds",
            "computation run time by kind and outcome",
            ["kind", "outcome"],
            buckets=_COMPUTE_BUCKETS,
        ),
    )


def record_decision(allowed: bool, reason: str) -> None:
    get_metrics().policy_decisions.labels("allow" if allowed else "deny", reason).inc()


@contextmanager
def observe_computation(kind: str) -> Iterator[None]:
    """Time a computation (``aggregate``, ``export``, ``he_score``, ...)."""
    started = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        get_metrics().computations.labels(kind, outcome).observe(time.perf_counter() - started)


def prepare_multiprocess_metrics(directory: Path) -> None:
    """Point ``prometheus_client`` at a fresh, empty ``directory`` for this server's workers
    (samples of an earlier run would otherwise be summed in). Call before workers start."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in directory.glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = str(directory)


def render_metrics() -> bytes:
    """The text exposition: every worker's samples in multiprocess mode, else this process's."""
    get_metrics()
    if os.environ.get(MULTIPROC_ENV):
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


# -- readiness ---------------------------------------------------------------------------------


def readiness_problem(ex: Any) -> str | None:
    """Why this process should not get traffic, or None when it is ready: the control-plane
    database answers a trivial query and the ledger writer runs. Details go to the log."""
    if not ex.ledger.running:
        return "the ledger writer is not running"
    try:
        with ex.engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
    except Exception as exc:
        logging.getLogger("zonex.ready").warning("readiness: database check failed: %s", exc)
        return "the control-plane database does not answer"
    return None
