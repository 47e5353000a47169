"""Secure sums over a node-hosted zone: the zone's contribution (query, gate, encryption, the
contribution's signature) runs on its node as a ``secure_sum`` task; the exchange verifies it
under the zone's registered key (the node's) and adds it to the in-process zones' parts.

Covered here, with zone ``d1`` hosted in-process and zone ``d2`` on a separate
``zonex node serve`` process: an exact BFV sum equals the plaintext total; a differentially
private sum lands within a noise bound derived from its scales; the node's contribution verifies
under the catalog's key for the zone and the exchange keeps no key for it; the receipt embeds
the node's signed result and is refused offline without it, signed by another key or over
another contribution; a node veto is 409 ``node_refused`` with nothing charged; an offline node
is 503 ``zone_unavailable``.
"""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto.encoding import b64url_decode, b64url_encode
from crypto.envelope import Envelope, sign_envelope, verify_envelope
from crypto.keys import SigningKey, VerifyKey
from crypto.receipt import NODE_RESULT_TYPE, NodeResultError, verify_receipt
from exchange.cli import app
from exchange.client import he as he_client
from exchange.client.results import Computation
from exchange.client.sdk import ApiError
from exchange.keyfile import load_private_key, write_private_key
from exchange.server.compute.secure_sum import CONTRIBUTION_TYPE
from exchange.server.models import BudgetRow, LedgerEntryRow, NodeTaskRow
from tests.conftest import LiveServer
from tests.exchange.test_he_compute import FIRM_LEVELS, STATS, SUM_SQL, _grant, _sum_rules, _write
from tests.node.test_node_flow import cli, node_process, runner, wait_online
from tests.node.test_node_psi import _in_process_agent

pytestmark = pytest.mark.slow

ZONES = ("d1", "d2")
INDUSTRIES = ("finance", "software", "catering", "construction", "retail")
#: one cell no zone has: it sums to zero (plus noise under DP)
CELLS = [[i] for i in INDUSTRIES] + [["mining"]]
#: firms per zone, 40 per industry: far above k = 3, so the DP gates open (bound below)
FIRMS = 200
STAFF = 5000


def _firms(seed: int, prefix: str) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [
        {
            "company_id": f"{prefix}{i:05d}",
            "district": rng.choice(["huangpu", "jingan", "xuhui"]),
            "industry": INDUSTRIES[i % len(INDUSTRIES)],
            "tax_paid": rng.randint(0, 1_000_000),
            "employees": rng.randint(1, 6_000),  # some above the clamp of 5000
            "filing_regularity": round(rng.random(), 3),
            "payroll": round(rng.uniform(1e3, 1e6), 2),
        }
        for i in range(FIRMS)
    ]


def _truth(data: dict[str, list[dict[str, Any]]]) -> list[list[int]]:
    """COUNT and the clamped SUM of employees per named cell over both zones."""
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for firms in data.values():
        for f in firms:
            totals[f["industry"]][0] += 1
            totals[f["industry"]][1] += min(STAFF, f["employees"])
    return [totals.get(c[0], [0, 0]) for c in CELLS]


