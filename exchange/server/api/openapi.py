"""The API's OpenAPI document and its ``/docs`` page.

FastAPI generates the document from the routes; this module adds what a client author needs
and the routes cannot say: the request-signing scheme (RFC 9421) as a security scheme and a
description paragraph, one shared ``Problem`` component (RFC 9457) referenced by every error
answer, and a summary and description for every operation. ``/docs`` is a small self-contained
page (no CDN assets, no external URL) that renders the document served by the same exchange.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse

from exchange.server.api.schemas import PROBLEM_COMPONENT, PROBLEM_REF

__all__ = [
    "API_DESCRIPTION",
    "DATASET_FILE_BODY",
    "SECURITY_SCHEME",
    "build_openapi",
    "docs_page",
    "install",
]

#: the name of the security scheme every authenticated operation requires
SECURITY_SCHEME = "httpMessageSignature"
#: routes anyone may call: no signature
UNAUTHENTICATED = {("get", "/v1/health"), ("get", "/v1/ready")}

API_DESCRIPTION = """\
zonex: a privacy-preserving data exchange. Providers publish zones and datasets with
classification levels; consumers ask for access with a purpose and run authorized computations
(aggregates, private joins, encrypted scoring, secure sums); every call is decided by policy
and recorded on a tamper-evident ledger; every release comes with a signed receipt that can be
verified offline.

## Signing requests

There are no bearer tokens and no sessions. Every request except `GET /v1/health` and
`GET /v1/ready` is signed by the caller's registered Ed25519 key with HTTP Message Signatures
(RFC 9421) and carries three headers:

- `Content-Digest: sha-256=:<base64 of SHA-256(body)>:` (RFC 9530), also for an empty body;
- `Signature-Input: sig1=("@method" "@target-uri" "content-digest");created=<unix seconds>;\
nonce="<unique per key>";keyid="<key id>";alg="ed25519"`, where the key id is the lowercase hex
  SHA-256 of the raw 32-byte public key, `created` is within 300 s of the server's clock and a
  nonce is never used twice;
- `Signature: sig1=:<base64 of the 64-byte Ed25519 signature>:` over the RFC 9421 signature
  base of those three components.

A request that is unsigned, stale, replayed, signed by an unknown or suspended key, or whose
body does not match its digest is answered `401` with code `verification_failed`. The byte
layout, a worked example and the test vector are in `docs/wire-formats-http.md`; the Python
SDK (`exchange.client.sdk.Client`) and the `zonex` CLI sign for you.

## Errors

Every error is an RFC 9457 problem (`application/problem+json`, the `Problem` schema) with a
stable `code`; refusals add a `reason` code. 401 unauthenticated, 403 denied by policy (404
where existence itself is secret), 409 conflict, 413 too large, 415 wrong media type, 422
invalid input (with `errors` naming each field), 429 privacy budget exhausted, 503 the
exchange cannot record evidence right now (retry).

## Encodings

