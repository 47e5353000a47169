"""SQL injection strings in every text field of the JSON bodies, the path and the query: each
is refused as bad input or stored and echoed exactly as sent, never executed. Runs on both
database engines."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import inspect

from crypto.encoding import b64url_encode
from crypto.keys import SigningKey
from exchange.client.sdk import ApiError
from tests.conftest import BACKENDS
from tests.exchange.test_aggregate import _rules
from tests.security._support import DAY, PURPOSE, World, entries, state

PAYLOADS = [
    "' OR '1'='1",
    "'; DROP TABLE grants; --",
    '" OR ""="',
    "1); DELETE FROM ledger_entries; --",
    "x' UNION SELECT key_id, public_key FROM principals --",
    "'; SELECT pg_sleep(10); --",
    "\\'; UPDATE zones SET status='suspended'; --",
    "%' OR name LIKE '%",
    "admin'/*",
    "1 OR 1=1",
]


def _status(call: Any) -> int:
    try:
        call()
    except ApiError as exc:
        assert exc.body["type"].startswith("urn:zonex:problem:"), exc.body
        assert exc.status in (403, 404, 409, 422), (exc.status, exc.body)
        return exc.status
    return 200


def _empty_or_422(call: Any) -> None:
    """A filter is matched as a value (nothing matches) or refused by its length limit."""
    try:
        assert call() == []
    except ApiError as exc:
        assert (exc.status, exc.code) == (422, "invalid_input")


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_injection_strings_are_inert_everywhere(world: World) -> None:
    server = world.server
    tables = set(inspect(server.exchange.engine).get_table_names())
    consumer, provider, operator = world.key("consumer"), world.key("provider"), server.operator
    until = datetime.now(UTC) + timedelta(days=1)
    with server.client(provider) as p, server.client(consumer) as c:
        p.set_analysis_rules("tax", "companies", _rules())
        req = c.request_access(
            "tax", ["companies"], ["aggregate"], PURPOSE, duration_seconds=DAY, justification="j"
        )
        p.approve(req["id"])
    before = state(server)
    echoed: list[str] = []
    c = server.client(consumer)
    p = server.client(provider)
    op = server.client(operator)
    try:
        for i, bad in enumerate(PAYLOADS):
            # names: refused by their grammar
            assert (
                _status(
                    lambda b=bad: op.register_principal(
                        b, "agency", SigningKey.generate().public_key
                    )
                )
                == 422
            )
            assert (
                _status(
                    lambda b=bad: op.register_principal(
                        "Ok Name", b, SigningKey.generate().public_key
                    )
                )
                == 422
            )
            assert _status(lambda b=bad: op.set_principal_status(b, "suspended")) in (404, 422)
            assert _status(lambda b=bad: op.set_principal_status(consumer.key_id, b)) == 422
            assert _status(lambda b=bad: p.create_zone(b)) == 422
            assert _status(lambda b=bad: p.set_zone_status(b, "suspended")) in (403, 404)
            assert _status(lambda b=bad: c.dataset("tax", b)) in (404, 422)
            assert _status(lambda b=bad: c.zone(b)) in (404, 422)
            for field in ("name", "subject_column"):
                body = {
                    "name": "ds",
                    "subject_column": "company_id",
                    "levels": {"company_id": "L2"},
                }
                body[field] = bad
                body["upload_id"] = "0" * 32
                assert _status(
                    lambda b=body: p.request("POST", "/v1/zones/tax/datasets", json=b)
                ) in (404, 422)
            body = {"name": "ds", "subject_column": "company_id", "levels": {bad: "L2"}}
            assert _status(lambda b=body: p.request("POST", "/v1/zones/tax/datasets", json=b)) in (
                404,
                422,
            )
            # the access workflow: zone, datasets, operations, purpose are looked up, not run
            for field, value in (
                ("zone", bad),
                ("datasets", [bad]),
                ("operations", [bad]),
                ("purpose", bad),
            ):
                body = {
                    "zone": "tax",
                    "datasets": ["open_companies"],
                    "operations": ["export"],
                    "purpose": PURPOSE,
                    "duration_seconds": DAY,
                    "justification": "x",
                    field: value,
                }
                assert _status(lambda b=body: c.request("POST", "/v1/access-requests", json=b)) in (
                    404,
                    422,
                )
            for path in (
                f"/v1/access-requests/{bad}",
                f"/v1/grants/{bad}",
                f"/v1/he/models/{bad}",
                f"/v1/he/contexts/{bad}",
                f"/v1/psi/sessions/{bad}",
            ):
                assert _status(lambda q=path: c.request("GET", q)) in (404, 422)
            assert _status(lambda b=bad: p.reject(b, "no")) in (404, 422)
            assert _status(lambda b=bad: p.revoke(b, "no")) in (404, 422)
            assert _status(lambda b=bad: p.withdraw_consent(b)) in (404, 422)
            for listing in (
                lambda b=bad: c.requests(zone=b),
                lambda b=bad: c.requests(status=b),
                lambda b=bad: c.grants(zone=b),
                lambda b=bad: c.budgets(zone=b),
            ):
                _empty_or_422(listing)
            assert (
                _status(lambda b=bad: p.record_consent("tax", "s", consumer.key_id, b, until))
                == 422
            )
            assert _status(lambda b=bad: c.export("tax", "open_companies", b)) == 422
            assert _status(lambda b=bad: c.aggregate("tax", b, PURPOSE)) == 422
            # free text: stored and echoed exactly
            r = c.request_access(
                "tax",
                ["open_companies"],
                ["export"],
                PURPOSE,
                duration_seconds=DAY,
                justification=bad,
            )
            assert r["justification"] == bad and c.get_request(r["id"])["justification"] == bad
            rejected = p.reject(r["id"], bad)
            assert rejected["reason"] == bad
            zone = p.create_zone(f"inj-{i}", bad)
            assert zone["description"] == bad and c.zone(f"inj-{i}")["description"] == bad
            consent = p.record_consent("tax", bad, consumer.key_id, PURPOSE, until)
            assert bad not in json.dumps(consent)  # the subject is kept as a salted digest
            echoed.append(bad)
            # a string constant in a clean-room query is a bound parameter: it matches nothing
            quoted = bad.replace("'", "''")
            out = c.aggregate(
                "tax",
                f"SELECT district, COUNT(*) FROM companies WHERE district = '{quoted}' "
                "GROUP BY district",
                PURPOSE,
            )
            assert out["result"]["rows"] == []
    finally:
        for client in (c, p, op):
            client.close()
    assert echoed == PAYLOADS
    # every table is still there, and only the inert records were added
    assert set(inspect(server.exchange.engine).get_table_names()) == tables
    after = state(server)
    n = len(PAYLOADS)
    assert after["principals"] == before["principals"]
    assert after["grants"] == before["grants"] and after["grant_status"] == before["grant_status"]
    assert after["zones"] == before["zones"] + n
    assert after["access_requests"] == before["access_requests"] + n
    assert after["consents"] == before["consents"] + n
    assert all(s == "active" for _, s in after["zone_status"])
    assert all(s == "active" for _, s in after["principal_status"])
    assert after["datasets"] == before["datasets"]
    # the ledger carries digests and codes, not the strings
    ledger = json.dumps(entries(server))
    assert not any(bad in ledger for bad in PAYLOADS if len(bad) > 8)


def test_injection_in_a_principal_key_and_kind(world: World) -> None:
    server = world.server
    before = state(server)
    with server.client(server.operator) as op:
        for key in ("' OR '1'='1" + "A" * 32, "A" * 42 + "'", "=" * 43):
            body = {"name": "Quiet Bank", "kind": "enterprise", "public_key": key}
            assert _status(lambda b=body: op.request("POST", "/v1/principals", json=b)) == 422
        body = {
            "name": "Quiet Bank",
            "kind": "enterprise'; --",
            "public_key": b64url_encode(SigningKey.generate().public_key.raw),
        }
        assert _status(lambda: op.request("POST", "/v1/principals", json=body)) == 422
    assert state(server) == before
