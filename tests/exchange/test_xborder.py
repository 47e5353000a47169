"""Cross-border flows end to end on a real exchange (uvicorn on loopback, SQLite; PostgreSQL too
for the concurrency test when ZONEX_TEST_DATABASE_URL is set), thresholds lowered in settings:
exempt below the threshold, refused past it naming the document, allowed under a recorded
approval, refused again once it expired; decisions on the ledger; concurrent releases crossing
a threshold together; no raw subject id in any table or entry; the CLI's check."""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Iterator
from contextlib import nullcontext
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.cli import app
from exchange.client.sdk import ApiError
from exchange.keyfile import write_private_key
from exchange.server.models import XborderApprovalRow, XborderCountRow, XborderSubjectRow
from exchange.server.runtime import Exchange, init_data_dir
from tests.conftest import LiveServer, fresh_postgres_database, serving, settings_for

# one world for the module, its tests in order on one worker
pytestmark = pytest.mark.xdist_group(name="xborder")

PURPOSE = "credit-assessment"
DAY = 86400
#: ids planted in the data: none may appear in the control database or on the ledger
PLANTED = [f"PLANTED-SUBJECT-{i:02d}-9c1e" for i in range(20)]
#: lowered thresholds: a contract from 5 people, an assessment from 8; sensitive from 3
LOWERED = {
    "xborder_personal_contract": 5,
    "xborder_personal_assessment": 8,
    "xborder_sensitive_assessment": 3,
}


def _csv(path: Path, subjects: list[int]) -> Path:
    lines = ["person_id,city,visits"] + [f"{PLANTED[i]},c{i % 3},{i}" for i in subjects]
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


def _exchange(data_dir: Path, database_url: str | None) -> Exchange:
    init_data_dir(data_dir, origin="test.zonex/log", database_url=database_url)
    ex = Exchange(settings_for(data_dir, checkpoint_interval_seconds=0.2, **LOWERED))
    ex.start()
    return ex


def _grant(
    server: LiveServer,
    provider: SigningKey,
    consumer: SigningKey,
    zone: str,
    names: list[str],
    operations: tuple[str, ...] = ("export",),
) -> None:
    with server.client(consumer) as c:
        req = c.request_access(
            zone, names, list(operations), PURPOSE, duration_seconds=DAY, justification="review"
        )
    with server.client(provider) as p:
        assert p.approve(req["id"])["grant_id"]


