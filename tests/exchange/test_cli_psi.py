"""``zonex psi`` from the shell: results, local files, receipts that verify, one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exchange.cli import app
from exchange.keyfile import write_private_key
from tests.conftest import EXAMPLES, L2_LEVELS, LiveServer, tax_bureau_and_bank

PURPOSE = "credit-assessment"


@pytest.fixture
def setup(server: LiveServer, tmp_path: Path) -> dict[str, Path]:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    with server.client(provider) as p:
        p.set_analysis_rules(
            "tax",
            "companies",
            {
                "min_group_size": 5,
                "columns": {
                    "tax_paid_2025": {
                        "disclosure": "after_aggregate",
                        "lower": "0",
                        "upper": "10000000",
                    }
                },
            },
        )
    with server.client(consumer) as c:
        req = c.request_access(
            "tax",
            ["companies"],
            ["psi_cardinality", "psi_members", "psi_aggregate"],
            PURPOSE,
            duration_seconds=86400,
            justification="loan applicants",
        )
    with server.client(provider) as p:
        p.approve(req["id"])
    with (EXAMPLES / "companies.csv").open(encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    applicants = tmp_path / "applicants.csv"
    with applicants.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["applicant", "company"])
        for i, r in enumerate(rows[:30]):
            w.writerow([f"a{i}", f" {r['company_id']} "])
        for i in range(10):
            w.writerow([f"b{i}", f"UNKNOWN{i:04d}"])
    key = tmp_path / "consumer.key"
    write_private_key(key, consumer)
    expected = sum(min(int(r["tax_paid_2025"]), 10_000_000) for r in rows[:30])
    return {"key": key, "ids": applicants, "sum": Path(str(expected))}


def run(server: LiveServer, key: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, [*args, "--url", server.url, "--key", str(key)], catch_exceptions=False
    )
    return result.exit_code, result.output


def _common(setup: dict[str, Path]) -> list[str]:
    return [
        "--zone", "tax", "--dataset", "companies", "--ids", str(setup["ids"]),
        "--column", "company", "--purpose", PURPOSE,
    ]  # fmt: skip


def test_psi_commands_write_results_and_receipts(
    server: LiveServer, setup: dict[str, Path], tmp_path: Path
) -> None:
    code, out = run(server, setup["key"], "psi", "cardinality", *_common(setup))
    assert code == 0, out
    assert "in both" in out and "30" in out

    members = tmp_path / "members.json"
    code, out = run(server, setup["key"], "psi", "members", *_common(setup), "--out", str(members))
    assert code == 0, out
    local = json.loads((tmp_path / "members.json.local.json").read_text("utf-8"))
    flags = [m["member"] for m in local["members"]]
    assert flags == [True] * 30 + [False] * 10
    verified = CliRunner().invoke(
        app,
        [
            "receipt",
            "verify",
            str(tmp_path / "members.json.receipt"),
            "--result",
            str(members),
            "--log-key",
            str(server.data_dir / "log.pub"),
        ],
    )
    assert verified.exit_code == 0, verified.output

    agg = tmp_path / "agg.json"
    code, out = run(
        server, setup["key"], "psi", "aggregate", *_common(setup),
        "--sum", "tax_paid_2025", "--out", str(agg),
    )  # fmt: skip
    assert code == 0, out
    local = json.loads((tmp_path / "agg.json.local.json").read_text("utf-8"))
    assert local["count"] == 30
    assert local["sums"]["tax_paid_2025"] == int(str(setup["sum"]))
    # the signed result holds only a ciphertext, never the total
    signed = json.loads(agg.read_text("utf-8"))
    assert str(setup["sum"]) not in json.dumps(signed)


def test_psi_errors_are_one_line(server: LiveServer, setup: dict[str, Path]) -> None:
    for args in (
        ["psi", "cardinality", *_common(setup)[:-4], "--column", "nope", "--purpose", PURPOSE],
        ["psi", "cardinality", *_common(setup), "--epsilon", "lots"],
        ["psi", "aggregate", *_common(setup), "--sum", "district"],
        ["psi", "members", *_common(setup)[:-2], "--purpose", "marketing"],
    ):
        code, out = run(server, setup["key"], *args)
        assert code == 1, out
        assert "Traceback" not in out
        assert len([line for line in out.strip().splitlines() if "error" in line]) == 1, out
