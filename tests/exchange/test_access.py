"""The access workflow on a real server: requests, signed approvals, grants, revocation,
suspensions, ceilings, consents, and the denial codes every data call answers with."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto.envelope import Envelope, sign_envelope
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.client.sdk import ApiError, Client
from exchange.domain import APPROVAL_TYPE, approval_payload
from exchange.server import access
from exchange.server.models import LedgerEntryRow
from tests.conftest import EXAMPLES, L2_LEVELS, L3_LEVELS, LiveServer, free_port

IMPORTANT_LEVELS = {**L2_LEVELS, "tax_paid_2025": "IMPORTANT"}
PURPOSE = "credit-assessment"
DAY = 24 * 3600


@pytest.fixture
def parties(server: LiveServer) -> dict[str, SigningKey]:
    keys = {
        "provider": SigningKey.generate(),
        "consumer": SigningKey.generate(),
        "other": SigningKey.generate(),
        "auditor": SigningKey.generate(),
    }
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
        op.register_principal("Land Bureau", "agency", keys["other"].public_key)
        op.register_principal("Audit Office", "auditor", keys["auditor"].public_key)
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
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
    return keys


def denial(exc: pytest.ExceptionInfo[ApiError]) -> str:
    assert exc.value.status == 403
    assert exc.value.code == "denied"
    body = exc.value.body
    assert body["type"] == "urn:zonex:problem:denied"
    # the reason code only: no rule text, no policy rows
    assert "allow" not in json.dumps(body) and "p," not in json.dumps(body)
    return str(body["reason"])


def entries(server: LiveServer, kind: str | None = None) -> list[dict[str, Any]]:
    with Session(server.exchange.engine) as s:
        bodies = s.execute(select(LedgerEntryRow.body).order_by(LedgerEntryRow.seq)).scalars()
        found = [json.loads(b) for b in bodies]
    return [e for e in found if kind is None or e["kind"] == kind]


def granted(
    server: LiveServer,
    keys: dict[str, SigningKey],
    datasets: list[str],
    operations: list[str],
    *,
    purpose: str = PURPOSE,
    not_after: datetime | None = None,
) -> dict[str, Any]:
    with server.client(keys["consumer"]) as c:
        req = c.request_access(
            "tax",
            datasets,
            operations,
            purpose,
            duration_seconds=DAY,
            justification="credit line review",
        )
    with server.client(keys["provider"]) as p:
        approved = p.approve(req["id"], not_after=not_after)
    assert approved["status"] == "approved"
    assert approved["grant_id"].startswith("grant:")
    return approved


def test_denied_request_approve_succeed_revoke_denied(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    consumer = server.client(parties["consumer"])
    with pytest.raises(ApiError) as exc:
        consumer.export("tax", "open_companies", PURPOSE)
    assert denial(exc) == "not_granted"

    req = consumer.request_access(
        "tax",
        ["open_companies"],
        ["export"],
        PURPOSE,
        duration_seconds=DAY,
        justification="credit line review",
    )
    assert req["status"] == "pending"
    with server.client(parties["provider"]) as p:
        pending = p.requests(zone="tax", status="pending")
        assert [r["id"] for r in pending] == [req["id"]]
        approved = p.approve(req["id"])
    grant_id = approved["grant_id"]

    response = consumer.export("tax", "open_companies", PURPOSE)
    out = response["result"]
    statement, _ = verify_receipt(response["receipt"], out, server.log_verifier())
    assert statement["grant"] == approved["grant_id"]
    assert statement["output_level"] == "L2"
    assert out["level"] == "L2"
    assert out["masked"] == ["company_id"]
    ids = [row[0] for row in out["rows"]]
    raw_ids = {line.split(",")[0] for line in (EXAMPLES / "companies.csv").read_text().splitlines()}
    assert ids and not set(ids) & raw_ids  # pseudonyms, never the raw subject ids
    assert len(out["rows"]) == len(raw_ids) - 1

    grants = consumer.grants()
    assert [g["id"] for g in grants] == [grant_id]
    assert grants[0]["approved_by"] == [parties["provider"].key_id]

    with server.client(parties["provider"]) as p:
        revoked = p.revoke(grant_id, "review finished")
    assert revoked["status"] == "revoked"
    with pytest.raises(ApiError) as exc:
        consumer.export("tax", "open_companies", PURPOSE)
    assert denial(exc) == "not_granted"
    assert consumer.grants() == []
    consumer.close()

    kinds = [e["kind"] for e in entries(server)]
    for kind in ("access.requested", "grant.created", "computation.export", "grant.revoked"):
        assert kind in kinds
    denied = entries(server, "access.denied")
    assert len(denied) == 2
    assert all(d["attrs"]["reason"] == "not_granted" for d in denied)
    assert all(isinstance(d["attrs"]["policy_version"], int) for d in denied)
    export = entries(server, "computation.export")[0]
    assert export["attrs"]["rule"] == grant_id
    assert export["attrs"]["level"] == "L2"
    created = entries(server, "grant.created")[0]
    assert export["attrs"]["policy_version"] >= created["attrs"]["policy_version"]


def test_operation_above_ceiling_is_refused_at_request_and_approval(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c:
        with pytest.raises(ApiError) as exc:
            c.request_access(
                "tax", ["companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="x"
            )
        assert denial(exc) == "level_ceiling"
        req = c.request_access(
            "tax",
            ["open_companies"],
            ["export", "aggregate"],
            PURPOSE,
            duration_seconds=DAY,
            justification="x",
        )
    with server.client(parties["provider"]) as p:
        # the provider tightens the ceiling after the request was filed: approval is refused
        p.set_ceilings("tax", {"L2": ["aggregate"]}, dataset="open_companies")
        with pytest.raises(ApiError) as exc:
            p.approve(req["id"])
        assert denial(exc) == "level_ceiling"
        # narrowing to what the ceiling allows works
        approved = p.approve(req["id"], operations=["aggregate"])
    assert approved["status"] == "approved"


def test_loosening_a_ceiling_is_refused(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    with server.client(parties["provider"]) as p:
        with pytest.raises(ApiError) as exc:
            p.set_ceilings("tax", {"L3": ["export", "aggregate"]})
        assert exc.value.status == 422
        with pytest.raises(ApiError) as exc:
            p.set_ceilings("tax", {"CORE": ["aggregate"]})
        assert exc.value.status == 422
        eff = p.set_ceilings("tax", {"L2": ["aggregate", "export"]})
        assert eff["L2"] == ["aggregate", "export"]
        assert eff["CORE"] == []
    with server.client(parties["other"]) as o, pytest.raises(ApiError) as exc:
        o.set_ceilings("tax", {"L2": ["aggregate"]})
    assert exc.value.status == 403


def test_tightened_zone_ceiling_denies_at_use(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    granted(server, parties, ["open_companies"], ["export"])
    with server.client(parties["consumer"]) as c:
        c.export("tax", "open_companies", PURPOSE)
        with server.client(parties["provider"]) as p:
            p.set_ceilings("tax", {"L2": ["aggregate"]})
        with pytest.raises(ApiError) as exc:
            c.export("tax", "open_companies", PURPOSE)
        assert denial(exc) == "level_ceiling"


def test_no_self_approval_and_no_foreign_zone(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c:
        req = c.request_access(
            "tax", ["open_companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="x"
        )
        with pytest.raises(ApiError) as exc:
            c.approve(req["id"])
        assert exc.value.status == 403
    with server.client(parties["other"]) as o:
        with pytest.raises(ApiError) as exc:
            o.approve(req["id"])  # it cannot even read the request
        assert exc.value.status == 404
        end = datetime.now(UTC) + timedelta(hours=1)
        payload = approval_payload(req, approver=parties["other"].key_id, not_after=end)
        forged = sign_envelope(APPROVAL_TYPE, payload, [parties["other"]])
        # a request it may not see is as absent as one that does not exist
        assert _post_approval(server, parties["other"], req["id"], forged).status == 404
        with pytest.raises(ApiError) as exc:
            o.reject(req["id"], "not yours")
        assert exc.value.status == 404
        # another provider cannot even see it
        assert o.requests() == []
    # the provider filing on its own zone cannot approve itself either
    with server.client(parties["provider"]) as p:
        own = p.request_access(
            "tax", ["open_companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="x"
        )
        with pytest.raises(ApiError) as exc:
            p.approve(own["id"])
        assert exc.value.status == 403
    with server.client(parties["other"]) as o:
        grant = granted(server, parties, ["open_companies"], ["export"])
        with pytest.raises(ApiError) as exc:
            o.revoke(grant["grant_id"], "not mine")
        assert exc.value.status == 404


def _post_approval(
    server: LiveServer, key: SigningKey, request_id: str, envelope: Envelope | dict[str, Any]
) -> ApiError:
    body = envelope.model_dump(mode="json") if isinstance(envelope, Envelope) else envelope
    with server.client(key) as c, pytest.raises(ApiError) as exc:
        c.request("POST", f"/v1/access-requests/{request_id}/approve", json={"approval": body})
    return exc.value


def test_an_approval_cannot_widen_or_be_forged(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    provider = parties["provider"]
    with server.client(parties["consumer"]) as c:
        req = c.request_access(
            "tax", ["open_companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="x"
        )
        other_req = c.request_access(
            "tax", ["companies"], ["aggregate"], PURPOSE, duration_seconds=DAY, justification="y"
        )
    end = datetime.now(UTC) + timedelta(hours=1)

    def env(key: SigningKey = provider, **changes: Any) -> Envelope:
        payload = approval_payload(req, approver=provider.key_id, not_after=end)
        payload.update(changes)
        return sign_envelope(APPROVAL_TYPE, payload, [key])

    widen = [
        {"datasets": ["companies", "open_companies"]},
        {"operations": ["aggregate", "export"]},
        {"purpose": "financial-services"},
        {"not_after": (datetime.now(UTC) + timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%SZ")},
        {"consumer": parties["other"].key_id},
        {"request": other_req["id"]},
        {"not_after": "2020-01-01T00:00:00Z"},
    ]
    for change in widen:
        err = _post_approval(server, provider, req["id"], env(**change))
        assert err.status == 422, change
    # signed by someone else's key, presented by the provider
    err = _post_approval(server, provider, req["id"], env(key=parties["other"]))
    assert err.status == 422
    # a byte of the payload changed after signing
    good = env().model_dump(mode="json")
    tampered = dict(
        good,
        payload=good["payload"][:-2]
        + ("A" if good["payload"][-2] != "A" else "B")
        + good["payload"][-1],
    )
    err = _post_approval(server, provider, req["id"], tampered)
    assert err.status == 422
    # another payload type (a valid signature over the same terms)
    wrong_type = sign_envelope(
        "application/vnd.zonex.other+json",
        approval_payload(req, approver=provider.key_id, not_after=end),
        [provider],
    )
    err = _post_approval(server, provider, req["id"], wrong_type)
    assert err.status == 422
    # the genuine approval works once; replaying it conflicts
    with server.client(provider) as p:
        ok = p.request("POST", f"/v1/access-requests/{req['id']}/approve", json={"approval": good})
    assert ok["status"] == "approved"
    err = _post_approval(server, provider, req["id"], good)
    assert err.status == 409


def test_purpose_binding_and_hierarchy(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    granted(server, parties, ["open_companies"], ["export"], purpose="financial-services")
    with server.client(parties["consumer"]) as c:
        c.export("tax", "open_companies", "financial-services")
        c.export("tax", "open_companies", "credit-assessment")  # below the granted purpose
        with pytest.raises(ApiError) as exc:
            c.export("tax", "open_companies", "public-administration")
        assert denial(exc) == "purpose_mismatch"
        with pytest.raises(ApiError) as exc:
            c.export("tax", "open_companies", "no-such-purpose")
        assert exc.value.status == 422


def test_expired_grant_is_denied(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
    granted(server, parties, ["open_companies"], ["export"], not_after=end)
    with server.client(parties["consumer"]) as c:
        c.export("tax", "open_companies", PURPOSE)
        time.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()) + 0.3)
        with pytest.raises(ApiError) as exc:
            c.export("tax", "open_companies", PURPOSE)
        assert denial(exc) == "expired"


def test_zone_and_principal_suspension(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    granted(server, parties, ["open_companies"], ["export"])
    consumer = server.client(parties["consumer"])
    consumer.export("tax", "open_companies", PURPOSE)
    with server.client(parties["provider"]) as p, pytest.raises(ApiError) as exc:
        p.set_zone_status("tax", "suspended")
    assert exc.value.status == 403  # only the operator
    with server.client(server.operator) as op:
        op.set_zone_status("tax", "suspended")
        with pytest.raises(ApiError) as exc:
            consumer.export("tax", "open_companies", PURPOSE)
        assert denial(exc) == "suspended"
        op.set_zone_status("tax", "active")
        consumer.export("tax", "open_companies", PURPOSE)
        op.set_principal_status(parties["consumer"].key_id, "suspended")
        with pytest.raises(ApiError) as exc:
            consumer.export("tax", "open_companies", PURPOSE)
        assert exc.value.status == 401
        # the policy carries the suspension as well, for every process's decision point
        rows = server.exchange.policy.point.rule_rows("suspend:" + parties["consumer"].key_id)
        assert len(rows) == 1
        op.set_principal_status(parties["consumer"].key_id, "active")
        consumer.export("tax", "open_companies", PURPOSE)
    consumer.close()


def test_important_data_needs_the_operator_too(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c:
        req = c.request_access(
            "tax", ["strategic"], ["aggregate"], PURPOSE, duration_seconds=DAY, justification="x"
        )
    with server.client(parties["provider"]) as p:
        first = p.approve(req["id"])
    assert first["status"] == "awaiting_operator"
    assert first["grant_id"] is None
    with server.client(parties["provider"]) as p, pytest.raises(ApiError) as exc:
        p.approve(req["id"])
    assert exc.value.status == 403
    # the provider's signed terms are on the request, for everyone who sees it
    terms = first["pending_terms"]
    assert terms["approver"] == parties["provider"].key_id
    assert terms["datasets"] == ["strategic"] and terms["operations"] == ["aggregate"]
    with server.client(parties["consumer"]) as c:
        assert c.get_request(req["id"])["pending_terms"] == terms
    end = datetime.now(UTC) + timedelta(hours=2)
    with server.client(server.operator) as op:
        with pytest.raises(ApiError) as exc:  # different terms from the provider's
            op.approve(req["id"], not_after=end)
        assert exc.value.status == 422 and exc.value.body["reason"] == "terms_differ"
        with pytest.raises(ApiError) as exc:  # other datasets than the provider signed
            op.approve(req["id"], datasets=["strategic", "companies"])
        assert exc.value.status == 422
        # the operator's approval signs the pending terms as they are
        same_end = datetime.strptime(terms["not_after"], "%Y-%m-%dT%H:%M:%SZ")
        payload = approval_payload(
            op.get_request(req["id"]),
            approver=server.operator.key_id,
            not_after=same_end.replace(tzinfo=UTC),
            datasets=terms["datasets"],
            operations=terms["operations"],
        )
        envelope = sign_envelope(APPROVAL_TYPE, payload, [server.operator])
        body = {"approval": envelope.model_dump(mode="json")}
        done = op.request("POST", f"/v1/access-requests/{req['id']}/approve", json=body)
        assert done["status"] == "approved" and done["pending_terms"] is None
        # replaying the operator's signed approval creates nothing more
        with pytest.raises(ApiError) as exc:
            op.request("POST", f"/v1/access-requests/{req['id']}/approve", json=body)
        assert exc.value.status == 409
    with server.client(parties["consumer"]) as c:
        (grant,) = c.grants()
    assert grant["approved_by"] == [parties["provider"].key_id, server.exchange.operator_key_id()]
    assert grant["expires_at"].startswith(terms["not_after"][:19])
    assert grant["consumer_name"] == "City Bank"


def test_the_operator_approves_important_data_by_the_sdk(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c:
        req = c.request_access(
            "tax", ["strategic"], ["aggregate"], PURPOSE, duration_seconds=DAY, justification="x"
        )
        with pytest.raises(ApiError) as exc:  # no one approves their own request
            c.approve(req["id"])
        assert exc.value.status == 403
    with server.client(parties["provider"]) as p:
        assert p.approve(req["id"])["status"] == "awaiting_operator"
    with server.client(server.operator) as op:
        done = op.approve(req["id"][:10])  # the pending terms, by a unique id prefix
    assert done["status"] == "approved" and done["grant_id"]
    with server.client(parties["consumer"]) as c:
        out = c.aggregate(
            "tax", "SELECT district, COUNT(*) FROM strategic GROUP BY district", PURPOSE
        )
    assert out["receipt"]


def test_a_denial_names_what_was_denied_and_the_next_step(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c, pytest.raises(ApiError) as exc:
        c.export("tax", "open_companies", PURPOSE)
    assert denial(exc) == "not_granted"
    body = exc.value.body
    assert (body["zone"], body["dataset"], body["operation"], body["purpose"]) == (
        "tax",
        "open_companies",
        "export",
        PURPOSE,
    )
    assert body["next"].startswith("request access: zonex request tax --dataset open_companies")
    assert "export on tax/open_companies" in body["detail"]


def test_consents(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    consumer_id = parties["consumer"].key_id
    until = datetime.now(UTC) + timedelta(days=30)
    with server.client(parties["provider"]) as p:
        c1 = p.record_consent("tax", "91310885617X0AEH7Y", consumer_id, "financial-services", until)
        p.record_consent("tax", "913101294399YKETQ1", consumer_id, "public-administration", until)
        listed = p.consents("tax")
    assert len(listed) == 2
    assert "91310885617X0AEH7Y" not in json.dumps(listed)
    ex = server.exchange
    s1, s2, s3 = "91310885617X0AEH7Y", "913101294399YKETQ1", "unknown-company"
    d1 = access.subject_digest(ex, "tax", s1)
    # a consent is answered by its id, never with the keyed digest of the subject it was sent
    assert "subject_digest" not in c1 and d1[:16] not in json.dumps(listed)
    live = access.has_live_consent(ex, "tax", [s1, s2, s3], consumer_id, PURPOSE)
    assert live == {s1: True, s2: False, s3: False}  # s2 is for another purpose
    # at the expiry instant the consent has lapsed; one second before it is live
    assert access.has_live_consent(ex, "tax", [s1], consumer_id, PURPOSE, until) == {s1: False}
    before = until - timedelta(seconds=1)
    assert access.has_live_consent(ex, "tax", [s1], consumer_id, PURPOSE, before) == {s1: True}
    other = access.has_live_consent(ex, "tax", [s1], parties["other"].key_id, PURPOSE)
    assert other == {s1: False}
    with server.client(parties["consumer"]) as c:
        with pytest.raises(ApiError) as exc:
            c.record_consent("tax", "x", consumer_id, PURPOSE, until)
        assert exc.value.status == 403
        with pytest.raises(ApiError) as exc:
            c.withdraw_consent(c1["id"])
        assert exc.value.status == 403
        assert len(c.consents("tax")) == 2  # its own consents are visible to it
    with server.client(parties["provider"]) as p:
        assert p.withdraw_consent(c1["id"])["status"] == "withdrawn"
        with pytest.raises(ApiError) as exc:
            p.withdraw_consent(c1["id"])
        assert exc.value.status == 409
        with pytest.raises(ApiError) as exc:
            p.record_consent("tax", "x", consumer_id, PURPOSE, datetime.now(UTC) - timedelta(1))
        assert exc.value.status == 422
    assert access.has_live_consent(ex, "tax", [s1], consumer_id, PURPOSE) == {s1: False}
    ledger_text = json.dumps(entries(server))
    assert "91310885617X0AEH7Y" not in ledger_text
    assert d1 in ledger_text


def test_reject_and_withdraw(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    with server.client(parties["consumer"]) as c:
        r1 = c.request_access(
            "tax", ["open_companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="x"
        )
        r2 = c.request_access(
            "tax", ["open_companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="y"
        )
        assert c.reject(r2["id"], "no longer needed")["status"] == "withdrawn"
    with server.client(parties["provider"]) as p:
        out = p.reject(r1["id"], "insufficient justification")
        assert out["status"] == "rejected"
        assert out["reason"] == "insufficient justification"
        with pytest.raises(ApiError) as exc:
            p.approve(r1["id"])
        assert exc.value.status == 409


@pytest.mark.parametrize(
    "body",
    [
        {"zone": "tax", "datasets": [], "operations": ["export"]},
        {"zone": "tax", "datasets": ["open_companies"], "operations": ["teleport"]},
        {"zone": "tax", "datasets": ["open_companies"], "operations": ["export"], "purpose": "x"},
        {"zone": "tax", "datasets": ["nope"], "operations": ["export"]},
        {
            "zone": "tax",
            "datasets": ["open_companies"],
            "operations": ["export"],
            "duration_seconds": 5,
        },
        {
            "zone": "tax",
            "datasets": ["open_companies"],
            "operations": ["export"],
            "justification": " ",
        },
    ],
)
def test_bad_requests_get_problem_json(
    server: LiveServer, parties: dict[str, SigningKey], body: dict[str, Any]
) -> None:
    full = {
        "purpose": PURPOSE,
        "duration_seconds": DAY,
        "justification": "credit line review",
        **body,
    }
    with server.client(parties["consumer"]) as c, pytest.raises(ApiError) as exc:
        c.request("POST", "/v1/access-requests", json=full)
    assert exc.value.status in (404, 422)
    assert exc.value.body["type"].startswith("urn:zonex:problem:")


def test_auditor_cannot_request(server: LiveServer, parties: dict[str, SigningKey]) -> None:
    with server.client(parties["auditor"]) as a, pytest.raises(ApiError) as exc:
        a.request_access(
            "tax", ["open_companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="x"
        )
    assert exc.value.status == 403


def _start_worker(
    data_dir: Path, database_url: str | None, *extra: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = dict(os.environ)
    if database_url:
        env["ZONEX_DATABASE_URL"] = database_url
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "exchange.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(port),
            *extra,
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            assert proc.stderr is not None
            message = proc.stderr.read().decode()
            proc.stderr.close()
            raise RuntimeError(message or "worker died")
        try:
            if httpx.get(url + "/v1/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()
    raise RuntimeError("second worker did not start")


def test_revocation_in_one_process_is_enforced_by_another_within_a_second(
    server: LiveServer, parties: dict[str, SigningKey], database_url: str | None
) -> None:
    grant = granted(server, parties, ["open_companies"], ["export"])
    proc, url = _start_worker(server.data_dir, database_url)
    try:
        with Client(url, parties["consumer"]) as other:
            other.export("tax", "open_companies", PURPOSE)  # allowed in the second process
            with server.client(parties["provider"]) as p:
                p.revoke(grant["grant_id"], "ended")
            revoked_at = time.monotonic()
            while True:
                try:
                    other.export("tax", "open_companies", PURPOSE)
                except ApiError as exc:
                    assert exc.code == "denied"
                    break
                assert time.monotonic() - revoked_at < 1.0, "still allowed after 1 s"
                time.sleep(0.02)
            assert time.monotonic() - revoked_at < 1.0
            # suspension of the zone through the first process, seen by the second
            granted(server, parties, ["open_companies"], ["export"])
            deadline = time.monotonic() + 1.0
            while True:
                try:
                    other.export("tax", "open_companies", PURPOSE)
                    break
                except ApiError:
                    assert time.monotonic() < deadline
                    time.sleep(0.02)
            with server.client(server.operator) as op:
                op.set_zone_status("tax", "suspended")
            suspended_at = time.monotonic()
            with pytest.raises(ApiError) as exc:
                other.export("tax", "open_companies", PURPOSE)
            assert exc.value.body["reason"] == "suspended"
            assert time.monotonic() - suspended_at < 1.0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_serve_with_two_workers_shares_one_policy_and_ledger(
    server: LiveServer, parties: dict[str, SigningKey], database_url: str | None
) -> None:
    """``zonex serve --workers 2``: uvicorn worker processes on one database; every worker
    enforces a revocation, and the ledger stays one verifiable sequence."""
    grant = granted(server, parties, ["open_companies"], ["export"])
    proc, url = _start_worker(server.data_dir, database_url, "--workers", "2")
    try:
        # fresh connections spread over both workers
        for _ in range(8):
            with Client(url, parties["consumer"]) as c:
                c.export("tax", "open_companies", PURPOSE)
        with server.client(parties["provider"]) as p:
            p.revoke(grant["grant_id"], "ended")
        time.sleep(1.0)
        for _ in range(8):
            with Client(url, parties["consumer"]) as c, pytest.raises(ApiError) as exc:
                c.export("tax", "open_companies", PURPOSE)
            assert exc.value.body["reason"] == "not_granted"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    seqs = [e["seq"] for e in entries(server)]
    assert seqs == list(range(len(seqs)))
    assert len(entries(server, "computation.export")) == 8
    assert len(entries(server, "access.denied")) == 8
