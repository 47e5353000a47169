"""Epoch mode for a zone hosted on its own node: the node prepares the epoch (k_e, the order seed
and the rows stay there), uploads the sorted fingerprints and positions under a manifest its key
signs, and answers each session's A_e = k_e·A (and, for ``aggregate``, the values in I's order)
as node tasks; the exchange binds, matches and rotates as for a zone it hosts.

Covered, on one module-wide exchange and node: a preparation stopped after a chunk continues
from its last recorded chunk with the same key, run again by hand or by the restarted node's
serve loop; the uploaded image is exactly the fingerprints of k_e·H_e(Y) in the keyed order;
an offline node answers 503 ``zone_unavailable`` and nothing is charged; with ``zonex node
serve`` running, a cardinality and an aggregate session match plaintext exactly, a balanced
session runs per session, the provider's request starts a preparation on the node through a
task and the node's veto refuses an answer by name; forged uploads (signed by another key,
files that differ from the signed digests, a stale snapshot, from a principal that is no node,
too many at once) are refused; the exchange's data directory, database and log hold no planted
id or value and no epoch key of the zone, and each stored epoch is ledgered; an epoch the
exchange deleted, or past its life, loses its key on the node.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import re
import secrets
import shutil
import stat
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto import psi as cpsi
from crypto.canonical import canonicalize
from crypto.envelope import sign_envelope
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.cli import app
from exchange.client.sdk import ApiError, SignatureAuth
from exchange.keyfile import load_private_key, write_private_key
from exchange.node import psi as node_psi
from exchange.node import psi_epoch as node_epoch
from exchange.node.home import NodeHome
from exchange.psi_epoch import FP_DTYPE, epoch_domain, fingerprints, keyed_order
from exchange.psi_protocol import LABEL, normalize_id
from exchange.server.compute import psi_epoch
from exchange.server.models import BudgetRow, LedgerEntryRow, NodeTaskRow, PsiSessionRow
from exchange.server.runtime import Exchange, init_data_dir
from tests.conftest import LiveServer, serving, settings_for
from tests.node.test_node_flow import cli, node_process, runner, wait_online
from tests.node.test_node_psi import _in_process_agent

# one world for the module, its tests in order on one worker
pytestmark = pytest.mark.xdist_group(name="node-psi-epoch")

PURPOSE = "credit-assessment"
DAY = 24 * 3600
K = 3
UPPER = 100_000
Y = 600
#: subjects per recorded chunk: the preparation takes three
CHUNK = 200
LEVELS = {"company_id": "L3", "tax": "L3", "district": "L1"}
#: exact releases (the provider's opt-out): results are compared with plaintext exactly
RULES: dict[str, Any] = {
    "min_group_size": K,
    "epsilon_budget": "5",
    "exact_release": True,
    "columns": {"tax": {"disclosure": "after_aggregate", "lower": "0", "upper": str(UPPER)}},
}


def _planted(n: int) -> list[tuple[str, str]]:
    """Ids no other text can contain by chance (a random 16-hex tail) and values whose text
    (a fixed fractional tail after five digits) no digest, key or timestamp can spell."""
    return [
        (f"ZXPLANT{secrets.token_hex(8).upper()}", f"{10_000 + secrets.randbelow(89_000)}.3125")
        for _ in range(n)
    ]


def _write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["company_id", "tax", "district"])
        for cid, tax in rows:
            w.writerow([cid, tax, "north"])
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("node-epoch") / "exchange"
    init_data_dir(data_dir, origin="test.zonex/log")
    ex = Exchange(
        settings_for(
            data_dir,
            checkpoint_interval_seconds=0.2,
            psi_epoch_chunk=CHUNK,
            node_poll_seconds=1.0,
            node_offline_seconds=3.0,
        )
    )
    # the exchange's log, kept under its data directory: searched for planted data below
    handler = logging.FileHandler(data_dir / "server.log")
    handler.setLevel(logging.DEBUG)
    root = logging.getLogger("zonex")
    root.addHandler(handler)
    level = root.level
    root.setLevel(logging.DEBUG)
    ex.start()
    try:
        with serving(ex, data_dir) as server:
            yield server
        psi_epoch.join_preparations()
    finally:
        ex.close()
        root.removeHandler(handler)
        root.setLevel(level)
        handler.close()


@pytest.fixture(scope="module")
def world(live: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Zone ``tax`` on an approved node holding ``companies`` (|Y| = 600 planted ids and values),
    ``small`` (100) and ``resumed`` (80); a bank granted ``psi_cardinality`` and
    ``psi_aggregate`` on them."""
    folder = tmp_path_factory.mktemp("node-epoch-data")
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    with live.client(live.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    with live.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
    key_file = folder / "provider.key"
    write_private_key(key_file, keys["provider"])
    node_dir = folder / "tax-node"
    out = cli(
        "node", "init", "--data-dir", str(node_dir), "--zone", "tax",
        "--url", live.url, "--key", str(key_file),
    )  # fmt: skip
    node_key = out.split()[1]
    cli("node", "approve", node_key[:10], "--url", live.url, "--key",
        str(live.data_dir / "operator.key"))  # fmt: skip
    rows = {"companies": _planted(Y), "small": _planted(100), "resumed": _planted(80)}
    for name, data in rows.items():
        path = _write(folder / f"{name}.csv", data)
        cli(
            "dataset", "register", "tax", name, "--node", str(node_dir),
            "--file", str(path), "--subject-column", "company_id",
            *(f"--level={c}={lv}" for c, lv in LEVELS.items()),
        )  # fmt: skip
        path.unlink()  # the rows now live on the node only
        with live.client(keys["provider"]) as p:
            p.set_analysis_rules("tax", name, RULES)
    with live.client(keys["consumer"]) as c:
        req = c.request_access(
            "tax",
            list(rows),
            ["psi_cardinality", "psi_aggregate"],
            PURPOSE,
            duration_seconds=DAY,
            justification="loan applicants",
        )
    with live.client(keys["provider"]) as p:
        assert p.approve(req["id"])["status"] == "approved"
    return {"keys": keys, "node_dir": node_dir, "node": node_key, "rows": rows}


def _node_meta(world: dict[str, Any], dataset: str = "companies") -> list[dict[str, Any]]:
    home = NodeHome(world["node_dir"])
    try:
        return node_epoch.local_epochs(home, dataset)
    finally:
        home.close()


def _status(live: LiveServer, world: dict[str, Any], dataset: str) -> dict[str, Any]:
    with live.client(world["keys"]["provider"]) as p:
        return p.psi_epochs("tax", dataset)


def _node_http(live: LiveServer, key: SigningKey) -> httpx.Client:
    return httpx.Client(base_url=live.url, auth=SignatureAuth(key), timeout=30)


def test_the_node_prepares_resumes_and_uploads_only_fingerprints(
    live: LiveServer, world: dict[str, Any]
) -> None:
    node_dir = world["node_dir"]
    prepare = ("psi", "prepare", "--node", str(node_dir), "--dataset", "companies")
    # stopped after one chunk: preparing on the node, nothing on the exchange yet
    cli(*prepare, "--chunk", str(CHUNK), "--max-chunks", "1")
    (meta,) = _node_meta(world)
    assert (meta["state"], meta["done"], meta["y_count"]) == ("preparing", CHUNK, Y)
    key_file = node_dir / "psi_epochs" / "companies" / meta["id"] / "key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    key_bytes = key_file.read_bytes()
    assert _status(live, world, "companies")["current"] is None

    # a new process (the node restarted): it continues from the last recorded chunk, same key
    cli(*prepare, "--chunk", str(CHUNK), "--max-chunks", "1")
    (again,) = _node_meta(world)
    assert (again["id"], again["resumed_from"], again["done"]) == (meta["id"], CHUNK, 2 * CHUNK)
    cli(*prepare, "--chunk", str(CHUNK))
    (done,) = _node_meta(world)
    assert (done["id"], done["resumed_from"], done["state"]) == (meta["id"], 2 * CHUNK, "uploaded")
    assert key_file.read_bytes() == key_bytes
    # the node keeps the key and its metadata only; the image went to the exchange
    assert sorted(p.name for p in key_file.parent.iterdir()) == ["epoch.json", "key"]

    status = _status(live, world, "companies")
    assert status["current"] == meta["id"]
    (shown,) = status["epochs"]
    assert (shown["state"], shown["y_count"], shown["sessions"]) == ("ready", Y, 0)

    # the image is exactly k_e·H_e(Y)'s fingerprints, each at its position in the keyed order
    folder = live.data_dir / "psi_epochs" / "tax" / "companies" / meta["id"]
    fp, pos = np.load(folder / "fp.npy"), np.load(folder / "pos.npy")
    k_e = cpsi.PsiKey.from_bytes(key_bytes[: cpsi.SCALAR_BYTES])
    ids = sorted(normalize_id(cid) for cid, _ in world["rows"]["companies"])
    seed = key_bytes[cpsi.SCALAR_BYTES :]
    ordered = [ids[i] for i in keyed_order(seed, ids)]
    want = fingerprints(cpsi.blind(k_e, epoch_domain(meta["id"]), [i.encode() for i in ordered]))
    assert sorted(pos.tolist()) == list(range(Y))
    assert fp.tolist() == [want[int(k)].tolist() for k in pos]
    # a second run finds the current epoch and leaves it as it is
    cli(*prepare)
    assert [m["id"] for m in _node_meta(world)] == [meta["id"]]
    # ``resumed`` stops after one chunk here; the node's serve loop finishes it (below)
    cli("psi", "prepare", "--node", str(node_dir), "--dataset", "resumed", "--chunk", "20",
        "--max-chunks", "1")  # fmt: skip
    (left,) = _node_meta(world, "resumed")
    assert (left["state"], left["done"], left["chunk"]) == ("preparing", 20, 20)
    # a dataset the node does not host: one readable line, no traceback
    failed = runner.invoke(app, ["psi", "prepare", "--node", str(node_dir), "--dataset", "nope"])
    assert failed.exit_code == 1
    assert failed.output.strip().splitlines() == ["error: this node hosts no dataset 'nope'"]


def test_an_offline_node_is_503_and_nothing_is_charged(
    live: LiveServer, world: dict[str, Any]
) -> None:
    ids = [cid for cid, _ in world["rows"]["companies"][:10]]
    with live.client(world["keys"]["consumer"]) as c:
        with pytest.raises(ApiError) as exc:
            c.psi_join("tax", "companies", "cardinality", ids, PURPOSE, protocol="epoch")
        assert exc.value.status == 503 and exc.value.code == "zone_unavailable"
    with live.client(world["keys"]["provider"]) as p, pytest.raises(ApiError) as exc:
        p.psi_prepare_epoch("tax", "small")  # the node must start it: it is not there
    assert exc.value.status == 503 and exc.value.code == "zone_unavailable"
    with Session(live.exchange.engine) as s:
        assert s.execute(select(BudgetRow)).scalars().all() == []
        assert s.execute(select(PsiSessionRow)).scalars().all() == []
        assert s.execute(select(NodeTaskRow)).scalars().all() == []
    assert _status(live, world, "companies")["epochs"][0]["sessions"] == 0


def _truth(world: dict[str, Any], ids: list[str]) -> tuple[int, int]:
    ours = {normalize_id(i) for i in ids}
    matched = [
        round(float(v)) for cid, v in world["rows"]["companies"] if normalize_id(cid) in ours
    ]
    return len(matched), sum(matched)


def test_sessions_on_the_node_epoch_match_plaintext(
    live: LiveServer, world: dict[str, Any]
) -> None:
    rows = world["rows"]["companies"]
    few = [cid for cid, _ in rows[:25]] + [f"NOPE-{secrets.token_hex(6)}" for _ in range(5)]
    many = [cid for cid, _ in rows[100:130]] + [f"NOPE-{secrets.token_hex(6)}" for _ in range(10)]
    epoch = _status(live, world, "companies")["current"]
    (left,) = _node_meta(world, "resumed")
    key = world["node_dir"] / "psi_epochs" / "resumed" / left["id"] / "key"
    key_bytes = key.read_bytes()
    with node_process(world["node_dir"]):
        wait_online(live, world["keys"]["consumer"])
        # the node restarted mid-preparation continues it at its first poll, from its last
        # recorded chunk, with the same key, and uploads it (polled with a deadline)
        deadline = time.monotonic() + 30
        while _status(live, world, "resumed")["current"] is None:
            assert time.monotonic() < deadline, "the node did not finish the epoch"
            time.sleep(0.2)
        (done,) = _node_meta(world, "resumed")
        assert (done["id"], done["state"], done["resumed_from"]) == (left["id"], "uploaded", 20)
        assert key.read_bytes() == key_bytes
        with live.client(world["keys"]["consumer"]) as c:
            # left to the exchange: |Y| = 600 >= 16 x 30 takes the epoch
            card = c.psi_join("tax", "companies", "cardinality", few, PURPOSE)
            # 600 < 16 x 40: asked for explicitly
            agg = c.psi_join(
                "tax", "companies", "aggregate", many, PURPOSE, sums=["tax"], protocol="epoch"
            )
            # balanced sizes left to the exchange: the per-session protocol on the node, and
            # the epoch that serves stays as it is (no preparation asked for)
            balanced = c.psi_join("tax", "companies", "cardinality", many, PURPOSE)
        # the provider asks for an epoch of ``small``: a task starts it on the node, which
        # uploads it when done (polled with a deadline: the preparation runs on its own)
        with live.client(world["keys"]["provider"]) as p:
            assert p.psi_prepare_epoch("tax", "small")["current"] is None
            p.psi_prepare_epoch("tax", "small")  # following it: the node is not asked again
        deadline = time.monotonic() + 30
        while _status(live, world, "small")["current"] is None:
            assert time.monotonic() < deadline, "the node did not upload the epoch"
            time.sleep(0.2)
        # the provider's veto refuses epoch answers by name (read per task)
        veto = world["node_dir"] / "veto.toml"
        kept = veto.read_text("utf-8")
        veto.write_text('refuse = ["psi_epoch_answer"]\n', "utf-8")
        try:
            with live.client(world["keys"]["consumer"]) as c, pytest.raises(ApiError) as exc:
                c.psi_join("tax", "companies", "cardinality", few, PURPOSE)
        finally:
            veto.write_text(kept, "utf-8")
        assert exc.value.status == 409 and exc.value.code == "node_refused"
        assert "vetoed" in exc.value.detail

    assert card["result"]["intersection"] == _truth(world, few)[0] == 25
    assert balanced["result"]["intersection"] == 30
    count, total = _truth(world, many)
    assert agg["local"]["count"] == count == 30
    assert agg["local"]["sums"] == {"tax": total}
    for done in (card, agg):
        statement, _ = verify_receipt(done["receipt"], done["result"], live.log_verifier())
        assert statement["node"]["key_id"] == world["node"]
        assert done["result"]["y_count"] == Y
    with Session(live.exchange.engine) as s:
        tasks = s.execute(select(NodeTaskRow).order_by(NodeTaskRow.created_at)).scalars().all()
        sessions = s.execute(select(PsiSessionRow)).scalars().all()
    assert [(t.kind, t.status) for t in tasks] == [
        ("psi_epoch_answer", "done"),
        ("psi_epoch_answer", "done"),
        ("psi_zone", "done"),
        ("psi_epoch_prepare", "done"),
        ("psi_epoch_answer", "refused"),
    ]
    assert sorted((str(x.params.get("epoch")), x.state) for x in sessions) == sorted(
        [(epoch, "done"), (epoch, "done"), ("None", "done"), (epoch, "failed")]
    )
    assert _status(live, world, "companies")["epochs"][0]["sessions"] == 3
    assert [m["state"] for m in _node_meta(world, "small")] == ["uploaded"]


def test_a_node_answer_other_than_signed_or_not_points_is_refused(
    live: LiveServer, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [cid for cid, _ in world["rows"]["companies"][:30]]
    upload = node_psi._upload

    def swapped(http: httpx.Client, task_id: str, name: str, data: bytes, chunk: int) -> None:
        if name == "a_e":  # signed A_e's digest, then uploads it with two points swapped
            data = data[32:64] + data[:32] + data[64:]
        upload(http, task_id, name, data, chunk)

    def not_points(key: cpsi.PsiKey, points: list[bytes]) -> list[bytes]:
        # distinct 32-byte strings that encode no point (field elements >= p): signed as is
        return [b"\xff" * 31 + bytes([i]) for i in range(len(points))]

    refused = []
    for patch in ("upload", "points"):
        with monkeypatch.context() as m:
            if patch == "upload":
                m.setattr(node_psi, "_upload", swapped)
            else:
                m.setattr(
                    node_epoch, "cpsi", SimpleNamespace(**{**vars(cpsi), "reblind": not_points})
                )
            with _in_process_agent(world["node_dir"]):
                wait_online(live, world["keys"]["consumer"])
                with live.client(world["keys"]["consumer"]) as c, pytest.raises(ApiError) as exc:
                    c.psi_join("tax", "companies", "cardinality", ids, PURPOSE)
        refused.append(exc.value)
    assert [(e.status, e.code) for e in refused] == [(409, "node_refused")] * 2
    assert "bad_output" in refused[0].detail
    assert refused[1].body["reason"] == "node_mismatch" and "invalid point" in refused[1].detail
    with Session(live.exchange.engine) as s:
        sessions = s.execute(select(PsiSessionRow)).scalars().all()
        tasks = s.execute(select(NodeTaskRow).order_by(NodeTaskRow.created_at)).scalars().all()
    assert [(t.kind, t.status) for t in tasks[-2:]] == [
        ("psi_epoch_answer", "refused"),
        ("psi_epoch_answer", "done"),  # signed and uploaded as signed; the points are refused
    ]
    assert sum(x.state == "failed" for x in sessions) == 3  # the veto's, and these two
    assert not [p for p in (live.data_dir / "psi").rglob("*") if p.is_file()]


def _forge(
    live: LiveServer,
    world: dict[str, Any],
    signer: SigningKey,
    tamper: bool = False,
    **changes: Any,
) -> httpx.Response:
    """Upload an image for a new epoch of ``companies`` as the node, then a manifest signed by
    ``signer`` (with ``changes`` to its fields); with ``tamper`` one fingerprint differs from
    what the manifest names."""
    node_key = load_private_key(world["node_dir"] / "node.key")
    epoch = "ep_" + secrets.token_urlsafe(18)
    fp = np.sort(np.frombuffer(secrets.token_bytes(Y * 12), dtype=FP_DTYPE), order=["hi", "lo"])
    pos = np.random.default_rng().permutation(Y).astype("<u4")
    files = {"fp": fp.tobytes(), "pos": pos.tobytes()}
    status = _status(live, world, "companies")
    payload = {
        "type": node_epoch.MANIFEST_VERSION,
        "zone": "tax",
        "node": node_key.key_id,
        "epoch": epoch,
        "dataset": "companies",
        "snapshot": status["epochs"][0]["snapshot"],
        "y_count": Y,
        "y_skipped": 0,
        "label": LABEL,
        "fp_bits": 96,
        "pos_dtype": "<u4",
        "files": {
            name: {"sha256": _sha256(data), "bytes": len(data)} for name, data in files.items()
        },
        "prepared_at": datetime.now(UTC).isoformat(),
        **changes,
    }
    if tamper:  # the first fingerprint's low word, after signing
        files["fp"] = files["fp"][:8] + bytes(4) + files["fp"][12:]
    octets = {"content-type": "application/octet-stream"}
    with _node_http(live, node_key) as node:
        for name, data in files.items():
            put = node.put(
                f"/v1/node/psi/epochs/{epoch}/files/{name}?offset=0", content=data, headers=octets
            )
            assert put.status_code == 200 and put.json() == {"received": len(data)}
        envelope = sign_envelope(node_epoch.MANIFEST_TYPE, payload, [signer])
        return node.post("/v1/node/psi/epochs", json={"manifest": envelope.model_dump()})


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_forged_epoch_uploads_are_refused(live: LiveServer, world: dict[str, Any]) -> None:
    before = _status(live, world, "companies")
    node_key = load_private_key(world["node_dir"] / "node.key")
    # signed by the zone's provider, not by its node
    refused = _forge(live, world, world["keys"]["provider"], tamper=False)
    assert refused.status_code == 422 and refused.json()["reason"] == "verification_failed"
    # signed by the node, but the uploaded fingerprints are not the ones it signed
    refused = _forge(live, world, node_key, tamper=True)
    assert refused.status_code == 422 and refused.json()["reason"] == "digest_mismatch"
    # signed by the node, for a snapshot the dataset no longer has
    refused = _forge(live, world, node_key, snapshot="0" * 64)
    assert refused.status_code == 409 and refused.json()["reason"] == "epoch_stale"
    # a refused upload is deleted with its manifest
    assert list((live.data_dir / "psi_epochs" / "tax" / ".incoming").iterdir()) == []
    # the node-only routes refuse a principal that is no node
    with _node_http(live, world["keys"]["provider"]) as provider:
        put = provider.put(
            "/v1/node/psi/epochs/ep_AAAAAAAAAAAAAAAAAAAAAAAA/files/fp?offset=0",
            content=b"x" * 12,
            headers={"content-type": "application/octet-stream"},
        )
        assert put.status_code == 403
        assert provider.get("/v1/node/psi/epochs").status_code == 403
    # at most psi_epoch_max_uploads (4) epochs under way at once: a fifth new one is refused
    octets = {"content-type": "application/octet-stream"}
    with _node_http(live, node_key) as node:
        answers = [
            node.put(
                f"/v1/node/psi/epochs/ep_{secrets.token_urlsafe(18)}/files/pos?offset=0",
                content=b"\x00" * 4,
                headers=octets,
            )
            for _ in range(5)
        ]
    assert [a.status_code for a in answers] == [200] * 4 + [409]
    assert answers[-1].json()["reason"] == "too_many_uploads"
    shutil.rmtree(live.data_dir / "psi_epochs" / "tax" / ".incoming")
    # nothing changed: the node's epoch still serves, no other epoch was stored
    assert _status(live, world, "companies") == before
    assert sorted(p.name for p in (live.data_dir / "psi_epochs" / "tax" / "companies").iterdir()
                  if p.is_dir()) == [before["current"]]  # fmt: skip


def _leaks(root: Path, needles: list[bytes]) -> list[str]:
    """Files under ``root`` holding any of ``needles`` (one alternation: one pass per file)."""
    pattern = re.compile(b"|".join(re.escape(n) for n in needles))
    return [
        str(path.relative_to(root))
        for path in root.rglob("*")
        if path.is_file() and pattern.search(path.read_bytes())
    ]


def test_the_exchange_holds_no_id_value_or_epoch_key_of_the_zone(
    live: LiveServer, world: dict[str, Any]
) -> None:
    rows = [r for rs in world["rows"].values() for r in rs]
    needles = [cid.encode() for cid, _ in rows] + [v.encode() for _, v in rows]
    # the data directory, its SQLite database and the exchange's log (server.log) included
    assert (live.data_dir / "server.log").stat().st_size > 0
    assert _leaks(live.data_dir, needles) == []
    # no key file of the zone's epochs (nor any PSI file of the zone) in the exchange's hands
    assert [p for p in (live.data_dir / "zones").rglob("*") if "psi" in p.parts] == []
    epochs = [m for d in ("companies", "small", "resumed") for m in _node_meta(world, d)]
    assert len(epochs) == 3
    for meta in epochs:
        key = (world["node_dir"] / "psi_epochs" / meta["dataset"] / meta["id"] / "key").read_bytes()
        assert _leaks(live.data_dir, [key[: cpsi.SCALAR_BYTES], key[cpsi.SCALAR_BYTES :]]) == []
    with Session(live.exchange.engine) as s:
        kinds = [json.loads(r.body)["kind"] for r in s.execute(select(LedgerEntryRow)).scalars()]
    assert kinds.count("task.authorized") == 7
    # each epoch the node uploaded is ledgered under its key, with the manifest's digest
    with Session(live.exchange.engine) as s:
        stored = [
            json.loads(r.body)
            for r in s.execute(select(LedgerEntryRow)).scalars()
            if json.loads(r.body)["kind"] == "psi.epoch_stored"
        ]
    assert sorted(e["refs"]["epoch"] for e in stored) == sorted(m["id"] for m in epochs)
    assert {e["actor"] for e in stored} == {world["node"]}
    for e in stored:
        folder = live.data_dir / "psi_epochs" / "tax" / e["refs"]["dataset"] / e["refs"]["epoch"]
        manifest = json.loads((folder / "manifest.json").read_text())
        assert e["digests"]["manifest"] == hashlib.sha256(canonicalize(manifest)).hexdigest()


def test_an_epoch_the_exchange_deleted_loses_its_key_on_the_node(
    live: LiveServer, world: dict[str, Any]
) -> None:
    ex = live.exchange
    (meta,) = _node_meta(world, "small")
    folder = live.data_dir / "psi_epochs" / "tax" / "small" / meta["id"]
    stored = json.loads((folder / "epoch.json").read_text())
    long_ago = datetime.now(UTC) - timedelta(seconds=ex.settings.psi_session_seconds + 60)
    stored.update(state="retired", retired_at=long_ago.isoformat(), retired_for="age")
    (folder / "epoch.json").write_text(json.dumps(stored))
    home = NodeHome(world["node_dir"])
    try:
        with _node_http(live, home.key) as http:
            listing = node_epoch.exchange_epochs(http)  # the exchange deletes it first
            assert meta["id"] not in {e["id"] for e in listing["epochs"]}
            # a listing asked for before the upload says nothing about the epoch yet
            early = {**listing, "asked_at": meta["created_at"]}
            assert node_epoch.sweep_epochs(home, early) == 0
            assert node_epoch.sweep_epochs(home, listing) == 1
            assert not folder.exists()
            assert not (world["node_dir"] / "psi_epochs" / "small" / meta["id"]).exists()
            # the other epoch is still current, on both sides
            (current,) = _node_meta(world)
            assert _status(live, world, "companies")["current"] == current["id"]
            # past its longest life the node deletes the key whatever the exchange lists
            listing = node_epoch.exchange_epochs(http)
            life = {"max_seconds": 0.001, "session_seconds": 0}
            assert node_epoch.sweep_epochs(home, {**listing, **life}) == 2
    finally:
        home.close()
    assert _node_meta(world) == _node_meta(world, "resumed") == []


def test_an_epoch_of_another_node_serves_no_session(
    live: LiveServer, world: dict[str, Any]
) -> None:
    # as if the zone had moved to another node since the epoch was stored: the node now
    # approved does not hold its key, so the exchange retires it instead of asking
    epoch = _status(live, world, "companies")["current"]
    path = live.data_dir / "psi_epochs" / "tax" / "companies" / epoch / "epoch.json"
    stored = json.loads(path.read_text())
    path.write_text(json.dumps({**stored, "node": "0" * 64}))
    ids = [cid for cid, _ in world["rows"]["companies"][:30]]
    with _in_process_agent(world["node_dir"]):
        wait_online(live, world["keys"]["consumer"])
        with live.client(world["keys"]["consumer"]) as c, pytest.raises(ApiError) as exc:
            c.psi_join("tax", "companies", "cardinality", ids, PURPOSE, protocol="epoch")
    assert exc.value.status == 422 and exc.value.body["reason"] == "epoch_stale"
    status = _status(live, world, "companies")
    assert status["current"] is None
    with Session(live.exchange.engine) as s:
        tasks = s.execute(select(NodeTaskRow)).scalars().all()
    assert len(tasks) == 7  # no task was sent for it
    assert json.loads(path.read_text())["retired_for"] == "node"
