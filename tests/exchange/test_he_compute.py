"""Homomorphic computations on a real server: encrypted credit scoring with model commitments
and consent, secure sums across zones, their receipts verified offline, and the abuse cases
(wrong or foreign contexts and ciphertexts, unconsented entities, forged zone contributions,
replays, revoked grants, an exhausted budget)."""

from __future__ import annotations

import csv
import json
import math
import os
import random
import socket
import time
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tenseal as ts

from crypto import he
from crypto.encoding import b64url_decode
from crypto.errors import VerificationError
from crypto.httpsig import sign_request
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.client import he as he_client
from exchange.client.sdk import ApiError, Client, ScoreRefusedError
from exchange.keyfile import write_private_key
from exchange.server import access
from tests.conftest import LiveServer
from tests.exchange.test_access import entries

pytestmark = pytest.mark.slow

PURPOSE = "credit-assessment"
STATS = "statistics"
DAY = 24 * 3600
FIRM_LEVELS = {
    "company_id": "L3",
    "district": "L1",
    "industry": "L1",
    "tax_paid": "L3",
    "employees": "L3",
    "filing_regularity": "L3",
    "payroll": "L3",
}
FEATURES = ["tax_paid", "employees", "filing_regularity", "payroll"]
N_FIRMS = 48
CONSENTED = 40  # the first 40 firms consented; the last 8 did not


def _firms(seed: int, n: int, prefix: str) -> list[dict[str, Any]]:
    """Realistic magnitudes: |x| <= 10^6 (yuan, heads, a 0..1 ratio)."""
    rng = random.Random(seed)
    industries = ["finance", "software", "catering", "construction", "retail"]
    return [
        {
            "company_id": f"{prefix}{i:05d}",
            "district": rng.choice(["huangpu", "jingan", "xuhui"]),
            "industry": industries[i % len(industries)],
            "tax_paid": rng.randint(0, 1_000_000),
            "employees": rng.randint(1, 5_000),
            "filing_regularity": round(rng.random(), 3),
            "payroll": round(rng.uniform(1e3, 1e6), 2),
        }
        for i in range(n)
    ]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _grant(
    server: LiveServer, consumer: SigningKey, provider: SigningKey, zone: str, op: str, purpose: str
) -> str:
    with server.client(consumer) as c:
        req = c.request_access(
            zone,
            ["firms"],
            [op],
            purpose,
            duration_seconds=DAY,
            justification="credit line review",
        )
    with server.client(provider) as p:
        approved = p.approve(req["id"])
    return str(approved["grant_id"])


@pytest.fixture
def bank(server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    """A tax zone with firms, a bank granted he_score on them, consents for most firms."""
    keys = {
        "provider": SigningKey.generate(),
        "bank": SigningKey.generate(),
        "other": SigningKey.generate(),
        "auditor": SigningKey.generate(),
    }
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["bank"].public_key)
        op.register_principal("Other Bank", "enterprise", keys["other"].public_key)
        op.register_principal("Audit Office", "auditor", keys["auditor"].public_key)
    firms = _firms(7, N_FIRMS, "9131")
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
        p.register_dataset(
            "tax",
            "firms",
            levels=FIRM_LEVELS,
            subject_column="company_id",
            file=_write(tmp_path / "firms.csv", firms),
        )
        until = datetime.now(UTC) + timedelta(days=30)
        for firm in firms[:CONSENTED]:
            p.record_consent("tax", firm["company_id"], keys["bank"].key_id, PURPOSE, until)
    grant = _grant(server, keys["bank"], keys["provider"], "tax", "he_score", PURPOSE)
    return {"keys": keys, "firms": firms, "grant": grant}


def _matrix(firms: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[float(f[c]) for c in FEATURES] for f in firms])


