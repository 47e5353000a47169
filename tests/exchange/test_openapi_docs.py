"""The API as a client author meets it: the OpenAPI document describes the signing scheme, the
binary bodies and one shared problem schema, every operation is summarized, and ``/docs``
renders that document without loading anything from outside the server."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest

from exchange.server.api.openapi import SECURITY_SCHEME
from tests.conftest import LiveServer

BINARY = "application/octet-stream"
PROBLEM_REF = "#/components/schemas/Problem"


@pytest.fixture
def document(server: LiveServer) -> dict[str, Any]:
    response = httpx.get(f"{server.url}/openapi.json")
    assert response.status_code == 200
    doc: dict[str, Any] = response.json()
    return doc


def _operations(doc: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(m, p, op) for p, item in doc["paths"].items() for m, op in item.items()]


def test_docs_page_works_offline(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    # nothing from a CDN or any other host: no absolute URL at all, no protocol-relative one
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert "//cdn" not in page and not re.search(r"""(src|href)=["']//""", page)
    assert not re.search(r"<script[^>]+src=", page) and "<link" not in page
    # what it renders comes from this server
    assert 'fetch("openapi.json")' in page
    assert httpx.get(f"{server.url}/openapi.json").status_code == 200
    # FastAPI's CDN-based pages are gone
    assert httpx.get(f"{server.url}/redoc").status_code == 404


def test_the_signing_scheme_is_described(document: dict[str, Any]) -> None:
    scheme = document["components"]["securitySchemes"][SECURITY_SCHEME]
    assert scheme["type"] == "apiKey" and scheme["in"] == "header"
    assert scheme["name"] == "Signature" and "RFC 9421" in scheme["description"]
    assert document["security"] == [{SECURITY_SCHEME: []}]
    description = document["info"]["description"]
    for words in ("Signature-Input", "Content-Digest", "created", "nonce", "keyid", "ed25519"):
        assert words in description
    operations = {(m, p): op for m, p, op in _operations(document)}
    # the unsigned routes say so; every other one inherits the scheme
    assert operations[("get", "/v1/health")]["security"] == []
    assert operations[("get", "/v1/ready")]["security"] == []
    assert "security" not in operations[("post", "/v1/zones")]


def test_every_operation_has_a_summary_and_a_description(document: dict[str, Any]) -> None:
    for method, path, op in _operations(document):
        assert op.get("summary"), f"{method} {path}"
        assert op.get("description"), f"{method} {path}"


def test_every_error_answer_is_the_one_problem_component(document: dict[str, Any]) -> None:
    problem = document["components"]["schemas"]["Problem"]
    assert {"type", "title", "status", "detail", "code"} <= set(problem["required"])
    assert "reason" in problem["properties"] and "errors" in problem["properties"]
    for method, path, op in _operations(document):
        errors = {s: r for s, r in op["responses"].items() if s.startswith(("4", "5"))}
        assert errors, f"{method} {path}"
        for status, response in errors.items():
            assert response["content"] == {
                "application/problem+json": {"schema": {"$ref": PROBLEM_REF}}
            }, f"{method} {path} {status}"


def test_binary_bodies_and_results_are_declared(document: dict[str, Any]) -> None:
    paths = document["paths"]
    for path in (
        "/v1/psi/sessions/{session}/a/points",
        "/v1/psi/sessions/{session}/bc/points",
        "/v1/he/contexts",
        "/v1/he/contexts/{digest}/uploads",
    ):
        content = paths[path]["post"]["requestBody"]["content"]
        assert content == {BINARY: {"schema": {"type": "string", "format": "binary"}}}, path
    b = paths["/v1/psi/sessions/{session}/b/points"]["get"]["responses"]["200"]["content"]
    assert list(b) == [BINARY]
    upload = paths["/v1/zones/{zone}/uploads"]["post"]["requestBody"]["content"]
    assert {"text/csv", "application/vnd.apache.parquet"} <= set(upload)
    # results and receipts have schemas
    schemas = document["components"]["schemas"]
    assert {"ReceiptOut", "SessionOut", "ScoreOut", "SecureSumOut", "PsiResultOut"} <= set(schemas)
    receipt = schemas["ReceiptOut"]
    assert {"type", "statement", "entry", "inclusion", "checkpoint"} <= set(receipt["required"])
    for path, method in (
        ("/v1/zones/{zone}/aggregate", "post"),
        ("/v1/psi/sessions/{session}/result", "post"),
        ("/v1/he/score", "post"),
    ):
        ok = paths[path][method]["responses"]["200"]["content"]["application/json"]["schema"]
        assert "$ref" in ok, path


@pytest.mark.parametrize("body", [b"\x00\xd6", '{"a":'.encode("utf-16-le"), b"\xef\xbb\xbf{"])
def test_a_signed_body_json_reads_as_utf16_is_invalid_input_not_unauthenticated(
    server: LiveServer, body: bytes
) -> None:
    # json.loads reads a body that starts with a NUL byte as UTF-16 or UTF-32: the signature
    # is still checked over the bytes that were sent, so the signer hears what was wrong
    with server.client(server.operator) as c:
        signed = c._http.put(
            "/v1/zones/tax/ceilings", content=body, headers={"content-type": "application/json"}
        )
    assert signed.status_code == 422 and signed.json()["code"] == "invalid_input"
    # and an unsigned one learns nothing
    unsigned = httpx.put(
        f"{server.url}/v1/zones/tax/ceilings",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert unsigned.status_code == 401
