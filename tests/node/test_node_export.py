"""Exports of a node-hosted dataset: the zone's node reads the rows, applies the level's
obligations with its own keys and seals the rows to the consumer; the exchange relays the
sealed blob and records the receipt with the node's signed result.

One exchange (SQLite) and one ``zonex node serve`` process for the module. Covered: an ``L1``
export round-trips through the SDK and the CLI and its receipt carries and verifies the node's
signature; an ``L2`` export's subject column holds the pseudonyms of the node's key; the
exchange's files (its database included) hold no planted id or value afterwards and no subject
key for the zone; a tampered blob, another consumer's key or a result that does not match are
each one readable error in the SDK; a consumer abroad is counted from the node's subject
digests, once per subject; the node's veto refuses an export and nothing is released.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crypto.canonical import canonicalize
from crypto.errors import VerificationError
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.audit.rules import check_rules
from exchange.cli import app
from exchange.client.sdk import ApiError, open_export
from exchange.keyfile import write_private_key
from exchange.node.export import node_subjects
from tests.conftest import LiveServer, live_exchange
from tests.exchange.test_access import entries
from tests.node.test_node_flow import cli, node_process, wait_online
from tests.node.test_node_psi import _leaks, _zone_with_node

pytestmark = pytest.mark.slow

PURPOSE = "credit-assessment"
DAY = 24 * 3600
ROWS = 12
#: public (L1) and internal (L2) datasets with the same shape
LEVELS = {
    "public_firms": {"firm_id": "L1", "district": "L1", "revenue": "L1"},
    "firms": {"firm_id": "L2", "district": "L1", "revenue": "L2"},
}


def _planted(tag: str) -> list[dict[str, str]]:
    """Ids and values no digest, key or timestamp can spell (random hex, a fixed tail)."""
    return [
        {
            "firm_id": f"ZX{tag}{secrets.token_hex(8).upper()}",
            "district": "north" if k % 2 else "south",
            "revenue": f"{100_000 + k * 7919}.4375",
        }
        for k in range(ROWS)
    ]


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Zone ``tax`` on a running node holding both datasets; the bank granted ``export``."""
    tmp = tmp_path_factory.mktemp("node-export")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(tmp / "xdg"))
        mp.delenv("ZONEX_PROFILE", raising=False)
        with live_exchange(tmp / "exchange") as server:
            keys = {
                "provider": SigningKey.generate(),
                "bank": SigningKey.generate(),
                "lab": SigningKey.generate(),
            }
            with server.client(server.operator) as op:
                op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
                op.register_principal("City Bank", "enterprise", keys["bank"].public_key)
                op.register_principal(
                    "Overseas Lab", "enterprise", keys["lab"].public_key, jurisdiction="US"
                )
            node_dir, key_id = _zone_with_node(server, tmp, keys, "tax", "provider")
            planted = {name: _planted(name[:3].upper()) for name in LEVELS}
            for name, levels in LEVELS.items():
                data = _write(tmp / f"{name}.csv", planted[name])
                cli(
                    "dataset", "register", "tax", name, "--node", str(node_dir),
                    "--file", str(data), "--subject-column", "firm_id", "--pi=firm_id=personal",
                    *(f"--level={c}={lv}" for c, lv in levels.items()),
                )  # fmt: skip
                data.unlink()  # the rows now live on the node only
            for consumer in ("bank", "lab"):
                with server.client(keys[consumer]) as c:
                    req = c.request_access(
                        "tax", list(LEVELS), ["export"], PURPOSE, duration_seconds=DAY,
                        justification="supplier review",
                    )  # fmt: skip
                with server.client(keys["provider"]) as p:
                    assert p.approve(req["id"])["status"] == "approved"
            bank_file = tmp / "bank.key"
            write_private_key(bank_file, keys["bank"])
            with node_process(node_dir):
                wait_online(server, keys["bank"])
                yield {
                    "server": server,
                    "keys": keys,
                    "node_dir": node_dir,
                    "node": key_id,
                    "planted": planted,
                    "bank_file": bank_file,
                    "tmp": tmp,
                }


