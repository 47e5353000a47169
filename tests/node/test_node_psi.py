"""Private joins on a node-hosted zone: the zone's role (p, Y, B, Enc_C(v)) runs on the node as
a ``psi_zone`` task, the exchange keeps its role (matching, the HE mask-and-sum, DP, receipts).

Covered here, with the node as a separate ``zonex node serve`` process: ``psi_cardinality`` and
``psi_aggregate`` agree with plaintext within noise bounds, the receipt carries the node's
signature, and the exchange's data directory (its database included) holds no zone key and no
planted id or value afterwards; with an in-process agent that tampers with its upload: a forged
output is refused; the node's task-file routes refuse another node's key and a task that is not
running; an offline node answers 503 ``zone_unavailable``, before a session and during one.
"""

from __future__ import annotations

import csv
import json
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto import psi as cpsi
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.client.sdk import ApiError, SignatureAuth
from exchange.keyfile import load_private_key, write_private_key
from exchange.node import psi as node_psi
from exchange.node.agent import NodeAgent
from exchange.node.home import NodeHome
from exchange.psi_protocol import LABEL, normalize_id
from exchange.server.models import BudgetRow, LedgerEntryRow, NodeTaskRow, PsiSessionRow
from tests.conftest import LiveServer
from tests.node.test_node_flow import cli, node_process, wait_online

PURPOSE = "credit-assessment"
DAY = 24 * 3600
K = 5
UPPER = 100_000
LEVELS = {"company_id": "L3", "tax": "L3", "district": "L1"}
#: L3 without exact_release: every release over an id list is differentially private
RULES: dict[str, Any] = {
    "min_group_size": K,
    "epsilon_budget": "10",
    "columns": {"tax": {"disclosure": "after_aggregate", "lower": "0", "upper": str(UPPER)}},
}
#: half the budget per session (two sessions spend it): the noise bounds below follow from it
EPS = "5"
ROWS = 60


def _planted() -> list[tuple[str, str]]:
    """Ids no other text can contain by chance (a random 16-hex tail) and values whose text
    (a fixed fractional tail after five digits) no digest, key or timestamp can spell."""
    return [
        (f"ZXPLANT{secrets.token_hex(8).upper()}", f"{10_000 + secrets.randbelow(89_000)}.3125")
        for _ in range(ROWS)
    ]


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["company_id", "tax", "district"])
        for cid, tax in rows:
            w.writerow([cid, tax, "north"])
    return path


def _zone_with_node(
    server: LiveServer, tmp_path: Path, keys: dict[str, SigningKey], zone: str, owner: str
) -> tuple[Path, str]:
    """Zone ``zone`` for ``keys[owner]`` hosted on an approved node at ``tmp_path/<zone>-node``."""
    with server.client(keys[owner]) as p:
        p.create_zone(zone, f"{zone} records")
    key_file = tmp_path / f"{owner}.key"
    write_private_key(key_file, keys[owner])
    node_dir = tmp_path / f"{zone}-node"
    out = cli(
        "node", "init", "--data-dir", str(node_dir), "--zone", zone,
        "--url", server.url, "--key", str(key_file),
    )  # fmt: skip
    key_id = out.split()[1]
    cli("node", "approve", key_id[:10], "--url", server.url, "--key",
        str(server.data_dir / "operator.key"))  # fmt: skip
    return node_dir, key_id