def _model(seed: int, *, positive: bool = False) -> he_client.Model:
    """Weights log-uniform in ±[10^-5, 10^3] (the documented range)."""
    rng = random.Random(seed)
    weights = [
        (1 if positive or rng.random() < 0.5 else -1) * 10 ** rng.uniform(-5, 3) for _ in FEATURES
    ]
    return he_client.new_model(FEATURES, weights, bias=-2.5, link="identity")


def _upload_weights(client: Client, ctx: Any, weights: list[float]) -> tuple[str, str]:
    public = he.public_context_bytes(ctx)
    context = client.upload_context(public)["digest"]
    packed = he.pack_ciphertexts(he.encrypt_model(ctx, weights))
    return context, client.upload_ciphertexts(context, packed)["digest"]


def _raw_request(client: Client, **body: Any) -> dict[str, Any]:
    return client.he_score(**body)


# -- he_score ---------------------------------------------------------------------------------


def test_scores_match_numpy_receipt_verifies_and_the_model_can_be_audited(
    server: LiveServer, bank: dict[str, Any]
) -> None:
    keys, firms = bank["keys"], bank["firms"]
    consented = firms[:CONSENTED]
    ids = [f["company_id"] for f in reversed(consented)]  # any order; scores follow it
    x = _matrix(list(reversed(consented)))
    with server.client(keys["bank"]) as c:
        for seed, positive in ((1, True), (2, False)):
            model = _model(seed, positive=positive)
            stored = c.commit_model(model.document())
            assert stored["commitment"] == model.commitment
            assert c.commit_model(model.document()) == stored  # idempotent for its owner
            out = he_client.score(
                c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids
            )
            expected = x @ np.array(model.weights) + model.bias
            got = np.array(out.scores)
            # the derived bound (docs/he.md "Accuracy"), plus the float64 reference's rounding
            bound = he.score_error_bounds(he.CKKS_DEFAULT, model.weights, x, bias=model.bias)
            scale = np.abs(x) @ np.abs(np.array(model.weights)) + abs(model.bias)
            assert np.all(np.abs(got - expected) <= bound + 2.0**-50 * scale)
            (response,) = out.responses
            statement, _ = verify_receipt(
                response["receipt"], response["result"], server.log_verifier()
            )
            assert statement["kind"] == "he_score"
            assert statement["model"] == model.commitment
            assert statement["grant"] == bank["grant"]
            assert statement["context"] == response["result"]["context"]
            assert response["result"]["entities"] == CONSENTED
            assert len(response["result"]["ciphertexts"]) == 1  # 40 entities, one ciphertext

    # an auditor reads the committed document and checks the revealed model against it
    with server.client(keys["auditor"]) as a:
        document = a.model(model.commitment)["document"]
    he.verify_model_commitment(
        model.commitment,
        document,
        features=model.features,
        weights=model.weights,
        bias=model.bias,
        nonce=model.nonce,
        link=model.link,
    )
    with pytest.raises(VerificationError, match="weights"):
        he.verify_model_commitment(
            model.commitment,
            document,
            features=model.features,
            weights=[*model.weights[:-1], model.weights[-1] * 1.0001],
            bias=model.bias,
            nonce=model.nonce,
            link=model.link,
        )

    committed = entries(server, "he.model_committed")
    assert [e["digests"]["model"] for e in committed][-1] == model.commitment
    assert len(entries(server, "computation.he_score")) == 2
    # no raw entity id anywhere on the ledger (consents and scores carry salted digests)
    every = json.dumps(entries(server))
    assert not any(f["company_id"] in every for f in firms)


