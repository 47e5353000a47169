"""Readiness, request ids, JSON access logs and Prometheus metrics on a live server."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine

from crypto.keys import SigningKey
from exchange.client.sdk import ApiError
from exchange.server.api.app import create_app
from exchange.server.observability import JsonFormatter, RequestIdFilter, logging_config
from exchange.server.runtime import Exchange
from tests.conftest import L3_LEVELS, LiveServer, settings_for, tax_bureau_and_bank


def get_in_process(ex: Exchange, path: str) -> httpx.Response:
    """One request through the ASGI app, without a server (the exchange is the caller's)."""
    app = create_app(exchange=ex)
    app.state.exchange = ex

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            return await http.get(path)

    return asyncio.run(go())


@pytest.fixture
def database_url() -> None:
    """These checks do not depend on the control-plane backend: SQLite only."""
    return None


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter())
        self.addFilter(RequestIdFilter())
        self.lines: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


@pytest.fixture
def log_lines() -> Iterator[list[dict[str, object]]]:
    handler = _Lines()
    logger = logging.getLogger("zonex")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def wait_for_access_line(lines: list[dict[str, object]], request_id: str) -> dict[str, object]:
    """The access line is written just after the response is sent: give it a moment."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        found = [
            x for x in lines if x["logger"] == "zonex.access" and x.get("request_id") == request_id
        ]
        if found:
            assert len(found) == 1
            return found[0]
        time.sleep(0.01)
    raise AssertionError(f"no access line for {request_id}")


def test_ready_and_request_ids(server: LiveServer) -> None:
    with httpx.Client(base_url=server.url) as http:
        r = http.get("/v1/ready")
        assert r.status_code == 200
        assert r.json() == {"status": "ready"}
        generated = r.headers["x-request-id"]
        assert len(generated) == 32
        assert http.get("/v1/health", headers={"x-request-id": "abc-1.2_3"}).headers[
            "x-request-id"
        ] == ("abc-1.2_3")
        for bad in ("a b", "x" * 129, "a/b", "a;b", ""):
            got = http.get("/v1/health", headers={"x-request-id": bad}).headers["x-request-id"]
            assert got != bad and len(got) == 32
        # problem responses carry the id too
        r = http.get("/v1/nowhere", headers={"x-request-id": "trace-404"})
        assert r.status_code == 404
        assert r.headers["x-request-id"] == "trace-404"
        assert r.headers["content-type"].startswith("application/problem+json")
        # refused by the body limit before the application runs: still carries an id
        big = b"{" + b" " * (server.exchange.settings.max_json_bytes + 1) + b"}"
        r = http.post("/v1/zones", content=big, headers={"x-request-id": "trace-413"})
        assert r.status_code == 413
        assert r.headers["x-request-id"] == "trace-413"


def test_not_ready_when_ledger_stopped(data_dir: Path) -> None:
    ex = Exchange(settings_for(data_dir))  # never started: no ledger writer
    try:
        r = get_in_process(ex, "/v1/ready")
        assert r.status_code == 503
        assert r.headers["content-type"].startswith("application/problem+json")
        assert r.json()["code"] == "not_ready"
        assert "ledger" in r.json()["detail"]
        assert get_in_process(ex, "/v1/health").status_code == 200
    finally:
        ex.close()


def test_not_ready_when_database_gone(exchange: Exchange, tmp_path: Path) -> None:
    real = exchange.engine
    exchange.engine = create_engine(f"sqlite:///{tmp_path}/missing/dir/x.db")
    try:
        assert get_in_process(exchange, "/v1/ready").status_code == 503
        r = get_in_process(exchange, "/v1/ready")
        assert r.json()["detail"] == "the control-plane database does not answer"
    finally:
        exchange.engine.dispose()
        exchange.engine = real


def test_access_log_is_json_with_request_id_and_signer(
    server: LiveServer, log_lines: list[dict[str, object]]
) -> None:
    with server.client(server.operator) as op:
        response = op._http.get("/v1/grants", params={"zone": "secret-zone-name"})
    assert response.status_code == 200
    line = wait_for_access_line(log_lines, response.headers["x-request-id"])
    assert line["method"] == "GET"
    assert line["path"] == "/v1/grants"
    assert line["route"] == "/v1/grants"
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float)
    assert line["key_id"] == server.operator.key_id
    assert line["level"] == "info"
    assert str(line["ts"]).endswith("+00:00")
    assert "secret-zone-name" not in json.dumps(log_lines)


def test_logs_inside_a_request_carry_its_id(
    server: LiveServer, log_lines: list[dict[str, object]]
) -> None:
    stranger = SigningKey.generate()
    with server.client(stranger) as c:
        response = c._http.get("/v1/catalog", headers={"x-request-id": "req-unknown-key"})
    assert response.status_code == 401
    auth = [x for x in log_lines if x["logger"] == "zonex.auth"]
    assert auth and auth[-1]["request_id"] == "req-unknown-key"
    line = wait_for_access_line(log_lines, "req-unknown-key")
    assert line.get("key_id") is None  # never authenticated


def test_text_and_json_logging_configs() -> None:
    import logging.config

    for fmt in ("json", "text"):
        cfg = logging_config(fmt)
        logging.config.dictConfig(cfg)
    with pytest.raises(ValueError):
        logging_config("xml")
    # leave the process as pytest configured it
    logging.config.dictConfig({"version": 1, "disable_existing_loggers": False})
    for name in ("zonex", "exchange", "uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
        lg.setLevel(logging.NOTSET)


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics(server: LiveServer) -> None:
    provider, consumer = tax_bureau_and_bank(server, L3_LEVELS, zone="taxzone")
    with httpx.Client(base_url=server.url) as http:
        before = http.get("/metrics").text
    with server.client(consumer) as c, pytest.raises(ApiError) as denied:
        c.request(
            "POST",
            "/v1/zones/taxzone/datasets/companies/export",
            json={"purpose": "credit-assessment"},
        )
    assert denied.value.status == 403
    server.exchange.ledger.size()
    with httpx.Client(base_url=server.url) as http:
        for _ in range(3):
            http.get("/v1/health")
        # a request is counted just after its response is sent: poll briefly
        deadline = time.monotonic() + 5
        while True:
            r = http.get("/metrics")
            health = _sample(r.text, "zonex_http_requests_total", route="/v1/health")
            if health >= 3 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert _sample(text, "zonex_http_requests_total", route="/v1/health", status="200") >= 3
    # the metrics are process-wide (other tests count too): compare with before
    export_route = {
        "method": "POST",
        "route": "/v1/zones/{zone}/datasets/{name}/export",
        "status": "403",
    }
    exports = _sample(text, "zonex_http_requests_total", **export_route)
    assert exports == _sample(before, "zonex_http_requests_total", **export_route) + 1
    assert _sample(text, "zonex_http_request_duration_seconds_count", route="/v1/health") >= 3
    deny = _sample(text, "zonex_policy_decisions_total", outcome="deny", reason="level_ceiling")
    assert (
        deny
        == _sample(before, "zonex_policy_decisions_total", outcome="deny", reason="level_ceiling")
        + 1
    )
    assert _sample(text, "zonex_ledger_size") == server.exchange.ledger.size()
    assert _sample(text, "zonex_ledger_append_seconds_count") > 0
    assert _sample(text, "zonex_ledger_commit_seconds_count") > 0
    assert (
        _sample(text, "zonex_computation_duration_seconds_count", kind="export", outcome="error")
        >= 1
    )
    # route templates only: no key ids, zone or dataset names in any label
    for secret in (consumer.key_id, provider.key_id, server.operator.key_id, "taxzone"):
        assert secret not in text