@pytest.fixture
def hosted(server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    """Zone ``tax`` on an approved node holding ``companies`` (planted ids and values, L3, no
    exact_release); the bank granted ``psi_cardinality`` and ``psi_aggregate``."""
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    node_dir, key_id = _zone_with_node(server, tmp_path, keys, "tax", "provider")
    rows = _planted()
    data = _write(tmp_path / "companies.csv", rows)
    cli(
        "dataset", "register", "tax", "companies", "--node", str(node_dir),
        "--file", str(data), "--subject-column", "company_id",
        *(f"--level={c}={lv}" for c, lv in LEVELS.items()),
    )  # fmt: skip
    data.unlink()  # the rows now live on the node only
    with server.client(keys["provider"]) as p:
        p.set_analysis_rules("tax", "companies", RULES)
    with server.client(keys["consumer"]) as c:
        req = c.request_access(
            "tax",
            ["companies"],
            ["psi_cardinality", "psi_aggregate"],
            PURPOSE,
            duration_seconds=DAY,
            justification="loan applicants",
        )
    with server.client(keys["provider"]) as p:
        assert p.approve(req["id"])["status"] == "approved"
    return {"keys": keys, "node_dir": node_dir, "node": key_id, "rows": rows}


def _applicants(hosted: dict[str, Any], hits: int, misses: int) -> list[str]:
    ids = [cid for cid, _ in hosted["rows"][:hits]]
    return ids + [f"NOPE-{secrets.token_hex(6)}" for _ in range(misses)]


def _truth(hosted: dict[str, Any], ids: list[str]) -> tuple[int, int]:
    """|X ∩ Y| and the SUM of tax over it, each value clipped and rounded as the zone does."""
    ours = {normalize_id(i) for i in ids}
    matched = [Decimal(v) for cid, v in hosted["rows"] if normalize_id(cid) in ours]
    total = sum(int(min(max(v, 0), UPPER).to_integral_value(ROUND_HALF_EVEN)) for v in matched)
    return len(matched), total


def _leaks(root: Path, needles: list[bytes]) -> list[str]:
    """Files under ``root`` (the database included) holding any of ``needles``."""
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            if any(n in data for n in needles):
                found.append(str(path.relative_to(root)))
    return found


def _no_session_files(server: LiveServer) -> None:
    assert not [p for p in (server.data_dir / "psi").rglob("*") if p.is_file()]
    assert not list((server.data_dir / "zones").glob("*/psi/*.key"))


def test_private_joins_run_the_zone_role_on_the_node(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    consumer = hosted["keys"]["consumer"]
    ids = _applicants(hosted, 40, 25)
    size, total = _truth(hosted, ids)
    assert size == 40
    with node_process(hosted["node_dir"]):
        wait_online(server, consumer)
        with server.client(consumer) as c:
            card = c.psi_join("tax", "companies", "cardinality", ids, PURPOSE, epsilon=EPS)
            agg = c.psi_join(
                "tax", "companies", "aggregate", ids, PURPOSE, sums=["tax"], epsilon=EPS
            )

    # cardinality: ε = 5, discrete Laplace of scale b = 1/5: P(|Z| >= 5) <= 2·e^(-5/b) =
    # 2·e^(-25) < 3e-11, the false-failure probability of this bound
    result = card["result"]
    assert result["noised"] is True and result["y_count"] == ROWS
    assert abs(result["intersection"] - size) < 5
    statement, _ = verify_receipt(card["receipt"], result, server.log_verifier())
    assert statement["node"]["key_id"] == hosted["node"]
    assert card["receipt"]["node_result"]["payloadType"].endswith("node-result+json")

    # aggregate: ε = 5 split in two shares of 2.5. COUNT: discrete Laplace of scale 0.4,
    # P(|Z| >= 10) <= 2·e^(-25) < 3e-11. SUM: Laplace of scale (1 row · 100000) / 2.5 = 40000
    # (then rounded), P(|N| > 40000·25 = 1000000) = e^(-25) < 2e-11 (the true sum is about
    # 2.2 million). The noisy gate (k = 5 against a count of 40) shuts with P(Z <= -36) <
    # e^(-90). Together: false failure below 1e-10.
    result = agg["result"]
    assert result["suppressed"] is False and result["noised"] is True
    assert result["y_count"] == ROWS and result["bounds"] == {"tax": ["0", str(UPPER)]}
    assert abs(result["count"] - size) < 10
    assert abs(agg["local"]["sums"]["tax"] - total) <= 1_000_000
    statement, _ = verify_receipt(agg["receipt"], result, server.log_verifier())
    assert statement["node"]["key_id"] == hosted["node"]

    with Session(server.exchange.engine) as s:
        spent = {r.dataset: Decimal(r.spent) for r in s.execute(select(BudgetRow)).scalars()}
        tasks = s.execute(select(NodeTaskRow)).scalars().all()
        sessions = s.execute(select(PsiSessionRow)).scalars().all()
        entries = [json.loads(r.body) for r in s.execute(select(LedgerEntryRow)).scalars()]
    assert spent == {"companies": Decimal(10)}
    assert [(t.kind, t.status) for t in tasks] == [("psi_zone", "done")] * 2
    assert {x.state for x in sessions} == {"done"}
    released = [e for e in entries if e["kind"].startswith("computation.psi_")]
    assert sorted(e["attrs"]["node_task"] for e in released) == sorted(t.id for t in tasks)

    # nothing of the zone's stays with the exchange: no key, no session file, no planted id or
    # value in any file under its data directory, its database (SQLite here) included
    _no_session_files(server)
    needles = [cid.encode() for cid, _ in hosted["rows"]]
    needles += [v.encode() for _, v in hosted["rows"]]
    assert _leaks(server.data_dir, needles) == []
    # nor on the node, once the task ended: p lived in memory only
    assert not [p for p in hosted["node_dir"].rglob("*") if "psi" in p.name]


@contextmanager
def _in_process_agent(node_dir: Path) -> Iterator[NodeAgent]:
    home = NodeHome(node_dir)
    agent = NodeAgent(home, poll_wait=1.0)
    stop = threading.Event()
    thread = threading.Thread(target=agent.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        yield agent
    finally:
        stop.set()
        thread.join(timeout=20)
        agent.close()
        home.close()


def test_an_output_that_does_not_match_the_signed_digest_is_refused(
    server: LiveServer, hosted: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    upload = node_psi._upload

    def forged(http: httpx.Client, task_id: str, name: str, data: bytes, chunk: int) -> None:
        if name == "b":  # the node signs B's digest, then uploads B with one point swapped
            data = data[32:64] + data[:32] + data[64:]
        upload(http, task_id, name, data, chunk)

    monkeypatch.setattr(node_psi, "_upload", forged)
    consumer = hosted["keys"]["consumer"]
    with _in_process_agent(hosted["node_dir"]):
        wait_online(server, consumer)
        with server.client(consumer) as c, pytest.raises(ApiError) as exc:
            c.psi_join("tax", "companies", "cardinality", _applicants(hosted, 10, 5), PURPOSE,
                       epsilon=EPS)  # fmt: skip
    assert exc.value.status == 409 and exc.value.code == "node_refused"
    assert "bad_output" in exc.value.detail
    with Session(server.exchange.engine) as s:
        (task,) = s.execute(select(NodeTaskRow)).scalars().all()
        (session,) = s.execute(select(PsiSessionRow)).scalars().all()
        assert s.execute(select(BudgetRow)).scalars().all() == []
        kinds = [json.loads(r.body)["kind"] for r in s.execute(select(LedgerEntryRow)).scalars()]
    assert task.status == "refused" and task.outcome["refused"]["reason"] == "bad_output"
    assert session.state == "failed" and session.error == "node_refused"
    assert "task.refused" in kinds and "psi.session_failed" in kinds
    assert not any(k.startswith("computation.") for k in kinds)
    _no_session_files(server)


@pytest.mark.parametrize("veto", ['max_epsilon = "1"\n', 'refuse = ["psi_zone"]\n'])
def test_the_node_veto_refuses_a_private_join_and_nothing_is_charged(
    server: LiveServer, hosted: dict[str, Any], veto: str
) -> None:
    (hosted["node_dir"] / "veto.toml").write_text(veto, "utf-8")
    consumer = hosted["keys"]["consumer"]
    with _in_process_agent(hosted["node_dir"]):
        wait_online(server, consumer)
        with server.client(consumer) as c, pytest.raises(ApiError) as exc:
            c.psi_join("tax", "companies", "cardinality", _applicants(hosted, 10, 5), PURPOSE,
                       epsilon=EPS)  # fmt: skip
    assert exc.value.status == 409 and exc.value.code == "node_refused"
    assert "vetoed" in exc.value.detail
    with Session(server.exchange.engine) as s:
        assert s.execute(select(BudgetRow)).scalars().all() == []
        (session,) = s.execute(select(PsiSessionRow)).scalars().all()
    assert session.state == "failed" and session.error == "node_refused"
    _no_session_files(server)


def _node_http(server: LiveServer, key: SigningKey) -> httpx.Client:
    return httpx.Client(base_url=server.url, auth=SignatureAuth(key), timeout=30)


def test_task_files_are_for_the_addressed_node_while_its_task_runs(
    server: LiveServer, hosted: dict[str, Any], tmp_path: Path
) -> None:
    # another approved node, of another provider's zone
    keys = {"health": SigningKey.generate()}
    with server.client(server.operator) as op:
        op.register_principal("Health Office", "agency", keys["health"].public_key)
    other_dir, _ = _zone_with_node(server, tmp_path, keys, "health", "health")
    ours = load_private_key(hosted["node_dir"] / "node.key")
    theirs = load_private_key(other_dir / "node.key")
    folder = server.data_dir / "psi" / "psi_test"
    folder.mkdir(parents=True)
    (folder / "a.bin").write_bytes(b"\x01" * 64)
    files = {
        "inputs": {"a": "psi/psi_test/a.bin"},
        "outputs": {"b": {"path": "psi/psi_test/b.out", "max": 64}},
    }
    now = datetime.now(UTC)
    with Session(server.exchange.engine) as s, s.begin():
        for status in ("queued", "started", "done"):
            s.add(
                NodeTaskRow(
                    id=f"task-{status}",
                    zone="tax",
                    node=hosted["node"],
                    kind="psi_zone",
                    status=status,
                    bundle={"task": {"id": f"task-{status}"}, "index": 0, "files": files},
                    deadline=now + timedelta(minutes=5),
                )
            )
    octets = {"content-type": "application/octet-stream"}
    with _node_http(server, ours) as node, _node_http(server, theirs) as other:
        got = node.get("/v1/node/tasks/task-started/inputs/a")
        assert got.status_code == 200 and got.content == b"\x01" * 64
        assert node.get("/v1/node/tasks/task-started/inputs/a?offset=32&limit=8").content == (
            b"\x01" * 8
        )
        # another node's key: no such task for it
        refused = other.get("/v1/node/tasks/task-started/inputs/a")
        assert refused.status_code == 404
        put = other.put(
            "/v1/node/tasks/task-started/outputs/b?offset=0", content=b"x", headers=octets
        )
        assert put.status_code == 404
        # a task not running: queued (not claimed yet) or already answered
        for status in ("queued", "done"):
            refused = node.get(f"/v1/node/tasks/task-{status}/inputs/a")
            assert refused.status_code == 409
            assert refused.json()["reason"] == "task_not_started"
            put = node.put(f"/v1/node/tasks/task-{status}/outputs/b?offset=0", content=b"x",
                           headers=octets)  # fmt: skip
            assert put.status_code == 409
        # inputs and outputs the task does not name, a chunk past the declared size, a gap
        assert node.get("/v1/node/tasks/task-started/inputs/b").status_code == 404
        url = "/v1/node/tasks/task-started/outputs/{}?offset={}"
        assert node.put(url.format("a", 0), content=b"x", headers=octets).status_code == 404
        assert node.put(url.format("b", 0), content=b"y" * 65, headers=octets).status_code == 422
        assert node.put(url.format("b", 0), content=b"y" * 8, headers=octets).json() == {
            "received": 8
        }
        assert node.put(url.format("b", 16), content=b"y", headers=octets).status_code == 409
        assert node.put(url.format("b", 0), content=b"y", headers=octets).status_code == 200
        # JSON is refused: outputs are raw bytes
        assert node.put(url.format("b", 0), json={"b": 1}).status_code == 415
    assert (folder / "b.out").read_bytes() == b"y"


def test_an_offline_node_is_503_before_and_during_a_session(
    server: LiveServer, hosted: dict[str, Any]
) -> None:
    consumer = hosted["keys"]["consumer"]
    ids = _applicants(hosted, 10, 5)
    with server.client(consumer) as c:
        # no node process: refused before a session opens
        with pytest.raises(ApiError) as exc:
            c.psi_join("tax", "companies", "cardinality", ids, PURPOSE, epsilon=EPS)
        assert exc.value.status == 503 and exc.value.code == "zone_unavailable"
    with node_process(hosted["node_dir"]):
        wait_online(server, consumer)
        with server.client(consumer) as c:
            session = c.psi_create(
                zone="tax", dataset="companies", mode="cardinality", purpose=PURPOSE,
                x_count=K, epsilon=EPS,
            )  # fmt: skip
    # the node is gone; once it has missed node_offline_seconds of polls, the last batch of A
    # fails the session
    deadline = time.monotonic() + 30
    with server.client(consumer) as c:
        while c.request("GET", "/v1/availability")["tax"]["online"]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
    key = cpsi.PsiKey.generate()
    items = [f"id-{i}".encode() for i in range(K)]
    points = cpsi.blind(key, cpsi.session_domain(session["session"], LABEL), items)
    with server.client(consumer) as c:
        with pytest.raises(ApiError) as exc:
            c.psi_put_a(session["session"], 0, b"".join(points))
        assert exc.value.status == 503 and exc.value.code == "zone_unavailable"
        info = c.psi_session(session["session"])
    assert info["state"] == "failed" and info["error"] == "zone_unavailable"
    with Session(server.exchange.engine) as s:
        assert s.execute(select(BudgetRow)).scalars().all() == []
    _no_session_files(server)