def _raw_export(world: dict[str, Any], dataset: str) -> dict[str, Any]:
    server: LiveServer = world["server"]
    with server.client(world["keys"]["bank"]) as c:
        answer: dict[str, Any] = c.request(
            "POST", f"/v1/zones/tax/datasets/{dataset}/export", json={"purpose": PURPOSE}
        )
    return answer


def _no_zone_key(server: LiveServer) -> None:
    assert not list((server.data_dir / "zones").rglob("*.salt"))


def test_an_l1_export_is_sealed_on_the_node_and_opened_by_the_consumer(
    world: dict[str, Any],
) -> None:
    server: LiveServer = world["server"]
    planted = world["planted"]["public_firms"]
    with server.client(world["keys"]["bank"]) as c:
        out = c.export("tax", "public_firms", PURPOSE)
    expected = [[r["firm_id"], r["district"], r["revenue"]] for r in planted]
    assert out.columns == ["firm_id", "district", "revenue"]
    assert sorted(out.rows) == sorted(expected)
    result = out.result
    assert "rows" not in result and result["masked"] == [] and result["level"] == "L1"
    assert result["row_count"] == ROWS

    # the receipt embeds the node's signed result (counts and digests) and verifies
    statement, _ = verify_receipt(out.receipt, result, server.log_verifier())
    assert statement["kind"] == "export" and statement["node"]["key_id"] == world["node"]
    forged = {**result, "rows_sha256": "0" * 64}
    with pytest.raises(Exception, match="result"):
        verify_receipt(out.receipt, forged, server.log_verifier())
    entry = entries(server, "computation.export")[-1]
    assert entry["attrs"]["rows"] == ROWS and entry["attrs"]["node_task"]

    # the CLI opens it too: the signed result to OUT, the rows beside it
    target = world["tmp"] / "public.json"
    runner = CliRunner()
    done = runner.invoke(
        app,
        ["export", "tax", "public_firms", "--purpose", PURPOSE, "--out", str(target),
         "--url", server.url, "--key", str(world["bank_file"])],
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    again = json.loads(target.read_text())
    assert again["row_count"] == result["row_count"]
    opened = json.loads((target.parent / "public.json.rows").read_text())
    assert sorted(opened["rows"]) == sorted(expected)
    # salted: the same rows exported twice have two digests, and the digest of the rows alone
    # (what someone who guessed the whole dataset would compute) is neither
    assert again["rows_sha256"] != result["rows_sha256"]
    assert hashlib.sha256(canonicalize(opened["rows"])).hexdigest() not in (
        again["rows_sha256"],
        result["rows_sha256"],
    )
    assert "opened and checked" in done.output


def test_an_l2_export_is_pseudonymized_with_the_node_key_and_leaves_nothing_at_the_exchange(
    world: dict[str, Any],
) -> None:
    server: LiveServer = world["server"]
    bank = world["keys"]["bank"]
    planted = world["planted"]["firms"]
    with server.client(bank) as c:
        out = c.export("tax", "firms", PURPOSE)
    assert out.result["masked"] == ["firm_id"] and out.result["level"] == "L2"
    keys = node_subjects(world["node_dir"])
    by_pseudonym = {keys.pseudonym(bank.key_id, r["firm_id"]): r for r in planted}
    assert len(out.rows) == ROWS
    for pseudonym, district, revenue in out.rows:
        firm = by_pseudonym[pseudonym]  # the node's key made it
        assert (district, revenue) == (firm["district"], firm["revenue"])
    # another consumer's pseudonyms (same node key) are unrelated to the bank's
    other = {keys.pseudonym("0" * 64, r["firm_id"]) for r in planted}
    assert not other & set(by_pseudonym)
    verify_receipt(out.receipt, out.result, server.log_verifier())

    # the exchange never saw a row: no planted id or value in its files (database included),
    # no subject key made for the zone, no task file left
    needles = [r[col].encode() for rows in world["planted"].values() for r in rows
               for col in ("firm_id", "revenue")]  # fmt: skip
    assert _leaks(server.data_dir, needles) == []
    _no_zone_key(server)
    assert not [p for p in (server.data_dir / "exports").rglob("*") if p.is_file()]


def test_a_tampered_blob_another_key_or_another_result_is_one_clear_error(
    world: dict[str, Any],
) -> None:
    answer = _raw_export(world, "firms")
    bank = world["keys"]["bank"]
    assert len(open_export(bank, answer).rows) == ROWS  # the untouched answer opens

    sealed = answer["sealed"]
    blob = bytearray(base64.urlsafe_b64decode(sealed + "=" * (-len(sealed) % 4)))
    blob[-1] ^= 1
    tampered = {**answer, "sealed": base64.urlsafe_b64encode(bytes(blob)).decode().rstrip("=")}
    with pytest.raises(VerificationError, match="altered"):
        open_export(bank, tampered)
    # the same bit flipped and the result's digest changed to match: the node signed another
    digest = hashlib.sha256(blob).hexdigest()
    forged = {**tampered, "result": {**answer["result"], "sealed_sha256": digest}}
    with pytest.raises(VerificationError, match="'sealed_sha256' is not what the node signed"):
        open_export(bank, forged)
    with pytest.raises(VerificationError, match="do not open with key"):
        open_export(SigningKey.generate(), answer)
    wrong = {**answer, "result": {**answer["result"], "rows_sha256": "0" * 64}}
    with pytest.raises(VerificationError, match="'rows_sha256' is not what the node signed"):
        open_export(bank, wrong)
    receipt = {k: v for k, v in answer["receipt"].items() if k != "node_result"}
    with pytest.raises(VerificationError, match="no node result"):
        open_export(bank, {**answer, "receipt": receipt})


def test_a_consumer_abroad_is_counted_from_the_node_s_subject_digests(
    world: dict[str, Any],
) -> None:
    server: LiveServer = world["server"]
    with server.client(world["keys"]["lab"]) as c:
        first = c.export("tax", "firms", PURPOSE)
        again = c.export("tax", "firms", PURPOSE)
    assert len(first.rows) == len(again.rows) == ROWS
    decisions = entries(server, "xborder.decision")
    seen = [(d["attrs"]["decision"], d["attrs"]["count_before"], d["attrs"]["count_after"])
            for d in decisions]  # fmt: skip
    # each distinct subject counted once (the node's digests are stable across exports)
    assert seen == [("exempt", 0, ROWS), ("exempt", ROWS, ROWS)]
    assert decisions[0]["attrs"]["consumer_jurisdiction"] == "US"
    # the counts hold digests under the node's key, not the provider's at the exchange
    assert not (server.data_dir / "xborder").exists()
    assert (world["node_dir"] / "xborder" / "subject.salt").stat().st_mode & 0o777 == 0o600
    needles = [r["firm_id"].encode() for r in world["planted"]["firms"]]
    assert _leaks(server.data_dir, needles) == []
    report = check_rules(canonicalize(e) for e in entries(server))
    assert report.ok, report.faults


def test_the_node_veto_refuses_an_export_and_nothing_is_released(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    veto = world["node_dir"] / "veto.toml"
    released = len(entries(server, "computation.export"))
    veto.write_text('refuse = ["export"]\n', "utf-8")
    try:
        with server.client(world["keys"]["bank"]) as c, pytest.raises(ApiError) as exc:
            c.export("tax", "public_firms", PURPOSE)
    finally:
        veto.unlink()
    assert exc.value.status == 409 and exc.value.code == "node_refused"
    assert "vetoed" in exc.value.detail
    assert len(entries(server, "computation.export")) == released
    assert entries(server, "task.refused")[-1]["attrs"]["reason"] == "vetoed"
    assert not [p for p in (server.data_dir / "exports").rglob("*") if p.is_file()]
