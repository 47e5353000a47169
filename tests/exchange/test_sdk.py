"""The SDK as a developer meets it: a key file given by path, typed results that still index
like dicts, and a clear error for the wrong key file (through the SDK and the CLI)."""

from __future__ import annotations

import json
import os
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crypto.errors import VerificationError
from crypto.keys import SigningKey
from exchange.cli import app
from exchange.client.sdk import (
    AccessRequest,
    ApiError,
    Budget,
    Catalog,
    Client,
    Computation,
    Grant,
    Principal,
)
from exchange.errors import KeyFileError
from exchange.keyfile import load_private_key, load_public_key, write_private_key, write_public_key
from tests.conftest import L2_LEVELS, L3_LEVELS, LiveServer, tax_bureau_and_bank

PURPOSE = "credit-assessment"


def _key_files(tmp_path: Path, name: str, key: SigningKey) -> tuple[Path, Path]:
    private, public = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
    write_private_key(str(private), key)
    write_public_key(str(public), key.public_key)
    return private, public


def test_key_loaders_take_str_and_path(tmp_path: Path) -> None:
    key = SigningKey.generate()
    private, public = _key_files(tmp_path, "bank", key)
    for given in (str(private), private):
        assert load_private_key(given).key_id == key.key_id
    for given in (str(public), public):
        assert load_public_key(given).key_id == key.key_id


def test_client_takes_a_key_path_as_str_or_path(
    server: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    private, _ = _key_files(tmp_path, "bank", consumer)
    monkeypatch.chdir(tmp_path)  # the developer's first try: a file name in the working directory
    for key in ("bank.key", private, consumer):
        with Client(server.url, key) as c:
            me = c.whoami()
            assert isinstance(me, Principal)
            assert me.key_id == consumer.key_id and me.name == "City Bank"
            assert me.kind == "enterprise" and isinstance(me.created_at, datetime)


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("public", "holds a public key; give the private key instead"),
        ("missing", "no such key file"),
        ("readable", "chmod 600"),
        ("directory", "is not a regular file"),
    ],
)
def test_wrong_key_file_is_named_with_what_to_do(tmp_path: Path, which: str, message: str) -> None:
    private, public = _key_files(tmp_path, "bank", SigningKey.generate())
    given = {
        "public": public,
        "missing": tmp_path / "nope.key",
        "readable": private,
        "directory": tmp_path,
    }[which]
    if which == "readable":
        os.chmod(private, 0o644)
    with pytest.raises(KeyFileError, match=message):
        Client("http://127.0.0.1:1", str(given))


def test_a_public_key_file_where_a_private_one_belongs_is_refused_even_when_0600(
    tmp_path: Path,
) -> None:
    _, public = _key_files(tmp_path, "bank", SigningKey.generate())
    os.chmod(public, 0o600)
    with pytest.raises(KeyFileError, match=r"bank\.pub holds a public key"):
        load_private_key(public)
    private, _ = _key_files(tmp_path, "other", SigningKey.generate())
    with pytest.raises(KeyFileError, match="holds a private key; give the public key"):
        load_public_key(private)


def test_client_refuses_a_key_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match="path to a private key file or a SigningKey"):
        Client("http://127.0.0.1:1", b"bank.key")  # type: ignore[arg-type]


def test_cli_names_a_public_key_given_as_key(server: LiveServer, tmp_path: Path) -> None:
    _, public = _key_files(tmp_path, "bank", SigningKey.generate())
    result = CliRunner().invoke(
        app, ["whoami", "--url", server.url, "--key", str(public)], catch_exceptions=False
    )
    assert result.exit_code == 1
    assert "public key" in result.output and "bank.pub" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1