def test_unconsented_entities_are_refused_by_position_and_nothing_is_computed(
    server: LiveServer, bank: dict[str, Any]
) -> None:
    keys, firms = bank["keys"], bank["firms"]
    ids = [f["company_id"] for f in firms[CONSENTED - 3 : CONSENTED + 2]]  # 3 yes, 2 no
    model = _model(3)
    with server.client(keys["provider"]) as p:  # a withdrawn consent counts as none
        (consent,) = access.live_consents(
            server.exchange, "tax", ids[:1], keys["bank"].key_id, PURPOSE
        )
        assert consent is not None
        p.withdraw_consent(consent)
    with server.client(keys["bank"]) as c:
        c.commit_model(model.document())
        with pytest.raises(ScoreRefusedError) as exc:
            he_client.score(c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids)
    assert exc.value.status == 403
    assert exc.value.body["reason"] == "no_consent"
    # positions and a count: nothing derived from the ids (no keyed digest to compare)
    assert "refused" not in exc.value.body
    assert exc.value.body["refused_positions"] == "0,3,4"
    assert exc.value.body["refused_count"] == 3
    assert (exc.value.positions, exc.value.count) == ([0, 3, 4], 3)
    assert entries(server, "computation.he_score") == []
    (refusal,) = entries(server, "he.score_refused")
    assert refusal["attrs"]["reason"] == "no_consent" and refusal["attrs"]["refused"] == 3
    assert not any(i in json.dumps(refusal) for i in ids)


def test_consented_entity_without_a_row_is_refused_as_unscorable(
    server: LiveServer, bank: dict[str, Any]
) -> None:
    keys, firms = bank["keys"], bank["firms"]
    until = datetime.now(UTC) + timedelta(days=1)
    with server.client(keys["provider"]) as p:
        p.record_consent("tax", "91319999999", keys["bank"].key_id, PURPOSE, until)
    model = _model(4)
    with server.client(keys["bank"]) as c:
        c.commit_model(model.document())
        with pytest.raises(ApiError) as exc:
            he_client.score(
                c,
                zone="tax",
                dataset="firms",
                purpose=PURPOSE,
                model=model,
                ids=[firms[0]["company_id"], "91319999999"],
            )
    assert exc.value.status == 422 and exc.value.body["reason"] == "unscorable"
    assert exc.value.body["refused_positions"] == "1" and "refused" not in exc.value.body
    assert entries(server, "computation.he_score") == []


def test_wrong_contexts_and_foreign_ciphertexts_are_refused(
    server: LiveServer, bank: dict[str, Any]
) -> None:
    keys, firms = bank["keys"], bank["firms"]
    model = _model(5)
    ids = [f["company_id"] for f in firms[:5]]
    with server.client(keys["bank"]) as c:
        c.commit_model(model.document())
        ckks = he.new_context(he.CKKS_DEFAULT)
        context, weights = _upload_weights(c, ckks, list(model.weights))
        body = {
            "zone": "tax",
            "dataset": "firms",
            "purpose": PURPOSE,
            "model": model.commitment,
            "context": context,
            "weights": weights,
            "ids": ids,
        }
        assert len(_raw_request(c, **body)["ciphertexts"]) == 1

        # a BFV context where scoring needs CKKS
        bfv = he.new_context(he.BFV_DEFAULT)
        bfv_digest = c.upload_context(he.public_context_bytes(bfv))["digest"]
        with pytest.raises(ApiError) as exc:
            _raw_request(c, **{**body, "context": bfv_digest})
        assert exc.value.status == 422 and exc.value.body["reason"] == "bad_context"

        # a CKKS context with other parameters is refused at upload
        other = he.ParameterSet("ckks", 8192, (60, 40, 40, 60), None, 40)
        with pytest.raises(ApiError) as exc:
            c.upload_context(he.public_context_bytes(he.new_context(other)))
        assert exc.value.status == 422 and exc.value.body["reason"] == "bad_context"

        # ciphertexts from another context: other parameters and another scheme
        other_ctx = he.new_context(other)
        foreign = he.pack_ciphertexts([ts.ckks_vector(other_ctx, [1.0] * 4096).serialize()])
        bfv_ct = he.pack_ciphertexts([he.encrypt_vector(bfv, [1, 2, 3])])
        for blob in (foreign, bfv_ct):
            with pytest.raises(ApiError) as exc:
                c.upload_ciphertexts(context, blob)
            assert exc.value.status == 422 and exc.value.body["reason"] == "bad_ciphertext"

        # an oversized frame is refused before SEAL parses it
        huge = b"\x00" * (he.max_ciphertext_bytes(he.CKKS_DEFAULT) + 1)
        with pytest.raises(ApiError) as exc:
            c.upload_ciphertexts(context, he.pack_ciphertexts([huge]))
        assert exc.value.status == 422 and "limit" in exc.value.detail

        # weights under the right parameters but another key are not detectable by the
        # exchange: they load, and only the sender's own decryption turns to garbage
        stranger = he.new_context(he.CKKS_DEFAULT)
        packed = he.pack_ciphertexts(he.encrypt_model(stranger, list(model.weights)))
        swapped = c.upload_ciphertexts(context, packed)["digest"]
        response = _raw_request(c, **{**body, "weights": swapped})
        chunks = [b64url_decode(x) for x in response["ciphertexts"]]
        garbage = he.decrypt_scores(ckks, chunks, len(ids))
        expected = _matrix(firms[:5]) @ np.array(model.weights)
        assert not np.allclose(garbage, expected, rtol=1e-3)

        # the weight count must match the commitment; another principal's upload is not found
        short = c.upload_ciphertexts(context, he.pack_ciphertexts(he.encrypt_model(ckks, [1.0])))[
            "digest"
        ]
        with pytest.raises(ApiError) as exc:
            _raw_request(c, **{**body, "weights": short})
        assert exc.value.status == 422
    with server.client(keys["other"]) as o:
        with pytest.raises(ApiError) as exc:  # not its commitment, not its upload
            _raw_request(o, **body)
        assert exc.value.status in (403, 404)


