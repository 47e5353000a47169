"""User flows driven through the CLI against a live server: important data approved by the
provider and then the operator, ids copied whole or by a unique prefix, principals by name,
the duration bound reported by the exchange, and denials that name what was denied."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.keyfile import write_private_key
from tests.conftest import EXAMPLES, L2_LEVELS, LiveServer, tax_bureau_and_bank

IMPORTANT_LEVELS = {**L2_LEVELS, "tax_paid_2025": "IMPORTANT"}
PURPOSE = "credit-assessment"


@pytest.fixture
def keys(server: LiveServer, tmp_path: Path) -> dict[str, Path]:
    """A tax bureau with ``companies`` (L2) and ``strategic`` (IMPORTANT) in zone ``tax``, a
    bank that asks for access, and a second firm (Other Bank) that has nothing to do with it."""
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    other = SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Other Bank", "enterprise", other.public_key)
    with server.client(provider) as p:
        p.register_dataset(
            "tax",
            "strategic",
            levels=IMPORTANT_LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    paths = {}
    for name, key in (("provider", provider), ("consumer", consumer), ("other", other)):
        paths[name] = tmp_path / f"{name}.key"
        write_private_key(paths[name], key)
    paths["operator"] = server.data_dir / "operator.key"
    return paths


def run(server: LiveServer, key: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(
        app, [*args, "--url", server.url, "--key", str(key)], catch_exceptions=False
    )
    assert "Traceback" not in result.output
    return result.exit_code, result.output


def one_error(code: int, text: str) -> str:
    """A refusal: non-zero exit and exactly one line."""
    assert code != 0, text
    assert len(text.strip().splitlines()) == 1, text
    return text


def file_request(server: LiveServer, keys: dict[str, Path], dataset: str, op: str) -> str:
    code, out = run(
        server,
        keys["consumer"],
        "request",
        "tax",
        "--dataset",
        dataset,
        "--operation",
        op,
        "--purpose",
        PURPOSE,
        "--justification",
        "credit line review",
        "--days",
        "7",
    )
    assert code == 0, out
    found = re.search(r"request (\S+) filed", out)
    assert found is not None
    return found.group(1)


def requests_json(server: LiveServer, key: Path) -> list[dict[str, Any]]:
    code, out = run(server, key, "requests", "--json")
    assert code == 0, out
    found: list[dict[str, Any]] = json.loads(out)
    return found


# -- important data: the provider, then the operator --------------------------------------------


def test_important_data_provider_then_operator_from_the_shell(
    server: LiveServer, keys: dict[str, Path], tmp_path: Path
) -> None:
    request_id = file_request(server, keys, "strategic", "aggregate")

    # no one approves their own request
    text = one_error(*run(server, keys["consumer"], "approve", request_id))
    assert "403" in text and "own request" in text

    code, out = run(server, keys["provider"], "approve", request_id)
    assert code == 0 and "awaiting_operator" in out and "zonex approve" in out, out

    # the terms the provider signed are readable, by everyone who sees the request
    (mine,) = requests_json(server, keys["consumer"])
    terms = mine["pending_terms"]
    assert mine["status"] == "awaiting_operator"
    assert terms["datasets"] == ["strategic"] and terms["operations"] == ["aggregate"]
    assert terms["purpose"] == PURPOSE and re.fullmatch(r"\d{4}-.*Z", terms["not_after"])
    code, table = run(server, keys["operator"], "requests")
    assert code == 0 and request_id in table and "City Bank" in table
    assert "aggregate on strategic until" in table  # the pending terms column

    # the operator signing other terms than the provider's is refused, and nothing changes
    text = one_error(*run(server, keys["operator"], "approve", request_id, "--days", "1"))
    assert "422" in text and "differs from the provider's" in text and "not_after" in text
    # a provider approving a second time is not the operator
    text = one_error(*run(server, keys["provider"], "approve", request_id))
    assert "403" in text and "operator" in text

    # the operator's approval signs exactly the pending terms: the grant is live
    code, out = run(server, keys["operator"], "approve", request_id[:12])
    assert code == 0, out
    found = re.search(r"approved: grant (grant:[0-9a-f]{24})\b", out)
    assert found is not None, out
    grant_id = found.group(1)
    code, out = run(server, keys["consumer"], "grants", "--json")
    (grant,) = json.loads(out)
    assert grant["id"] == grant_id and grant["expires_at"].startswith(terms["not_after"][:19])
    assert len(grant["approved_by"]) == 2

    # a second operator approval (a replay of the step) finds the request decided
    text = one_error(*run(server, keys["operator"], "approve", request_id))
    assert "409" in text and "approved" in text

    # and the consumer runs the operation the grant allows (DP: important data)
    result = tmp_path / "agg.json"
    code, out = run(
        server,
        keys["consumer"],
        "aggregate",
        "tax",
        "--sql",
        "SELECT district, COUNT(*) FROM strategic GROUP BY district",
        "--purpose",
        PURPOSE,
        "--epsilon",
        "0.5",
        "--out",
        str(result),
    )
    assert code == 0, out
    assert "differentially private" in out
    assert json.loads(result.read_text())["columns"]


# -- ids you can copy ----------------------------------------------------------------------------


def test_ids_are_whole_and_unique_prefixes_work(server: LiveServer, keys: dict[str, Path]) -> None:
    first = file_request(server, keys, "companies", "export")
    second = file_request(server, keys, "companies", "aggregate")
    code, out = run(server, keys["consumer"], "whoami")
    consumer_id = out.split()[-1]
    assert len(consumer_id) == 64

    # tables print whole ids and key ids, with the principal's name next to them
    code, table = run(server, keys["provider"], "requests")
    assert code == 0
    assert first in table and second in table and consumer_id in table and "City Bank" in table
    assert "…" not in table

    # a unique prefix is taken where an id is
    code, out = run(server, keys["provider"], "approve", first[:10])
    assert code == 0 and f"request {first} approved" in out, out
    code, out = run(server, keys["provider"], "approve", second[:10])
    assert code == 0 and f"request {second} approved" in out, out
    code, table = run(server, keys["consumer"], "grants")
    grant_ids = re.findall(r"grant:[0-9a-f]{24}", table)
    assert len(grant_ids) == 2 and consumer_id in table and "City Bank" in table

    # an ambiguous prefix names how many match, never which
    text = one_error(*run(server, keys["provider"], "revoke", "grant:", "--reason", "x"))
    assert "matches 2 grants" in text and "grant:" in text
    assert not any(g in text for g in grant_ids)
    # a caller who sees none of them learns nothing (not even that the prefix is ambiguous)
    text = one_error(*run(server, keys["other"], "revoke", "grant:", "--reason", "x"))
    assert "404" in text and "no such grant" in text and "matches" not in text
    # too short a prefix is not taken
    text = one_error(*run(server, keys["provider"], "revoke", "grant", "--reason", "x"))
    assert "404" in text
    # another's grant by its unique prefix: still not found for an outsider
    text = one_error(*run(server, keys["other"], "revoke", grant_ids[0][:12], "--reason", "x"))
    assert "404" in text and grant_ids[0] not in text
    # ... and by its whole id the outsider gets exactly what an id nobody has gets
    whole = one_error(*run(server, keys["other"], "revoke", grant_ids[0], "--reason", "x"))
    absent = one_error(*run(server, keys["other"], "revoke", "grant:" + "0" * 24, "--reason", "x"))
    assert "404" in whole and whole == absent

    code, out = run(server, keys["provider"], "revoke", grant_ids[0][:12], "--reason", "done")
    assert code == 0 and f"grant {grant_ids[0]} revoked" in out, out

    # consent add takes the consumer's name or a key id prefix; consents show names
    for who in ("City Bank", consumer_id[:10], consumer_id):
        code, out = run(
            server,
            keys["provider"],
            "consent",
            "add",
            "tax",
            "--subject",
            "91310885617X0AEH7Y",
            "--consumer",
            who,
            "--purpose",
            PURPOSE,
        )
        assert code == 0 and re.search(r"consent consent-[0-9a-f]{24} recorded", out), out
    text = one_error(
        *run(
            server,
            keys["provider"],
            "consent",
            "add",
            "tax",
            "--subject",
            "91310885617X0AEH7Y",
            "--consumer",
            "No Such Bank",
            "--purpose",
            PURPOSE,
        )
    )
    assert "among the principals you can see" in text
    # a registered principal with nothing on this provider's zones gets the very same answer:
    # names are no oracle for who is registered
    unrelated = one_error(
        *run(
            server,
            keys["provider"],
            "consent",
            "add",
            "tax",
            "--subject",
            "91310885617X0AEH7Y",
            "--consumer",
            "Other Bank",
            "--purpose",
            PURPOSE,
        )
    )
    assert unrelated.replace("Other Bank", "?") == text.replace("No Such Bank", "?")
    code, table = run(server, keys["provider"], "consents", "tax")
    consent_ids = re.findall(r"consent-[0-9a-f]{24}", table)
    assert len(consent_ids) == 3 and "City Bank" in table and consumer_id in table
    code, out = run(server, keys["provider"], "consent", "withdraw", consent_ids[0][:14])
    assert code == 0 and f"consent {consent_ids[0]} withdrawn" in out, out


def test_who_lists_principals(server: LiveServer, keys: dict[str, Path]) -> None:
    file_request(server, keys, "companies", "export")
    # the operator sees everyone, with whole key ids
    code, table = run(server, keys["operator"], "principal", "list")
    assert code == 0 and "Other Bank" in table and "City Bank" in table
    assert re.search(r"\b[0-9a-f]{64}\b", table) and "…" not in table
    # a provider sees itself and those with requests, grants or consents on its zones
    code, table = run(server, keys["provider"], "principal", "list")
    assert code == 0 and "City Bank" in table and "Tax Bureau" in table
    assert "Other Bank" not in table
    # a principal that owns no zone lists none
    text = one_error(*run(server, keys["other"], "principal", "list"))
    assert "403" in text and "zone providers" in text
    # the operator suspends by name or by a unique key id prefix
    code, out = run(server, keys["operator"], "principal", "suspend", "Other Bank")
    assert code == 0 and "Other Bank: suspended" in out, out
    code, table = run(server, keys["operator"], "principal", "list")
    other_id = next(
        line.split()[-2] for line in table.splitlines() if "Other Bank" in line and "│" in line
    )
    code, out = run(server, keys["operator"], "principal", "reinstate", other_id[:8])
    assert code == 0 and "Other Bank: active" in out, out


# -- one bound, reported by the exchange ---------------------------------------------------------


@pytest.mark.parametrize("days", ["400", "0", "-3", "inf"])
def test_days_bound_is_the_exchanges(server: LiveServer, keys: dict[str, Path], days: str) -> None:
    text = one_error(
        *run(
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
            "x",
            "--days",
            days,
        )
    )
    if days == "inf":
        assert "--days" in text
    else:
        assert "422" in text and "duration_seconds" in text and "366 days" in text


# -- denials name what was denied ----------------------------------------------------------------


def test_denial_names_dataset_operation_purpose_and_next_step(
    server: LiveServer, keys: dict[str, Path]
) -> None:
    text = one_error(
        *run(server, keys["consumer"], "export", "tax", "companies", "--purpose", PURPOSE)
    )
    assert "403" in text and "not_granted" in text
    assert "export" in text and "tax/companies" in text and PURPOSE in text


def test_status_filters_and_expired_grants(server: LiveServer, keys: dict[str, Path]) -> None:
    text = one_error(*run(server, keys["provider"], "requests", "--status", "done"))
    assert "422" in text and "awaiting_operator" in text and "pending" in text
    request_id = file_request(server, keys, "companies", "export")
    # an outsider cannot reach a request by its prefix, nor learn it exists
    text = one_error(*run(server, keys["other"], "approve", request_id[:10]))
    assert "404" in text and request_id not in text
    code, out = run(server, keys["provider"], "approve", request_id, "--days", "0.00003")
    assert code == 0, out
    time.sleep(3)
    code, table = run(server, keys["consumer"], "grants")
    assert code == 0 and "expired" in table and "active" not in table


def test_reject_and_withdraw_by_prefix(server: LiveServer, keys: dict[str, Path]) -> None:
    first = file_request(server, keys, "companies", "export")
    second = file_request(server, keys, "companies", "aggregate")
    code, out = run(server, keys["provider"], "reject", first[:10], "--reason", "not needed")
    assert code == 0 and f"request {first} rejected" in out, out
    code, out = run(server, keys["consumer"], "reject", second[:10], "--reason", "changed plan")
    assert code == 0 and f"request {second} withdrawn" in out, out
    text = one_error(*run(server, keys["provider"], "reject", first, "--reason", "again"))
    assert "409" in text and "rejected" in text
