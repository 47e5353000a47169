"""Consents of a node-hosted zone: the zone's subject key lives in the node's directory only.

The provider records consents with ``zonex consent add|import --node DIR``: subjects are
digested with the node's key on the provider's machine and only digests reach the exchange,
which takes digests only for a node-hosted zone and subjects only for a zone it hosts (422
otherwise, saying what to do). ``he_score`` on the node carries the live consents as
``{digest: consent id}``; the node matches the ids against them and refuses the whole task by
count when one is missing, before reading a feature. One exchange (SQLite) and one ``zonex node
serve`` process for the module.
"""

from __future__ import annotations

import csv
import json
import random
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crypto.canonical import canonicalize
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.audit.rules import check_rules
from exchange.cli import app
from exchange.client import he as he_client
from exchange.client.sdk import ApiError, ScoreRefusedError
from exchange.node.export import node_subjects
from exchange.server.models import ConsentRow, NodeTaskRow
from tests.conftest import LiveServer, live_exchange
from tests.exchange.test_access import entries
from tests.node.test_node_flow import cli, node_process, wait_online
from tests.node.test_node_psi import _leaks, _zone_with_node

pytestmark = pytest.mark.slow

PURPOSE = "credit-assessment"
DAY = 24 * 3600
FEATURES = ["tax_paid", "employees"]
LEVELS = {"company_id": "L3", "tax_paid": "L3", "employees": "L3"}
ROWS = 12
CONSENTED = 8  # the bank holds consents for the first 8 firms
LIMIT = 10  # max_node_score_consents


