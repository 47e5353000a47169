"""The HTTP API on a real server on loopback: authentication, catalog, bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from crypto.httpsig import sign_request
from crypto.keys import SigningKey
from exchange.client.sdk import ApiError, Client
from exchange.server.models import DatasetRow, LedgerEntryRow, PrincipalRow, ZoneRow
from tests.conftest import LiveServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
LEVELS = {
    "company_id": "L2",
    "district": "L1",
    "industry": "L1",
    "founded_year": "L1",
    "employees": "L2",
    "registered_capital": "L2",
    "tax_paid_2025": "L3",
}


def signed(
    method: str,
    url: str,
    key: SigningKey,
    body: bytes = b"",
    *,
    created: int | None = None,
    nonce: str = "n-" + str(time.time_ns()),
    headers: dict[str, str] | None = None,
) -> httpx.Request:
    hdrs = dict(headers or {})
    if body:
        hdrs.setdefault("content-type", "application/json")
    sig = sign_request(
        method, url, hdrs, body, key, created=created or int(time.time()), nonce=nonce
    )
    return httpx.Request(method, url, headers={**hdrs, **sig}, content=body)


def send(request: httpx.Request) -> httpx.Response:
    with httpx.Client() as c:
        return c.send(request)


@pytest.fixture
def parties(server: LiveServer) -> dict[str, SigningKey]:
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    return keys


@pytest.fixture
def with_dataset(server: LiveServer, parties: dict[str, SigningKey]) -> dict[str, SigningKey]:
    with server.client(parties["provider"]) as p:
        p.create_zone("tax", "tax records")
        p.register_dataset(
            "tax",
            "companies",
            levels=LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    return parties


def rejected_reasons(server: LiveServer) -> list[str]:
    server.exchange.ledger.rejections.flush()
    deadline = time.monotonic() + 5
    reasons: list[str] = []
    while time.monotonic() < deadline:
        with Session(server.exchange.engine) as s:
            bodies = s.execute(select(LedgerEntryRow.body).order_by(LedgerEntryRow.seq)).scalars()
            reasons = []
            for b in bodies:
                e = json.loads(b)
                if e["kind"] == "request.rejected":
                    reasons.append(e["attrs"]["reason"])
                elif e["kind"] == "request.rejected.summary":
                    reasons.extend(
                        k.removeprefix("count.") for k in e["attrs"] if k.startswith("count.")
                    )
        time.sleep(0.05)
        if reasons:
            break
    return reasons


def assert_401(response: httpx.Response) -> None:
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "verification_failed"


# -- the happy path ---------------------------------------------------------------------------


def test_catalog_shows_metadata_and_never_rows(
    server: LiveServer, with_dataset: dict[str, SigningKey]
) -> None:
    with server.client(with_dataset["consumer"]) as c:
        catalog = c.catalog()
        dataset = c.dataset("tax", "companies")
    zone = catalog["zones"][0]
    assert zone["name"] == "tax" and zone["owner_name"] == "Tax Bureau"
    assert dataset["level"] == "L3"
    assert dataset["row_count_band"] == "100-999"
    assert {c["name"]: c["level"] for c in dataset["columns"]} == LEVELS
    assert len(dataset["digest"]) == 64
    text = json.dumps(catalog)
    first_id = (EXAMPLES / "companies.csv").read_text().splitlines()[1].split(",")[0]
    assert first_id not in text


def test_every_state_change_is_on_the_ledger(
    server: LiveServer, with_dataset: dict[str, SigningKey]
) -> None:
    with Session(server.exchange.engine) as s:
        kinds = [json.loads(b)["kind"] for b in s.execute(select(LedgerEntryRow.body)).scalars()]
    for kind in (
        "log.initialized",
        "principal.registered",
        "zone.created",
        "upload.received",
        "dataset.registered",
    ):
        assert kind in kinds


def test_inclusion_proof_from_the_api_verifies(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    from crypto.encoding import b64_decode
    from crypto.merkle import verify_inclusion
    from crypto.note import NoteVerifier, verify_checkpoint

    server.exchange.ledger.checkpoint()
    with server.client(parties["consumer"]) as c:
        cp = c.checkpoint()
        proof = c.inclusion_proof(1, cp["size"])
    verifier = NoteVerifier.from_verifier_key((server.data_dir / "log.pub").read_text().strip())
    checkpoint = verify_checkpoint(cp["note"], verifier)
    verify_inclusion(
        1,
        checkpoint.size,
        b64_decode(proof["leaf_hash"]),
        [b64_decode(h) for h in proof["proof"]],
        checkpoint.root,
    )


# -- authentication ---------------------------------------------------------------------------


def test_unsigned_request_is_rejected(server: LiveServer) -> None:
    assert_401(httpx.get(f"{server.url}/v1/catalog"))


def test_replayed_request_is_rejected(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    request = signed("GET", f"{server.url}/v1/catalog", parties["consumer"])
    assert send(request).status_code == 200
    assert_401(send(request))
    assert "replayed" in rejected_reasons(server)


@pytest.mark.parametrize("offset", [-310, 310])
def test_stale_request_is_rejected(
    server: LiveServer, parties: dict[str, SigningKey], offset: int
) -> None:
    request = signed(
        "GET", f"{server.url}/v1/catalog", parties["consumer"], created=int(time.time()) + offset
    )
    assert_401(send(request))
    assert "stale" in rejected_reasons(server)


def test_request_within_skew_is_accepted(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    request = signed(
        "GET", f"{server.url}/v1/catalog", parties["consumer"], created=int(time.time()) - 290
    )
    assert send(request).status_code == 200


def test_wrongly_signed_request_is_rejected(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    request = signed("GET", f"{server.url}/v1/catalog", parties["consumer"])
    other = signed("GET", f"{server.url}/v1/catalog", SigningKey.generate(), nonce="other")
    # keep the consumer's key id but carry another key's signature
    request.headers["signature"] = other.headers["signature"]
    assert_401(send(request))
    assert "bad_signature" in rejected_reasons(server)


def test_body_tampered_request_is_rejected(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    body = json.dumps({"name": "zone-a", "description": ""}).encode()
    request = signed("POST", f"{server.url}/v1/zones", parties["provider"], body)
    tampered = httpx.Request(
        "POST",
        request.url,
        headers=request.headers,
        content=body.replace(b"zone-a", b"zone-b"),
    )
    assert_401(send(tampered))
    assert "digest_mismatch" in rejected_reasons(server)
    with Session(server.exchange.engine) as s:
        assert s.execute(select(func.count()).select_from(ZoneRow)).scalar_one() == 0


def test_target_uri_is_covered(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    request = signed("GET", f"{server.url}/v1/principals/me", parties["consumer"])
    moved = httpx.Request("GET", f"{server.url}/v1/catalog", headers=request.headers)
    assert_401(send(moved))


def test_unknown_key_is_rejected_and_only_summarized(server: LiveServer) -> None:
    stranger = SigningKey.generate()
    for i in range(25):
        assert_401(send(signed("GET", f"{server.url}/v1/catalog", stranger, nonce=f"s{i}")))
    ledger = server.exchange.ledger
    before = ledger.size()
    ledger.rejections.flush()
    deadline = time.monotonic() + 5
    while ledger.size() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    with Session(server.exchange.engine) as s:
        entries = [json.loads(b) for b in s.execute(select(LedgerEntryRow.body)).scalars()]
    assert not [e for e in entries if e["kind"] == "request.rejected"]
    summaries = [e for e in entries if e["kind"] == "request.rejected.summary"]
    # at most one summary per interval (the ticker may have flushed once meanwhile)
    assert 1 <= len(summaries) <= 2
    assert sum(e["attrs"].get("count.unknown_key", 0) for e in summaries) == 25
    assert all(e["actor"] == "-" for e in summaries)


def test_known_key_rejections_are_bounded_per_interval(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    limit = server.exchange.settings.rejection_entries_per_key
    old = int(time.time()) - 1000
    for i in range(limit + 15):
        request = signed(
            "GET", f"{server.url}/v1/catalog", parties["consumer"], created=old, nonce=f"o{i}"
        )
        assert_401(send(request))
    reasons = rejected_reasons(server)
    with Session(server.exchange.engine) as s:
        entries = [json.loads(b) for b in s.execute(select(LedgerEntryRow.body)).scalars()]
    individual = [e for e in entries if e["kind"] == "request.rejected"]
    assert len(individual) == limit
    assert all(e["actor"] == parties["consumer"].key_id for e in individual)
    assert all(set(e["attrs"]) == {"reason", "route"} for e in individual)
    assert "stale" in reasons


def test_suspended_key_is_rejected_and_reinstated(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    consumer = parties["consumer"]
    with server.client(server.operator) as op:
        op.set_principal_status(consumer.key_id, "suspended")
    with server.client(consumer) as c, pytest.raises(ApiError) as info:
        c.catalog()
    assert info.value.status == 401
    assert "suspended" in rejected_reasons(server)
    with server.client(server.operator) as op:
        op.set_principal_status(consumer.key_id, "active")
    with server.client(consumer) as c:
        c.catalog()


# -- authorization ------------------------------------------------------------------------------


def test_only_the_operator_registers_principals(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c, pytest.raises(ApiError) as info:
        c.register_principal("Mallory", "agency", SigningKey.generate().public_key)
    assert info.value.status == 403


def test_provider_cannot_register_into_a_zone_it_does_not_own(
    server: LiveServer, with_dataset: dict[str, SigningKey]
) -> None:
    other = SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Other Agency", "agency", other.public_key)
    with server.client(other) as c, pytest.raises(ApiError) as info:
        c.register_dataset(
            "tax",
            "stolen",
            levels=LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    assert info.value.status == 403


def test_auditor_cannot_create_zones(server: LiveServer) -> None:
    auditor = SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Audit Office", "auditor", auditor.public_key)
    with server.client(auditor) as c, pytest.raises(ApiError) as info:
        c.create_zone("audit-zone")
    assert info.value.status == 403


# -- bad input leaves stored data unchanged -----------------------------------------------------


def snapshot(server: LiveServer) -> tuple[int, int, int]:
    with Session(server.exchange.engine) as s:
        return (
            s.execute(select(func.count()).select_from(PrincipalRow)).scalar_one(),
            s.execute(select(func.count()).select_from(ZoneRow)).scalar_one(),
            s.execute(select(func.count()).select_from(DatasetRow)).scalar_one(),
        )


def problem_of(
    server: LiveServer,
    key: SigningKey,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    response = send(signed(method, f"{server.url}{path}", key, body, headers=headers))
    assert response.headers["content-type"].startswith("application/problem+json")
    return response


@pytest.mark.parametrize(
    "body",
    [
        b'{"name": 5}',
        b'{"name": "ok-zone", "description": ["x"]}',
        b'{"name": "ok-zone", "extra": 1}',
        b"not json",
        b'{"name": "Bad Name!"}',
        b"[]",
    ],
)
def test_bad_zone_bodies_get_422(
    server: LiveServer, parties: dict[str, SigningKey], body: bytes
) -> None:
    before = snapshot(server)
    response = problem_of(server, parties["provider"], "POST", "/v1/zones", body)
    assert response.status_code == 422
    assert snapshot(server) == before


def test_huge_body_gets_413(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    body = json.dumps({"name": "z" * 10, "description": "x" * (2 << 20)}).encode()
    response = problem_of(server, parties["provider"], "POST", "/v1/zones", body)
    assert response.status_code == 413


def test_compressed_body_is_refused(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    response = problem_of(
        server,
        parties["provider"],
        "POST",
        "/v1/zones",
        b"{}",
        headers={"content-encoding": "gzip"},
    )
    assert response.status_code == 415


def test_duplicate_names_get_409(server: LiveServer, with_dataset: dict[str, SigningKey]) -> None:
    before = snapshot(server)
    with server.client(with_dataset["provider"]) as p:
        with pytest.raises(ApiError) as info:
            p.create_zone("tax")
        assert info.value.status == 409
        with pytest.raises(ApiError) as info:
            p.register_dataset(
                "tax",
                "companies",
                levels=LEVELS,
                subject_column="company_id",
                file=EXAMPLES / "companies.csv",
            )
        assert info.value.status == 409
    with server.client(server.operator) as op, pytest.raises(ApiError) as info:
        op.register_principal("Tax Bureau", "agency", SigningKey.generate().public_key)
    assert info.value.status == 409
    assert snapshot(server) == before


@pytest.mark.parametrize(
    ("levels", "subject"),
    [
        ({**LEVELS, "district": "L9"}, "company_id"),
        ({k: v for k, v in LEVELS.items() if k != "district"}, "company_id"),
        ({**LEVELS, "no_such_column": "L1"}, "company_id"),
        (LEVELS, "no_such_column"),
    ],
)
def test_bad_dataset_definitions_get_422(
    server: LiveServer,
    parties: dict[str, SigningKey],
    levels: dict[str, str],
    subject: str,
) -> None:
    with server.client(parties["provider"]) as p:
        p.create_zone("tax")
        before = snapshot(server)
        with pytest.raises(ApiError) as info:
            p.register_dataset(
                "tax",
                "companies",
                levels=levels,
                subject_column=subject,
                file=EXAMPLES / "companies.csv",
            )
        assert info.value.status == 422
        assert snapshot(server) == before
        # the same name still works once the definition is right: nothing half-registered
        p.register_dataset(
            "tax",
            "companies",
            levels=LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )


@pytest.mark.parametrize(
    "content",
    [
        b"a,b\n1,2,3,4\n\x00\xff\xfe",
        b"\xff\xfe\x00garbage\x00\x01",
        b"only_header\n",
    ],
)
def test_bad_csv_gets_422(
    server: LiveServer, parties: dict[str, SigningKey], tmp_path: Path, content: bytes
) -> None:
    path = tmp_path / "bad.csv"
    path.write_bytes(content)
    with server.client(parties["provider"]) as p:
        p.create_zone("tax")
        before = snapshot(server)
        with pytest.raises(ApiError) as info:
            p.register_dataset(
                "tax", "bad", levels={"a": "L1", "b": "L1"}, subject_column="a", file=path
            )
        assert 400 <= info.value.status < 500
    assert snapshot(server) == before


def test_unknown_route_is_problem_json(server: LiveServer) -> None:
    response = httpx.get(f"{server.url}/v1/nope")
    assert response.status_code in (401, 404)
    assert response.headers["content-type"].startswith("application/problem+json")


def test_attach_is_refused_unless_the_operator_allows_it(
    server: LiveServer, parties: dict[str, SigningKey], tmp_path: Path
) -> None:
    with server.client(parties["provider"]) as p:
        p.create_zone("tax")
        with pytest.raises(ApiError) as info:
            p.register_dataset(
                "tax",
                "stolen",
                levels={"x": "L1"},
                subject_column="x",
                attach_url=f"sqlite:///{server.data_dir / 'control.db'}",
                attach_table="principals",
            )
    assert info.value.status == 403


def test_sdk_client_signs_for_you(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    with Client(server.url, parties["consumer"]) as c:
        me = c.whoami()
    assert me["key_id"] == parties["consumer"].key_id
    assert me["kind"] == "enterprise"