def test_main_calls_return_typed_results_that_still_index_like_dicts(
    server: LiveServer, tmp_path: Path
) -> None:
    provider, consumer = tax_bureau_and_bank(server, L3_LEVELS)
    bank_key, _ = _key_files(tmp_path, "bank", consumer)
    bureau_key, _ = _key_files(tmp_path, "bureau", provider)
    with Client(server.url, str(bank_key)) as bank, Client(server.url, str(bureau_key)) as bureau:
        catalog = bank.catalog()
        assert isinstance(catalog, Catalog)
        companies = catalog.dataset("tax", "companies")
        assert companies.level == "L3" and companies.subject_column == "company_id"
        assert {c.name: c.level for c in companies.columns}["tax_paid_2025"] == "L3"
        assert catalog.zones[0].owner_name == "Tax Bureau"
        assert catalog["zones"][0]["datasets"][0]["name"] == "companies"  # as before
        with pytest.raises(KeyError, match="no dataset 'nope' in zone 'tax'"):
            catalog.dataset("tax", "nope")

        req = bank.request_access(
            "tax",
            ["companies"],
            ["aggregate"],
            PURPOSE,
            duration_seconds=86400,
            justification="credit line review",
        )
        assert isinstance(req, AccessRequest)
        assert req.status == "pending" and req.datasets == ["companies"]
        assert req.duration_seconds == 86400 and req.grant_id is None

        approved = bureau.approve(req.id)
        assert isinstance(approved, AccessRequest) and approved.status == "approved"
        assert approved.grant_id is not None and approved["grant_id"] == approved.grant_id

        (grant,) = bank.grants("tax")
        assert isinstance(grant, Grant)
        assert grant.id == approved.grant_id and grant.operations == ["aggregate"]
        assert grant.expires_at > grant.created_at and grant.approved_by == [provider.key_id]

        out = bank.aggregate(
            "tax",
            "SELECT district, COUNT(*) AS n FROM companies GROUP BY district",
            PURPOSE,
            epsilon="0.5",
        )
        assert isinstance(out, Computation)
        assert out.columns == ["district", "n"] and out.level == out.result["level"] == "L2"
        assert out.rows == out["result"]["rows"]
        assert out.receipt["type"] == "zonex.receipt-bundle.v1"
        log_key = (server.data_dir / "log.pub").read_text()
        statement = out.verify(log_key)
        assert statement["kind"] == "aggregate"
        # a result changed after release no longer verifies
        tampered = Computation(out.raw | {"result": {**out.result, "k": out.result["k"] - 1}})
        with pytest.raises(VerificationError):
            tampered.verify(log_key)

        (budget,) = bank.budgets("tax")
        assert isinstance(budget, Budget)
        assert budget.spent == Decimal("0.5") and budget.remaining == budget.budget - budget.spent
        assert isinstance(budget.dp_required, bool) and budget.window_end > budget.window_start

        # the results are still the JSON objects they were: serializable as they are
        for result in (catalog, req, grant, out, budget):
            assert isinstance(result, dict)
            assert json.loads(json.dumps(result)) == result.raw


def test_export_is_typed(server: LiveServer, tmp_path: Path) -> None:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    with Client(server.url, consumer) as bank, Client(server.url, provider) as bureau:
        req = bank.request_access(
            "tax", ["companies"], ["export"], PURPOSE, duration_seconds=3600, justification="x"
        )
        bureau.approve(req.id)
        out = bank.export("tax", "companies", PURPOSE)
        assert isinstance(out, Computation) and out.level == "L2"
        assert "company_id" in out.columns and len(out.rows) > 0
        assert out.result["masked"] == ["company_id"]
        out.verify((server.data_dir / "log.pub").read_text())


def test_a_refusal_carries_its_reason_and_field_errors(server: LiveServer) -> None:
    _, consumer = tax_bureau_and_bank(server, L3_LEVELS)
    with Client(server.url, consumer) as bank:
        with pytest.raises(ApiError) as denied:
            bank.aggregate("tax", "SELECT COUNT(*) FROM companies", PURPOSE)
        assert denied.value.status == 403 and denied.value.code == "denied"
        assert denied.value.reason == "not_granted" and denied.value.errors == []
        with pytest.raises(ApiError) as invalid:
            bank.request("POST", "/v1/access-requests", json={"zone": "tax"})
        assert invalid.value.status == 422 and invalid.value.code == "invalid_input"
        fields = {tuple(e["loc"]) for e in invalid.value.errors}
        assert ("body", "purpose") in fields and ("body", "datasets") in fields