def test_replayed_score_request_is_rejected(server: LiveServer, bank: dict[str, Any]) -> None:
    keys, firms = bank["keys"], bank["firms"]
    model = _model(6)
    with server.client(keys["bank"]) as c:
        c.commit_model(model.document())
        context, weights = _upload_weights(c, he.new_context(he.CKKS_DEFAULT), list(model.weights))
    body = json.dumps(
        {
            "zone": "tax",
            "dataset": "firms",
            "purpose": PURPOSE,
            "model": model.commitment,
            "context": context,
            "weights": weights,
            "ids": [firms[0]["company_id"]],
        }
    ).encode()
    url = f"{server.url}/v1/he/score"
    headers = {"content-type": "application/json"}
    signature = sign_request(
        "POST", url, headers, body, keys["bank"], created=int(time.time()), nonce="replay-1"
    )
    request = httpx.Request("POST", url, headers={**headers, **signature}, content=body)
    with httpx.Client(timeout=60) as http:
        assert http.send(request).status_code == 200
        again = http.send(request)
    assert again.status_code == 401 and again.json()["code"] == "verification_failed"
    assert len(entries(server, "computation.he_score")) == 1


def test_revoked_grant_stops_scoring(server: LiveServer, bank: dict[str, Any]) -> None:
    keys, firms = bank["keys"], bank["firms"]
    model = _model(8)
    with server.client(keys["bank"]) as c:
        c.commit_model(model.document())
        ids = [firms[1]["company_id"]]
        he_client.score(c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids)
        with server.client(keys["provider"]) as p:
            p.revoke(bank["grant"], "review finished")
        with pytest.raises(ApiError) as exc:
            he_client.score(c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids)
    assert exc.value.status == 403 and exc.value.body["reason"] == "not_granted"


def test_model_commitments_belong_to_their_owner(server: LiveServer, bank: dict[str, Any]) -> None:
    keys = bank["keys"]
    model = _model(9)
    with server.client(keys["bank"]) as c:
        c.commit_model(model.document())
        with pytest.raises(ApiError) as exc:
            c.commit_model({**model.document(), "link": "cubic"})
        assert exc.value.status == 422
    with server.client(keys["other"]) as o:
        with pytest.raises(ApiError) as exc:
            o.commit_model(model.document())
        assert exc.value.status == 409
        with pytest.raises(ApiError) as exc:
            o.model(model.commitment)
        assert exc.value.status == 404


