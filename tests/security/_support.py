"""Helpers for the attack suite: hand-signed requests, the exact rejection, and snapshots of
everything an attack could change."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from crypto.httpsig import sign_request
from crypto.keys import SigningKey
from exchange.server.models import (
    AccessRequestRow,
    AnalysisRulesRow,
    BudgetRow,
    ConsentRow,
    DatasetRow,
    GrantRow,
    LedgerEntryRow,
    PrincipalRow,
    PsiSessionRow,
    UploadRow,
    ZoneRow,
)
from tests.conftest import LiveServer
from tests.exchange.test_access import EXAMPLES, IMPORTANT_LEVELS, L2_LEVELS, L3_LEVELS

__all__ = [
    "DAY",
    "EXAMPLES",
    "PURPOSE",
    "World",
    "assert_problem",
    "entries",
    "rejected_reasons",
    "send",
    "signed",
    "state",
]

PURPOSE = "credit-assessment"
DAY = 24 * 3600
_COUNTED = (
    PrincipalRow,
    ZoneRow,
    DatasetRow,
    UploadRow,
    AccessRequestRow,
    GrantRow,
    ConsentRow,
    AnalysisRulesRow,
    BudgetRow,
    PsiSessionRow,
)


@dataclass
class World:
    """A live server with an operator, two providers (zones ``tax`` and ``land``), a consumer
    bank, another bank and an auditor. ``tax`` holds the same registry at three levels."""

    server: LiveServer
    keys: dict[str, SigningKey] = field(default_factory=dict)

    def url(self, path: str) -> str:
        return self.server.url + path

    def key(self, who: str) -> SigningKey:
        return self.server.operator if who == "operator" else self.keys[who]


def build_world(server: LiveServer, *, datasets: bool = True) -> World:
    keys = {
        "provider": SigningKey.generate(),
        "consumer": SigningKey.generate(),
        "other": SigningKey.generate(),
        "bank2": SigningKey.generate(),
        "auditor": SigningKey.generate(),
    }
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
        op.register_principal("Land Bureau", "agency", keys["other"].public_key)
        op.register_principal("Harbour Bank", "enterprise", keys["bank2"].public_key)
        op.register_principal("Audit Office", "auditor", keys["auditor"].public_key)
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
        if not datasets:
            return World(server, keys)
        for name, levels in (
            ("open_companies", L2_LEVELS),
            ("companies", L3_LEVELS),
            ("strategic", IMPORTANT_LEVELS),
        ):
            p.register_dataset(
                "tax",
                name,
                levels=levels,
                subject_column="company_id",
                file=EXAMPLES / "companies.csv",
            )
    with server.client(keys["other"]) as o:
        o.create_zone("land", "land records")
        o.register_dataset(
            "land",
            "parcels",
            levels=L2_LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    return World(server, keys)


def file_request(world: World, who: str = "consumer", justification: str = "review") -> str:
    """``who`` asks for export of the tax zone's ``open_companies``; returns the request id."""
    with world.server.client(world.key(who)) as c:
        r = c.request_access(
            "tax",
            ["open_companies"],
            ["export"],
            PURPOSE,
            duration_seconds=DAY,
            justification=justification,
        )
    return str(r["id"])


def signed(
    method: str,
    url: str,
    key: SigningKey,
    body: bytes = b"",
    *,
    created: int | None = None,
    nonce: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Request:
    """A request signed exactly as the SDK signs it, with every parameter under control."""
    hdrs = dict(headers or {})
    if body:
        hdrs.setdefault("content-type", "application/json")
    sig = sign_request(
        method,
        url,
        hdrs,
        body,
        key,
        created=int(time.time()) if created is None else created,
        nonce=nonce or "n-" + str(time.time_ns()),
    )
    return httpx.Request(method, url, headers={**hdrs, **sig}, content=body)


def send(request: httpx.Request) -> httpx.Response:
    with httpx.Client(timeout=60) as c:
        return c.send(request)


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is exactly this RFC 9457 problem; returns its body."""
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["code"] == code, body
    assert body["status"] == status
    assert body["type"] == f"urn:zonex:problem:{code}"
    assert {"title", "detail"} <= set(body)
    return body


def entries(server: LiveServer, kind: str | None = None) -> list[dict[str, Any]]:
    with Session(server.exchange.engine) as s:
        bodies = s.execute(select(LedgerEntryRow.body).order_by(LedgerEntryRow.seq)).scalars()
        found = [json.loads(b) for b in bodies]
    return [e for e in found if kind is None or e["kind"] == kind]


def state(server: LiveServer) -> dict[str, Any]:
    """Row counts of every table an attack could add to, each grant's and request's status,
    and the ε spent: equal before and after means nothing changed."""
    with Session(server.exchange.engine) as s:
        counts = {
            row.__tablename__: s.execute(select(func.count()).select_from(row)).scalar_one()
            for row in _COUNTED
        }
        for name, columns in (
            ("grant_status", (GrantRow.id, GrantRow.status)),
            ("request_status", (AccessRequestRow.id, AccessRequestRow.status)),
            ("zone_status", (ZoneRow.name, ZoneRow.status)),
            ("principal_status", (PrincipalRow.key_id, PrincipalRow.status)),
            ("spent", (BudgetRow.dataset, BudgetRow.spent)),
        ):
            counts[name] = sorted(tuple(r) for r in s.execute(select(*columns)))
    return counts


def rejected_reasons(server: LiveServer, at_least: int = 1) -> list[str]:
    """The reasons of the rejections on the ledger (one by one or summarized), once at least
    ``at_least`` are there (rejections are written in batches)."""
    server.exchange.ledger.rejections.flush()
    deadline = time.monotonic() + 5
    while True:
        reasons: list[str] = []
        for e in entries(server):
            if e["kind"] == "request.rejected":
                reasons.append(e["attrs"]["reason"])
            elif e["kind"] == "request.rejected.summary":
                for k, v in e["attrs"].items():
                    if k.startswith("count."):
                        reasons.extend([k.removeprefix("count.")] * int(v))
        if len(reasons) >= at_least or time.monotonic() > deadline:
            return reasons
        time.sleep(0.05)
        server.exchange.ledger.rejections.flush()


def ledger_kinds(server: LiveServer) -> list[str]:
    return [e["kind"] for e in entries(server)]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}