def _entries(ex: Exchange, kind: str) -> list[dict[str, Any]]:
    out = []
    for seq in range(ex.ledger.size()):
        entry = json.loads(ex.ledger.entry(seq))
        if entry["kind"] == kind:
            out.append(entry)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A CN clinic (zone ``health``: datasets a = subjects 0-2, b = 1-4, c = 5-6, all with a
    personal-information column) and a CN firm whose zone ``firms`` has no PI; a US lab and a CN
    lab both granted exports of every dataset."""
    root = tmp_path_factory.mktemp("xborder")
    ex = _exchange(root / "exchange", None)
    try:
        with serving(ex, root / "exchange") as server:
            clinic, firm = SigningKey.generate(), SigningKey.generate()
            us_lab, cn_lab = SigningKey.generate(), SigningKey.generate()
            with server.client(server.operator) as op:
                made = op.register_principal("Clinic", "agency", clinic.public_key)
                assert made["jurisdiction"] == "CN" and made["ciio"] is False
                op.register_principal("Firm Registry", "agency", firm.public_key)
                us = op.register_principal(
                    "Overseas Lab", "enterprise", us_lab.public_key, jurisdiction="US"
                )
                assert us["jurisdiction"] == "US"
                op.register_principal("Local Lab", "enterprise", cn_lab.public_key)
            with server.client(clinic) as p:
                p.create_zone("health", "clinic visits")
                for name, subjects in (("a", [0, 1, 2]), ("b", [1, 2, 3, 4]), ("c", [5, 6])):
                    d = p.register_dataset(
                        "health",
                        name,
                        levels={"person_id": "L2", "city": "L1", "visits": "L2"},
                        pi={"person_id": "personal"},
                        subject_column="person_id",
                        file=_csv(root / f"{name}.csv", subjects),
                    )
                    assert [c["pi"] for c in d["columns"]] == ["personal", "none", "none"]
                p.register_dataset(
                    "health",
                    "big",
                    levels={"person_id": "L3", "city": "L1", "visits": "L3"},
                    pi={"person_id": "personal"},
                    subject_column="person_id",
                    file=_csv(root / "big.csv", list(range(20))),
                )
            with server.client(firm) as p:
                p.create_zone("firms", "no personal information")
                p.register_dataset(
                    "firms",
                    "f",
                    levels={"person_id": "L2", "city": "L1", "visits": "L1"},
                    subject_column="person_id",
                    file=_csv(root / "f.csv", list(range(10, 19))),
                )
            _grant(server, clinic, us_lab, "health", ["a", "big"], ("aggregate",))
            for lab in (us_lab, cn_lab):
                _grant(server, clinic, lab, "health", ["a", "b", "c"])
                _grant(server, firm, lab, "firms", ["f"])
            yield {
                "server": server,
                "ex": ex,
                "root": root,
                "clinic": clinic,
                "us": us_lab,
                "cn": cn_lab,
            }
    finally:
        ex.close()


def _export(server: LiveServer, key: SigningKey, zone: str, name: str) -> dict[str, Any]:
    with server.client(key) as c:
        out: dict[str, Any] = c.export(zone, name, PURPOSE)
    return out


def test_registration_and_catalog_show_jurisdiction_and_pi(world: dict[str, Any]) -> None:
    server = world["server"]
    with server.client(world["us"]) as c:
        assert c.whoami()["jurisdiction"] == "US"
        zone = c.zone("health")
    cols = {c["name"]: c["pi"] for c in zone["datasets"][0]["columns"]}
    assert cols == {"person_id": "personal", "city": "none", "visits": "none"}
    bad = SigningKey.generate()
    with server.client(server.operator) as op, pytest.raises(ApiError) as exc:
        op.register_principal("Nowhere", "enterprise", bad.public_key, jurisdiction="XX")
    assert exc.value.status == 422 and "ISO 3166-1" in exc.value.detail
    with server.client(world["clinic"]) as p, pytest.raises(ApiError) as exc:
        p.register_dataset(
            "health",
            "bad_pi",
            levels={"person_id": "L2", "city": "L1", "visits": "L2"},
            pi={"person_id": "biometric"},
            subject_column="person_id",
            file=_csv(world["root"] / "bad.csv", [0]),
        )
    assert exc.value.status == 422 and "personal-information class" in exc.value.detail


def test_export_abroad_exempt_refused_approved_expired(world: dict[str, Any]) -> None:
    server, ex, clinic = world["server"], world["ex"], world["clinic"]
    provider = clinic.public_key.key_id

    # 0 -> 3 subjects: under the (lowered) contract threshold of 5
    first = _export(server, world["us"], "health", "a")
    verify_receipt(first["receipt"], first["result"], server.log_verifier())
    # the same subjects again are not counted twice
    _export(server, world["us"], "health", "a")
    # a domestic consumer's export is no cross-border flow and is not counted
    _export(server, world["cn"], "health", "b")
    # b adds subjects 3 and 4: 3 -> 5 reaches the contract threshold, refused without approval
    with pytest.raises(ApiError) as exc:
        _export(server, world["us"], "health", "b")
    problem = exc.value.body
    assert exc.value.status == 403 and exc.value.code == "xborder_approval_required"
    # the refusal names the document, never the provider's count: the count after this export
    # would tell the consumer how many of its subjects were already sent abroad by anyone
    assert not {"count_after", "count_before", "count"} & set(exc.value.body)
    assert not re.search(r"\b[0-9]+\b", str(exc.value.body.get("detail", "")).split("(")[0])
    assert problem["document"] == "contract"
    assert problem["documents"] == "assessment,certification,contract"
    assert "Art. 8" in exc.value.detail

    decisions = _entries(ex, "xborder.decision")
    seen = [(d["attrs"]["decision"], d["attrs"]["count_before"], d["attrs"]["count_after"])
            for d in decisions]  # fmt: skip
    assert seen == [("exempt", 0, 3), ("exempt", 3, 3), ("contract", 3, 5)]
    exempt = decisions[0]
    assert exempt["attrs"]["basis"] == "personal_under_threshold"
    assert exempt["attrs"]["threshold"] == 5
    assert exempt["attrs"]["pi"] == "personal" and exempt["attrs"]["operation"] == "export"
    assert (exempt["attrs"]["consumer_jurisdiction"], exempt["attrs"]["zone_jurisdiction"]) == (
        "US",
        "CN",
    )
    assert exempt["refs"] == {"zone": "health", "dataset": "a", "provider": provider}
    assert exempt["actor"] == world["us"].public_key.key_id
    # an allowed decision is committed right after its computation, in its transaction
    computation = json.loads(ex.ledger.entry(exempt["seq"] - 1))
    assert computation["kind"] == "computation.export" and computation["refs"]["dataset"] == "a"
    # the refusal recorded no release
    us_id = world["us"].public_key.key_id
    released = [
        e["refs"]["dataset"] for e in _entries(ex, "computation.export") if e["actor"] == us_id
    ]
    assert released == ["a", "a"]

    # the operator records a standard contract (CLI); the same export is then allowed
    doc = world["root"] / "scc.pdf"
    doc.write_bytes(b"%PDF standard contract filed with the provincial CAC")
    op_key = world["root"] / "exchange" / "operator.key"
    until = (datetime.now(UTC) + timedelta(days=365)).strftime("%Y-%m-%d")
    result = CliRunner().invoke(
        app,
        [
            *("xborder", "approve", "--provider", "Clinic", "--document", "contract"),
            *(
                "--file",
                str(doc),
                "--valid-until",
                until,
                "--url",
                server.url,
                "--key",
                str(op_key),
            ),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "approval xba_" in result.output
    (recorded,) = _entries(ex, "xborder.approval_recorded")
    assert recorded["attrs"]["document"] == "contract"
    assert recorded["refs"]["provider"] == provider
    assert recorded["digests"]["document"] == hashlib.sha256(doc.read_bytes()).hexdigest()

    _export(server, world["us"], "health", "b")
    allowed = _entries(ex, "xborder.decision")[-1]
    assert allowed["attrs"]["decision"] == "contract"
    assert allowed["refs"]["approval"] == recorded["refs"]["approval"]
    assert (allowed["attrs"]["count_before"], allowed["attrs"]["count_after"]) == (3, 5)
    with server.client(server.operator) as op:
        assert op.xborder_counts(provider)["personal"] == 5

    # the approval expires (its end moved into the past, as time would): refused again
    with Session(ex.engine) as s, s.begin():
        s.execute(
            update(XborderApprovalRow).values(valid_until=datetime.now(UTC) - timedelta(seconds=1))
        )
    with pytest.raises(ApiError) as exc:
        _export(server, world["us"], "health", "c")
    assert exc.value.code == "xborder_approval_required"
    last = _entries(ex, "xborder.decision")[-1]
    assert (last["attrs"]["decision"], last["attrs"]["count_after"]) == ("contract", 7)
    assert "approval" not in last["refs"]
    with server.client(server.operator) as op:
        assert op.xborder_counts(provider)["personal"] == 5
        listed = op.xborder_approvals(provider)
    assert [a["live"] for a in listed] == [False]

    # a dataset without personal information leaves freely, and is not counted
    _export(server, world["us"], "firms", "f")
    assert _entries(ex, "xborder.decision")[-1]["attrs"]["basis"] == "no_personal_information"


def test_aggregates_abroad(world: dict[str, Any]) -> None:
    """A DP aggregate is anonymized output: exempt, still ledgered. An exact aggregate of
    personal information counts no subjects, so it needs an assessment (fail closed)."""
    server, ex = world["server"], world["ex"]
    with server.client(world["us"]) as c:
        c.aggregate("health", "SELECT city, COUNT(*) FROM big GROUP BY city", PURPOSE)
        dp = _entries(ex, "xborder.decision")[-1]
        assert (dp["attrs"]["operation"], dp["attrs"]["decision"], dp["attrs"]["basis"]) == (
            "aggregate",
            "exempt",
            "anonymized",
        )
        assert json.loads(ex.ledger.entry(dp["seq"] - 1))["kind"] == "computation.aggregate"
        with pytest.raises(ApiError) as exc:
            c.aggregate("health", "SELECT city, COUNT(*) FROM a GROUP BY city", PURPOSE)
    assert exc.value.code == "xborder_approval_required"
    assert exc.value.body["document"] == "assessment"
    exact = _entries(ex, "xborder.decision")[-1]
    assert (exact["attrs"]["decision"], exact["attrs"]["basis"]) == (
        "assessment",
        "count_unavailable",
    )


def test_approval_terms_are_checked(world: dict[str, Any]) -> None:
    server, provider = world["server"], world["clinic"].public_key.key_id
    now = datetime.now(UTC).replace(microsecond=0)
    with server.client(server.operator) as op, pytest.raises(ValueError, match="three years"):
        op.record_xborder_approval(
            provider, "assessment", b"doc", valid_until=now + timedelta(days=3 * 366)
        )
    # a forged record: terms signed by another key than the operator's
    from crypto.envelope import sign_envelope
    from policy.xborder import APPROVAL_TYPE, approval_payload

    forger = SigningKey.generate()
    payload = approval_payload(
        provider=provider,
        document="assessment",
        document_sha256="0" * 64,
        valid_from=now,
        valid_until=now + timedelta(days=30),
        approver=server.operator.public_key.key_id,
    )
    forged = sign_envelope(APPROVAL_TYPE, payload, [forger])
    with server.client(server.operator) as op, pytest.raises(ApiError) as exc:
        op.request("POST", "/v1/xborder/approvals", json={"approval": forged.model_dump()})
    assert exc.value.status == 422 and "does not verify" in exc.value.detail
    # a provider cannot record its own approval
    with server.client(world["clinic"]) as p, pytest.raises(ApiError) as exc:
        p.record_xborder_approval(provider, "contract", b"doc", valid_until=now + timedelta(1))
    assert exc.value.status == 403


def test_no_raw_subject_id_in_any_table_or_entry(world: dict[str, Any]) -> None:
    ex: Exchange = world["ex"]
    with Session(ex.engine) as s:
        assert s.scalar(select(XborderSubjectRow.digest).limit(1)) is not None
        for table in inspect(ex.engine).get_table_names():
            for row in s.execute(text(f'SELECT * FROM "{table}"')):
                blob = repr(tuple(row))
                assert not any(p in blob for p in PLANTED), table
    for seq in range(ex.ledger.size()):
        body = ex.ledger.entry(seq)
        assert not any(p.encode() in body for p in PLANTED), seq
    control = world["root"] / "exchange"
    for path in control.glob("control.db*"):
        raw = path.read_bytes()
        assert not any(p.encode() in raw for p in PLANTED), path


BACKENDS = ["sqlite"] + (["postgresql"] if os.environ.get("ZONEX_TEST_DATABASE_URL") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_releases_crossing_a_threshold_exactly_one_succeeds(
    backend: str, tmp_path: Path
) -> None:
    """Four exports of three new subjects each, at once, against a contract threshold of 5:
    whichever is decided first takes the count to 3; every other would take it to 6 and is
    refused. The counts are decided in the ledger transaction, one after the other."""
    with fresh_postgres_database() if backend == "postgresql" else nullcontext() as url:
        ex = _exchange(tmp_path / "exchange", url)
        try:
            with serving(ex, tmp_path / "exchange") as server:
                clinic, lab = SigningKey.generate(), SigningKey.generate()
                with server.client(server.operator) as op:
                    op.register_principal("Clinic", "agency", clinic.public_key)
                    op.register_principal("Lab", "enterprise", lab.public_key, jurisdiction="SG")
                names = [f"d{i}" for i in range(4)]
                with server.client(clinic) as p:
                    p.create_zone("health", "visits")
                    for i, name in enumerate(names):
                        p.register_dataset(
                            "health",
                            name,
                            levels={"person_id": "L2", "city": "L1", "visits": "L2"},
                            pi={"person_id": "personal"},
                            subject_column="person_id",
                            file=_csv(tmp_path / f"{name}.csv", [3 * i, 3 * i + 1, 3 * i + 2]),
                        )
                _grant(server, clinic, lab, "health", names)
                results: dict[str, str] = {}
                barrier = threading.Barrier(len(names))

                def run(name: str) -> None:
                    barrier.wait()
                    try:
                        _export(server, lab, "health", name)
                        results[name] = "ok"
                    except ApiError as exc:
                        results[name] = exc.code

                threads = [threading.Thread(target=run, args=(n,)) for n in names]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join(timeout=60)
                assert sorted(results.values()) == ["ok"] + ["xborder_approval_required"] * 3
                with Session(ex.engine) as s:
                    (count,) = s.scalars(select(XborderCountRow.personal)).all()
                    stored = s.scalars(select(XborderSubjectRow.digest)).all()
                assert count == len(stored) == 3
                decisions = [d["attrs"] for d in _entries(ex, "xborder.decision")]
                assert sorted((d["decision"], d["count_after"]) for d in decisions) == [
                    ("contract", 6),
                    ("contract", 6),
                    ("contract", 6),
                    ("exempt", 3),
                ]
        finally:
            ex.close()


def test_cli_check_golden_json() -> None:
    result = CliRunner().invoke(
        app,
        [
            *("xborder", "check", "--operation", "export", "--pi", "personal", "--level", "L2"),
            *("--count", "85000", "--new", "1000", "--consumer-jurisdiction", "US", "--json"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        "decision": "exempt",
        "basis": "personal_under_threshold",
        "provision": "PI (not sensitive) of fewer than 100,000 people (Art. 5(4))",
        "threshold": 100000,
        "count_before": 84000,
        "count_after": 85000,
        "warnings": [
            "85000 of 100000 people's personal information this year (85% of the threshold)"
        ],
    }
    result = CliRunner().invoke(
        app,
        [
            *("xborder", "check", "--operation", "psi_members", "--pi", "sensitive"),
            *("--level", "L3", "--count", "10000", "--consumer-jurisdiction", "HK"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[:2] == [
        "decision: assessment",
        "basis: sensitive_over_threshold (sensitive PI of 10,000 people or more this year "
        "(Art. 7(2)))",
    ]
    bad = CliRunner().invoke(
        app,
        [
            *("xborder", "check", "--operation", "export", "--pi", "personal", "--level", "L2"),
            *("--count", "1", "--new", "2", "--consumer-jurisdiction", "US"),
        ],
    )
    assert bad.exit_code == 1 and len(bad.output.strip().splitlines()) == 1
    assert "Traceback" not in bad.output


def test_cli_check_with_a_deployments_thresholds(tmp_path: Path) -> None:
    """``--data-dir``: the thresholds that exchange's settings set (lowered here), the same
    the exchange decides with; without it, the 2024 values."""
    data_dir = tmp_path / "exchange"
    init_data_dir(data_dir, origin="test.zonex/log")
    config = json.loads((data_dir / "config.json").read_text())
    (data_dir / "config.json").write_text(json.dumps({**config, **LOWERED}))
    case = ["xborder", "check", "--operation", "export", "--pi", "personal", "--level", "L2"]
    case += ["--count", "6", "--consumer-jurisdiction", "US", "--json"]
    lowered = CliRunner().invoke(app, [*case, "--data-dir", str(data_dir)])
    assert lowered.exit_code == 0, lowered.output
    assert json.loads(lowered.output)["decision"] == "contract"
    assert json.loads(lowered.output)["threshold"] == LOWERED["xborder_personal_contract"]
    default = CliRunner().invoke(app, case)
    assert json.loads(default.output)["decision"] == "exempt"
    missing = CliRunner().invoke(app, [*case, "--data-dir", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1 and "no exchange here" in missing.output


def test_negative_list_and_the_approval_warning(world: dict[str, Any], tmp_path: Path) -> None:
    server, ex = world["server"], world["ex"]
    with server.client(world["us"]) as c, pytest.raises(ApiError) as exc:
        c.set_xborder_negative_list("health", [["export", "*"]])
    assert exc.value.status == 403  # only the operator or the zone's provider
    with server.client(world["clinic"]) as p:
        assert p.set_xborder_negative_list("health", [["export", "L2"]])["entries"] == [
            ["export", "L2"]
        ]
        with pytest.raises(ApiError) as exc:
            p.set_xborder_negative_list("health", [["export", "secret"]])
        assert exc.value.status == 422
    (listed,) = _entries(ex, "xborder.negative_list_set")
    assert listed["attrs"]["entries"] == "export:L2" and listed["refs"] == {"zone": "health"}
    with pytest.raises(ApiError) as exc:
        _export(server, world["us"], "health", "a")  # an L2 dataset
    assert exc.value.code == "xborder_refused"
    assert _entries(ex, "xborder.decision")[-1]["attrs"]["basis"] == "negative_list"
    _export(server, world["cn"], "health", "a")  # not abroad: no negative list applies
    with server.client(world["clinic"]) as p:
        assert p.set_xborder_negative_list("health", [])["entries"] == []

    # approving an access request abroad warns of the approval the releases would need
    with server.client(world["us"]) as c:
        req = c.request_access(
            "health", ["b"], ["export"], PURPOSE, duration_seconds=DAY, justification="more"
        )
    key = tmp_path / "clinic.key"
    write_private_key(key, world["clinic"])
    result = CliRunner().invoke(app, ["approve", req["id"], "--url", server.url, "--key", str(key)])
    assert result.exit_code == 0, result.output
    assert "warning: export on b to US needs assessment or certification or contract" in (
        result.output
    )


def test_the_auditor_checks_every_release_abroad(world: dict[str, Any]) -> None:
    """Offline, from the ledger alone (``zonex audit verify --rules``): every release abroad is
    followed by its decision, and one needing a document cites a live approval. The module's
    whole history passes; the same history with a decision dropped, or its approval's citation
    removed, does not."""
    from exchange.audit.rules import check_rules

    ex = world["ex"]
    lines = [ex.ledger.entry(seq) for seq in range(ex.ledger.size())]
    report = check_rules(lines)
    assert report.ok, report.faults
    entries = [json.loads(line) for line in lines]
    attached = [
        i
        for i, e in enumerate(entries)
        if e["kind"] == "xborder.decision" and entries[i - 1]["kind"].startswith("computation.")
    ]
    assert attached  # the exports and aggregates abroad above
    dropped = attached[0]
    faults = check_rules(lines[:dropped] + lines[dropped + 1 :]).faults
    assert [(f.line, str(f.kind)) for f in faults] == [(dropped, "xborder_without_decision")]
    approved = [i for i in attached if "approval" in entries[i]["refs"]]
    assert approved  # the export allowed after `zonex xborder approve`
    bare = dict(entries[approved[0]], refs={**entries[approved[0]]["refs"]})
    del bare["refs"]["approval"]
    changed = [*lines]
    changed[approved[0]] = json.dumps(bare).encode()
    faults = check_rules(changed).faults
    assert [(f.line, str(f.kind)) for f in faults] == [
        (approved[0] + 1, "xborder_without_approval")
    ]
