"""Zone nodes end to end: the exchange serving on loopback, the tax bureau's node as a separate
`zonex node serve` process with its own directory, on SQLite and PostgreSQL.

Covered here: registration and approval, a dataset registered on the node (only metadata and
the digest reach the exchange), an aggregate computed on the node with the node's signed result
embedded in a receipt that verifies offline, a local veto, the node killed mid-task (503, nothing
released, nothing charged, ledger consistent), the node restarted, an offline node answering
503 within 10 s, and a raw-value search of the exchange's side.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crypto.encoding import b64url_encode
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.cli import app
from exchange.client.sdk import ApiError
from exchange.keyfile import load_private_key, write_private_key
from exchange.server.models import BudgetRow, LedgerEntryRow, NodeTaskRow
from tests.conftest import EXAMPLES, L3_LEVELS, LiveServer
from tests.exchange.test_access import granted
from tests.exchange.test_aggregate import _rules

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()

#: one fixed group: the gate is at k, far below the 240 companies, so the group is released
SQL = "SELECT COUNT(*) AS n, SUM(tax_paid_2025) AS tax FROM companies"


def cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@contextmanager
def node_process(node_dir: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``zonex node serve`` as its own process."""
    log = (node_dir.parent / f"{node_dir.name}.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exchange.cli", "node", "serve", "--data-dir", str(node_dir)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def wait_online(server: LiveServer, consumer: SigningKey, zone: str = "tax") -> None:
    deadline = time.monotonic() + 30
    with server.client(consumer) as c:
        while time.monotonic() < deadline:
            if c.request("GET", "/v1/availability").get(zone, {}).get("online"):
                return
            time.sleep(0.1)
    raise AssertionError("the node did not come online")


@pytest.fixture
def hosted(server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    """Tax bureau and bank registered; zone ``tax`` hosted on an approved node at
    ``tmp_path/tax-node`` holding ``companies``; the bank granted ``aggregate``."""
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
    provider_key = tmp_path / "provider.key"
    write_private_key(provider_key, keys["provider"])
    node_dir = tmp_path / "tax-node"
    out = cli(
        "node", "init", "--data-dir", str(node_dir), "--zone", "tax",
        "--url", server.url, "--key", str(provider_key),
    )  # fmt: skip
    key_id = out.split()[1]
    assert "pending" in out and len(key_id) == 64
    assert (node_dir / "node.key").stat().st_mode & 0o777 == 0o600
    # pending: the node's key is refused, and told why
    with server.client(keys["provider"]) as p:
        nodes = p.request("GET", "/v1/nodes")
    assert [(n["key_id"], n["status"]) for n in nodes] == [(key_id, "pending")]
    operator_key = server.data_dir / "operator.key"
    cli("node", "approve", key_id[:10], "--url", server.url, "--key", str(operator_key))
    cli(
        "dataset", "register", "tax", "companies", "--node", str(node_dir),
        "--file", str(EXAMPLES / "companies.csv"), "--subject-column", "company_id",
        *(f"--level={c}={lv}" for c, lv in L3_LEVELS.items()),
    )  # fmt: skip
    with server.client(keys["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    granted(server, keys, ["companies"], ["aggregate"])
    return {"keys": keys, "node_dir": node_dir, "node": key_id}


def _rows() -> list[dict[str, str]]:
    with (EXAMPLES / "companies.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_aggregate_runs_on_the_node_and_its_signature_travels_in_the_receipt(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    consumer = hosted["keys"]["consumer"]
    with server.client(consumer) as c:
        zone = c.zone("tax")
        (dataset,) = zone["datasets"]
        assert dataset["source"] == "node"
        # nothing is hosted in the exchange's zone directory, and the zone's key is the node's
        assert not list((server.data_dir / "zones").glob("tax/**/*.duckdb"))
        assert not (server.data_dir / "zones" / "tax" / "zone.key").exists()
        node_key = load_private_key(hosted["node_dir"] / "node.key")
        assert zone["public_key"] == b64url_encode(node_key.public_key.raw)
        # the catalog says where the zone's rows are and that its node is not there
        consumer_key = hosted["node_dir"].parent / "consumer.key"
        write_private_key(consumer_key, consumer)
        shown = cli("catalog", "--url", server.url, "--key", str(consumer_key))
        assert "host" in shown and "OFFLINE" in shown
        with pytest.raises(ApiError) as exc:  # offline: no node process yet
            c.aggregate("tax", SQL, "credit-assessment", epsilon="1")
        assert exc.value.status == 503 and exc.value.code == "zone_unavailable"
    with node_process(hosted["node_dir"]):
        wait_online(server, consumer)
        assert "online" in cli("catalog", "--url", server.url, "--key", str(consumer_key))
        with server.client(consumer) as c:
            out = c.aggregate("tax", SQL, "credit-assessment", epsilon="1")
    bundle = out.receipt
    statement, _ = verify_receipt(bundle, out.result, server.log_verifier())
    assert statement["node"]["key_id"] == hosted["node"]
    assert bundle["node_result"]["payloadType"] == "application/vnd.zonex.node-result+json"
    # noise drawn on the node: the count is near the truth. ε = 1 split in three shares, so
    # the count's Laplace scale is 3; P(|noise| >= 70) = exp(-70/3) < 1e-10 (false failure)
    ((n, _tax),) = out.result["rows"]
    assert abs(Decimal(str(n)) - len(_rows())) < 70
    # a consumer holding a receipt whose node signature was swapped or whose values changed
    forged = json.loads(json.dumps(bundle))
    forged["node_result"]["signatures"][0]["sig"] = forged["node_result"]["signatures"][0]["sig"][
        ::-1
    ]
    with pytest.raises(Exception, match="node"):
        verify_receipt(forged, out.result, server.log_verifier())
    stripped = {k: v for k, v in bundle.items() if k != "node_result"}
    with pytest.raises(Exception, match="node result"):
        verify_receipt(stripped, out.result, server.log_verifier())
    with Session(server.exchange.engine) as s:
        kinds = [r.body for r in s.execute(select(LedgerEntryRow)).scalars()]
    entries = [json.loads(b)["kind"] for b in kinds]
    assert "task.authorized" in entries and "computation.aggregate" in entries
    assert entries.index("task.authorized") < entries.index("computation.aggregate")


def test_a_local_veto_refuses_before_a_row_is_read_and_charges_nothing(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    (hosted["node_dir"] / "veto.toml").write_text('max_epsilon = "0.5"\n', "utf-8")
    consumer = hosted["keys"]["consumer"]
    with node_process(hosted["node_dir"]):
        wait_online(server, consumer)
        with server.client(consumer) as c:
            with pytest.raises(ApiError) as exc:
                c.aggregate("tax", SQL, "credit-assessment", epsilon="1")
            assert exc.value.status == 409 and exc.value.code == "node_refused"
            assert "vetoed" in exc.value.detail
            # within the veto: released
            out = c.aggregate("tax", SQL, "credit-assessment", epsilon="0.5")
    assert out.result["epsilon"] == "0.5"
    with Session(server.exchange.engine) as s:
        spent = {r.dataset: Decimal(r.spent) for r in s.execute(select(BudgetRow)).scalars()}
    assert spent == {"companies": Decimal("0.5")}  # the vetoed task charged nothing


def test_a_node_killed_mid_task_releases_nothing_and_charges_nothing_then_restarts(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    consumer = hosted["keys"]["consumer"]
    with node_process(hosted["node_dir"]) as proc:
        wait_online(server, consumer)
        # freeze the node: its open long poll claims the task and hands it over, but the node
        # never answers (or, frozen between polls, never claims it); then it dies
        proc.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        with server.client(consumer) as c, pytest.raises(ApiError) as exc:
            c.aggregate("tax", SQL, "credit-assessment", epsilon="1")
        assert exc.value.status == 503 and exc.value.code == "zone_unavailable"
        # noticed within node_offline_seconds (8 s) of the node's last poll
        assert time.monotonic() - started < 10
        proc.kill()
        proc.wait()
    with Session(server.exchange.engine) as s:
        assert s.execute(select(BudgetRow)).scalars().all() == []
        tasks = s.execute(select(NodeTaskRow)).scalars().all()
        kinds = [json.loads(r.body)["kind"] for r in s.execute(select(LedgerEntryRow)).scalars()]
    assert len(tasks) == 1 and tasks[0].status == "terminated"
    assert "computation.aggregate" not in kinds
    assert kinds.count("task.terminated") == len(tasks)
    # restarted, the node serves again from its own directory
    with node_process(hosted["node_dir"]):
        wait_online(server, consumer)
        with server.client(consumer) as c:
            out = c.aggregate("tax", SQL, "credit-assessment", epsilon="1")
    verify_receipt(out.receipt, out.result, server.log_verifier())


def test_registration_and_the_node_api_refuse_escalation(server: LiveServer) -> None:
    """Only a zone's provider registers its node, only the operator approves it, a pending or
    foreign key cannot poll, and no principal but a node reaches the node's routes."""
    tax, bank, other = (SigningKey.generate() for _ in range(3))
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", tax.public_key)
        op.register_principal("City Bank", "enterprise", bank.public_key)
        op.register_principal("Other Bureau", "agency", other.public_key)
    with server.client(tax) as p:
        p.create_zone("tax", "tax records")
    node = SigningKey.generate()
    body = {"zone": "tax", "public_key": b64url_encode(node.public_key.raw)}
    for intruder in (other, bank):  # another provider's zone; a consumer
        with server.client(intruder) as c, pytest.raises(ApiError) as exc:
            c.request("POST", "/v1/nodes", json=body)
        assert exc.value.status == 403
    with server.client(tax) as p:
        p.request("POST", "/v1/nodes", json=body)
        with pytest.raises(ApiError) as exc:  # only the operator approves
            p.request("POST", f"/v1/nodes/{node.key_id}/approve")
        assert exc.value.status == 403
    # pending: the node's own key is refused, and told why
    with server.client(node) as n, pytest.raises(ApiError) as exc:
        n.request("POST", "/v1/node/poll", json={"wait": 0})
    assert exc.value.status == 401 and exc.value.body.get("reason") == "pending"
    with server.client(server.operator) as op:
        op.request("POST", f"/v1/nodes/{node.key_id}/approve")
        with pytest.raises(ApiError) as exc:  # approved once; not twice
            op.request("POST", f"/v1/nodes/{node.key_id}/approve")
        assert exc.value.status == 409
    # principals that are not nodes never reach a node's routes
    for key in (server.operator, tax, bank):
        with server.client(key) as c:
            for method, path, payload in (
                ("POST", "/v1/node/poll", {"wait": 0}),
                ("POST", "/v1/node/tasks/" + "0" * 32 + "/outcome", {"refused": {}}),
                ("GET", "/v1/node/self", None),
            ):
                with pytest.raises(ApiError) as exc:
                    c.request(method, path, json=payload)
                assert exc.value.status == 403, (method, path)
    with server.client(node) as n:
        assert n.request("GET", "/v1/node/self")["status"] == "active"
        with pytest.raises(ApiError) as exc:  # no such task for this node
            n.request("POST", "/v1/node/tasks/" + "0" * 32 + "/outcome", json={"refused": {}})
        assert exc.value.status == 404
