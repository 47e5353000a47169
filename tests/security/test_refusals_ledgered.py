"""Every refusal of an authenticated request is on the ledger: who, which route, the error and
reason codes, and the digest of the query it carried, never its text or values; bounded per
key; never twice; never for a caller whose signature did not verify."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlglot

from crypto.keys import SigningKey
from exchange.audit import check_bundle, read_bundle_lines
from exchange.client.sdk import ApiError
from exchange.server.api.refusals import sql_digest
from exchange.server.ledger import EntryDraft, write_export
from exchange.server.runtime import Exchange
from tests.conftest import LiveServer, settings_for
from tests.exchange.test_access import granted
from tests.security._support import PURPOSE, World, assert_problem, entries, send, signed

#: the per-key limit in this module (small, so the limit is cheap to reach)
PER_KEY = 4
AGGREGATE_ROUTE = "POST /v1/zones/{zone}/aggregate"
#: a literal that appears nowhere in the data: if it is on the ledger, the query text leaked
SECRET = "C-SECRET-4242"
ROW_LEVEL_SQL = f"SELECT company_id, tax_paid_2025 FROM companies WHERE company_id = '{SECRET}'"
REFUSAL_ATTRS = {"route", "code", "reason", "status"}


@pytest.fixture
def exchange(data_dir: Path) -> Iterator[Exchange]:
    # a summary interval far longer than any test: the ticker never resets the per-key
    # counters in the middle of one
    ex = Exchange(
        settings_for(
            data_dir,
            checkpoint_interval_seconds=0.2,
            rejection_entries_per_key=PER_KEY,
            rejection_summary_interval_seconds=3600,
        )
    )
    ex.start()
    try:
        yield ex
    finally:
        ex.close()


def settled(server: LiveServer) -> None:
    """Wait until every entry queued so far is durable: the writer commits in queue order, so
    an entry appended (and waited for) now is committed after all of them."""
    server.exchange.ledger.append(EntryDraft(kind="test.barrier"))


def refusals(server: LiveServer) -> list[dict[str, Any]]:
    settled(server)
    return entries(server, "request.refused")


def canonical_digest(sql: str) -> str:
    canonical = sqlglot.parse_one(sql, read="duckdb").sql(
        dialect="duckdb", normalize=True, comments=False
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def exported(server: LiveServer, tmp_path: Path) -> bytes:
    """The ledger as an auditor gets it, checked the way `zonex audit verify` checks it."""
    settled(server)
    path = tmp_path / "bundle.jsonl"
    write_export(server.exchange.ledger, path)
    report = check_bundle(read_bundle_lines(path), server.log_verifier())
    assert report.ok, report
    return path.read_bytes()


def assert_nothing_of(data: bytes, *texts: str) -> None:
    for text in texts:
        assert text.encode() not in data, text
        assert json.dumps(text).encode() not in data, text


def post(world: World, who: str, path: str, body: dict[str, Any] | bytes) -> Any:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return send(signed("POST", world.url(path), world.key(who), raw))


# -- each kind of refusal leaves exactly one entry ---------------------------------------------


def test_a_query_rejection_is_ledgered_by_digest(world: World, tmp_path: Path) -> None:
    granted(world.server, world.keys, ["companies"], ["aggregate"])
    consumer = world.key("consumer")
    response = post(
        world, "consumer", "/v1/zones/tax/aggregate", {"sql": ROW_LEVEL_SQL, "purpose": PURPOSE}
    )
    assert_problem(response, 422, "query_rejected")
    (entry,) = refusals(world.server)
    assert entry["actor"] == consumer.key_id
    assert set(entry["attrs"]) == REFUSAL_ATTRS
    assert entry["attrs"] == {
        "route": AGGREGATE_ROUTE,
        "code": "query_rejected",
        "reason": response.json()["reason"],
        "status": 422,
    }
    assert entry["digests"] == {"query": canonical_digest(ROW_LEVEL_SQL)}
    assert entry["refs"] == {}
    # the text, its literal and the problem's detail are nowhere on the ledger
    assert_nothing_of(
        exported(world.server, tmp_path), ROW_LEVEL_SQL, SECRET, response.json()["detail"]
    )


def test_a_query_that_does_not_parse_is_ledgered_without_a_digest(world: World) -> None:
    granted(world.server, world.keys, ["companies"], ["aggregate"])
    sql = f"SELEKT '{SECRET}' FROM"
    response = post(world, "consumer", "/v1/zones/tax/aggregate", {"sql": sql, "purpose": PURPOSE})
    assert_problem(response, 422, "query_rejected")
    (entry,) = refusals(world.server)
    assert entry["attrs"]["reason"] == "parse_error"
    assert entry["digests"] == {}


def test_budget_exhaustion_is_ledgered(world: World, tmp_path: Path) -> None:
    with world.server.client(world.key("provider")) as p:
        p.set_analysis_rules(
            "tax",
            "companies",
            {
                "columns": {
                    "company_id": {"disclosure": "join_only"},
                    "district": {"disclosure": "plaintext"},
                },
                "dp_required": True,
                "epsilon_budget": "1",
                "refresh_seconds": 3600,
            },
        )
    granted(world.server, world.keys, ["companies"], ["aggregate"])
    sql = f"SELECT COUNT(*) AS n FROM companies WHERE district = '{SECRET}'"
    with world.server.client(world.key("consumer")) as c, pytest.raises(ApiError) as info:
        c.aggregate("tax", sql, PURPOSE, epsilon="2")
    assert info.value.status == 429 and info.value.code == "budget_exhausted"
    (entry,) = refusals(world.server)
    assert entry["actor"] == world.key("consumer").key_id
    assert entry["attrs"] == {
        "route": AGGREGATE_ROUTE,
        "code": "budget_exhausted",
        "reason": "budget_exhausted",
        "status": 429,
    }
    assert entry["digests"] == {"query": canonical_digest(sql)}
    assert_nothing_of(exported(world.server, tmp_path), sql, SECRET, info.value.detail)


def test_an_access_request_above_the_ceiling_is_ledgered(world: World, tmp_path: Path) -> None:
    justification = f"please, for {SECRET}"
    with world.server.client(world.key("consumer")) as c, pytest.raises(ApiError) as info:
        c.request_access(
            "tax",
            ["strategic"],
            ["export"],
            PURPOSE,
            duration_seconds=3600,
            justification=justification,
        )
    assert info.value.status == 403 and info.value.code == "denied"
    (entry,) = refusals(world.server)
    assert entry["actor"] == world.key("consumer").key_id
    assert entry["attrs"] == {
        "route": "POST /v1/access-requests",
        "code": "denied",
        "reason": "level_ceiling",
        "status": 403,
    }
    assert entry["digests"] == {}
    assert entries(world.server, "access.requested") == []
    assert_nothing_of(exported(world.server, tmp_path), justification, SECRET)


def test_a_validation_error_is_ledgered(world: World, tmp_path: Path) -> None:
    sql = f"SELECT COUNT(*) FROM companies WHERE company_id = '{SECRET}'"
    body = {"sql": sql, "purpose": PURPOSE, "limit": SECRET}  # an unknown field
    response = post(world, "consumer", "/v1/zones/tax/aggregate", body)
    assert_problem(response, 422, "invalid_input")
    (entry,) = refusals(world.server)
    assert entry["actor"] == world.key("consumer").key_id
    assert entry["attrs"] == {
        "route": AGGREGATE_ROUTE,
        "code": "invalid_input",
        "reason": "extra_forbidden",
        "status": 422,
    }
    # the body was invalid, but the query in it parses: its digest is there, never its text
    assert entry["digests"] == {"query": canonical_digest(sql)}
    assert_nothing_of(exported(world.server, tmp_path), sql, SECRET)


def test_a_body_that_is_not_json_is_ledgered_after_its_signature_verifies(world: World) -> None:
    response = post(world, "consumer", "/v1/zones", b"{not json " + SECRET.encode())
    assert_problem(response, 422, "invalid_input")
    (entry,) = refusals(world.server)
    assert entry["actor"] == world.key("consumer").key_id
    assert entry["attrs"]["route"] == "POST /v1/zones"
    assert entry["attrs"]["reason"] == "json_invalid"


def test_the_digest_is_that_of_the_canonical_query_a_release_shows(world: World) -> None:
    # an auditor can match a refused query with the same query released later
    granted(world.server, world.keys, ["open_companies"], ["aggregate"])
    sql = "select District, count(*) as n /* by district */ from open_companies group by district"
    with world.server.client(world.key("consumer")) as c:
        out = c.aggregate("tax", sql, PURPOSE)
    canonical = out["result"]["sql"]
    assert canonical != sql
    assert sql_digest(sql) == hashlib.sha256(canonical.encode()).hexdigest()


# -- bounded, attributable, not twice ---------------------------------------------------------


def test_refusals_beyond_the_per_key_limit_are_summarized(world: World) -> None:
    consumer = world.key("consumer")
    for i in range(PER_KEY + 5):
        response = post(world, "consumer", "/v1/zones", {"name": f"z{i}", "colour": i})
        assert_problem(response, 422, "invalid_input")
    individual = refusals(world.server)
    assert len(individual) == PER_KEY
    assert {e["actor"] for e in individual} == {consumer.key_id}
    assert entries(world.server, "request.refused.summary") == []
    world.server.exchange.ledger.rejections.flush()
    settled(world.server)
    (summary,) = entries(world.server, "request.refused.summary")
    assert summary["actor"] == "-"
    assert summary["attrs"]["count.invalid_input.extra_forbidden"] == 5
    assert summary["attrs"][f"actor.{consumer.key_id}"] == 5
    assert set(summary["attrs"]) == {
        "since",
        "count.invalid_input.extra_forbidden",
        f"actor.{consumer.key_id}",
    }
    # a new interval: the key gets individual entries again
    post(world, "consumer", "/v1/zones", {"name": "again", "colour": 1})
    assert len(refusals(world.server)) == PER_KEY + 1


def test_forged_requests_in_a_key_s_name_do_not_silence_its_refusals(world: World) -> None:
    consumer = world.key("consumer")
    forger = SigningKey.generate()
    for i in range(PER_KEY + 2):
        forged = signed("GET", world.url("/v1/catalog"), forger, nonce=f"forged-{i}")
        forged.headers["signature-input"] = forged.headers["signature-input"].replace(
            forger.key_id, consumer.key_id
        )
        assert_problem(send(forged), 401, "verification_failed")
    response = post(world, "consumer", "/v1/zones", {"name": "z", "colour": 1})
    assert_problem(response, 422, "invalid_input")
    (entry,) = refusals(world.server)
    assert entry["actor"] == consumer.key_id


def test_a_policy_denial_is_ledgered_once(world: World) -> None:
    # no grant: the decision point denies, and the domain ledgers it as access.denied
    with world.server.client(world.key("consumer")) as c, pytest.raises(ApiError) as info:
        c.aggregate("tax", "SELECT COUNT(*) FROM open_companies", PURPOSE)
    assert info.value.status == 403 and info.value.code == "denied"
    settled(world.server)
    assert len(entries(world.server, "access.denied")) == 1
    assert refusals(world.server) == []


def test_unauthenticated_refusals_leave_no_per_key_entry(world: World) -> None:
    stranger = SigningKey.generate()
    consumer = world.key("consumer")
    # an unknown key, a body that is not JSON: refused as unauthenticated, not as bad input
    response = send(signed("POST", world.url("/v1/zones"), stranger, b"{not json"))
    assert_problem(response, 401, "verification_failed")
    # the consumer's key id, a stale signature, a bad body
    stale = signed(
        "POST",
        world.url("/v1/zones/tax/aggregate"),
        consumer,
        json.dumps({"sql": ROW_LEVEL_SQL}).encode(),
        created=int(time.time()) - 3600,
    )
    assert_problem(send(stale), 401, "verification_failed")
    # no signature at all
    unsigned = httpx.Request(
        "POST", world.url("/v1/zones"), content=b"[]", headers={"content-type": "application/json"}
    )
    assert_problem(send(unsigned), 401, "verification_failed")
    # unknown routes are not authenticated
    assert send(signed("GET", world.url("/v1/no-such-route"), consumer)).status_code == 404
    assert refusals(world.server) == []
    assert entries(world.server, "request.refused.summary") == []
