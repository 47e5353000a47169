"""Encrypted scoring on a node-hosted zone: the zone's part of ``he_score`` (reading the
requested entities' features and computing ``Enc(w·x)`` under the consumer's key) runs on the
zone's node as an ``he_score`` task, the consent check too; the exchange keeps authorization,
the model commitment, the ``subjects`` commitment and the receipt.

Covered here, with the node as a separate ``zonex node serve`` process: decrypted scores match
the plaintext model within the derived CKKS bound, the receipt carries and verifies the node's
signature, and the exchange's data directory (its database included) holds none of the planted
feature values afterwards; an unconsented id is refused by the node (which alone holds the
zone's subject key) by count, before it reads a feature; a consented id without a row is refused
by position after the node's answer; the node's veto is
409 ``node_refused``; an offline node is 503 ``zone_unavailable``; nothing is released then.
"""

from __future__ import annotations

import csv
import json
import random
import secrets
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto import he
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.client import he as he_client
from exchange.client.sdk import ApiError, ScoreRefusedError
from exchange.node.export import node_subjects
from exchange.server.models import NodeTaskRow
from tests.conftest import LiveServer
from tests.exchange.test_access import entries
from tests.node.test_node_flow import cli, node_process, wait_online
from tests.node.test_node_psi import _leaks, _zone_with_node

pytestmark = pytest.mark.slow

PURPOSE = "credit-assessment"
DAY = 24 * 3600
LEVELS = {
    "company_id": "L3",
    "district": "L1",
    "tax_paid": "L3",
    "employees": "L3",
    "payroll": "L3",
}
FEATURES = ["tax_paid", "employees", "payroll"]
ROWS = 30
CONSENTED = 24  # the first 24 firms consented; the last 6 did not


def _planted() -> list[dict[str, Any]]:
    """Ids no other text can contain by chance (a random 16-hex tail) and feature values whose
    text (a fixed fractional tail after five or six digits) no digest, key or timestamp can
    spell."""
    rng = random.Random(secrets.randbits(32))
    return [
        {
            "company_id": f"ZXSCORE{secrets.token_hex(8).upper()}",
            "district": "north",
            "tax_paid": f"{10_000 + rng.randrange(89_000)}.3125",
            "employees": str(rng.randint(1, 5_000)),
            "payroll": f"{100_000 + rng.randrange(899_000)}.8125",
        }
        for _ in range(ROWS)
    ]


