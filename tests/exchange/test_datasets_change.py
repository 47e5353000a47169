"""Datasets that change, from the shell against a real server: a provider publishes a new
snapshot (new digest, ledgered, grants carry over, old receipts still verify) and retires a
dataset (no more computations, gone from the catalog, ledgered); others cannot do either."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exchange.cli import app
from exchange.keyfile import write_private_key
from tests.conftest import EXAMPLES, L2_LEVELS, LiveServer, tax_bureau_and_bank

PURPOSE = "credit-assessment"
COUNT_SQL = "SELECT COUNT(*) AS n FROM companies"


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def api(server: LiveServer, key: Path, *args: str) -> tuple[int, str]:
    return cli(*args, "--url", server.url, "--key", str(key))


@pytest.fixture
def keys(server: LiveServer, tmp_path: Path) -> dict[str, Path]:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    with server.client(consumer) as c:
        req = c.request_access(
            "tax",
            ["companies"],
            ["export", "aggregate"],
            PURPOSE,
            duration_seconds=86400,
            justification="credit line review",
        )
    with server.client(provider) as p:
        p.approve(req["id"])
    paths = {}
    for name, key in (("provider", provider), ("consumer", consumer)):
        paths[name] = tmp_path / f"{name}.key"
        write_private_key(paths[name], key)
    paths["operator"] = server.data_dir / "operator.key"
    return paths


def _rows() -> tuple[list[str], list[list[str]]]:
    with (EXAMPLES / "companies.csv").open(encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        return header, list(reader)


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _export(server: LiveServer, key: Path, out: Path) -> tuple[int, str]:
    return api(
        server,
        key,
        "export",
        "tax",
        "companies",
        "--purpose",
        PURPOSE,
        "--out",
        str(out),
        "--receipt",
        str(out.with_suffix(".receipt")),
    )


def _snapshot(receipt: Path) -> str:
    """The snapshot digest a receipt's signed statement names."""
    from crypto.envelope import Envelope

    bundle = json.loads(receipt.read_text("utf-8"))
    statement = json.loads(Envelope.model_validate(bundle["statement"]).payload_bytes())
    return str(statement["datasets"][0]["snapshot"])


def _ledger(server: LiveServer, key: Path, tmp_path: Path) -> list[dict[str, object]]:
    bundle = tmp_path / "ledger.jsonl"
    code, out = api(server, key, "ledger", "export", "--out", str(bundle))
    assert code == 0, out
    lines = [json.loads(line) for line in bundle.read_text("utf-8").splitlines()]
    return [line for line in lines if "seq" in line]


