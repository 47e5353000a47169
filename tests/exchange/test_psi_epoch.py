"""Epoch mode of the private joins on a real server: both protocols against plaintext, the
consumer's download independent of |Y|, rotation, resumed preparation, hostile points, epochs
bound to their dataset, and the DP default at L3."""

from __future__ import annotations

import csv
import json
import secrets
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crypto import psi as cpsi
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.cli import app
from exchange.client.sdk import ApiError, Client
from exchange.keyfile import write_private_key
from exchange.psi_epoch import epoch_domain, fingerprints
from exchange.server.compute import psi_epoch
from exchange.server.compute.psi import normalize_id
from exchange.server.models import BudgetRow, PsiSessionRow
from exchange.server.runtime import Exchange, init_data_dir
from tests.conftest import LiveServer, serving, settings_for

# one world for the module, its tests in order on one worker
pytestmark = pytest.mark.xdist_group(name="psi-epoch")

PURPOSE = "credit-assessment"
DAY = 24 * 3600
K = 3
#: an epoch serves this many sessions in these tests, then rotates
MAX_SESSIONS = 4
#: subjects per preparation chunk: every dataset here takes several chunks
CHUNK = 16
EXACT = {
    "min_group_size": K,
    "epsilon_budget": "5",
    "exact_release": True,
    "columns": {"tax": {"disclosure": "after_aggregate", "lower": "0", "upper": "7000000"}},
}
#: L3 without the provider's opt-out: every release over an id list is DP
DP_DEFAULT = {**{k: v for k, v in EXACT.items() if k != "exact_release"}}
LEVELS = {"company_id": "L3", "tax": "L3", "district": "L1"}
DATASETS = {"register": 120, "rotating": 40, "resume": 50, "hostile": 30, "private": 40}


def _rows(n: int) -> list[tuple[str, int]]:
    return [
        (f"9131{i:06d}{secrets.token_hex(4).upper()}", 100_000 + secrets.randbelow(9_000_000))
        for i in range(n)
    ]


