"""Receipts: issued by a real exchange, verified offline, and broken by any change."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crypto.canonical import canonicalize
from crypto.encoding import b64url_decode, b64url_encode
from crypto.errors import VerificationError
from crypto.keys import SigningKey
from crypto.note import NoteSigner, NoteVerifier
from crypto.receipt import verify_receipt
from exchange.cli import app
from exchange.server.receipts import record_computation
from exchange.server.runtime import Exchange

RESULT = {"columns": ["district", "count"], "rows": [["huangpu", 12], ["putuo", 30]]}
STATEMENT = {
    "consumer": "c" * 64,
    "zones": ["tax"],
    "datasets": [{"zone": "tax", "name": "companies", "snapshot": "d" * 64}],
    "query_digest": "e" * 64,
    "rules_version": 3,
    "grant": "grant-0123",
    "policy_version": 7,
    "k": 10,
    "epsilon": "0.5",
    "output_level": "L3",
}


def verifier_of(data_dir: Path) -> NoteVerifier:
    return NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())


@pytest.fixture
def issued(exchange: Exchange) -> dict[str, Any]:
    # some history before and after, so the proof has several levels
    for _ in range(5):
        record_computation(
            exchange, kind="aggregate", actor="a" * 64, statement=STATEMENT, result={"x": 1}
        )
    bundle, _ = record_computation(
        exchange, kind="aggregate", actor="c" * 64, statement=STATEMENT, result=RESULT
    )
    return bundle


def test_a_receipt_verifies_offline(
    issued: dict[str, Any], exchange: Exchange, data_dir: Path
) -> None:
    statement, cp = verify_receipt(issued, RESULT, verifier_of(data_dir))
    assert statement["ledger_index"] == 6  # after log.initialized and five others
    assert statement["epsilon"] == "0.5"
    assert cp.size >= 6
    assert issued["inclusion"]["proof"]  # a real path, not a one-leaf tree


def _mutations(bundle: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out: list[tuple[str, dict[str, Any]]] = []
    payload = json.loads(b64url_decode(bundle["statement"]["payload"]))
    for key in payload:
        changed = copy.deepcopy(bundle)
        altered = dict(payload)
        value = altered[key]
        altered[key] = value + 1 if isinstance(value, int) else (str(value) + "x")
        changed["statement"]["payload"] = b64url_encode(canonicalize(altered))
        out.append((f"statement.{key}", changed))
    sig = bundle["statement"]["signatures"][0]["sig"]
    changed = copy.deepcopy(bundle)
    changed["statement"]["signatures"][0]["sig"] = ("A" if sig[0] != "A" else "B") + sig[1:]
    out.append(("signature", changed))
    entry = json.loads(b64url_decode(bundle["entry"]))
    for key in ("seq", "kind", "time", "actor"):
        changed = copy.deepcopy(bundle)
        e = dict(entry)
        e[key] = e[key] + 1 if isinstance(e[key], int) else e[key] + "x"
        changed["entry"] = b64url_encode(canonicalize(e))
        out.append((f"entry.{key}", changed))
    for key in ("statement", "result"):
        changed = copy.deepcopy(bundle)
        e = copy.deepcopy(entry)
        e["digests"][key] = "0" * 64
        changed["entry"] = b64url_encode(canonicalize(e))
        out.append((f"entry.digests.{key}", changed))
    for i in range(len(bundle["inclusion"]["proof"])):
        changed = copy.deepcopy(bundle)
        h = bytearray(b64url_decode(changed["inclusion"]["proof"][i]))
        h[0] ^= 1
        changed["inclusion"]["proof"][i] = b64url_encode(bytes(h))
        out.append((f"proof[{i}]", changed))
    for key in ("index", "size"):
        changed = copy.deepcopy(bundle)
        changed["inclusion"][key] += 1
        out.append((f"inclusion.{key}", changed))
    changed = copy.deepcopy(bundle)
    changed["inclusion"]["proof"] = changed["inclusion"]["proof"][:-1]
    out.append(("proof truncated", changed))
    lines = bundle["checkpoint"].split("\n")
    changed = copy.deepcopy(bundle)
    lines2 = list(lines)
    lines2[1] = str(int(lines2[1]) + 1)
    changed["checkpoint"] = "\n".join(lines2)
    out.append(("checkpoint size", changed))
    changed = copy.deepcopy(bundle)
    changed["type"] = "zonex.receipt-bundle.v2"
    out.append(("bundle type", changed))
    changed = copy.deepcopy(bundle)
    changed["extra"] = 1
    out.append(("extra key", changed))
    return out


def test_any_change_to_the_receipt_fails(issued: dict[str, Any], data_dir: Path) -> None:
    verifier = verifier_of(data_dir)
    mutations = _mutations(issued)
    assert len(mutations) > 25
    for name, changed in mutations:
        with pytest.raises(VerificationError):
            verify_receipt(changed, RESULT, verifier)
            pytest.fail(f"accepted a receipt with a changed {name}")


@pytest.mark.parametrize(
    "result",
    [
        {**RESULT, "rows": [["huangpu", 13], ["putuo", 30]]},
        {**RESULT, "rows": [["putuo", 30], ["huangpu", 12]]},
        {**RESULT, "columns": ["district", "n"]},
        {**RESULT, "extra": True},
        {},
    ],
)
def test_any_change_to_the_result_fails(
    issued: dict[str, Any], data_dir: Path, result: dict[str, Any]
) -> None:
    with pytest.raises(VerificationError, match="result"):
        verify_receipt(issued, result, verifier_of(data_dir))


def test_another_logs_key_is_refused(issued: dict[str, Any]) -> None:
    other = NoteSigner("test.zonex/log", SigningKey.generate()).verifier()
    with pytest.raises(VerificationError):
        verify_receipt(issued, RESULT, other)


def test_cli_receipt_verify(issued: dict[str, Any], data_dir: Path, tmp_path: Path) -> None:
    receipt = tmp_path / "receipt.json"
    result = tmp_path / "result.json"
    receipt.write_text(json.dumps(issued, indent=2))
    result.write_text(json.dumps(RESULT, indent=1))
    runner = CliRunner()
    args = ["receipt", "verify", str(receipt), "--result", str(result)]
    args += ["--log-key", str(data_dir / "log.pub")]
    ok = runner.invoke(app, args)
    assert ok.exit_code == 0, ok.output
    assert "OK: aggregate" in ok.output
    result.write_text(json.dumps({**RESULT, "rows": []}))
    bad = runner.invoke(app, args)
    assert bad.exit_code == 1
    assert "result" in bad.output and "Traceback" not in bad.output
    receipt.write_text("{not json")
    broken = runner.invoke(app, args)
    assert broken.exit_code == 1 and "not a JSON receipt" in broken.output
