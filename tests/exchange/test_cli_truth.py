"""The CLI tells the truth (issue 14), driven through the CLI against a live server: errors
name what was wrong and what to do, results on stdout are parseable and keep their receipt,
read commands print the server's JSON, noised numbers are shown rounded."""

from __future__ import annotations

import importlib.metadata
import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.keyfile import write_private_key, write_public_key
from tests.conftest import (
    EXAMPLES,
    L2_LEVELS,
    L3_LEVELS,
    LiveServer,
    free_port,
    tax_bureau_and_bank,
)
from tests.exchange.test_access import granted
from tests.exchange.test_aggregate import _rules


class Ran:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def zonex(*args: str | Path) -> Ran:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    return Ran(result.exit_code, result.stdout, result.stderr)


def one_error_line(ran: Ran) -> str:
    """The single ``error: ...`` line of a failed command (and nothing that looks like a
    traceback)."""
    assert ran.code != 0, ran.output
    assert "Traceback" not in ran.output, ran.output
    lines = [line for line in ran.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, ran.output
    assert lines[0].startswith("error: "), ran.output
    return lines[0]


@pytest.fixture
def parties(server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    keys = {"provider": provider, "consumer": consumer}
    paths: dict[str, Any] = {"keys": keys}
    for name, key in keys.items():
        paths[name] = tmp_path / f"{name}.key"
        write_private_key(paths[name], key)
        write_public_key(tmp_path / f"{name}.pub", key.public_key)
    paths["operator"] = server.data_dir / "operator.key"
    return paths


def as_(server: LiveServer, key: Path, *args: str | Path) -> Ran:
    return zonex(*args, "--url", server.url, "--key", key)


def test_version() -> None:
    ran = zonex("--version")
    assert ran.code == 0
    assert ran.stdout.strip() == f"zonex {importlib.metadata.version('zonex')}"


def test_a_public_key_given_as_key_is_named(server: LiveServer, tmp_path: Path) -> None:
    pub = tmp_path / "bank.pub"
    write_public_key(pub, SigningKey.generate().public_key)
    line = one_error_line(zonex("catalog", "--url", server.url, "--key", pub))
    assert "that is a public key; pass the private key file" in line
    assert str(pub) in line


def test_an_unreachable_exchange_names_the_url_and_the_fix(tmp_path: Path) -> None:
    key = tmp_path / "bank.key"
    write_private_key(key, SigningKey.generate())
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    line = one_error_line(zonex("catalog", "--url", url, "--key", key))
    assert f"cannot reach the exchange at {url}" in line
    assert "--url" in line and "ZONEX_URL" in line


def test_an_unregistered_key_is_told_what_to_check(server: LiveServer, tmp_path: Path) -> None:
    key = tmp_path / "stranger.key"
    write_private_key(key, SigningKey.generate())
    line = one_error_line(zonex("catalog", "--url", server.url, "--key", key))
    assert "401" in line and "next: check that --key" in line and "zonex key id" in line


def test_a_suspended_key_is_told_so_and_what_to_do(
    server: LiveServer, parties: dict[str, Any]
) -> None:
    consumer = parties["keys"]["consumer"]
    with server.client(server.operator) as op:
        op.set_principal_status(consumer.key_id, "suspended")
    line = one_error_line(as_(server, parties["consumer"], "catalog"))
    assert "401" in line and "suspended" in line and "reinstate" in line


def test_a_validation_error_names_the_field(server: LiveServer, parties: dict[str, Any]) -> None:
    line = one_error_line(as_(server, parties["provider"], "zone", "create", "x"))
    assert "422 invalid_input" in line
    assert re.search(r"field name: String should have at least 2 characters", line), line


def test_a_denial_names_reason_context_and_next_step(
    server: LiveServer, parties: dict[str, Any]
) -> None:
    line = one_error_line(
        as_(server, parties["consumer"], "export", "tax", "companies", "--purpose", "statistics")
    )
    assert "403 denied" in line and "not_granted" in line
    assert "companies" in line and "export" in line and "statistics" in line
    assert "next: request access: zonex request tax --dataset companies --operation export" in line


def test_unknown_choices_list_the_valid_values(
    server: LiveServer, parties: dict[str, Any], tmp_path: Path
) -> None:
    line = one_error_line(
        as_(
            server,
            parties["consumer"],
            "request",
            "tax",
            "--dataset",
            "companies",
            "--operation",
            "export",
            "--purpose",
            "fishing",
            "--justification",
            "x",
        )
    )
    assert "unknown purpose 'fishing'" in line and "credit-assessment" in line
    line = one_error_line(
        as_(
            server,
            parties["operator"],
            "principal",
            "add",
            "Bakery",
            "--kind",
            "bakery",
            "--public-key",
            tmp_path / "consumer.pub",
        )
    )
    assert "'bakery'" in line and "agency, enterprise, auditor" in line
    levels = tmp_path / "levels.json"
    levels.write_text(json.dumps({**L2_LEVELS, "company_id": "L9"}))
    line = one_error_line(
        as_(
            server,
            parties["provider"],
            "dataset",
            "register",
            "tax",
            "firms",
            "--file",
            EXAMPLES / "companies.csv",
            "--subject-column",
            "company_id",
            "--levels-file",
            levels,
        )
    )
    assert "'L9'" in line and "L1, L2, L3, L4, IMPORTANT, CORE" in line


def test_out_dash_is_stdout_json_with_its_receipt(
    server: LiveServer, parties: dict[str, Any], tmp_path: Path
) -> None:
    granted(server, parties["keys"], ["companies"], ["export"])
    ran = as_(
        server,
        parties["consumer"],
        "export",
        "tax",
        "companies",
        "--purpose",
        "credit-assessment",
        "--out",
        "-",
    )
    assert ran.code == 0, ran.output
    document = json.loads(ran.stdout)  # stdout holds the JSON and nothing else
    assert set(document) == {"result", "receipt"} and document["result"]["rows"]
    assert "receipt" in ran.stderr  # where the receipt went is said, on stderr
    # the saved output is both the result and the receipt for an offline check
    saved = tmp_path / "export.json"
    saved.write_text(ran.stdout)
    checked = zonex(
        "receipt",
        "verify",
        saved,
        "--result",
        saved,
        "--log-key",
        server.data_dir / "log.pub",
    )
    assert checked.code == 0 and checked.stdout.startswith("OK: export"), checked.output

    # no --out behaves the same; --receipt also writes the receipt to a file
    receipt = tmp_path / "r.json"
    ran = as_(
        server,
        parties["consumer"],
        "export",
        "tax",
        "companies",
        "--purpose",
        "credit-assessment",
        "--receipt",
        receipt,
    )
    assert ran.code == 0, ran.output
    assert json.loads(ran.stdout)["receipt"] == json.loads(receipt.read_text())


def test_read_commands_print_the_servers_json(server: LiveServer, parties: dict[str, Any]) -> None:
    granted(server, parties["keys"], ["companies"], ["export"])
    for key, args in (
        ("consumer", ["catalog"]),
        ("consumer", ["catalog", "--zone", "tax"]),
        ("consumer", ["grants"]),
        ("consumer", ["requests"]),
        ("consumer", ["budget"]),
        ("provider", ["consents", "tax"]),
        ("operator", ["principal", "list"]),
        ("consumer", ["whoami"]),
        ("provider", ["dataset", "rules", "tax", "companies"]),
    ):
        ran = as_(server, parties[key], *args, "--json")
        assert ran.code == 0, (args, ran.output)
        parsed = json.loads(ran.stdout)
        assert isinstance(parsed, list | dict), args
    zones = json.loads(as_(server, parties["consumer"], "catalog", "--json").stdout)
    assert "tax" in json.dumps(zones) and "companies" in json.dumps(zones)
    principals = json.loads(as_(server, parties["operator"], "principal", "list", "--json").stdout)
    assert {"Tax Bureau", "City Bank"} <= {p["name"] for p in principals}


def test_noised_numbers_are_rounded_in_tables_and_whole_in_json(
    server: LiveServer, tmp_path: Path
) -> None:
    provider, consumer = tax_bureau_and_bank(server, L3_LEVELS)
    keys = {"provider": provider, "consumer": consumer}
    path = tmp_path / "consumer.key"
    write_private_key(path, consumer)
    with server.client(provider) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    granted(server, keys, ["companies"], ["aggregate"])
    sql = "SELECT COUNT(*) AS n, AVG(tax_paid_2025) AS tax FROM companies"
    out = tmp_path / "agg.json"
    common = ["aggregate", "tax", "--sql", sql, "--purpose", "credit-assessment"]
    ran = as_(server, path, *common, "--epsilon", "1", "--out", out)
    assert ran.code == 0, ran.output
    assert "rounded to 2 decimals" in ran.stderr
    values = [str(v) for row in json.loads(out.read_text())["rows"] for v in row]
    assert values and any(len(v.partition(".")[2]) > 2 for v in values)  # the JSON: every digit
    shown = re.findall(r"\d+\.\d+", ran.stderr)
    assert shown and all(len(n.partition(".")[2]) <= 2 for n in shown), ran.stderr


def test_psi_out_dash_is_one_json_document_with_receipt_and_local_values(
    server: LiveServer, tmp_path: Path
) -> None:
    from tests.exchange.test_cli_psi import _setup

    setup = _setup(server, tmp_path, L3_LEVELS)  # DP by default: the sums are noised
    ran = as_(
        server,
        setup["key"],
        "psi",
        "aggregate",
        "--zone",
        "tax",
        "--dataset",
        "companies",
        "--ids",
        setup["ids"],
        "--column",
        "company",
        "--purpose",
        "credit-assessment",
        "--sum",
        "tax_paid_2025",
        "--epsilon",
        "1",
        "--out",
        "-",
    )
    assert ran.code == 0, ran.output
    document = json.loads(ran.stdout)
    assert set(document) == {"result", "receipt", "local"}
    assert "receipt" in ran.stderr and "psi aggregate" in ran.stderr  # the table, on stderr
    saved = tmp_path / "psi.json"
    saved.write_text(ran.stdout)
    checked = zonex(
        "receipt", "verify", saved, "--result", saved, "--log-key", server.data_dir / "log.pub"
    )
    assert checked.code == 0, checked.output
    if not document["local"].get("suppressed"):
        # the table shows the noised average with at most two decimals
        shown = re.search(r"avg\(tax_paid_2025\)\s*│?\s*(-?\d+(?:\.\d+)?)", ran.stderr)
        assert shown is not None, ran.stderr
        assert len(shown.group(1).partition(".")[2]) <= 2, ran.stderr


def test_out_dash_is_refused_where_stdout_would_leak_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    line = one_error_line(zonex("key", "new", "--out", "-"))
    assert "prefix" in line and not list(tmp_path.iterdir())  # no "-.key" written
    line = one_error_line(zonex("backup", "--data-dir", tmp_path, "--out", "-"))
    assert "private keys" in line and "not to standard output" in line


def test_a_port_out_of_range_is_a_usage_error(tmp_path: Path) -> None:
    ran = zonex("serve", "--data-dir", tmp_path, "--port", "70000")
    assert ran.code == 2 and "Traceback" not in ran.output
    assert "--port" in ran.output and "65535" in ran.output