def _write(path: Path, rows: list[tuple[str, int]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["company_id", "tax", "district"])
        for cid, tax in rows:
            w.writerow([cid, tax, "north"])
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    data_dir = tmp_path_factory.mktemp("epoch") / "exchange"
    init_data_dir(data_dir, origin="test.zonex/log")
    ex = Exchange(
        settings_for(
            data_dir,
            checkpoint_interval_seconds=0.2,
            psi_epoch_max_sessions=MAX_SESSIONS,
            psi_epoch_chunk=CHUNK,
        )
    )
    ex.start()
    try:
        with serving(ex, data_dir) as server:
            yield server
        psi_epoch.join_preparations()
    finally:
        ex.close()


@pytest.fixture(scope="module")
def world(live: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tax bureau zone with the datasets of :data:`DATASETS` and a bank granted all three
    private joins on all of them."""
    folder = tmp_path_factory.mktemp("data")
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    rows = {name: _rows(n) for name, n in DATASETS.items()}
    with live.client(live.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    with live.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
        for name, data in rows.items():
            p.register_dataset(
                "tax",
                name,
                levels=LEVELS,
                subject_column="company_id",
                file=_write(folder / f"{name}.csv", data),
            )
            p.set_analysis_rules("tax", name, DP_DEFAULT if name == "private" else EXACT)
    with live.client(keys["consumer"]) as c:
        req = c.request_access(
            "tax",
            list(DATASETS),
            ["psi_cardinality", "psi_members", "psi_aggregate"],
            PURPOSE,
            duration_seconds=DAY,
            justification="loan applicants",
        )
    with live.client(keys["provider"]) as p:
        p.approve(req["id"])
    return {"keys": keys, "rows": rows, "folder": folder}


class Counting(Client):
    """A client that counts the bytes of points it downloads, by route."""

    downloaded: dict[str, int]

    def psi_get_b(self, session: str, offset: int, limit: int) -> bytes:
        data = super().psi_get_b(session, offset, limit)
        self.downloaded["b"] = self.downloaded.get("b", 0) + len(data)
        return data

    def psi_get_ae(self, session: str, offset: int, limit: int) -> bytes:
        data = super().psi_get_ae(session, offset, limit)
        self.downloaded["ae"] = self.downloaded.get("ae", 0) + len(data)
        return data


def _consumer(live: LiveServer, world: dict[str, Any]) -> Client:
    return live.client(world["keys"]["consumer"])


def _ids(world: dict[str, Any], dataset: str, hits: int, misses: int) -> list[str]:
    return [cid for cid, _ in world["rows"][dataset][:hits]] + [
        f"NOPE-{secrets.token_hex(6)}" for _ in range(misses)
    ]


def _last_params(live: LiveServer) -> dict[str, Any]:
    with Session(live.exchange.engine) as s:
        row = s.execute(
            select(PsiSessionRow).order_by(PsiSessionRow.created_at.desc()).limit(1)
        ).scalar_one()
        return dict(row.params)


def _image(live: LiveServer, dataset: str, epoch: str) -> set[tuple[int, int]]:
    folder = live.data_dir / "psi_epochs" / "tax" / dataset / epoch
    return {(int(a), int(b)) for a, b in np.load(folder / "fp.npy").tolist()}


def test_both_protocols_match_plaintext_and_the_download_is_o_x(
    live: LiveServer, world: dict[str, Any]
) -> None:
    ex = live.exchange
    epoch = psi_epoch.prepare(ex, "tax", "register")
    assert epoch["state"] == "ready" and epoch["y_count"] == 120
    rows = world["rows"]["register"]
    ids = _ids(world, "register", 9, 3)  # 9 of 120 in common
    tax = {cid: min(t, 7_000_000) for cid, t in rows}  # clipped to the bounds
    c = Counting(live.url, world["keys"]["consumer"])
    with c:
        for protocol in ("epoch", "session"):
            c.downloaded = {}
            card = c.psi_join("tax", "register", "cardinality", ids, PURPOSE, protocol=protocol)
            assert card["result"]["intersection"] == 9
            verify_receipt(card["receipt"], card["result"], live.log_verifier())
            # epoch mode: |X| points of A_e and nothing of B; per session: all |Y| points of B
            want = {"ae": 32 * 12} if protocol == "epoch" else {"b": 32 * 120}
            assert c.downloaded == want
            assert _last_params(live).get("epoch") == (epoch["id"] if protocol == "epoch" else None)

            members = c.psi_join("tax", "register", "members", ids, PURPOSE, protocol=protocol)
            assert members["local"]["members"] == [i in tax for i in ids]

            agg = c.psi_join(
                "tax", "register", "aggregate", ids, PURPOSE, sums=["tax"], protocol=protocol
            )
            assert agg["local"]["count"] == 9
            assert agg["local"]["sums"] == {"tax": sum(tax[i] for i in ids if i in tax)}
            verify_receipt(agg["receipt"], agg["result"], live.log_verifier())

        # left to the exchange: |Y| = 120 >= 16 x 6 takes the epoch; 16 x 10 > 120 does not
        c.psi_join("tax", "register", "cardinality", _ids(world, "register", 4, 2), PURPOSE)
        assert _last_params(live).get("epoch") == epoch["id"]
        c.psi_join("tax", "register", "cardinality", _ids(world, "register", 4, 6), PURPOSE)
        assert "epoch" not in _last_params(live)
    # the last session found the epoch spent: retired, and its successor prepared meanwhile
    psi_epoch.join_preparations()
    with live.client(world["keys"]["provider"]) as p:
        served = p.psi_epochs("tax", "register")
    assert [(e["state"], e["sessions"]) for e in served["epochs"]] == [
        ("retired", MAX_SESSIONS),
        ("ready", 0),
    ]
    assert served["current"] == served["epochs"][1]["id"] != epoch["id"]


def _epoch_session(c: Client, dataset: str, ids: list[str], mode: str = "cardinality") -> Any:
    return c.psi_join("tax", dataset, mode, ids, PURPOSE, protocol="epoch")


def test_rotation_after_n_sessions_and_a_new_snapshot(
    live: LiveServer, world: dict[str, Any]
) -> None:
    ex = live.exchange
    first = psi_epoch.prepare(ex, "tax", "rotating")
    with _consumer(live, world) as c:
        for _ in range(MAX_SESSIONS):
            out = _epoch_session(c, "rotating", _ids(world, "rotating", 5, 2))
            assert out["result"]["intersection"] == 5
        # the epoch has served its sessions: the next one waits for a new epoch, never blocks
        response = c._http.post(
            "/v1/psi/sessions",
            json={
                "zone": "tax",
                "dataset": "rotating",
                "mode": "cardinality",
                "purpose": PURPOSE,
                "x_count": 5,
                "protocol": "epoch",
            },
        )
        assert response.status_code == 503
        assert response.json()["code"] == "epoch_preparing"
        assert int(response.headers["Retry-After"]) >= 1
        psi_epoch.join_preparations()
        second = psi_epoch.prepare(ex, "tax", "rotating")
        assert second["id"] != first["id"] and second["snapshot"] == first["snapshot"]
        assert _image(live, "rotating", first["id"]).isdisjoint(
            _image(live, "rotating", second["id"])
        )
        # a new snapshot retires the epoch at the next session, whatever its count
        changed = world["rows"]["rotating"][:30] + _rows(10)
        with live.client(world["keys"]["provider"]) as p:
            p.publish_snapshot("tax", "rotating", _write(world["folder"] / "r2.csv", changed))
        with pytest.raises(ApiError) as exc:
            _epoch_session(c, "rotating", _ids(world, "rotating", 5, 2))
        assert exc.value.code == "epoch_preparing"
        psi_epoch.join_preparations()
        third = psi_epoch.prepare(ex, "tax", "rotating")
        assert third["snapshot"] != second["snapshot"] and third["id"] != second["id"]
        assert _image(live, "rotating", third["id"]).isdisjoint(
            _image(live, "rotating", second["id"])
        )
        new_ids = [cid for cid, _ in changed[25:]] + [world["rows"]["rotating"][35][0]]
        out = _epoch_session(c, "rotating", new_ids, "members")
        assert out["local"]["members"] == [True] * 15 + [False]
        assert _last_params(live)["epoch"] == third["id"]


def test_resumed_preparation_equals_an_uninterrupted_one(
    live: LiveServer, world: dict[str, Any]
) -> None:
    ex = live.exchange
    part = psi_epoch.prepare(ex, "tax", "resume", max_chunks=1)
    assert part["state"] == "preparing" and part["done"] == CHUNK
    # a session asking for the epoch meanwhile is told to come back (503), not held
    with _consumer(live, world) as c, pytest.raises(ApiError) as exc:
        _epoch_session(c, "resume", _ids(world, "resume", 4, 1))
    assert exc.value.status == 503 and exc.value.body["retry_after"] >= 1
    psi_epoch.join_preparations()
    done = psi_epoch.prepare(ex, "tax", "resume")
    assert done["id"] == part["id"] and done["state"] == "ready" and done["y_count"] == 50
    # the image is k_e·H_e(y) over every subject under the epoch's one key, in the zone's order
    key_file = ex.zones_dir / "tax" / "psi" / "epochs" / f"{done['id']}.key"
    key = cpsi.PsiKey.from_bytes(key_file.read_bytes()[:32])
    seed = key_file.read_bytes()[32:]
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    ids = [normalize_id(cid) or "" for cid, _ in world["rows"]["resume"]]
    order = psi_epoch._order(seed, ids)
    whole = fingerprints(
        cpsi.blind(key, epoch_domain(done["id"]), [ids[i].encode() for i in order])
    )
    folder = live.data_dir / "psi_epochs" / "tax" / "resume" / done["id"]
    stored, positions = np.load(folder / "fp.npy"), np.load(folder / "pos.npy")
    in_order = np.empty_like(stored)
    in_order[positions] = stored
    assert in_order.tolist() == whole.tolist()
    # the key is the zone's: nothing under the exchange's epoch folder holds it
    assert all(key.to_bytes() not in f.read_bytes() for f in folder.iterdir())


def _open_epoch(c: Client, dataset: str, ids: list[str]) -> tuple[str, cpsi.PsiKey, list[bytes]]:
    session = c.psi_create(
        zone="tax",
        dataset=dataset,
        mode="cardinality",
        purpose=PURPOSE,
        x_count=len(ids),
        protocol="epoch",
    )
    key = cpsi.PsiKey.generate()
    a = cpsi.blind(key, epoch_domain(session["epoch"]), [i.encode() for i in ids])
    c.psi_put_a(session["session"], 0, b"".join(a))
    data = c.psi_get_ae(session["session"], 0, len(ids))
    a_e = [data[i : i + 32] for i in range(0, len(data), 32)]
    return session["session"], key, cpsi.unblind(key, a_e)


def test_bad_and_repeated_points_of_f_are_refused(live: LiveServer, world: dict[str, Any]) -> None:
    psi_epoch.prepare(live.exchange, "tax", "hostile")
    ids = _ids(world, "hostile", 4, 2)
    with _consumer(live, world) as c:
        sid, _, f = _open_epoch(c, "hostile", ids)
        # garbage, the identity, a top-bit encoding and a repeat: refused, the session stays open
        for bad, reason in (
            (b"\xff" * 32, "bad_point"),
            (bytes(32), "bad_point"),
            (f[0][:31] + bytes([f[0][31] | 0x80]), "bad_point"),
            (f[0], "duplicate_point"),
        ):
            with pytest.raises(ApiError) as exc:
                c.psi_put_f(sid, 0, f[0] + bad + b"".join(f[2:]))
            assert (exc.value.status, exc.value.reason) == (422, reason)
        # the first point copied into a later batch: caught when F is whole; the session fails
        c.psi_put_f(sid, 0, b"".join(f[:3]))
        with pytest.raises(ApiError) as exc:
            c.psi_put_f(sid, 3, f[3] + f[4] + f[0])
        assert exc.value.reason == "duplicate_point"
        assert c.psi_session(sid)["state"] == "failed"

        # the consumer's own F, honestly computed, matches; A repeated is refused at upload
        sid, _, f = _open_epoch(c, "hostile", ids)
        c.psi_put_f(sid, 0, b"".join(f))
        assert c.psi_result(sid)["result"]["intersection"] == 4
        session = c.psi_create(
            zone="tax",
            dataset="hostile",
            mode="cardinality",
            purpose=PURPOSE,
            x_count=4,
            protocol="epoch",
        )
        point = cpsi.blind(cpsi.PsiKey.generate(), epoch_domain(session["epoch"]), [b"x"])[0]
        with pytest.raises(ApiError) as exc:
            c.psi_put_a(session["session"], 0, point * 4)
        assert exc.value.reason == "duplicate_point"


def test_an_epoch_serves_its_own_dataset_only(live: LiveServer, world: dict[str, Any]) -> None:
    ex = live.exchange
    hostile = psi_epoch.prepare(ex, "tax", "hostile")
    register = psi_epoch.prepare(ex, "tax", "register")  # rotated in the first test: fresh
    assert hostile["id"] != register["id"]
    ids = _ids(world, "hostile", 5, 0)
    with _consumer(live, world) as c:
        # hashing under another dataset's epoch: the points are foreign to this image
        session = c.psi_create(
            zone="tax",
            dataset="hostile",
            mode="cardinality",
            purpose=PURPOSE,
            x_count=5,
            protocol="epoch",
        )
        assert session["epoch"] == hostile["id"]
        key = cpsi.PsiKey.generate()
        a = cpsi.blind(key, epoch_domain(register["id"]), [i.encode() for i in ids])
        c.psi_put_a(session["session"], 0, b"".join(a))
        a_e = c.psi_get_ae(session["session"], 0, 5)
        f = cpsi.unblind(key, [a_e[i : i + 32] for i in range(0, len(a_e), 32)])
        c.psi_put_f(session["session"], 0, b"".join(f))
        assert c.psi_result(session["session"])["result"]["intersection"] == 0
        # the epochs of a dataset are its provider's to see and prepare
        with pytest.raises(ApiError) as exc:
            c.psi_epochs("tax", "hostile")
        assert exc.value.status == 403
        with pytest.raises(ApiError) as exc:
            c.psi_prepare_epoch("tax", "hostile")
        assert exc.value.status == 403
    with live.client(world["keys"]["provider"]) as p:
        status = p.psi_epochs("tax", "hostile")
    assert status["epochs"][0]["id"] == hostile["id"] and status["epochs"][0]["sessions"] >= 1
    assert "key" not in json.dumps(status)


def test_dp_by_default_at_l3_holds_in_epoch_mode(live: LiveServer, world: dict[str, Any]) -> None:
    psi_epoch.prepare(live.exchange, "tax", "private")
    ids = _ids(world, "private", 20, 5)
    with _consumer(live, world) as c:
        for mode in ("cardinality", "members"):
            with pytest.raises(ApiError) as exc:
                c.psi_join("tax", "private", mode, ids, PURPOSE, protocol="epoch")
            assert (exc.value.status, exc.value.reason) == (422, "dp_required")
        out = c.psi_join(
            "tax", "private", "cardinality", ids, PURPOSE, epsilon="1", protocol="epoch"
        )
    assert out["result"]["noised"] is True and out["result"]["epsilon"] == "1"
    # discrete Laplace of scale 1: P(|Z| >= 25) <= 2e^-25 < 3e-11 of a false failure
    assert abs(out["result"]["intersection"] - 20) < 25
    assert _last_params(live)["dp"] is True
    with Session(live.exchange.engine) as s:
        spent = s.execute(select(BudgetRow.spent).where(BudgetRow.dataset == "private"))
        assert Decimal(spent.scalar_one()) == 1


def test_zonex_psi_prepare_shows_the_epochs_and_refuses_a_consumer(
    live: LiveServer, world: dict[str, Any], tmp_path: Path
) -> None:
    provider, consumer = tmp_path / "provider.key", tmp_path / "consumer.key"
    write_private_key(provider, world["keys"]["provider"])
    write_private_key(consumer, world["keys"]["consumer"])

    def run(key: Path, *args: str) -> tuple[int, str]:
        result = CliRunner().invoke(
            app, ["psi", "prepare", *args, "--url", live.url, "--key", str(key)]
        )
        return result.exit_code, result.output

    psi_epoch.prepare(live.exchange, "tax", "private")
    code, out = run(provider, "tax", "--dataset", "private", "--json")
    assert code == 0
    status = json.loads(out)
    assert status["current"] is not None and status["epochs"][-1]["y_count"] == 40
    code, out = run(consumer, "tax", "--dataset", "private")
    assert code == 1 and "Traceback" not in out and "zone's provider" in out
