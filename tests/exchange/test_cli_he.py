"""``zonex model``, ``zonex score`` and ``zonex secure-sum`` against a real server: files
written, receipts verified offline with ``zonex receipt verify``, one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from crypto import he
from crypto.keys import SigningKey
from exchange.cli import app
from exchange.client import he as he_client
from exchange.keyfile import write_private_key
from tests.conftest import LiveServer
from tests.exchange import test_he_compute as he_tests
from tests.exchange.test_he_compute import (
    CELLS,
    CONSENTED,
    DISTRICTS,
    FEATURES,
    SUM_SQL,
    _expected,
    _matrix,
)

pytestmark = pytest.mark.slow

# the scenarios of the API tests, driven from the shell
bank = he_tests.bank
bureau = he_tests.bureau


def _key(tmp_path: Path, name: str, key: SigningKey) -> Path:
    path = tmp_path / f"{name}.key"
    write_private_key(path, key)
    return path


def run(server: LiveServer, key: Path | None, *args: str) -> tuple[int, str]:
    extra = ["--url", server.url, "--key", str(key)] if key is not None else []
    result = CliRunner().invoke(app, [*args, *extra], catch_exceptions=False)
    return result.exit_code, result.output


def test_commit_score_and_audit_from_the_shell(
    server: LiveServer, bank: dict[str, Any], tmp_path: Path
) -> None:
    key = _key(tmp_path, "bank", bank["keys"]["bank"])
    weights = [2e-05, 0.015, 3.5, -1e-06]
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"features": FEATURES, "weights": weights, "bias": 0.5}))
    code, output = run(server, key, "model", "commit", "--model", str(model))
    assert code == 0, output
    assert "added a secret nonce" in output
    commitment = output.split("model commitment: ")[1].split()[0]
    assert json.loads(model.read_text())["nonce"]
    shown = CliRunner().invoke(
        app,
        ["model", "show", commitment, "--out", "-", "--url", server.url, "--key", str(key)],
        catch_exceptions=False,
    )
    assert shown.exit_code == 0 and json.loads(shown.stdout)["features"] == FEATURES

    firms = bank["firms"][:CONSENTED]
    ids = tmp_path / "ids.csv"
    ids.write_text("id\n" + "\n".join(f["company_id"] for f in firms) + "\n")
    scores = tmp_path / "scores.csv"
    result = tmp_path / "result.json"
    code, output = run(
        server,
        key,
        "score",
        "--zone",
        "tax",
        "--dataset",
        "firms",
        "--model",
        str(model),
        "--ids",
        str(ids),
        "--out",
        str(scores),
        "--result",
        str(result),
    )
    assert code == 0, output
    with scores.open() as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [f["company_id"] for f in firms]
    expected = _matrix(firms) @ np.array(weights) + 0.5
    got = np.array([float(r["score"]) for r in rows])
    # the derived bound (docs/he.md "Accuracy"), plus the float64 reference's own rounding
    bound = he.score_error_bounds(he.CKKS_DEFAULT, weights, _matrix(firms), bias=0.5)
    slack = 2.0**-50 * (np.abs(_matrix(firms)) @ np.abs(weights) + 0.5)
    assert np.all(np.abs(got - expected) <= bound + slack)
    # beside the result: the nonce that opens its commitment to the ids, for the consumer only
    opening_file = tmp_path / "result.json.subjects"
    assert opening_file.stat().st_mode & 0o077 == 0
    opening = json.loads(opening_file.read_text())
    assert opening["ids"] == [f["company_id"] for f in firms]
    he_client.verify_subjects(json.loads(result.read_text()), opening["ids"], opening["nonce"])

    log_key = str(server.data_dir / "log.pub")
    code, output = run(
        server,
        None,
        "receipt",
        "verify",
        str(result) + ".receipt",
        "--result",
        str(result),
        "--log-key",
        log_key,
    )
    assert code == 0 and output.startswith("OK: he_score"), output

    auditor = SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Audit Office 2", "auditor", auditor.public_key)
    document = tmp_path / "document.json"
    code, output = run(
        server,
        _key(tmp_path, "auditor", auditor),
        "model",
        "show",
        commitment,
        "--out",
        str(document),
    )
    assert code == 0, output
    code, output = run(
        server,
        None,
        "model",
        "verify",
        "--model",
        str(model),
        "--document",
        str(document),
        "--commitment",
        commitment,
    )
    assert code == 0 and output.startswith("OK"), output
    tampered = json.loads(model.read_text())
    tampered["weights"][0] = 3e-05
    model.write_text(json.dumps(tampered))
    code, output = run(
        server,
        None,
        "model",
        "verify",
        "--model",
        str(model),
        "--document",
        str(document),
        "--commitment",
        commitment,
    )
    assert code == 1 and "differ from the committed" in output and len(output.splitlines()) <= 2


def test_a_refused_score_names_the_ids_locally_from_positions(
    server: LiveServer, bank: dict[str, Any], tmp_path: Path
) -> None:
    key = _key(tmp_path, "bank", bank["keys"]["bank"])
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"features": FEATURES, "weights": [1e-05, 0.01, 1.0, 1e-06]}))
    code, output = run(server, key, "model", "commit", "--model", str(model))
    assert code == 0, output
    firms = [f["company_id"] for f in bank["firms"]]
    asked = [firms[0], firms[CONSENTED], firms[1], firms[CONSENTED + 1]]  # 2nd and 4th: none
    ids = tmp_path / "ids.csv"
    ids.write_text("application,company_id\n" + "".join(f"a{i},{a}\n" for i, a in enumerate(asked)))
    # with two columns the id column must be named: the header row is never taken as an id
    common = ["score", "--zone", "tax", "--dataset", "firms", "--model", str(model)]
    code, output = run(server, key, *common, "--ids", str(ids), "--out", str(tmp_path / "x.csv"))
    assert code == 1 and "2 columns (application, company_id)" in output and "--id-column" in output
    refused = tmp_path / "refused.csv"
    code, output = run(
        server,
        key,
        "score",
        "--zone",
        "tax",
        "--dataset",
        "firms",
        "--model",
        str(model),
        "--ids",
        str(ids),
        "--id-column",
        "company_id",
        "--refused",
        str(refused),
        "--out",
        str(tmp_path / "scores.csv"),
    )
    assert code == 1 and "403 denied" in output and "2 ids refused" in output
    assert "rows 2, 4 of" in output  # the refused positions, printed
    with refused.open() as f:
        assert list(csv.reader(f)) == [["position", "id"], ["1", asked[1]], ["3", asked[3]]]
    assert not (tmp_path / "scores.csv").exists()


def test_secure_sum_from_the_shell(
    server: LiveServer, bureau: dict[str, Any], tmp_path: Path
) -> None:
    key = _key(tmp_path, "bureau", bureau["bureau"])
    totals = tmp_path / "totals.csv"
    result = tmp_path / "sum.json"
    cells = ",".join(c[0] for c in CELLS)
    common = ["--zones", ",".join(DISTRICTS), "--sql", SUM_SQL, "--purpose", "statistics"]
    code, output = run(
        server,
        key,
        "secure-sum",
        *common,
        "--cells",
        cells,
        "--out",
        str(totals),
        "--result",
        str(result),
    )
    assert code == 0, output
    assert "contribution verified" in output
    with totals.open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["cell", "n", "staff"]
    assert [[int(v) for v in r[1:]] for r in rows[1:]] == _expected(bureau["data"])
    assert json.loads(result.read_text())["zones"] == list(DISTRICTS)
    assert (tmp_path / "sum.json.receipt").exists()

    # --out -: the totals CSV alone on stdout (the table and notes go to stderr); list options
    # given the other way, the flag repeated, mean the same
    repeated = [a for d in DISTRICTS for a in ("--zone", d)]
    repeated += [a for c in CELLS for a in ("--cell", c[0])]
    argv = ["secure-sum", *repeated, *common[2:], "--out", "-", "--result", str(result)]
    piped = CliRunner().invoke(
        app, [*argv, "--url", server.url, "--key", str(key)], catch_exceptions=False
    )
    assert piped.exit_code == 0, piped.output
    assert list(csv.reader(piped.stdout.splitlines())) == rows
    assert "contribution verified" in piped.stderr

    code, output = run(server, key, "secure-sum", *common, "--cells", "retail")
    assert code == 1
    assert "422 invalid_input" in output and "d3" in output
    assert len(output.strip().splitlines()) <= 2