def _write(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Zone ``tax`` on a running node holding ``firms``, zone ``health`` hosted by the
    exchange, both the bureau's; the bank granted ``he_score`` on ``firms`` and holding
    consents (recorded as node-made digests) for the first firms."""
    tmp = tmp_path_factory.mktemp("node-consent")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CONFIG_HOME", str(tmp / "xdg"))
        mp.delenv("ZONEX_PROFILE", raising=False)
        with live_exchange(tmp / "exchange", max_node_score_consents=LIMIT) as server:
            keys = {
                "provider": SigningKey.generate(),
                "bank": SigningKey.generate(),
                "union": SigningKey.generate(),
            }
            with server.client(server.operator) as op:
                op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
                op.register_principal("City Bank", "enterprise", keys["bank"].public_key)
                op.register_principal("Credit Union", "enterprise", keys["union"].public_key)
            node_dir, key_id = _zone_with_node(server, tmp, keys, "tax", "provider")
            rng = random.Random(7)
            firms = [
                {
                    "company_id": f"ZXCONSENT{secrets.token_hex(8).upper()}",
                    "tax_paid": f"{10_000 + rng.randrange(89_000)}.3125",
                    "employees": str(rng.randint(1, 5_000)),
                }
                for _ in range(ROWS)
            ]
            data = _write(tmp / "firms.csv", firms)
            cli(
                "dataset", "register", "tax", "firms", "--node", str(node_dir),
                "--file", str(data), "--subject-column", "company_id",
                *(f"--level={c}={lv}" for c, lv in LEVELS.items()),
            )  # fmt: skip
            data.unlink()
            ids = [f["company_id"] for f in firms]
            digests = node_subjects(node_dir).consent_digests(ids)
            until = datetime.now(UTC) + timedelta(days=30)
            bank_id = keys["bank"].key_id
            with server.client(keys["provider"]) as p:
                p.create_zone("health", "health records")
                consent = {
                    ids[k]: p.record_consent(
                        "tax", None, bank_id, PURPOSE, until, subject_digest=digests[k]
                    )["id"]
                    for k in range(CONSENTED)
                }
            with server.client(keys["bank"]) as c:
                req = c.request_access(
                    "tax", ["firms"], ["he_score"], PURPOSE, duration_seconds=DAY,
                    justification="credit line review",
                )  # fmt: skip
            with server.client(keys["provider"]) as p:
                assert p.approve(req["id"])["status"] == "approved"
            provider_file = tmp / "provider.key"  # written by _zone_with_node
            with node_process(node_dir):
                wait_online(server, keys["bank"])
                yield {
                    "server": server,
                    "keys": keys,
                    "node_dir": node_dir,
                    "node": key_id,
                    "firms": firms,
                    "consent": consent,
                    "provider_file": provider_file,
                    "tmp": tmp,
                }


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output


def _no_zone_key(server: LiveServer) -> None:
    """The exchange made no subject key for the node-hosted zone."""
    assert not list((server.data_dir / "zones" / "tax").rglob("*.salt"))


def test_the_cli_digests_subjects_with_the_node_key_and_sends_digests_only(
    world: dict[str, Any],
) -> None:
    server: LiveServer = world["server"]
    node_dir: Path = world["node_dir"]
    subjects = [f"ZXCLI{secrets.token_hex(8).upper()}" for _ in range(3)]
    common = ["--url", server.url, "--key", str(world["provider_file"])]
    union = world["keys"]["union"].key_id
    code, out = _cli(
        "consent", "add", "tax", "--subject", subjects[0], "--consumer", union,
        "--purpose", PURPOSE, "--node", str(node_dir), *common,
    )  # fmt: skip
    assert code == 0, out
    added = out.split()[1]
    table = world["tmp"] / "consents.csv"
    table.write_text(
        "subject,consumer,purpose,days\n"
        + "".join(f"{s},{union},{PURPOSE},30\n" for s in subjects[1:]),
        "utf-8",
    )
    code, out = _cli("consent", "import", "tax", str(table), "--node", str(node_dir), *common)
    assert code == 0, out
    imported = [line.split(",")[1] for line in out.splitlines() if ",consent-" in line]
    assert len(imported) == 2

    # the exchange stored the node key's digests, as the ledger did
    keys = node_subjects(node_dir)
    with Session(server.exchange.engine) as s:
        rows = {r.id: r for r in s.scalars(select(ConsentRow).where(ConsentRow.zone == "tax"))}
    for consent_id, subject in zip([added, *imported], subjects, strict=True):
        assert rows[consent_id].subject_digest == keys.consent_digest(subject)
    recorded = {e["refs"]["consent"]: e for e in entries(server, "consent.recorded")}
    assert recorded[added]["digests"]["subject"] == keys.consent_digest(subjects[0])
    # no raw subject anywhere at the exchange, and no key made there for the zone
    assert _leaks(server.data_dir, [s.encode() for s in subjects]) == []
    _no_zone_key(server)

    # --node names the node of another zone: one line, nothing sent
    code, out = _cli(
        "consent", "add", "health", "--subject", subjects[0], "--consumer", union,
        "--purpose", PURPOSE, "--node", str(node_dir), *common,
    )  # fmt: skip
    assert code == 1 and "is the node of zone 'tax', not of 'health'" in out
    assert "Traceback" not in out and len(out.strip().splitlines()) == 1


def test_the_api_takes_digests_for_node_zones_and_subjects_for_zones_it_hosts(
    world: dict[str, Any],
) -> None:
    server: LiveServer = world["server"]
    until = datetime.now(UTC) + timedelta(days=1)
    digest = node_subjects(world["node_dir"]).consent_digest("ZXRAW1")
    bank = world["keys"]["bank"].key_id
    before = len(entries(server, "consent.recorded"))
    with server.client(world["keys"]["provider"]) as p:
        with pytest.raises(ApiError) as raw:
            p.record_consent("tax", "ZXRAW1", bank, PURPOSE, until)
        with pytest.raises(ApiError) as raw_import:
            p.import_consents(
                "tax",
                [{"subject": "ZXRAW1", "consumer": bank, "purpose": PURPOSE,
                  "expires_at": until}],
            )  # fmt: skip
        with pytest.raises(ApiError) as hashed:
            p.record_consent("health", None, bank, PURPOSE, until, subject_digest=digest)
        with pytest.raises(ApiError) as hashed_import:
            p.import_consents(
                "health",
                [{"subject_digest": digest, "consumer": bank, "purpose": PURPOSE,
                  "expires_at": until}],
            )  # fmt: skip
        with pytest.raises(ApiError) as malformed:
            p.record_consent("tax", None, bank, PURPOSE, until, subject_digest="AB" * 32)
    for refused in (raw, raw_import):
        assert refused.value.status == 422
        assert refused.value.body["reason"] == "subject_digest_required"
        assert "--node" in refused.value.detail
    for refused in (hashed, hashed_import):
        assert refused.value.status == 422 and refused.value.body["reason"] == "subject_required"
        assert "without --node" in refused.value.detail
    assert malformed.value.status == 422
    assert len(entries(server, "consent.recorded")) == before  # nothing recorded
    _no_zone_key(server)


def _tasks(server: LiveServer) -> list[NodeTaskRow]:
    with Session(server.exchange.engine) as s:
        return list(s.scalars(select(NodeTaskRow).where(NodeTaskRow.kind == "he_score")))


def test_he_score_checks_consents_on_the_node(world: dict[str, Any]) -> None:
    server: LiveServer = world["server"]
    bank = world["keys"]["bank"]
    firms = world["firms"]
    model = he_client.new_model(FEATURES, [0.5, -2.0], bias=1.0, link="identity")
    consented = [f["company_id"] for f in firms[:5]]
    with server.client(bank) as c:
        c.commit_model(model.document())
        out = he_client.score(
            c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=consented
        )
        assert len(out.scores) == 5
        expected = [0.5 * float(f["tax_paid"]) - 2.0 * float(f["employees"]) + 1.0
                    for f in firms[:5]]  # fmt: skip
        assert all(abs(a - b) < 1e-3 for a, b in zip(out.scores, expected, strict=True))
        (response,) = out.responses
        verify_receipt(response["receipt"], response["result"], server.log_verifier())
        # ledgered as the in-process path: the consents the node named, checked here
        (entry,) = entries(server, "computation.he_score")
        cited = sorted(world["consent"][i] for i in consented)
        assert entry["attrs"]["consent_count"] == 5
        assert entry["attrs"]["consent_ids"] == ",".join(cited)

        # two unconsented firms: the node refuses the whole task, by count, reads nothing
        mixed = [f["company_id"] for f in firms[CONSENTED - 2 : CONSENTED + 2]]
        with pytest.raises(ScoreRefusedError) as refused:
            he_client.score(c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=mixed)
    assert refused.value.status == 403 and refused.value.body["reason"] == "no_consent"
    assert (refused.value.positions, refused.value.count) == ([], 2)
    assert len(entries(server, "computation.he_score")) == 1  # nothing released
    (refusal,) = entries(server, "he.score_refused")
    assert (refusal["attrs"]["refused"], refusal["attrs"]["asked"]) == (2, 4)
    assert not any(i in json.dumps(refusal) for i in mixed)
    assert [t.status for t in _tasks(server)] == ["done", "done"]

    # the compliance rules hold over the whole ledger (scores on live consents only)
    report = check_rules(canonicalize(e) for e in entries(server))
    assert report.ok, report.faults
    _no_zone_key(server)

    # more live consents than one task may carry: refused before any task, saying what to do
    ids = [f"ZXMORE{k}" for k in range(LIMIT - CONSENTED + 1)]
    until = datetime.now(UTC) + timedelta(days=1)
    with server.client(world["keys"]["provider"]) as p:
        for digest in node_subjects(world["node_dir"]).consent_digests(ids):
            p.record_consent("tax", None, bank.key_id, PURPOSE, until, subject_digest=digest)
    with server.client(bank) as c, pytest.raises(ApiError) as many:
        he_client.score(c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=consented)
    assert many.value.status == 422 and many.value.body["reason"] == "too_many_consents"
    assert "max_node_score_consents" in many.value.detail
    assert len(_tasks(server)) == 2