# -- secure_sum -------------------------------------------------------------------------------

DISTRICTS = ("d1", "d2", "d3")
SUM_SQL = "SELECT industry, COUNT(*) AS n, SUM(employees) AS staff FROM firms GROUP BY industry"
CELLS = [["finance"], ["software"], ["catering"], ["construction"], ["retail"], ["mining"]]


def _sum_rules(**overrides: Any) -> dict[str, Any]:
    rules: dict[str, Any] = {
        "min_group_size": 3,
        "columns": {
            "company_id": {"disclosure": "join_only"},
            "district": {"disclosure": "plaintext"},
            "industry": {"disclosure": "plaintext"},
            "employees": {"disclosure": "after_aggregate", "lower": "0", "upper": "5000"},
            "payroll": {"disclosure": "after_aggregate", "lower": "0", "upper": "1000000"},
            "tax_paid": {"disclosure": "after_aggregate", "lower": "0", "upper": "1000000"},
        },
    }
    rules.update(overrides)
    return rules


@pytest.fixture
def bureau(server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    """Three district zones, each with its own provider and firms; a statistics bureau
    granted secure_sum in each. District d3 has only two retail firms (below its k of 3)."""
    bureau_key = SigningKey.generate()
    providers = {d: SigningKey.generate() for d in DISTRICTS}
    with server.client(server.operator) as op:
        op.register_principal("Statistics Bureau", "agency", bureau_key.public_key)
        for d, key in providers.items():
            op.register_principal(f"District {d}", "agency", key.public_key)
    data: dict[str, list[dict[str, Any]]] = {}
    grants: dict[str, str] = {}
    for n, d in enumerate(DISTRICTS):
        firms = _firms(100 + n, 16 if d != "d3" else 12, f"{d}-")
        if d == "d3":  # retail below k
            firms = [f for f in firms if f["industry"] != "retail"] + [
                {**firms[0], "company_id": f"{d}-r{i}", "industry": "retail"} for i in range(2)
            ]
        data[d] = firms
        with server.client(providers[d]) as p:
            p.create_zone(d, f"district {d}")
            p.register_dataset(
                d,
                "firms",
                levels=FIRM_LEVELS,
                subject_column="company_id",
                file=_write(tmp_path / f"{d}.csv", firms),
            )
            # exact sums at L3 are the providers' opt-out (the DP default is tested below)
            p.set_analysis_rules(d, "firms", _sum_rules(exact_release=True))
        grants[d] = _grant(server, bureau_key, providers[d], d, "secure_sum", STATS)
    return {"bureau": bureau_key, "providers": providers, "data": data, "grants": grants}


def _expected(data: dict[str, list[dict[str, Any]]], k: int = 3) -> list[list[int]]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for firms in data.values():
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for f in firms:
            groups[f["industry"]].append(f)
        for industry, members in groups.items():
            if len(members) >= k:
                totals[industry][0] += len(members)
                totals[industry][1] += sum(min(5000, m["employees"]) for m in members)
    return [totals.get(c[0], [0, 0]) for c in CELLS]


def test_secure_sum_over_three_zones_is_exact_and_verifiable(
    server: LiveServer, bureau: dict[str, Any]
) -> None:
    with server.client(bureau["bureau"]) as c:
        out = he_client.secure_sum(
            c, zones=list(DISTRICTS), sql=SUM_SQL, cells=CELLS, purpose=STATS
        )
        zone_keys = {d: b64url_decode(c.zone(d)["public_key"]) for d in DISTRICTS}
    assert out.values == ["n", "staff"]
    assert out.totals == _expected(bureau["data"])
    assert out.totals[-1] == [0, 0]  # a cell no zone has
    he_client.verify_contributions(out.response, zone_keys)
    result = out.response["result"]
    statement, _ = verify_receipt(out.response["receipt"], result, server.log_verifier())
    assert statement["kind"] == "secure_sum"
    assert statement["zones"] == list(DISTRICTS)
    assert statement["grant"] == ",".join(sorted(bureau["grants"].values()))
    assert statement["contributions"] == [c["envelope"] for c in result["contributions"]]
    assert result["epsilon"] == "0" and result["scheme"] == "bfv"
    (entry,) = entries(server, "computation.secure_sum")
    assert entry["refs"]["computation"] == result["computation"]
    # a forged key set: the contributions do not verify under keys the zones do not hold
    with pytest.raises(VerificationError):
        he_client.verify_contributions(
            out.response, {d: SigningKey.generate().public_key.raw for d in DISTRICTS}
        )


def test_a_secure_sum_abroad_is_decided_for_every_zone(
    server: LiveServer, bureau: dict[str, Any]
) -> None:
    """A consumer abroad: one cross-border decision per contributing zone, in the release's
    transaction; one zone's negative list refuses the whole sum, and nothing is released."""
    overseas = SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Overseas Institute", "enterprise", overseas.public_key,
                              jurisdiction="US")  # fmt: skip
    for d in DISTRICTS:
        _grant(server, overseas, bureau["providers"][d], d, "secure_sum", STATS)
    with server.client(overseas) as c:
        out = he_client.secure_sum(c, zones=list(DISTRICTS), sql=SUM_SQL, cells=CELLS,
                                   purpose=STATS)  # fmt: skip
    assert out.totals == _expected(bureau["data"])
    (computation,) = entries(server, "computation.secure_sum")
    decisions = entries(server, "xborder.decision")
    assert [e["refs"]["zone"] for e in decisions] == list(DISTRICTS)
    assert all(e["seq"] > computation["seq"] for e in decisions)
    # the firms' columns carry no personal information: exempt, and said so on the ledger
    assert {e["attrs"]["decision"] for e in decisions} == {"exempt"}
    assert {e["attrs"]["operation"] for e in decisions} == {"secure_sum"}

    with server.client(bureau["providers"]["d2"]) as p:
        p.set_xborder_negative_list("d2", [["secure_sum", "*"]])
    with server.client(overseas) as c, pytest.raises(ApiError) as exc:
        he_client.secure_sum(c, zones=list(DISTRICTS), sql=SUM_SQL, cells=CELLS, purpose=STATS)
    assert exc.value.code == "xborder_refused"
    assert len(entries(server, "computation.secure_sum")) == 1  # nothing more released
    refused = entries(server, "xborder.decision")[len(decisions) :]
    assert refused[-1]["refs"]["zone"] == "d2" and refused[-1]["attrs"]["decision"] == "refuse"
    assert refused[-1]["attrs"]["basis"] == "negative_list"