def test_publish_a_new_snapshot_then_retire(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    log_pub = tmp_path / "log.pub"
    assert api(server, keys["consumer"], "log", "key", "--out", str(log_pub))[0] == 0

    first = tmp_path / "first.json"
    code, out = _export(server, keys["consumer"], first)
    assert code == 0, out
    old_digest = _snapshot(first.with_suffix(".receipt"))

    # a new snapshot: the last 40 companies are gone, one value changed
    header, rows = _rows()
    rows = [list(r) for r in rows[:-40]]
    rows[0][header.index("employees")] = "999"
    new_file = _write(tmp_path / "companies-2026.csv", header, rows)
    code, out = api(
        server, keys["provider"], "dataset", "publish", "tax", "companies", "--file", str(new_file)
    )
    assert code == 0, out
    new_digest = re.search(r"snapshot ([0-9a-f]{64}) published", out).group(1)  # type: ignore[union-attr]
    assert new_digest != old_digest and f"previous {old_digest}" in out

    # the grant names the dataset: it carries over; computations see the new rows
    second = tmp_path / "second.json"
    code, out = _export(server, keys["consumer"], second)
    assert code == 0, out
    assert len(json.loads(second.read_text())["rows"]) == len(rows)
    assert _snapshot(second.with_suffix(".receipt")) == new_digest
    agg = tmp_path / "agg.json"
    code, out = api(
        server,
        keys["consumer"],
        "aggregate",
        "tax",
        "--sql",
        COUNT_SQL,
        "--purpose",
        PURPOSE,
        "--out",
        str(agg),
        "--receipt",
        str(tmp_path / "agg.receipt"),
    )
    assert code == 0, out
    assert json.loads(agg.read_text())["rows"] == [[len(rows)]]

    # the receipt made under the previous snapshot still verifies offline
    for made in (first, second):
        code, out = cli(
            "receipt",
            "verify",
            str(made.with_suffix(".receipt")),
            "--result",
            str(made),
            "--log-key",
            str(log_pub),
        )
        assert code == 0 and out.startswith("OK: export"), out

    # the same content again is a conflict; another schema is a new dataset, not a snapshot
    code, out = api(
        server, keys["provider"], "dataset", "publish", "tax", "companies", "--file", str(new_file)
    )
    assert code == 1 and "409" in out and "already the current snapshot" in out, out
    narrow = _write(tmp_path / "narrow.csv", header[:-1], [r[:-1] for r in rows])
    code, out = api(
        server, keys["provider"], "dataset", "publish", "tax", "companies", "--file", str(narrow)
    )
    assert code == 1 and "422" in out and "columns" in out and "new dataset" in out, out
    assert len(out.strip().splitlines()) == 1

    # a level may change with the snapshot; the others keep theirs
    raised = _write(tmp_path / "raised.csv", header, rows[:-1])
    code, out = api(
        server,
        keys["provider"],
        "dataset",
        "publish",
        "tax",
        "companies",
        "--file",
        str(raised),
        "--level",
        "tax_paid_2025=L3",
    )
    assert code == 0 and "level L3" in out, out
    # ... but never lower it (就高从严: a live grant would turn DP releases exact), nor change
    # the privacy unit; a refused snapshot changes nothing
    fewer = _write(tmp_path / "fewer.csv", header, rows[:-2])
    for extra, said in (
        (["--level", "tax_paid_2025=L1"], "never lowers a column's level"),
        (["--subject-column", "district"], "another privacy unit is a new dataset"),
    ):
        code, out = api(
            server,
            keys["provider"],
            "dataset",
            "publish",
            "tax",
            "companies",
            "--file",
            str(fewer),
            *extra,
        )
        assert code == 1 and "422" in out and said in out, out
        assert len(out.strip().splitlines()) == 1
    code, out = api(server, keys["consumer"], "catalog", "--json")
    zones = json.loads(out)
    zones = zones["zones"] if isinstance(zones, dict) else zones
    (listed,) = [d for z in zones for d in z["datasets"] if d["name"] == "companies"]
    assert listed["level"] == "L3", listed

    # retire: ledgered, gone from the catalog, nothing runs on it, its name is not reused
    code, out = api(
        server,
        keys["provider"],
        "dataset",
        "retire",
        "tax",
        "companies",
        "--reason",
        "superseded",
        "--yes",
    )
    assert code == 0 and "retired" in out, out
    code, out = _export(server, keys["consumer"], tmp_path / "third.json")
    assert code == 1 and "denied" in out and "retired" in out, out
    assert len(out.strip().splitlines()) == 1
    code, out = api(server, keys["consumer"], "catalog")
    assert code == 0 and "companies" not in out, out
    code, out = api(
        server,
        keys["consumer"],
        "request",
        "tax",
        "--dataset",
        "companies",
        "--operation",
        "export",
        "--purpose",
        PURPOSE,
        "--justification",
        "again",
        "--days",
        "7",
    )
    assert code == 1 and "retired" in out and len(out.strip().splitlines()) == 1, out
    code, out = api(
        server, keys["provider"], "dataset", "publish", "tax", "companies", "--file", str(raised)
    )
    assert code == 1 and "was retired" in out and len(out.strip().splitlines()) == 1, out
    code, out = api(
        server,
        keys["provider"],
        "dataset",
        "register",
        "tax",
        "companies",
        "--subject-column",
        "company_id",
        "--file",
        str(EXAMPLES / "companies.csv"),
        *(f"--level={c}={lv}" for c, lv in L2_LEVELS.items()),
    )
    assert code == 1 and "409" in out and "not reused" in out, out

    # receipts made on it keep verifying after it was retired
    code, out = cli(
        "receipt",
        "verify",
        str(first.with_suffix(".receipt")),
        "--result",
        str(first),
        "--log-key",
        str(log_pub),
    )
    assert code == 0, out

    entries = _ledger(server, keys["operator"], tmp_path)
    published = [e for e in entries if e["kind"] == "dataset.snapshot_published"]
    assert len(published) == 2
    assert published[0]["digests"] == {"snapshot": new_digest, "previous": old_digest}
    retired = [e for e in entries if e["kind"] == "dataset.retired"]
    assert len(retired) == 1 and retired[0]["refs"] == {"zone": "tax", "dataset": "companies"}
    denied = [
        e
        for e in entries
        if e["kind"] == "access.denied"
        and isinstance(e["attrs"], dict)
        and e["attrs"].get("reason") == "retired"
    ]
    assert len(denied) == 1


def test_only_the_provider_publishes_or_retires(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    header, rows = _rows()
    new_file = _write(tmp_path / "new.csv", header, rows[:-10])
    for who in ("consumer", "operator"):
        code, out = api(
            server, keys[who], "dataset", "publish", "tax", "companies", "--file", str(new_file)
        )
        assert code == 1 and "403" in out, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1
        code, out = api(server, keys[who], "dataset", "retire", "tax", "companies", "--yes")
        assert code == 1 and "403" in out, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1

    # nothing changed: the consumer still computes on the registered snapshot
    code, out = _export(server, keys["consumer"], tmp_path / "rows.json")
    assert code == 0, out
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == len(rows)

    # unknown datasets and a refused confirmation are one line each
    code, out = api(server, keys["provider"], "dataset", "retire", "tax", "nope", "--yes")
    assert code == 1 and "404" in out and "nope" in out, out
    result = CliRunner().invoke(
        app,
        [
            "dataset",
            "retire",
            "tax",
            "companies",
            "--url",
            server.url,
            "--key",
            str(keys["provider"]),
        ],
        input="n\n",
        catch_exceptions=False,
    )
    assert result.exit_code == 1 and "not retired" in result.output, result.output
    code, out = api(server, keys["consumer"], "catalog")
    assert code == 0 and "companies" in out
