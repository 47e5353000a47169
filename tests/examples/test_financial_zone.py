"""The financial-zone showcase runs end to end against a real server and leaves a ledger
export, a pinned checkpoint and receipts that verify offline."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from crypto.note import NoteVerifier
from crypto.receipt import verify_receipt
from exchange.audit import check_bundle, read_bundle_lines
from exchange.audit.console import open_bundle
from exchange.audit.rules import check_rules
from tests.browser import CHROMIUM, chromium, start_console
from tests.conftest import free_port
from tests.security.leakage import exchange_texts, find

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
    # and the business rules hold over every kind of computation the showcase runs: private
    # joins, scoring on consents, secure sums, a node's aggregate, a revocation
    rules = check_rules(read_bundle_lines(data_dir / "audit" / "ledger.jsonl"))
    assert rules.ok, rules.faults
    assert rules.entries == report.entries
    # the month's report: every computation kind the showcase ran is counted in it
    (folder,) = (data_dir / "audit").glob("report-*")
    assert {p.name for p in folder.iterdir()} >= {"report.json", "report.csv", "report.html"}
    csv_text = (folder / "report.csv").read_text()
    for kind in ("psi_aggregate", "he_score", "secure_sum", "aggregate", "export"):
        assert f",{kind}," in csv_text, kind
    if CHROMIUM.exists():  # CI installs it; the report opened in the console, in Chromium
        month = folder.name.removeprefix("report-")
        open_report_in_the_console(data_dir / "audit" / "ledger.jsonl", log, month)
    kinds = {}
    for name in ("psi-aggregate", "he-score", "secure-sum", "node-aggregate"):
        receipts = data_dir / "receipts"
        receipt = json.loads((receipts / f"{name}.receipt.json").read_text())
        result = json.loads((receipts / f"{name}.result.json").read_text())
        statement, _ = verify_receipt(receipt, result, log)
        kinds[name] = (statement["kind"], statement["epsilon"])
    assert kinds == {
        "psi-aggregate": ("psi_aggregate", str(financial_zone.PSI_EPSILON)),
        "he-score": ("he_score", "0"),
        "secure-sum": ("secure_sum", "0"),
        "node-aggregate": ("aggregate", str(financial_zone.NODE_EPSILON)),
    }
    # the social-insurance zone lives on its bureau's node: no store of it at the exchange
    assert not list((data_dir / "zones").glob("social-insurance/**/*.duckdb"))
    node_dir = data_dir.with_name(data_dir.name + "-social-node")
    assert list(node_dir.glob("store/**/*.duckdb"))
    city = financial_zone.citydata.generate()
    assert_no_planted_id_or_value_is_kept(data_dir, city)
    # the bank's secret model stays private to it; no private-join artefact is left behind
    assert (data_dir / "bank" / "credit-model.json").stat().st_mode & 0o077 == 0
    assert not any((data_dir / "psi").iterdir())


def open_report_in_the_console(bundle: Path, log: NoteVerifier, month: str) -> None:
    """The auditor opens the showcase's bundle in ``zonex console``: the month's report shows
    its charts with a bar per kind of computation the showcase ran."""
    from playwright.sync_api import expect

    console = start_console(bundle=open_bundle(bundle, log))
    try:
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1200, "height": 800})
            page.set_default_timeout(20_000)
            page.goto(f"{console.url}/reports?period={month}")
            expect(page.locator("#report-title")).to_contain_text(month)
            chart = page.locator("#chart-computations svg")
            expect(chart).to_be_visible()
            assert chart.locator(".mark-rect path").count() >= 5  # five kinds at least
            for kind in ("psi_aggregate", "he_score", "secure_sum"):
                expect(page.locator("#report-summary tr", has_text=kind).first).to_be_visible()
    finally:
        console.stop()


#: a number shorter than this could occur in a receipt by chance (a count, a time): it is not
#: searched for; every planted value at least this long is
_VALUE_DIGITS = 5


def assert_no_planted_id_or_value_is_kept(data_dir: Path, city: Any) -> None:
    """docs/privacy.md: nothing the exchange keeps (every table of the control database, every
    file of its data directory but the zones' own stores and keys, its server log, and every
    response the story saved) holds a raw identifier of any party or a raw L2+ value, nor the
    private join's exact (pre-noise) total. The providers' source files and the bank's own
    files are another party's and are not searched."""
    texts = exchange_texts(
        data_dir,
        f"sqlite:///{data_dir / 'control.db'}",
        others=[data_dir / "generated", data_dir / "bank"],
    )
    stores = {store for store, _ in texts}
    # the search reaches what it must: the database, the ledger, the log, the receipts
    assert {"database table ledger_entries", "database table consents", "file server.log"} <= stores
    assert any(store.startswith("file receipts/") for store in stores)

    ids = {cid.strip() for _, cid in city.applicants}  # the bank's, never sent in the clear
    ids |= {r["company_id"] for r in city.registry}  # consent subjects, scored ids
    ids |= {f["enterprise_id"] for firms in city.districts.values() for f in firms}
    values = {
        str(r[column])
        for rows in (city.tax, city.social)
        for r in rows
        for column, value in r.items()
        if column not in ("company_id", "district") and len(str(value)) >= _VALUE_DIGITS
    }
    values |= {
        str(f["revenue_10k"])
        for firms in city.districts.values()
        for f in firms
        if len(str(f["revenue_10k"])) >= _VALUE_DIGITS
    }
    truth = financial_zone.citydata.psi_truth(city)
    values.add(str(truth["tax_sum"]))  # released only with noise: the exact total never
    assert len(ids) > 3000 and len(values) > 1000  # the plant is large enough to mean something
    hits = find(texts, ids | values)
    assert not hits, "\n".join(str(h) for h in hits[:20])

    # and the search would have found them: one id and one value in a log line, one value in
    # a database row
    planted_id, planted_value = sorted(ids)[0], sorted(values)[0]
    leaked = [
        ("file server.log", f'{{"msg": "scoring {planted_id}", "x": {planted_value}}}'),
        ("database table ledger_entries", f"7\tcompute\t{planted_value}\t"),
    ]
    assert {(h.store, h.needle) for h in find(leaked, ids | values)} == {
        ("file server.log", planted_id),
        ("file server.log", planted_value),
        ("database table ledger_entries", planted_value),
    }