JSON bodies are UTF-8 with no floats in anything signed (decimals as strings). Public keys,
envelope payloads, HE ciphertexts and nonces are unpadded base64url; Merkle hashes in ledger
proofs and the PSI `psi_aggregate` sums are standard padded base64; binary bodies (dataset
files, HE contexts and ciphertexts, PSI points) are sent raw with their media type. The PSI and
HE protocols are documented in `docs/api-psi-he.md`.
"""

_SECURITY_DESCRIPTION = (
    "RFC 9421 HTTP Message Signatures with Ed25519 over `@method`, `@target-uri` and "
    "`content-digest` (RFC 9530, sha-256), with `created`, `nonce`, `keyid` and "
    '`alg="ed25519"` parameters: send `Signature-Input`, `Signature` and `Content-Digest`. '
    "Declared here as the `Signature` header; see the API description and "
    "docs/wire-formats-http.md for the full scheme."
)

#: the raw body of ``POST /v1/zones/{zone}/uploads``
DATASET_FILE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the dataset file as the raw body, at most max_upload_bytes",
        "content": {
            media: {"schema": {"type": "string", "format": "binary"}}
            for media in ("text/csv", "application/vnd.apache.parquet")
        },
    }
}

#: (method, path) -> (summary, description) for the routes declared in ``exchange.server.api.app``;
#: a route missing here keeps FastAPI's summary and its docstring (or the summary)
OPERATIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("get", "/v1/health"): ("Liveness", "Answers while the process runs. Not signed."),
    ("get", "/v1/ready"): (
        "Readiness",
        "200 when the control-plane database answers in time, else a 503 problem. Not signed.",
    ),
    ("get", "/v1/principals/me"): (
        "The caller's principal",
        "The principal the request's signing key belongs to: key id, name, kind, status.",
    ),
    ("get", "/v1/principals"): (
        "List principals",
        "Principals the caller may see (the operator sees all).",
    ),
    ("post", "/v1/principals"): (
        "Register a principal",
        "Operator only. Registers a name, a kind (operator, agency, enterprise, auditor) and "
        "a raw 32-byte Ed25519 public key (unpadded base64url); ledgered.",
    ),
    ("post", "/v1/principals/{key_id}/status"): (
        "Suspend or reinstate a principal",
        "Operator only. `active` or `suspended`; a suspended key's requests are refused at "
        "once (401 `verification_failed`).",
    ),
    ("post", "/v1/zones"): (
        "Create a zone",
        "A provider opens a zone it owns; the zone gets its own Ed25519 key.",
    ),
    ("get", "/v1/catalog"): (
        "Read the catalog",
        "Every zone with its datasets: schema, column levels, row-count band, snapshot digest "
        "and whether the provider opted out of DP by default. The first read of each document "
        "per interval is ledgered before it is answered; repeats are counted in a summary.",
    ),
    ("get", "/v1/zones/{zone}"): ("Read a zone", "One zone of the catalog with its datasets."),
    ("post", "/v1/zones/{zone}/uploads"): (
        "Stage a dataset file",
        "The zone's owner uploads a CSV (`text/csv`) or Parquet "
        "(`application/vnd.apache.parquet`) file as the raw body; the answer's `upload_id` "
        "names it when registering the dataset.",
    ),
    ("post", "/v1/zones/{zone}/datasets"): (
        "Register a dataset",
        "From a staged upload or an attached table, with a level per column and the subject "
        "column; the dataset's level is its highest column.",
    ),
    ("get", "/v1/zones/{zone}/datasets/{name}"): ("Read a dataset", "One dataset's metadata."),
    ("post", "/v1/access-requests"): (
        "Ask for access",
        "A consumer files a request: zone, datasets, operations, purpose, duration and "
        "justification. It stays pending until the provider (and for IMPORTANT data the "
        "operator) approves.",
    ),
    ("get", "/v1/access-requests"): (
        "List access requests",
        "A consumer's own requests, or those on a provider's zones; filter by zone and status.",
    ),
    ("get", "/v1/access-requests/{request_id}"): ("Read an access request", "One request."),
    ("post", "/v1/access-requests/{request_id}/approve"): (
        "Approve an access request",
        "The approver sends a DSSE envelope it signed over the request's terms (optionally "
        "narrowed); once every required approval is in, a grant is created. No one approves "
        "their own request.",
    ),
    ("post", "/v1/access-requests/{request_id}/reject"): (
        "Reject an access request",
        "The provider (or operator) rejects a pending request with a reason.",
    ),
    ("get", "/v1/grants"): (
        "List grants",
        "Live grants of the caller (consumer) or on its zones (provider); `all=true` adds "
        "revoked and expired ones.",
    ),
    ("get", "/v1/grants/{grant_id}"): ("Read a grant", "One grant."),
    ("post", "/v1/grants/{grant_id}/revoke"): (
        "Revoke a grant",
        "The provider or operator revokes a grant at once, with a reason; ledgered.",
    ),
    ("post", "/v1/zones/{zone}/status"): (
        "Suspend or reinstate a zone",
        "Operator only: `active` or `suspended`.",
    ),
    ("put", "/v1/zones/{zone}/ceilings"): (
        "Tighten a zone's level ceilings",
        "Per level, the operations allowed at most: a subset of the default ceiling (zones "
        "tighten, never loosen).",
    ),
    ("put", "/v1/zones/{zone}/datasets/{name}/ceilings"): (
        "Tighten a dataset's level ceilings",
        "As for the zone, for one dataset.",
    ),
    ("post", "/v1/zones/{zone}/consents"): (
        "Record a consent",
        "A data subject's consent to a named use by one consumer, until an expiry; needed "
        "for HE scoring of that subject. The subject is stored only as a keyed digest.",
    ),
    ("get", "/v1/zones/{zone}/consents"): ("List consents", "The zone's consents, by id."),
    ("post", "/v1/consents/{consent_id}/withdraw"): (
        "Withdraw a consent",
        "Ends a consent at once; ledgered.",
    ),
    ("get", "/v1/zones/{zone}/datasets/{name}/analysis-rules"): (
        "Read analysis rules",
        "The dataset's analysis rules (k, DP, ε budget, bounds, disclosure per column); see "
        "docs/analysis-rules.md.",
    ),
    ("put", "/v1/zones/{zone}/datasets/{name}/analysis-rules"): (
        "Set analysis rules",
        "The provider replaces the dataset's analysis rules; a new version is assigned and "
        "ledgered.",
    ),
    ("get", "/v1/budgets"): (
        "Read privacy budgets",
        "The caller's ε budget, spent and remaining per dataset, in the current window.",
    ),
    ("post", "/v1/zones/{zone}/aggregate"): (
        "Run an aggregate",
        "One SQL SELECT over the zone's datasets, checked against the analysis rules; groups "
        "under a noisy k gate are suppressed, DP noise by default at L3 and above (`epsilon` "
        "as a decimal string). Returns the result and a signed receipt.",
    ),
    ("post", "/v1/zones/{zone}/datasets/{name}/export"): (
        "Export rows",
        "Rows under an export grant (L1/L2), subject ids pseudonymized per consumer, with a "
        "signed receipt.",
    ),
    ("get", "/v1/log/checkpoint"): (
        "Latest checkpoint",
        "The log's latest signed checkpoint (C2SP tlog-checkpoint signed note): size, root "
        "(base64) and the note text.",
    ),
    ("get", "/v1/log/proof/inclusion"): (
        "Inclusion proof",
        "RFC 9162 inclusion proof of entry `seq` in the tree of `size` entries (hashes in base64).",
    ),
    ("get", "/v1/log/proof/consistency"): (
        "Consistency proof",
        "RFC 9162 consistency proof between tree sizes `size1` and `size2` (base64).",
    ),
    ("get", "/v1/log/entries/{seq}"): (
        "Read a ledger entry",
        "Operator and auditors only: the entry's exact canonical JSON text.",
    ),
}


def _problem_content() -> dict[str, Any]:
    return {"application/problem+json": {"schema": {"$ref": PROBLEM_REF}}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The OpenAPI document of ``app`` with the signing scheme, the shared ``Problem``
    component and a summary and description on every operation."""
    doc = get_openapi(
        title=app.title,
        version=app.version,
        description=API_DESCRIPTION,
        routes=app.routes,
    )
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {})["Problem"] = PROBLEM_COMPONENT
    components["securitySchemes"] = {
        SECURITY_SCHEME: {
            "type": "apiKey",
            "in": "header",
            "name": "Signature",
            "description": _SECURITY_DESCRIPTION,
        }
    }
    doc["security"] = [{SECURITY_SCHEME: []}]
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            if not isinstance(op, dict):
                continue
            summary, description = OPERATIONS.get((method, path), ("", ""))
            op["summary"] = summary or op.get("summary") or f"{method.upper()} {path}"
            op["description"] = description or op.get("description") or op["summary"]
            if (method, path) in UNAUTHENTICATED:
                op["security"] = []
            for status, response in op.get("responses", {}).items():
                # every error answer is a problem document, whatever the framework declared
                if status.startswith(("4", "5")) and isinstance(response, dict):
                    response["content"] = _problem_content()
    return doc


_DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>zonex API</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 72rem; padding: 1rem 2rem;
       color: #1b1f24; }
h1 { margin-bottom: .2rem; } .intro { white-space: pre-wrap; background: #f6f8fa;
       padding: 1rem; border-radius: 6px; }
details { border: 1px solid #d0d7de; border-radius: 6px; margin: .4rem 0; }
summary { cursor: pointer; padding: .45rem .7rem; }
.m { display: inline-block; min-width: 4.2rem; font-weight: 700; font-family: monospace; }
.get { color: #0969da; } .post { color: #1a7f37; } .put { color: #9a6700; }
.delete { color: #cf222e; } .path { font-family: monospace; } .s { color: #57606a; }
.body { padding: .2rem 1rem 1rem; } pre { background: #f6f8fa; padding: .6rem;
       overflow-x: auto; border-radius: 6px; font-size: 13px; }
table { border-collapse: collapse; } td, th { border: 1px solid #d0d7de; padding: .2rem .5rem;
       text-align: left; vertical-align: top; } .lock { color: #57606a; font-size: 12px; }
</style>
</head>
<body>
<h1 id="title">zonex API</h1>
<p class="s">This page renders <a href="openapi.json">openapi.json</a> from this exchange; it
loads nothing from anywhere else.</p>
<div id="intro" class="intro"></div>
<h2>Operations</h2>
<div id="ops">loading…</div>
<h2>Schemas</h2>
<div id="schemas"></div>
<script>
"use strict";
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(c));
  return node;
}
function pre(value) { return el("pre", {}, JSON.stringify(value, null, 2)); }
function render(doc) {
  document.getElementById("title").textContent = doc.info.title + " " + doc.info.version;
  document.getElementById("intro").textContent = doc.info.description || "";
  const ops = document.getElementById("ops");
  ops.textContent = "";
  const global = doc.security || [];
  for (const [path, item] of Object.entries(doc.paths || {})) {
    for (const [method, op] of Object.entries(item)) {
      const signed = (op.security || global).length > 0;
      const body = el("div", {class: "body"});
      body.append(el("p", {}, op.description || ""));
      body.append(el("p", {class: "lock"}, signed ? "signed request (RFC 9421)" : "not signed"));
      if (op.parameters && op.parameters.length) {
        const t = el("table", {}, el("tr", {}, el("th", {}, "parameter"), el("th", {}, "in"),
                                     el("th", {}, "required"), el("th", {}, "schema")));
        for (const p of op.parameters) {
          t.append(el("tr", {}, el("td", {}, p.name), el("td", {}, p.in),
                      el("td", {}, p.required ? "yes" : "no"),
                      el("td", {}, JSON.stringify(p.schema || {}))));
        }
        body.append(el("h4", {}, "Parameters"), t);
      }
      if (op.requestBody) {
        body.append(el("h4", {}, "Request body"));
        if (op.requestBody.description) body.append(el("p", {}, op.requestBody.description));
        for (const [media, content] of Object.entries(op.requestBody.content || {})) {
          body.append(el("p", {}, el("code", {}, media)), pre(content.schema || {}));
        }
      }
      body.append(el("h4", {}, "Responses"));
      for (const [status, resp] of Object.entries(op.responses || {})) {
        body.append(el("p", {}, el("b", {}, status + " "), resp.description || ""));
        for (const [media, content] of Object.entries(resp.content || {})) {
          body.append(el("p", {}, el("code", {}, media)), pre(content.schema || {}));
        }
      }
      ops.append(el("details", {},
        el("summary", {}, el("span", {class: "m " + method}, method.toUpperCase()),
           el("span", {class: "path"}, path + "  "), el("span", {class: "s"}, op.summary || "")),
        body));
    }
  }
  const schemas = document.getElementById("schemas");
  const comps = (doc.components || {});
  for (const [name, schema] of Object.entries(comps.securitySchemes || {})) {
    schemas.append(el("details", {}, el("summary", {}, "security scheme " + name), pre(schema)));
  }
  for (const [name, schema] of Object.entries(comps.schemas || {})) {
    schemas.append(el("details", {id: "schema-" + name}, el("summary", {}, name), pre(schema)));
  }
}
fetch("openapi.json").then(r => r.json()).then(render).catch(e => {
  document.getElementById("ops").textContent = "cannot load openapi.json: " + e;
});
</script>
</body>
</html>
"""


def docs_page() -> str:
    """The ``/docs`` page: plain HTML, inline CSS and script, the document fetched from this
    server (a relative URL), nothing from a CDN."""
    return _DOCS_PAGE


def install(app: FastAPI) -> None:
    """Serve the completed document at ``/openapi.json`` and the offline page at ``/docs``."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(docs_page())
