"""The financial-zone showcase runs end to end against a real server and leaves a ledger
export, a pinned checkpoint and receipts that verify offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from crypto.note import NoteVerifier
from crypto.receipt import verify_receipt
from exchange.audit import check_bundle, read_bundle_lines
from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "financial_zone"))

import financial_zone

pytestmark = pytest.mark.slow


def test_financial_zone_showcase_runs(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    assert financial_zone.main(["--data-dir", str(data_dir), "--port", str(free_port())]) == 0

    log = NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())
    trusted = (data_dir / "audit" / "trusted-checkpoint.txt").read_text()
    report = check_bundle(read_bundle_lines(data_dir / "audit" / "ledger.jsonl"), log, trusted)
    assert report.ok and report.entries > 0
    kinds = {}
    for name in ("psi-aggregate", "he-score", "secure-sum"):
        receipts = data_dir / "receipts"
        receipt = json.loads((receipts / f"{name}.receipt.json").read_text())
        result = json.loads((receipts / f"{name}.result.json").read_text())
        statement, _ = verify_receipt(receipt, result, log)
        kinds[name] = (statement["kind"], statement["epsilon"])
    assert kinds == {
        "psi-aggregate": ("psi_aggregate", str(financial_zone.PSI_EPSILON)),
        "he-score": ("he_score", "0"),
        "secure-sum": ("secure_sum", "0"),
    }
    # the ledger holds salted digests, never a raw company id of the bank's applicants
    ledger = (data_dir / "audit" / "ledger.jsonl").read_text()
    city = financial_zone.citydata.generate()
    assert not any(cid.strip() in ledger for _, cid in city.applicants)
    # the bank's secret model stays private to it; no private-join artefact is left behind
    assert (data_dir / "bank" / "credit-model.json").stat().st_mode & 0o077 == 0
    assert not any((data_dir / "psi").iterdir())
