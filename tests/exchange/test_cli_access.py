"""The access commands of the CLI against a real server: tables, one-line errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.keyfile import write_private_key
from tests.conftest import L2_LEVELS, LiveServer, tax_bureau_and_bank


@pytest.fixture
def keys(server: LiveServer, tmp_path: Path) -> dict[str, Path]:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    paths = {}
    for name, key in (("provider", provider), ("consumer", consumer)):
        paths[name] = tmp_path / f"{name}.key"
        write_private_key(paths[name], key)
    paths["operator"] = server.data_dir / "operator.key"
    return paths


def run(server: LiveServer, key: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, [*args, "--url", server.url, "--key", str(key)], catch_exceptions=False
    )
    return result.exit_code, result.output


def test_request_approve_use_revoke_from_the_shell(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    code, out = run(
        server, keys["consumer"], "export", "tax", "companies", "--purpose", "credit-assessment"
    )
    assert code == 1 and "denied" in out and "not_granted" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1

    code, out = run(
        server,
        keys["consumer"],
        "request",
        "tax",
        "--dataset",
        "companies",
        "--operation",
        "export",
        "--purpose",
        "credit-assessment",
        "--justification",
        "credit line review",
        "--days",
        "7",
    )
    assert code == 0, out
    request_id = re.search(r"request (\S+) filed", out).group(1)  # type: ignore[union-attr]

    code, out = run(server, keys["provider"], "requests", "--status", "pending", "--json")
    assert code == 0 and request_id in out
    code, out = run(server, keys["provider"], "requests")
    assert code == 0 and "pending" in out  # the table

    code, out = run(server, keys["provider"], "approve", request_id, "--days", "1")
    assert code == 0 and "grant grant:" in out, out
    grant_id = re.search(r"grant (grant:\S+)", out).group(1)  # type: ignore[union-attr]

    code, out = run(server, keys["consumer"], "grants", "--json")
    assert code == 0 and grant_id in out and "companies" in out and "export" in out

    result_file = tmp_path / "rows.json"
    code, out = run(
        server,
        keys["consumer"],
        "export",
        "tax",
        "companies",
        "--purpose",
        "credit-assessment",
        "--out",
        str(result_file),
    )
    assert code == 0 and "written" in out, out

    receipt_check = CliRunner().invoke(
        app,
        [
            "receipt",
            "verify",
            str(result_file) + ".receipt",
            "--result",
            str(result_file),
            "--log-key",
            str(server.data_dir / "log.pub"),
        ],
    )
    assert receipt_check.exit_code == 0, receipt_check.output
    assert "OK: export" in receipt_check.output

    code, out = run(server, keys["provider"], "revoke", grant_id, "--reason", "done")
    assert code == 0 and "revoked" in out
    code, out = run(
        server, keys["consumer"], "export", "tax", "companies", "--purpose", "credit-assessment"
    )
    assert code == 1 and "not_granted" in out


def test_ceilings_consents_and_suspension_from_the_shell(
    server: LiveServer, keys: dict[str, Path]
) -> None:
    code, out = run(server, keys["provider"], "zone", "ceilings", "tax", "--allow", "L3=export")
    assert code == 1 and "never loosened" in out
    code, out = run(server, keys["provider"], "zone", "ceilings", "tax", "--allow", "L2=aggregate")
    assert code == 0 and "L2" in out
    consumer_id = SigningKey.generate().key_id
    code, out = run(
        server,
        keys["provider"],
        "consent",
        "add",
        "tax",
        "--subject",
        "91310885617X0AEH7Y",
        "--consumer",
        consumer_id,
        "--purpose",
        "credit-assessment",
    )
    assert code == 1 and "no consumer" in out and "among the principals you can see" in out
    code, out = run(server, keys["provider"], "consents", "tax")
    assert code == 0
    code, out = run(server, keys["operator"], "zone", "suspend", "tax")
    assert code == 0 and "suspended" in out
    code, out = run(server, keys["provider"], "zone", "suspend", "tax")
    assert code == 1 and "403" in out
    code, out = run(server, keys["operator"], "zone", "reinstate", "tax")
    assert code == 0


def test_rules_aggregate_budget_from_the_shell(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    import json

    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            {
                "min_group_size": 10,
                "dp_required": True,
                "epsilon_budget": "1",
                "refresh_seconds": 3600,
                "columns": {
                    "company_id": {"disclosure": "join_only"},
                    "district": {"disclosure": "plaintext"},
                    "tax_paid_2025": {"disclosure": "plaintext", "lower": "0", "upper": "1000000"},
                },
            }
        )
    )
    code, text = run(
        server, keys["provider"], "dataset", "rules", "tax", "companies", "--set", str(rules)
    )
    assert code == 0 and "v1" in text and "DP required" in text
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, text = run(
        server, keys["provider"], "dataset", "rules", "tax", "companies", "--set", str(bad)
    )
    assert code != 0 and "Traceback" not in text and len(text.strip().splitlines()) == 1

    code, text = run(
        server,
        keys["consumer"],
        "request",
        "tax",
        "--dataset",
        "companies",
        "--operation",
        "aggregate",
        "--purpose",
        "credit-assessment",
        "--justification",
        "stats",
    )
    assert code == 0
    request_id = re.search(r"request (\S+) filed", text)
    assert request_id is not None
    code, _ = run(server, keys["provider"], "approve", request_id.group(1))
    assert code == 0

    out = tmp_path / "agg.json"
    sql = "SELECT district, COUNT(*), SUM(tax_paid_2025) FROM companies GROUP BY district"
    code, text = run(
        server,
        keys["consumer"],
        "aggregate",
        "tax",
        "--sql",
        sql,
        "--purpose",
        "credit-assessment",
        "--epsilon",
        "0.75",
        "--out",
        str(out),
    )
    assert code == 0, text
    assert "differentially private, ε = 0.75 charged" in text
    verified = CliRunner().invoke(
        app,
        [
            "receipt",
            "verify",
            str(out) + ".receipt",
            "--result",
            str(out),
            "--log-key",
            str(server.data_dir / "log.pub"),
        ],
    )
    code, text = verified.exit_code, verified.output
    assert code == 0 and text.startswith("OK: aggregate")
    code, text = run(server, keys["consumer"], "budget", "--json")
    assert code == 0 and '"remaining": "0.25"' in text
    code, text = run(
        server,
        keys["consumer"],
        "aggregate",
        "tax",
        "--sql",
        sql,
        "--purpose",
        "credit-assessment",
        "--epsilon",
        "0.5",
    )
    assert code != 0 and "budget" in text and "Traceback" not in text
    code, text = run(
        server,
        keys["consumer"],
        "aggregate",
        "tax",
        "--sql",
        "SELECT * FROM companies",
        "--purpose",
        "credit-assessment",
    )
    assert code != 0 and "Traceback" not in text
    assert len(text.strip().splitlines()) == 1