def test_contribution_signed_by_the_wrong_key_fails_the_whole_sum(
    server: LiveServer, bureau: dict[str, Any]
) -> None:
    path = server.data_dir / "zones" / "d2" / "zone.key"
    os.replace(path, path.with_suffix(".bak"))
    write_private_key(path, SigningKey.generate())  # a compromised node signing with its own key
    with server.client(bureau["bureau"]) as c, pytest.raises(ApiError) as exc:
        he_client.secure_sum(c, zones=list(DISTRICTS), sql=SUM_SQL, cells=CELLS, purpose=STATS)
    assert exc.value.status == 422
    assert exc.value.body["reason"] == "contribution_unverified"
    assert exc.value.body["zone"] == "d2"
    assert "ciphertext" not in exc.value.body
    assert entries(server, "computation.secure_sum") == []
    assert entries(server, "he.secure_sum_refused")[0]["refs"]["zone"] == "d2"


def test_a_refusing_zone_fails_the_whole_sum(server: LiveServer, bureau: dict[str, Any]) -> None:
    with server.client(bureau["bureau"]) as c:
        # d3 has only two retail firms: asked for retail alone, it refuses (below its k)
        with pytest.raises(ApiError) as exc:
            he_client.secure_sum(
                c, zones=list(DISTRICTS), sql=SUM_SQL, cells=[["retail"]], purpose=STATS
            )
        assert exc.value.status == 422 and exc.value.body["reason"] == "zone_refused"
        assert exc.value.body["zone"] == "d3"
        # AVG does not add up across zones
        with pytest.raises(ApiError) as exc:
            he_client.secure_sum(
                c,
                zones=list(DISTRICTS),
                sql="SELECT industry, AVG(employees) FROM firms GROUP BY industry",
                cells=CELLS,
                purpose=STATS,
            )
        assert exc.value.body["reason"] == "not_additive"
        # one zone revokes: denied, naming it, no total
        with server.client(bureau["providers"]["d1"]) as p:
            p.revoke(bureau["grants"]["d1"], "no longer")
        with pytest.raises(ApiError) as exc:
            he_client.secure_sum(c, zones=list(DISTRICTS), sql=SUM_SQL, cells=CELLS, purpose=STATS)
        assert exc.value.status == 403 and exc.value.body["reason"] == "not_granted"
        assert exc.value.body["zone"] == "d1"
    assert entries(server, "computation.secure_sum") == []