@pytest.fixture
def districts(server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    """Zone d1 hosted by the exchange, zone d2 on an approved node (``tmp_path/d2-node``), each
    with its own provider and ``firms``; a statistics bureau granted ``secure_sum`` in both;
    exact sums (``exact_release``) until a test sets other rules."""
    bureau = SigningKey.generate()
    providers = {d: SigningKey.generate() for d in ZONES}
    with server.client(server.operator) as op:
        op.register_principal("Statistics Bureau", "agency", bureau.public_key)
        for d, key in providers.items():
            op.register_principal(f"District {d}", "agency", key.public_key)
    data = {d: _firms(300 + n, f"{d}-") for n, d in enumerate(ZONES)}
    for d in ZONES:
        with server.client(providers[d]) as p:
            p.create_zone(d, f"district {d}")
    with server.client(providers["d1"]) as p:
        p.register_dataset(
            "d1",
            "firms",
            levels=FIRM_LEVELS,
            subject_column="company_id",
            file=_write(tmp_path / "d1.csv", data["d1"]),
        )
    key_file = tmp_path / "d2-provider.key"
    write_private_key(key_file, providers["d2"])
    node_dir = tmp_path / "d2-node"
    out = cli(
        "node", "init", "--data-dir", str(node_dir), "--zone", "d2",
        "--url", server.url, "--key", str(key_file),
    )  # fmt: skip
    node = out.split()[1]
    cli("node", "approve", node[:10], "--url", server.url, "--key",
        str(server.data_dir / "operator.key"))  # fmt: skip
    csv_file = _write(tmp_path / "d2.csv", data["d2"])
    cli(
        "dataset", "register", "d2", "firms", "--node", str(node_dir),
        "--file", str(csv_file), "--subject-column", "company_id",
        *(f"--level={c}={lv}" for c, lv in FIRM_LEVELS.items()),
    )  # fmt: skip
    csv_file.unlink()  # d2's rows now live on its node only
    for d in ZONES:
        with server.client(providers[d]) as p:
            p.set_analysis_rules(d, "firms", _sum_rules(exact_release=True))
        _grant(server, bureau, providers[d], d, "secure_sum", STATS)
    return {
        "bureau": bureau,
        "providers": providers,
        "data": data,
        "node_dir": node_dir,
        "node": node,
    }


def _dp_rules(server: LiveServer, districts: dict[str, Any]) -> None:
    """L3 without exact_release: the sums are differentially private; a budget of 10."""
    for d, key in districts["providers"].items():
        with server.client(key) as p:
            p.set_analysis_rules(d, "firms", _sum_rules(epsilon_budget="10"))


def _catalog_keys(server: LiveServer, key: SigningKey) -> dict[str, bytes]:
    with server.client(key) as c:
        return {d: b64url_decode(c.zone(d)["public_key"]) for d in ZONES}


def _kinds(server: LiveServer) -> list[str]:
    with Session(server.exchange.engine) as s:
        return [json.loads(r.body)["kind"] for r in s.execute(select(LedgerEntryRow)).scalars()]


def _charged(server: LiveServer) -> list[BudgetRow]:
    with Session(server.exchange.engine) as s:
        return list(s.execute(select(BudgetRow)).scalars().all())


def test_an_exact_sum_adds_an_in_process_zone_and_a_node_zone(
    server: LiveServer, districts: dict[str, Any]
) -> None:
    bureau = districts["bureau"]
    with node_process(districts["node_dir"]):
        wait_online(server, bureau, "d2")
        with server.client(bureau) as c:
            out = he_client.secure_sum(c, zones=list(ZONES), sql=SUM_SQL, cells=CELLS,
                                       purpose=STATS)  # fmt: skip
    # BFV, exact release: the decrypted total is the plaintext total, to the unit
    assert out.values == ["n", "staff"]
    assert out.totals == _truth(districts["data"])
    assert out.totals[-1] == [0, 0]
    result = out.response["result"]
    assert result["epsilon"] == "0" and result["scheme"] == "bfv" and result["gates"] == []

    # the node's contribution verifies under the catalog's key for d2, which is the node's key;
    # the exchange holds no key for d2 (it still holds d1's: d1 is hosted here)
    keys = _catalog_keys(server, bureau)
    node_key = load_private_key(districts["node_dir"] / "node.key")
    assert keys["d2"] == node_key.public_key.raw
    he_client.verify_contributions(out.response, keys)
    assert not (server.data_dir / "zones" / "d2" / "zone.key").exists()
    assert (server.data_dir / "zones" / "d1" / "zone.key").exists()
    d2_key = VerifyKey(keys["d2"])
    signed = [
        verify_envelope(Envelope.model_validate(e), CONTRIBUTION_TYPE, {d2_key.key_id: d2_key})
        for e in out.response["contributions"]
        if any(s["keyid"] == d2_key.key_id for s in e["signatures"])
    ]
    assert len(signed) == 1 and signed[0]["zone"] == "d2"
    assert signed[0]["suppressed"] == 0 and signed[0]["missing"] == 1  # mining

    statement, _ = verify_receipt(out.response["receipt"], result, server.log_verifier())
    assert statement["kind"] == "secure_sum" and statement["zones"] == list(ZONES)
    _check_node_results(server, out.response, districts["node_dir"], keys)
    with Session(server.exchange.engine) as s:
        (task,) = s.execute(select(NodeTaskRow)).scalars().all()
        (entry,) = [
            json.loads(r.body)
            for r in s.execute(select(LedgerEntryRow)).scalars()
            if json.loads(r.body)["kind"] == "computation.secure_sum"
        ]
    assert (task.kind, task.status, task.zone) == ("secure_sum", "done", "d2")
    assert entry["attrs"]["node_task.d2"] == task.id
    assert _charged(server) == []  # exact: no ε
    # the task's working files are gone
    assert not [p for p in (server.data_dir / "secure_sum").rglob("*") if p.is_file()]


def _check_node_results(
    server: LiveServer, response: dict[str, Any], node_dir: Path, keys: dict[str, bytes]
) -> None:
    """The receipt names d1 as hosted by the exchange and d2's node, embeds the node's signed
    result, and is refused offline (SDK and ``zonex receipt verify``) once that result is
    removed, signed by another zone's key or carries a tampered contribution."""
    receipt, result = response["receipt"], response["result"]
    log = server.log_verifier()
    d2 = VerifyKey(keys["d2"]).key_id
    statement = json.loads(Envelope.model_validate(receipt["statement"]).payload_bytes())
    assert statement["nodes"] == [
        {"zone": "d1", "node": None},
        {"zone": "d2", "node": {"key_id": d2, "public_key": b64url_encode(keys["d2"])}},
    ]
    assert "node_result" not in receipt
    (signed,) = receipt["node_results"]
    assert (signed["zone"], signed["key_id"]) == ("d2", d2)
    payload = json.loads(Envelope.model_validate(signed["envelope"]).payload_bytes())
    assert payload["contribution"] in response["contributions"]
    checks = Computation(response).node_checks(log.to_verifier_key())
    assert [(c.zone, c.key_id, c.ok) for c in checks] == [("d1", None, True), ("d2", d2, True)]

    saved = node_dir.parent / "sum"
    saved.mkdir()
    (saved / "result.json").write_text(json.dumps(result), "utf-8")
    log_pub = str(server.data_dir / "log.pub")

    def cli_verify(bundle: dict[str, Any]) -> Any:
        (saved / "receipt.json").write_text(json.dumps(bundle), "utf-8")
        return runner.invoke(app, ["receipt", "verify", str(saved / "receipt.json"), "--result",
                                   str(saved / "result.json"), "--log-key", log_pub])  # fmt: skip

    ok = cli_verify(receipt)
    assert ok.exit_code == 0, ok.output
    assert "zone d1 (no node): ok: hosted by the exchange" in ok.output
    assert f"zone d2 (node {d2[:16]}): ok: its node signed the contribution" in ok.output

    node_key = load_private_key(node_dir / "node.key")
    d1_key = load_private_key(server.data_dir / "zones" / "d1" / "zone.key")
    other = json.loads(Envelope.model_validate(payload["contribution"]).payload_bytes())
    forged = sign_envelope(CONTRIBUTION_TYPE, {**other, "ciphertext": "0" * 64}, [node_key])
    for envelope, why in (
        (None, "no signed result of this zone's node"),
        # d2's result signed with the other zone's (d1's) key
        (sign_envelope(NODE_RESULT_TYPE, payload, [d1_key]), "signature does not verify"),
        # the node's own key over a contribution other than the one the receipt commits to
        (
            sign_envelope(
                NODE_RESULT_TYPE,
                {**payload, "contribution": forged.model_dump(mode="json")},
                [node_key],
            ),
            "another contribution than the one the statement commits to",
        ),
    ):
        bad = copy.deepcopy(receipt)
        if envelope is None:
            bad["node_results"] = []
        else:
            bad["node_results"][0]["envelope"] = envelope.model_dump(mode="json")
        with pytest.raises(NodeResultError) as exc:
            verify_receipt(bad, result, log)
        assert "zone 'd2'" in str(exc.value) and why in str(exc.value)
        assert [c.ok for c in exc.value.checks] == [True, False]
        refused = cli_verify(bad)
        assert refused.exit_code == 1 and "Traceback" not in refused.output
        assert f"zone d2 (node {d2[:16]}): FAILED" in refused.output
        assert why in " ".join(refused.output.split())


def test_a_dp_sum_with_a_node_zone_is_within_its_noise_bound(
    server: LiveServer, districts: dict[str, Any]
) -> None:
    _dp_rules(server, districts)
    bureau = districts["bureau"]
    with node_process(districts["node_dir"]):
        wait_online(server, bureau, "d2")
        with server.client(bureau) as c:
            out = he_client.secure_sum(c, zones=list(ZONES), sql=SUM_SQL, cells=CELLS,
                                       purpose=STATS, epsilon="3")  # fmt: skip
            budgets = {(b["zone"], b["dataset"]): b["spent"] for b in c.budgets()}
    result = out.response["result"]
    assert (result["epsilon"], result["delta"]) == ("3", "0")
    # ε = 3 split in three equal shares of 1: COUNT, SUM and the gate
    count, staff = result["noise"]
    assert count["mechanism"] == "discrete_laplace" and count["epsilon"] == "1"
    assert staff["mechanism"] == "laplace" and staff["sensitivity"] == str(STAFF)
    gates = {g["zone"]: g for g in result["gates"]}
    assert set(gates) == set(ZONES)
    # d2's gate is the one its node built and signed: k = 3, share 1, one row per subject
    assert gates["d2"]["k"] == 3 and gates["d2"]["epsilon"] == "1"
    assert gates["d2"]["sensitivity"] == "1"
    assert budgets == {(d, "firms"): "3" for d in ZONES}
    he_client.verify_contributions(out.response, _catalog_keys(server, bureau))
    verify_receipt(out.response["receipt"], result, server.log_verifier())

    # The bound. Each of the 6 × 2 released values carries one draw: the COUNT a discrete
    # Laplace draw of scale b_c, P(|Z| >= t) <= 2·e^(-t/b_c); the SUM a Laplace draw of scale
    # b_s, rounded to an integer, P(|N| > t) = e^(-t/b_s). With t = 30 b, each fails with
    # probability <= 2·e^(-30) < 2e-13. Each of the 2 × 5 gates (k = 3, discrete Laplace of
    # scale b_g <= 1 over a count of 40) shuts with P(Z <= 3 - 40) <= e^(-37/b_g) < 9e-17.
    # Union bound: a false failure below 12 · 2e-13 + 10 · 9e-17 < 3e-12.
    for g in gates.values():
        assert Decimal(g["scale"]) <= 1 and g["threshold"] == 3
    b_count, b_staff = Decimal(count["scale"]), Decimal(staff["scale"])
    for (n, total), (true_n, true_total) in zip(out.totals, _truth(districts["data"]),
                                                strict=True):  # fmt: skip
        assert abs(n - true_n) < 30 * b_count
        assert abs(total - true_total) <= 30 * b_staff + 1


@pytest.mark.parametrize(
    "veto", ['refuse = ["secure_sum"]\n', 'max_epsilon = "1"\n', "min_k = 1000\n"]
)
def test_a_node_veto_fails_the_whole_sum_and_charges_nothing(
    server: LiveServer, districts: dict[str, Any], veto: str
) -> None:
    exact = veto.startswith("min_k")
    if not exact:
        _dp_rules(server, districts)
    (districts["node_dir"] / "veto.toml").write_text(veto, "utf-8")
    bureau = districts["bureau"]
    with _in_process_agent(districts["node_dir"]):
        wait_online(server, bureau, "d2")
        with server.client(bureau) as c, pytest.raises(ApiError) as exc:
            he_client.secure_sum(c, zones=list(ZONES), sql=SUM_SQL, cells=CELLS, purpose=STATS,
                                 epsilon=None if exact else "3")  # fmt: skip
    assert exc.value.status == 409 and exc.value.code == "node_refused"
    # an exact sum under the node's k of 1000 has no cell to give: the node refuses it
    assert exc.value.body["reason"] == ("zone_refused" if exact else "vetoed")
    assert exc.value.body["zone"] == "d2"
    assert _charged(server) == []
    kinds = _kinds(server)
    assert "task.refused" in kinds and "computation.secure_sum" not in kinds
    with Session(server.exchange.engine) as s:
        (task,) = s.execute(select(NodeTaskRow)).scalars().all()
    assert task.status == "refused"


def test_an_offline_node_fails_the_whole_sum_with_503(
    server: LiveServer, districts: dict[str, Any]
) -> None:
    _dp_rules(server, districts)
    bureau = districts["bureau"]
    # no node process: the node never polled
    with server.client(bureau) as c, pytest.raises(ApiError) as exc:
        he_client.secure_sum(c, zones=list(ZONES), sql=SUM_SQL, cells=CELLS, purpose=STATS,
                             epsilon="3")  # fmt: skip
    assert exc.value.status == 503 and exc.value.code == "zone_unavailable"
    assert _charged(server) == []
    assert "computation.secure_sum" not in _kinds(server)
    with Session(server.exchange.engine) as s:
        assert s.execute(select(NodeTaskRow)).scalars().all() == []
