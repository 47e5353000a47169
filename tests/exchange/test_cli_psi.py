"""``zonex psi`` from the shell: results, local files, receipts that verify, one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exchange.cli import app
from exchange.keyfile import write_private_key
from exchange.node import dp
from tests.conftest import EXAMPLES, L2_LEVELS, L3_LEVELS, LiveServer, tax_bureau_and_bank

PURPOSE = "credit-assessment"


def _setup(server: LiveServer, tmp_path: Path, levels: dict[str, str]) -> dict[str, Path]:
    provider, consumer = tax_bureau_and_bank(server, levels)
    with server.client(provider) as p:
        p.set_analysis_rules(
            "tax",
            "companies",
            {
                "min_group_size": 5,
                "epsilon_budget": "10",
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


@pytest.fixture
def setup(server: LiveServer, tmp_path: Path) -> dict[str, Path]:
    """The bank's 40 applicants (30 known) against an L2 dataset: exact releases allowed."""
    return _setup(server, tmp_path, L2_LEVELS)


@pytest.fixture
def setup_l3(server: LiveServer, tmp_path: Path) -> dict[str, Path]:
    """The same against an L3 dataset without the provider's opt-out: DP by default."""
    return _setup(server, tmp_path, L3_LEVELS)


def run(server: LiveServer, key: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, [*args, "--url", server.url, "--key", str(key)], catch_exceptions=False
    )
    return result.exit_code, result.output


def _common(setup: dict[str, Path]) -> list[str]:
    # the zone first, as every command that acts on a zone takes it
    return [
        "tax", "--dataset", "companies", "--ids", str(setup["ids"]),
        "--id-column", "company", "--purpose", PURPOSE,
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
        # the zone named twice, differently; and not at all
        ["psi", "cardinality", *_common(setup), "--zone", "land"],
        ["psi", "cardinality", *_common(setup)[1:]],
    ):
        code, out = run(server, setup["key"], *args)
        assert code == 1, out
        assert "Traceback" not in out
        assert len([line for line in out.strip().splitlines() if "error" in line]) == 1, out
    # the older spelling --zone still works
    older = ["psi", "cardinality", "--zone", "tax", *_common(setup)[1:], "--epsilon", "1"]
    code, out = run(server, setup["key"], *older)
    assert code == 0 and "in both" in out, out


def _one_error_line(code: int, out: str) -> str:
    assert code == 1, out
    assert "Traceback" not in out
    lines = [line for line in out.strip().splitlines() if "error" in line]
    assert len(lines) == 1, out
    return lines[0]


def test_psi_at_l3_needs_epsilon(server: LiveServer, setup_l3: dict[str, Path]) -> None:
    key = setup_l3["key"]
    line = _one_error_line(*run(server, key, "psi", "cardinality", *_common(setup_l3)))
    assert "--epsilon" in line and "dp_required" in line
    line = _one_error_line(*run(server, key, "psi", "members", *_common(setup_l3)))
    assert "dp_required" in line and "psi cardinality" in line
    code, out = run(server, key, "psi", "cardinality", *_common(setup_l3), "--epsilon", "1")
    assert code == 0, out
    assert "in both" in out and "DP noise" in out and "ε = 1" in out


@pytest.mark.parametrize("epsilon", ["1e-30", "0.0000000001", "0.001", "lots"])
def test_extreme_epsilon_is_one_line_naming_it(
    server: LiveServer, setup_l3: dict[str, Path], epsilon: str
) -> None:
    line = _one_error_line(
        *run(
            server, setup_l3["key"], "psi", "cardinality", *_common(setup_l3), "--epsilon", epsilon
        )
    )
    assert "--epsilon" in line


def test_a_suppressed_result_is_shown_plainly(
    server: LiveServer,
    setup_l3: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The noisy count is fixed below k so the gate closes: the consumer sees that nothing but
    the suppression was released, and that ε was spent."""
    monkeypatch.setattr(dp.Gate, "noisy", lambda gate, true: 0)
    agg = tmp_path / "agg.json"
    code, out = run(
        server, setup_l3["key"], "psi", "aggregate", *_common(setup_l3),
        "--sum", "tax_paid_2025", "--epsilon", "1", "--out", str(agg),
    )  # fmt: skip
    assert code == 0, out
    assert "Traceback" not in out and "suppressed" in out and "ε = 1" in out
    local = json.loads((tmp_path / "agg.json.local.json").read_text("utf-8"))
    assert local["suppressed"] is True and local["count"] is None and local["sums"] == {}
    verified = CliRunner().invoke(
        app,
        [
            "receipt", "verify", str(tmp_path / "agg.json.receipt"), "--result", str(agg),
            "--log-key", str(server.data_dir / "log.pub"),
        ],
    )  # fmt: skip
    assert verified.exit_code == 0, verified.output


def test_an_id_with_a_control_character_is_named_by_row(
    server: LiveServer, setup: dict[str, Path], tmp_path: Path
) -> None:
    ids = tmp_path / "dirty.csv"
    with ids.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["applicant", "company"])
        w.writerows([["a0", "91310000000001"], ["a1", "9131\x1b[2J0002"]])
    args = [*_common(setup)]
    args[args.index("--ids") + 1] = str(ids)
    line = _one_error_line(*run(server, setup["key"], "psi", "cardinality", *args))
    assert "row 2" in line and "control or format character (U+001B)" in line and "company" in line
    assert "[2J" not in line