def _payloads(client: Client, response: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each zone's verified contribution payload."""
    from crypto.envelope import Envelope, verify_envelope
    from crypto.keys import VerifyKey
    from exchange.server.compute.secure_sum import CONTRIBUTION_TYPE

    out = {}
    for d in DISTRICTS:
        key = VerifyKey(b64url_decode(client.zone(d)["public_key"]))
        for raw in response["contributions"]:
            envelope = Envelope.model_validate(raw)
            if any(sig.keyid == key.key_id for sig in envelope.signatures):
                out[d] = verify_envelope(envelope, CONTRIBUTION_TYPE, {key.key_id: key})
    return out


def test_secure_sums_inherit_dp_by_default_and_a_zone_below_k_is_charged_not_refused(
    server: LiveServer, bureau: dict[str, Any]
) -> None:
    """At L3 a secure sum is differentially private by default: it goes through the same
    checker as an aggregate. District d3 has two retail firms, below its k = 3. An exact gate
    made d3 refuse its whole part (``zone_refused``), exactly and for free: a "fewer than k"
    oracle. Under DP each named cell passes a noisy gate at its zone's k (cells are named by the
    requester, so no δ); a cell that fails contributes zeros; nothing is refused, every zone's
    budget is charged, and no contribution carries an exact count of zeroed cells."""
    for d, key in bureau["providers"].items():
        with server.client(key) as p:
            p.set_analysis_rules(d, "firms", _sum_rules())
    with server.client(bureau["bureau"]) as c:
        out = he_client.secure_sum(
            c, zones=list(DISTRICTS), sql=SUM_SQL, cells=[["retail"]], purpose=STATS
        )
        budgets = {(b["zone"], b["dataset"]): b["spent"] for b in c.budgets()}
        payloads = _payloads(c, out.response)
    result = out.response["result"]
    assert (result["epsilon"], result["delta"]) == ("0.1", "0")
    # ε = 0.1 split between COUNT, SUM and the gate
    assert {n["epsilon"] for n in result["noise"]} == {"0.033333333333"}
    assert [g["zone"] for g in result["gates"]] == list(DISTRICTS)
    for gate in result["gates"]:
        assert gate["k"] == gate["threshold"] == 3 and gate["epsilon"] == "0.033333333333"
    assert budgets == {(d, "firms"): "0.1" for d in DISTRICTS}
    assert set(payloads) == set(DISTRICTS)
    for payload in payloads.values():
        assert "suppressed" not in payload and "missing" not in payload
    statement, _ = verify_receipt(out.response["receipt"], result, server.log_verifier())
    assert (statement["epsilon"], statement["delta"]) == ("0.1", "0")
    assert len(entries(server, "computation.secure_sum")) == 1
    assert entries(server, "he.secure_sum_refused") == []
    # an ε that is not a decimal within the floor and ceiling is bad input with a reason
    with server.client(bureau["bureau"]) as c:
        for eps, reason in (("1e-30", "bad_epsilon"), ("0.001", "epsilon_below_floor")):
            with pytest.raises(ApiError) as exc:
                he_client.secure_sum(
                    c,
                    zones=list(DISTRICTS),
                    sql=SUM_SQL,
                    cells=[["retail"]],
                    purpose=STATS,
                    epsilon=eps,
                )
            assert exc.value.status == 422 and exc.value.body["reason"] == reason
    assert len(entries(server, "computation.secure_sum")) == 1


def test_dp_secure_sum_charges_every_zone_until_the_budget_is_exhausted(
    server: LiveServer, bureau: dict[str, Any]
) -> None:
    sql = "SELECT industry, SUM(payroll) AS payroll FROM firms GROUP BY industry"
    cells = CELLS[:3]
    with server.client(bureau["bureau"]) as c:
        out = he_client.secure_sum(
            c,
            zones=list(DISTRICTS),
            sql=sql,
            cells=cells,
            purpose=STATS,
            scheme="ckks",
            epsilon="0.6",
        )
        result = out.response["result"]
        assert result["epsilon"] == "0.6" and result["scheme"] == "ckks"
        (noise,) = result["noise"]
        assert noise["mechanism"] == "laplace" and noise["sensitivity"] == "1000000"
        exact = defaultdict(float)
        for firms in bureau["data"].values():
            groups: dict[str, list[float]] = defaultdict(list)
            for f in firms:
                groups[f["industry"]].append(float(f["payroll"]))
            for industry, values in groups.items():
                if len(values) >= 3:
                    exact[industry] += sum(values)
        scale = float(noise["scale"])
        for (value,), (industry,) in zip(out.totals, cells, strict=True):
            assert math.isfinite(value) and abs(value - exact[industry]) < 40 * scale
        budgets = {(b["zone"], b["dataset"]): b["spent"] for b in c.budgets()}
        assert budgets == {(d, "firms"): "0.6" for d in DISTRICTS}
        with pytest.raises(ApiError) as exc:
            he_client.secure_sum(
                c,
                zones=list(DISTRICTS),
                sql=sql,
                cells=cells,
                purpose=STATS,
                scheme="ckks",
                epsilon="0.6",
            )
        assert exc.value.status == 429 and exc.value.code == "budget_exhausted"
    statement, _ = verify_receipt(out.response["receipt"], result, server.log_verifier())
    assert statement["epsilon"] == "0.6"
    assert len(entries(server, "computation.secure_sum")) == 1


def test_ciphertext_uploads_have_their_own_body_limit(server: LiveServer) -> None:
    """The HE upload route is refused above ``max_he_upload_bytes`` before its body is read,
    not at the larger dataset-upload limit its ``/uploads`` suffix would otherwise get."""
    from exchange.server.api.app import BodyLimitMiddleware, create_app

    settings = server.exchange.settings
    app = create_app(exchange=server.exchange)
    (layer,) = [m for m in app.user_middleware if m.cls is BodyLimitMiddleware]
    mw = BodyLimitMiddleware(app, **layer.kwargs)  # type: ignore[arg-type]
    assert mw.limit_for(f"/v1/he/contexts/{'a' * 64}/uploads") == settings.max_he_upload_bytes
    assert mw.limit_for("/v1/zones/tax/uploads") == settings.max_upload_bytes
    assert mw.limit_for("/v1/he/contexts") == settings.max_he_context_bytes
    assert mw.limit_for("/v1/catalog") == settings.max_json_bytes
    too_big = settings.max_he_upload_bytes + 1
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /v1/he/contexts/{'a' * 64}/uploads HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {too_big}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        reply = conn.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 413")
    assert "application/problem+json" in reply