def _write(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def hosted(server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    """Zone ``tax`` on an approved node holding ``firms`` (planted ids and values); consents
    for the first firms recorded as digests made with the node's key; the bank granted
    ``he_score``."""
    keys = {"provider": SigningKey.generate(), "bank": SigningKey.generate()}
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["bank"].public_key)
    node_dir, key_id = _zone_with_node(server, tmp_path, keys, "tax", "provider")
    firms = _planted()
    data = _write(tmp_path / "firms.csv", firms)
    cli(
        "dataset", "register", "tax", "firms", "--node", str(node_dir),
        "--file", str(data), "--subject-column", "company_id",
        *(f"--level={c}={lv}" for c, lv in LEVELS.items()),
    )  # fmt: skip
    data.unlink()  # the rows now live on the node only
    until = datetime.now(UTC) + timedelta(days=30)
    digests = node_subjects(node_dir).consent_digests([f["company_id"] for f in firms])
    with server.client(keys["provider"]) as p:
        for digest in digests[:CONSENTED]:
            p.record_consent(
                "tax", None, keys["bank"].key_id, PURPOSE, until, subject_digest=digest
            )
    with server.client(keys["bank"]) as c:
        req = c.request_access(
            "tax", ["firms"], ["he_score"], PURPOSE, duration_seconds=DAY,
            justification="credit line review",
        )  # fmt: skip
    with server.client(keys["provider"]) as p:
        assert p.approve(req["id"])["status"] == "approved"
    return {"keys": keys, "node_dir": node_dir, "node": key_id, "firms": firms}


def _model(seed: int) -> he_client.Model:
    """Weights log-uniform in ±[10^-5, 10^3] (the documented range)."""
    rng = random.Random(seed)
    weights = [(1 if rng.random() < 0.5 else -1) * 10 ** rng.uniform(-5, 3) for _ in FEATURES]
    return he_client.new_model(FEATURES, weights, bias=-2.5, link="identity")


def _matrix(firms: list[dict[str, Any]]) -> np.ndarray:
    return np.array([[float(f[c]) for c in FEATURES] for f in firms])


def _tasks(server: LiveServer) -> list[NodeTaskRow]:
    with Session(server.exchange.engine) as s:
        return list(s.execute(select(NodeTaskRow)).scalars().all())


def _no_task_files(server: LiveServer) -> None:
    assert not [p for p in (server.data_dir / "he" / "tasks").rglob("*") if p.is_file()]


def test_scores_are_computed_on_the_node_and_the_exchange_never_reads_a_feature(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    firms = hosted["firms"]
    consented = list(reversed(firms[:CONSENTED]))  # any order; scores follow it
    ids = [f["company_id"] for f in consented]
    x = _matrix(consented)
    model = _model(11)
    with node_process(hosted["node_dir"]):
        wait_online(server, hosted["keys"]["bank"])
        with server.client(hosted["keys"]["bank"]) as c:
            c.commit_model(model.document())
            out = he_client.score(
                c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids
            )

    expected = x @ np.array(model.weights) + model.bias
    got = np.array(out.scores)
    # the derived bound (docs/he.md "Accuracy"), plus the float64 reference's rounding
    bound = he.score_error_bounds(he.CKKS_DEFAULT, model.weights, x, bias=model.bias)
    scale = np.abs(x) @ np.abs(np.array(model.weights)) + abs(model.bias)
    assert np.all(np.abs(got - expected) <= bound + 2.0**-50 * scale)

    # the receipt embeds the node's signed result and verifies with the node's key
    (response,) = out.responses
    result, bundle = response["result"], response["receipt"]
    statement, _ = verify_receipt(bundle, result, server.log_verifier())
    assert statement["kind"] == "he_score" and statement["model"] == model.commitment
    assert statement["node"]["key_id"] == hosted["node"]
    assert bundle["node_result"]["payloadType"] == "application/vnd.zonex.node-result+json"
    assert result["entities"] == CONSENTED and len(result["ciphertexts"]) == 1
    # the node vouched for the ciphertexts: another digest in the result breaks the receipt
    # (its result digest, and the node's signature over the ciphertexts' digests)
    forged = {**result, "ciphertexts": ["0" * 64]}
    with pytest.raises(Exception, match="result"):
        verify_receipt(bundle, forged, server.log_verifier())
    stripped = {k: v for k, v in bundle.items() if k != "node_result"}
    with pytest.raises(Exception, match="node result"):
        verify_receipt(stripped, result, server.log_verifier())

    (task,) = _tasks(server)
    assert (task.kind, task.status) == ("he_score", "done")
    # the ids were a task input, not part of the stored task
    assert not any(i in json.dumps(task.bundle) for i in ids)
    (entry,) = entries(server, "computation.he_score")
    assert entry["attrs"]["node_task"] == task.id
    authorized = entries(server, "task.authorized")
    assert [e["attrs"]["kind"] for e in authorized] == ["he_score"]

    # nothing of the zone's rows stays with the exchange: no planted feature value (nor id) in
    # any file under its data directory, its database (SQLite here) included, and no task file
    _no_task_files(server)
    needles = [f[c].encode() for f in firms for c in ("tax_paid", "payroll")]
    needles += [f["company_id"].encode() for f in firms]
    assert _leaks(server.data_dir, needles) == []


def test_unconsented_and_unscorable_ids_are_refused_by_position(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    firms = hosted["firms"]
    ids = [f["company_id"] for f in firms[CONSENTED - 3 : CONSENTED + 2]]  # 3 yes, 2 no
    model = _model(12)
    bank = hosted["keys"]["bank"]
    with node_process(hosted["node_dir"]):
        wait_online(server, bank)
        with server.client(bank) as c:
            c.commit_model(model.document())
            with pytest.raises(ScoreRefusedError) as exc:
                he_client.score(
                    c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids
                )
            # refused by the node, which alone holds the zone's subject key: a count, no
            # positions, nothing read; ledgered as the in-process refusal
            assert exc.value.status == 403 and exc.value.body["reason"] == "no_consent"
            assert exc.value.body["refused_positions"] == ""
            assert exc.value.body["refused_count"] == 2
            assert (exc.value.positions, exc.value.count) == ([], 2)
            (task,) = _tasks(server)
            assert (task.kind, task.status) == ("he_score", "done")
            (refusal,) = entries(server, "he.score_refused")
            assert refusal["attrs"]["reason"] == "no_consent"
            assert refusal["attrs"]["refused"] == 2 and refusal["attrs"]["asked"] == 5
            assert not any(i in json.dumps(refusal) for i in ids)

            # consented, but the node holds no row for it: refused by position, as in-process
            missing = f"ZXNOROW{secrets.token_hex(6).upper()}"
            digest = node_subjects(hosted["node_dir"]).consent_digest(missing)
            with server.client(hosted["keys"]["provider"]) as p:
                p.record_consent(
                    "tax", None, bank.key_id, PURPOSE, datetime.now(UTC) + timedelta(days=1),
                    subject_digest=digest,
                )  # fmt: skip
            with pytest.raises(ApiError) as err:
                he_client.score(
                    c, zone="tax", dataset="firms", purpose=PURPOSE, model=model,
                    ids=[firms[0]["company_id"], missing],
                )  # fmt: skip
    assert err.value.status == 422 and err.value.body["reason"] == "unscorable"
    assert err.value.body["refused_positions"] == "1" and err.value.body["refused_count"] == 1
    assert [(t.kind, t.status) for t in _tasks(server)] == [("he_score", "done")] * 2
    assert entries(server, "computation.he_score") == []
    _no_task_files(server)


def test_the_node_veto_refuses_and_nothing_is_released(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    (hosted["node_dir"] / "veto.toml").write_text('refuse = ["he_score"]\n', "utf-8")
    model = _model(13)
    bank = hosted["keys"]["bank"]
    ids = [f["company_id"] for f in hosted["firms"][:3]]
    with node_process(hosted["node_dir"]):
        wait_online(server, bank)
        with server.client(bank) as c:
            c.commit_model(model.document())
            with pytest.raises(ApiError) as exc:
                he_client.score(
                    c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids
                )
    assert exc.value.status == 409 and exc.value.code == "node_refused"
    assert "vetoed" in exc.value.detail
    (task,) = _tasks(server)
    assert task.status == "refused" and task.outcome["refused"]["reason"] == "vetoed"
    assert entries(server, "computation.he_score") == []
    assert [e["attrs"]["reason"] for e in entries(server, "task.refused")] == ["vetoed"]
    _no_task_files(server)


def test_an_offline_node_is_503_and_nothing_is_released(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    model = _model(14)
    bank = hosted["keys"]["bank"]
    ids = [f["company_id"] for f in hosted["firms"][:3]]
    with server.client(bank) as c:  # no node process: it never polled
        c.commit_model(model.document())
        with pytest.raises(ApiError) as exc:
            he_client.score(c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids)
    assert exc.value.status == 503 and exc.value.code == "zone_unavailable"
    assert _tasks(server) == []
    assert entries(server, "computation.he_score") == []
    _no_task_files(server)
