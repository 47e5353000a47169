"""An auditor without the operator's disk, from the shell against a real server: the log's
verifier key, the latest checkpoint and the ledger export over the signed API, then the
offline checks (``zonex audit verify``, ``zonex receipt verify``) with what was fetched."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.keyfile import write_private_key
from tests.conftest import L2_LEVELS, LiveServer, tax_bureau_and_bank

PURPOSE = "credit-assessment"


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def api(server: LiveServer, key: Path, *args: str) -> tuple[int, str]:
    return cli(*args, "--url", server.url, "--key", str(key))


@pytest.fixture
def keys(server: LiveServer, tmp_path: Path) -> dict[str, Path]:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    auditor = SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("City Audit Office", "auditor", auditor.public_key)
    with server.client(consumer) as c:
        req = c.request_access(
            "tax",
            ["companies"],
            ["export"],
            PURPOSE,
            duration_seconds=86400,
            justification="credit line review",
        )
    with server.client(provider) as p:
        p.approve(req["id"])
    paths = {}
    for name, key in (("provider", provider), ("consumer", consumer), ("auditor", auditor)):
        paths[name] = tmp_path / f"{name}.key"
        write_private_key(paths[name], key)
    paths["operator"] = server.data_dir / "operator.key"
    return paths


def _key_id(path: Path) -> str:
    from exchange.keyfile import load_private_key

    return load_private_key(path).key_id


def _entries(bundle: Path) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in bundle.read_text("utf-8").splitlines()]
    return [line for line in lines if "seq" in line]


def _up_to(bundle: bytes, size: int) -> bytes:
    """The lines of an export that an export ending at checkpoint ``size`` holds."""
    kept = []
    for line in bundle.splitlines(keepends=True):
        doc = json.loads(line)
        at = doc["seq"] + 1 if "seq" in doc else int(doc["checkpoint"].split("\n")[1])
        if at <= size:
            kept.append(line)
    return b"".join(kept)


def test_auditor_fetches_key_checkpoint_and_bundle_and_verifies_offline(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    # the consumer computes and keeps a receipt
    result, receipt = tmp_path / "rows.json", tmp_path / "rows.receipt"
    code, out = api(
        server,
        keys["consumer"],
        "export",
        "tax",
        "companies",
        "--purpose",
        PURPOSE,
        "--out",
        str(result),
        "--receipt",
        str(receipt),
    )
    assert code == 0, out

    # anyone registered fetches the log's verifier key: the same as the operator's log.pub
    log_pub = tmp_path / "log.pub"
    code, out = api(server, keys["consumer"], "log", "key", "--out", str(log_pub))
    assert code == 0, out
    assert "key hash" in out and str(log_pub) in out
    assert log_pub.read_text() == (server.data_dir / "log.pub").read_text()
    code, out = api(server, keys["consumer"], "log", "key")  # stdout: the key alone
    assert code == 0 and out.strip() == log_pub.read_text().strip()

    # ... with which the receipt verifies, no file from the operator needed
    code, out = cli(
        "receipt", "verify", str(receipt), "--result", str(result), "--log-key", str(log_pub)
    )
    assert code == 0 and out.startswith("OK: export"), out

    # the auditor saves a checkpoint, later exports the ledger over the API
    trusted = tmp_path / "trusted.txt"
    code, out = api(server, keys["auditor"], "ledger", "checkpoint", "--out", str(trusted))
    assert code == 0 and "checkpoint size" in out, out
    bundle = tmp_path / "ledger.jsonl"
    code, out = api(server, keys["auditor"], "ledger", "export", "--out", str(bundle))
    assert code == 0 and f"to {bundle}" in out, out
    assert not bundle.with_name(bundle.name + ".partial").exists()

    # which verifies offline with the fetched key, against the checkpoint saved before
    code, out = cli(
        "audit", "verify", str(bundle), "--log-key", str(log_pub), "--trusted", str(trusted)
    )
    assert code == 0 and out.startswith("OK:") and "trusted" in out, out

    # the export is on the ledger it exports, naming the auditor
    exported = [e for e in _entries(bundle) if e["kind"] == "ledger.exported"]
    assert [e["actor"] for e in exported] == [_key_id(keys["auditor"])]

    # the offline export (on the operator's disk) holds the same bytes up to the same size
    offline = tmp_path / "offline.jsonl"
    code, out = cli("ledger", "export", "--data-dir", str(server.data_dir), "--out", str(offline))
    assert code == 0, out
    fetched = bundle.read_bytes()
    size = int(json.loads(fetched.splitlines()[-1])["checkpoint"].split("\n")[1])
    assert _up_to(offline.read_bytes(), size) == fetched

    # the operator may export too; a checkpoint can go to stdout
    code, out = api(server, keys["operator"], "ledger", "export", "--out", str(tmp_path / "o"))
    assert code == 0, out
    code, out = api(server, keys["auditor"], "ledger", "checkpoint")
    assert code == 0 and out.startswith("test.zonex/log\n"), out
    code, out = api(server, keys["auditor"], "ledger", "checkpoint", "--json")
    assert code == 0 and json.loads(out)["note"].startswith("test.zonex/log\n"), out
    code, out = api(server, keys["consumer"], "log", "key", "--json")
    assert code == 0 and json.loads(out)["verifier_key"] == log_pub.read_text().strip(), out
    assert json.loads(out)["origin"] == "test.zonex/log"


def test_consumers_and_providers_cannot_export_and_the_refusal_is_ledgered(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    for who in ("consumer", "provider"):
        target = tmp_path / f"{who}.jsonl"
        code, out = api(server, keys[who], "ledger", "export", "--out", str(target))
        assert code == 1 and "403 forbidden" in out and "auditors" in out, out
        assert "Traceback" not in out and len(out.strip().splitlines()) == 1
        assert not target.exists()
        assert not target.with_name(target.name + ".partial").exists()

    bundle = tmp_path / "ledger.jsonl"
    code, out = api(server, keys["auditor"], "ledger", "export", "--out", str(bundle))
    assert code == 0, out
    refused = {
        e["actor"]
        for e in _entries(bundle)
        if e["kind"] == "request.refused"
        and isinstance(e["attrs"], dict)
        and e["attrs"].get("route") == "GET /v1/log/export"
        and e["attrs"].get("status") == 403
    }
    assert refused == {_key_id(keys["consumer"]), _key_id(keys["provider"])}
    exported = [e for e in _entries(bundle) if e["kind"] == "ledger.exported"]
    assert [e["actor"] for e in exported] == [_key_id(keys["auditor"])]


def test_unsigned_and_unknown_callers_get_401(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    for path in ("/v1/log/export", "/v1/log/key"):
        response = httpx.get(server.url + path)
        assert response.status_code == 401
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] == "verification_failed"
        assert "BEGIN" not in response.text and "+" not in response.json()["detail"]

    stranger = tmp_path / "stranger.key"
    write_private_key(stranger, SigningKey.generate())
    code, out = api(server, stranger, "ledger", "export", "--out", str(tmp_path / "x.jsonl"))
    assert code == 1 and "401" in out and len(out.strip().splitlines()) == 1
    code, out = api(server, stranger, "log", "key")
    assert code == 1 and "401" in out and len(out.strip().splitlines()) == 1


def test_export_takes_exactly_one_source(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ZONEX_URL", raising=False)
    target = str(tmp_path / "b.jsonl")
    code, out = cli(
        "ledger",
        "export",
        "--out",
        target,
        "--data-dir",
        str(server.data_dir),
        "--url",
        server.url,
    )
    assert code == 1 and "not both" in out and len(out.strip().splitlines()) == 1
    code, out = cli("ledger", "export", "--out", target)
    assert code == 1 and "--data-dir" in out and "--url" in out, out
    code, out = cli("ledger", "checkpoint")
    assert code == 1 and "--data-dir" in out and "--url" in out, out
    code, out = api(server, keys["auditor"], "ledger", "export", "--out", "-")
    assert code == 1 and "--out takes a file" in out, out
