"""Hostile bodies and names: oversized and compressed bodies (a decompression bomb), bad
framing, and path traversal in zone, dataset, upload and path-parameter names, in attach URLs
and in the CLI's ``--out``. Nothing is read past the limit, decompressed or written outside
its place."""

from __future__ import annotations

import gzip
import json
import socket
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from exchange.cli import app
from exchange.keyfile import write_private_key
from exchange.node.store import ZoneStoreError, _check_columns, _check_name, attach
from tests.conftest import LiveServer
from tests.security._support import (
    EXAMPLES,
    PURPOSE,
    World,
    assert_problem,
    files_under,
    send,
    signed,
    state,
)


def _raw(server: LiveServer, head: str, body: bytes = b"") -> tuple[int, str]:
    """Send bytes as they are (framing httpx would refuse to produce); the status and body."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        conn.sendall(head.encode("latin-1") + b"\r\n" + body)
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    text = reply.decode("latin-1")
    status = int(text.split(" ", 2)[1])
    return status, text.partition("\r\n\r\n")[2]


def test_oversized_bodies_are_refused_before_they_are_read(parties: World) -> None:
    server = parties.server
    before = state(server)
    limit = server.exchange.settings.max_json_bytes
    big = json.dumps({"name": "big-zone", "description": "x" * (limit + 1)}).encode()
    assert_problem(
        send(signed("POST", parties.url("/v1/zones"), parties.key("provider"), big)),
        413,
        "payload_too_large",
    )

    # chunked, with no content-length: counted while it streams
    def chunks() -> Iterator[bytes]:
        yield b'{"name": "big-zone", "description": "'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    response = httpx.post(
        parties.url("/v1/zones"), content=chunks(), headers={"content-type": "application/json"}
    )
    assert_problem(response, 413, "payload_too_large")
    # declared sizes above each route's limit are refused from the headers alone
    settings = server.exchange.settings
    for path, declared in (
        ("/v1/zones", limit + 1),
        ("/v1/zones/tax/uploads", settings.max_upload_bytes + 1),
        ("/v1/psi/sessions/x/a/points", settings.max_psi_batch_bytes + 1),
        ("/v1/he/contexts", settings.max_he_context_bytes + 1),
    ):
        status, body = _raw(
            server,
            f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {declared}\r\n"
            "Connection: close\r\n",
        )
        assert status == 413 and json.loads(body)["code"] == "payload_too_large", path
    # malformed or absurd lengths: refused by the HTTP parser or the middleware, never read
    for length in ("-1", "abc", "1e9", "0x10", str(10**30)):
        status, body = _raw(
            server,
            f"POST /v1/zones HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n"
            "Connection: close\r\n",
        )
        assert status == 400, length
    # fields longer than their schema allows, within the byte limit
    for body_dict in (
        {"name": "z" * 64},
        {"name": "long-zone", "description": "x" * 4001},
    ):
        response = send(
            signed(
                "POST",
                parties.url("/v1/zones"),
                parties.key("provider"),
                json.dumps(body_dict).encode(),
            )
        )
        assert_problem(response, 422, "invalid_input")
    assert state(server) == before


def test_compressed_bodies_are_never_decompressed(parties: World) -> None:
    server = parties.server
    before = state(server)
    # 64 MiB of JSON in 64 KiB: a decompression bomb for a server that inflates bodies
    inflated = b'{"name": "bomb-zone", "description": "' + b" " * (64 << 20) + b'"}'
    bombs = {
        "gzip": gzip.compress(inflated, compresslevel=9),
        "deflate": zlib.compress(inflated, 9),
    }
    assert all(len(b) < 128 << 10 for b in bombs.values())
    for encoding, body in (
        ("gzip", bombs["gzip"]),
        ("GZIP", bombs["gzip"]),
        ("x-gzip", bombs["gzip"]),
        ("deflate", bombs["deflate"]),
        ("br", b"\x00"),
        ("identity, gzip", bombs["gzip"]),
        ("gzip, identity", bombs["gzip"]),
    ):
        request = signed(
            "POST",
            parties.url("/v1/zones"),
            parties.key("provider"),
            body,
            headers={"content-type": "application/json", "content-encoding": encoding},
        )
        assert_problem(send(request), 415, "unsupported_media_type")
    # a compressed CSV upload, under the upload route's larger limit, is refused the same way
    request = signed(
        "POST",
        parties.url("/v1/zones/tax/uploads"),
        parties.key("provider"),
        gzip.compress(b"a,b\n" + b"1,2\n" * (1 << 20)),
        headers={"content-type": "text/csv", "content-encoding": "gzip"},
    )
    assert_problem(send(request), 415, "unsupported_media_type")
    assert state(server) == before
    staging = server.exchange.staging_dir
    assert not staging.exists() or not files_under(staging)


TRAVERSALS = ["../tax", "..", "tax/../land", "..%2f..%2fcontrol.db", "a\n", "control.db", "./x"]


def test_traversal_in_names_is_refused(world: World) -> None:
    server = world.server
    data = server.data_dir
    files = files_under(data)
    before = state(server)
    with server.client(world.key("provider")) as p:
        upload = p.upload("tax", EXAMPLES / "companies.csv")["upload_id"]
        files = files_under(data)
        before = state(server)
        for name in TRAVERSALS:
            r = httpx.Request(
                "POST",
                world.url("/v1/zones"),
                content=json.dumps({"name": name}).encode(),
            )
            req = signed("POST", str(r.url), world.key("provider"), r.content)
            assert_problem(send(req), 422, "invalid_input")
            body = {
                "name": name,
                "subject_column": "company_id",
                "levels": {"company_id": "L2"},
                "upload_id": upload,
            }
            with pytest.raises(Exception) as exc:
                p.request("POST", "/v1/zones/tax/datasets", json=body)
            assert getattr(exc.value, "status", None) == 422, (name, exc.value)
        # upload ids that walk out of the staging directory (32 characters, as the schema wants)
        for upload_id in (".//" + "./" * 8 + "../control.db", "../" * 10 + "db", "/" * 32):
            assert len(upload_id) == 32
            body = {
                "name": "stolen",
                "subject_column": "company_id",
                "levels": {"company_id": "L2"},
                "upload_id": upload_id,
            }
            with pytest.raises(Exception) as exc:
                p.request("POST", "/v1/zones/tax/datasets", json=body)
            assert getattr(exc.value, "status", None) in (404, 422), (upload_id, exc.value)
    # path parameters, percent-encoded so that the client does not resolve them
    for path in (
        "/v1/zones/..%2f..%2fetc",
        "/v1/zones/tax/datasets/..%2f..%2fcontrol.db",
        "/v1/he/contexts/..%2f..%2fcontrol.db",
        "/v1/he/contexts/" + "..%2f" * 8 + "log.pub",
        "/v1/he/models/..%2f..%2fcontrol.db",
        "/v1/psi/sessions/..%2f..%2fcontrol.db",
        "/v1/access-requests/..%2f..%2fcontrol.db",
        "/v1/grants/%2e%2e%2f%2e%2e%2fcontrol.db",
    ):
        response = send(signed("GET", world.url(path), world.key("consumer")))
        assert response.status_code in (404, 422), (path, response.status_code)
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "sqlite" not in response.text.lower() and "Traceback" not in response.text
    assert state(server) == before
    assert files_under(data) - files <= {p for p in files_under(data) if "ledger" in p.name}


def test_attach_urls_cannot_walk_out_of_an_allowed_prefix(tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.db"
    secret.write_bytes(b"")
    prefix = f"sqlite:///{allowed}/"
    for url in (
        f"sqlite:///{allowed}/../secret.db",
        f"sqlite:///{allowed}/%2e%2e/secret.db",
        f"sqlite:///{allowed}/sub/../../secret.db",
        f"sqlite:///{secret}",
        "sqlite:////etc/passwd",
    ):
        with pytest.raises(ZoneStoreError):
            attach(url, "t", allowed_prefixes=[prefix])


def test_cli_out_writes_exactly_where_asked(world: World, tmp_path: Path) -> None:
    server = world.server
    with server.client(world.key("consumer")) as c:
        req = c.request_access(
            "tax", ["open_companies"], ["export"], PURPOSE, duration_seconds=3600, justification="x"
        )
    with server.client(world.key("provider")) as p:
        p.approve(req["id"])
    key = tmp_path / "consumer.key"
    write_private_key(key, world.key("consumer"))
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)

    def run(*args: str) -> tuple[int, str]:
        result = CliRunner().invoke(
            app, [*args, "--url", server.url, "--key", str(key)], catch_exceptions=False
        )
        return result.exit_code, result.output

    before = files_under(work)
    # a missing directory: one line, non-zero, nothing written anywhere
    code, output = run(
        "export", "tax", "open_companies", "--purpose", PURPOSE, "--out", str(work / "no/rows.json")
    )
    assert code == 1 and "Traceback" not in output
    assert files_under(work) == before
    # dot segments resolve to the place the user named; the receipt goes beside the result
    target = work / "sub" / ".." / "rows.json"
    code, output = run(
        "export", "tax", "open_companies", "--purpose", PURPOSE, "--out", str(target)
    )
    assert code == 0, output
    assert files_under(work) - before == {work / "rows.json", work / "rows.json.receipt"}
    assert json.loads((work / "rows.json").read_text())["rows"]


def test_huge_integers_are_refused_not_overflowed(world: World) -> None:
    """Numbers beyond a database BIGINT in paths, queries and bodies get a 4xx, never a 500
    from the driver."""
    server = world.server
    before = state(server)
    huge = 10**21
    for path in (
        f"/v1/log/entries/{huge}",
        f"/v1/log/entries/{(1 << 63) - 1}",
        f"/v1/log/proof/inclusion?seq={huge}&size={huge}",
        f"/v1/log/proof/consistency?size1=1&size2={huge}",
        f"/v1/psi/sessions/x/b/points?offset={huge}&limit={huge}",
        f"/v1/grants?all={huge}",
    ):
        response = send(signed("GET", world.url(path), server.operator))
        assert 400 <= response.status_code < 500, (path, response.status_code)
        assert response.headers["content-type"].startswith("application/problem+json")
    base = {
        "zone": "tax",
        "datasets": ["open_companies"],
        "operations": ["export"],
        "purpose": PURPOSE,
        "justification": "x",
    }
    for duration in (huge, -huge):
        body = json.dumps({**base, "duration_seconds": duration}).encode()
        response = send(
            signed("POST", world.url("/v1/access-requests"), world.key("consumer"), body)
        )
        assert_problem(response, 422, "invalid_input")
    session = {
        "zone": "tax",
        "dataset": "open_companies",
        "mode": "cardinality",
        "purpose": PURPOSE,
        "x_count": huge,
    }
    response = send(
        signed(
            "POST",
            world.url("/v1/psi/sessions"),
            world.key("consumer"),
            json.dumps(session).encode(),
        )
    )
    assert 400 <= response.status_code < 500, response.text
    assert state(server) == before


def test_names_with_a_trailing_newline_are_refused() -> None:
    """``$`` matches before a final newline: table and column names are matched whole."""
    for name in ("tax\n", "companies\n"):
        with pytest.raises(ZoneStoreError):
            _check_columns(["company_id", name], "bad_columns")
        with pytest.raises(ZoneStoreError):
            _check_name(name)
    _check_columns(["company_id", "tax"], "bad_columns")
    _check_name("companies")
