"""``zonex audit verify --rules``: compliance rules checked offline over a real exchange's
bundle, and over bundles a holder of the log key rewrote (entries re-chained, checkpoint
re-signed, so the integrity checks pass and only the rules can catch them)."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from crypto.canonical import canonicalize
from crypto.merkle import MerkleTree, leaf_hash
from crypto.note import Checkpoint, NoteSigner, sign_checkpoint
from exchange.audit import check_bundle
from exchange.audit.rules import (
    DEFAULT_EPSILON_BUDGET,
    DEFAULT_REFRESH_SECONDS,
    RuleFaultKind,
    RulesChecker,
    check_rules,
)
from exchange.cli import app
from exchange.server.ledger import write_export
from exchange.server.runtime import Exchange, init_data_dir
from tests.conftest import L3_LEVELS, serving, settings_for, tax_bureau_and_bank

# one world for the module, its tests in order on one worker
pytestmark = pytest.mark.xdist_group(name="audit-rules")

PURPOSE = "credit-assessment"
SQL = "SELECT district, COUNT(*) AS n FROM companies GROUP BY district"
GENESIS = "0" * 64


@dataclass
class Flow:
    """A real exchange's exported ledger and what the workflow left on it."""

    bundle: Path
    log_pub: Path
    signer: NoteSigner
    entries: list[dict[str, Any]]
    consumer: str
    grant: str
    live_consent: str
    withdrawn_consent: str

    def seq_of(self, kind: str, nth: int = 0, **refs: str) -> int:
        found = [
            e["seq"]
            for e in self.entries
            if e["kind"] == kind and all(e["refs"].get(k) == v for k, v in refs.items())
        ]
        return int(found[nth])


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    """Provider, consumer, a grant, analysis rules with a budget, two DP aggregates, consents
    recorded and one withdrawn, the consumer suspended and reinstated, the grant revoked."""
    root = tmp_path_factory.mktemp("rules")
    data_dir = root / "exchange"
    init_data_dir(data_dir, origin="rules.test.zonex/log")
    ex = Exchange(settings_for(data_dir, checkpoint_interval_seconds=0.2))
    ex.start()
    try:
        with serving(ex, data_dir) as server:
            provider, consumer = tax_bureau_and_bank(server, L3_LEVELS)
            with server.client(consumer) as c:
                req = c.request_access(
                    "tax",
                    ["companies"],
                    ["aggregate", "he_score"],
                    PURPOSE,
                    duration_seconds=86400,
                    justification="credit line review",
                )
            with server.client(provider) as p:
                grant = p.approve(req.id).grant_id
                rules = p.analysis_rules("tax", "companies")["rules"]
                p.set_analysis_rules("tax", "companies", {**rules, "epsilon_budget": "0.5"})
                expires = datetime.now(UTC) + timedelta(days=30)
                live = p.record_consent("tax", "C0001", consumer.key_id, PURPOSE, expires)["id"]
                gone = p.record_consent("tax", "C0002", consumer.key_id, PURPOSE, expires)["id"]
                p.withdraw_consent(gone)
            with server.client(consumer) as c:
                c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
                c.aggregate("tax", SQL, PURPOSE, epsilon="0.2")
            with server.client(server.operator) as op:
                op.set_principal_status(consumer.key_id, "suspended")
                op.set_principal_status(consumer.key_id, "active")
            with server.client(provider) as p:
                p.revoke(grant, "review finished")
        bundle = root / "ledger.jsonl"
        write_export(ex.ledger, bundle)
        assert ex.log_signer is not None
        signer = ex.log_signer
    finally:
        ex.close()
    entries = [json.loads(line) for line in bundle.read_bytes().splitlines()]
    yield Flow(
        bundle=bundle,
        log_pub=data_dir / "log.pub",
        signer=signer,
        entries=[e for e in entries if "seq" in e],
        consumer=consumer.key_id,
        grant=str(grant),
        live_consent=str(live),
        withdrawn_consent=str(gone),
    )


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


def resign(flow: Flow, entries: list[dict[str, Any]], path: Path) -> Path:
    """What a holder of the log key can do: re-chain ``entries`` (seq, prev) and sign one
    checkpoint over them. The result passes every integrity check."""
    tree = MerkleTree()
    lines = []
    prev = GENESIS
    for seq, entry in enumerate(entries):
        body = canonicalize({**entry, "seq": seq, "prev": prev})
        digest = leaf_hash(body)
        tree.append(digest)
        lines.append(body)
        prev = digest.hex()
    note = sign_checkpoint(Checkpoint(flow.signer.name, len(lines), tree.root()), flow.signer)
    lines.append(canonicalize({"checkpoint": note, "consistency": []}))
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    assert check_bundle(path.read_bytes().splitlines(), flow.signer.verifier()).ok
    return path


def faults_of(flow: Flow, path: Path) -> tuple[int, set[tuple[int, str]], str]:
    code, out = cli("audit", "verify", str(path), "--log-key", str(flow.log_pub), "--rules")
    found = set()
    prefix = f"{path}:"
    for text in out.splitlines():
        if text.startswith(prefix):
            line, kind = text[len(prefix) :].split(": ")[:2]
            found.add((int(line), kind))
    return code, found, out


def release(flow: Flow, **attrs: Any) -> dict[str, Any]:
    """A copy of the workflow's first aggregate that charges nothing (so only the rule under
    test can fail), with ``attrs`` changed."""
    entry = copy.deepcopy(flow.entries[flow.seq_of("computation.aggregate")])
    entry["attrs"] = {
        k: v for k, v in entry["attrs"].items() if not k.startswith(("spent.", "window."))
    }
    entry["attrs"].update(epsilon="0", **attrs)
    return entry


def insert_at(
    flow: Flow, seq: int, entry: dict[str, Any], tmp_path: Path
) -> tuple[int, set[tuple[int, str]], str]:
    """Insert ``entry`` before the entry at ``seq`` (its time: that entry's) and verify."""
    entries = copy.deepcopy(flow.entries)
    entry = {**entry, "time": entries[seq]["time"]}
    entries.insert(seq, entry)
    return faults_of(flow, resign(flow, entries, tmp_path / "tampered.jsonl"))


# -- the real workflow --------------------------------------------------------------------


def test_a_real_workflow_verifies_clean_with_rules(flow: Flow) -> None:
    code, out = cli("audit", "verify", str(flow.bundle), "--log-key", str(flow.log_pub), "--rules")
    assert code == 0, out
    assert "compliance rules hold" in out
    kinds = [e["kind"] for e in flow.entries]
    assert kinds.count("computation.aggregate") == 2
    for kind in ("grant.created", "grant.revoked", "consent.withdrawn", "principal.suspended"):
        assert kind in kinds
    # the facts the rules need are on the ledger
    created = flow.entries[flow.seq_of("grant.created")]
    assert created["refs"]["zone"] == "tax"
    rules_set = flow.entries[flow.seq_of("analysis.rules_set")]
    assert rules_set["attrs"]["epsilon_budget"] == "0.5"
    assert rules_set["attrs"]["refresh_seconds"] == DEFAULT_REFRESH_SECONDS
    second = flow.entries[flow.seq_of("computation.aggregate", 1)]
    assert second["attrs"]["spent.tax/companies"] == "0.3"
    assert second["attrs"]["window.tax/companies"].endswith("Z")


def test_integrity_faults_come_first(flow: Flow, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jsonl"
    lines = flow.bundle.read_bytes().splitlines()
    lines[3] = lines[3].replace(b'"kind":"', b'"kind":"x', 1)
    broken.write_bytes(b"".join(line + b"\n" for line in lines))
    code, out = cli("audit", "verify", str(broken), "--log-key", str(flow.log_pub), "--rules")
    assert code == 1 and "prev_mismatch" in out and "compliance" not in out


# -- a holder of the log key rewrites history -----------------------------------------------


def test_inserted_computation_without_grant(flow: Flow, tmp_path: Path) -> None:
    at = flow.seq_of("computation.aggregate")
    code, found, out = insert_at(flow, at, release(flow, rule="grant:" + "ab" * 12), tmp_path)
    assert code == 1
    assert found == {(at + 1, "computation_without_grant")}, out
    # the same release before its grant was created
    code, found, out = insert_at(flow, flow.seq_of("grant.created"), release(flow), tmp_path)
    assert found == {(flow.seq_of("grant.created") + 1, "computation_without_grant")}, out


def test_release_after_revocation(flow: Flow, tmp_path: Path) -> None:
    revoked = flow.seq_of("grant.revoked")
    entries = [*flow.entries, {**release(flow), "time": flow.entries[-1]["time"]}]
    code, found, out = faults_of(flow, resign(flow, entries, tmp_path / "late.jsonl"))
    assert code == 1
    assert found == {(len(entries), "grant_revoked")}, out
    assert f"revoked on line {revoked + 1}" in out


def test_computation_after_the_grant_expired(flow: Flow, tmp_path: Path) -> None:
    entries = copy.deepcopy(flow.entries)
    created = flow.seq_of("grant.created")
    # the grant as signed would have lapsed a second after it was made
    made = datetime.fromisoformat(entries[created]["time"])
    lapse = (made + timedelta(seconds=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    entries[created]["attrs"]["expires"] = lapse
    first, second = flow.seq_of("computation.aggregate"), flow.seq_of("computation.aggregate", 1)
    later = (made + timedelta(seconds=2)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    for seq in range(first, len(entries)):
        entries[seq]["time"] = max(entries[seq]["time"], later)
    code, found, out = faults_of(flow, resign(flow, entries, tmp_path / "expired.jsonl"))
    assert code == 1
    assert found == {(first + 1, "grant_expired"), (second + 1, "grant_expired")}, out


def test_epsilon_over_budget(flow: Flow, tmp_path: Path) -> None:
    entries = copy.deepcopy(flow.entries)
    entries[flow.seq_of("analysis.rules_set")]["attrs"]["epsilon_budget"] = "0.25"
    code, found, out = faults_of(flow, resign(flow, entries, tmp_path / "over.jsonl"))
    assert code == 1
    second = flow.seq_of("computation.aggregate", 1)
    assert found == {(second + 1, "budget_exceeded")}, out
    assert "0.3 spent, over the budget 0.25" in out


def test_epsilon_charged_differs_from_the_releases(flow: Flow, tmp_path: Path) -> None:
    # a release deleted from history: the next charge's window total no longer adds up
    first, second = flow.seq_of("computation.aggregate"), flow.seq_of("computation.aggregate", 1)
    entries = [e for e in flow.entries if e["seq"] != first]
    code, found, out = faults_of(flow, resign(flow, entries, tmp_path / "hidden.jsonl"))
    assert code == 1
    assert found == {(second, "budget_mismatch")}, out  # one line up: the first is gone
    assert "records 0.3 spent, the releases add up to 0.2" in out


def test_scoring_citing_a_withdrawn_consent(flow: Flow, tmp_path: Path) -> None:
    score = release(flow, operation="he_score", consent_count=1)
    score["kind"] = "computation.he_score"
    withdrawn = flow.seq_of("consent.withdrawn")
    entries = copy.deepcopy(flow.entries)
    at = flow.seq_of("computation.aggregate")
    good = {**score, "time": entries[at]["time"]}
    good["attrs"] = {**score["attrs"], "consent_ids": flow.live_consent}
    bad = {**score, "time": entries[at]["time"]}
    bad["attrs"] = {**score["attrs"], "consent_ids": flow.withdrawn_consent}
    entries[at:at] = [good, bad]
    code, found, out = faults_of(flow, resign(flow, entries, tmp_path / "consent.jsonl"))
    assert code == 1
    assert found == {(at + 2, "consent_not_live")}, out  # the live consent's score passes
    assert f"withdrawn on line {withdrawn + 1}" in out


def test_action_by_a_suspended_principal(flow: Flow, tmp_path: Path) -> None:
    suspended = flow.seq_of("principal.suspended")
    reinstated = flow.seq_of("principal.reinstated")
    code, found, out = insert_at(flow, reinstated, release(flow), tmp_path)
    assert code == 1
    assert found == {(reinstated + 1, "action_while_suspended")}, out
    assert f"suspended on line {suspended + 1}" in out
    # after the reinstatement the same release is fine
    code, found, out = insert_at(flow, reinstated + 1, release(flow), tmp_path)
    assert code == 0 and not found, out


def test_private_join_release_without_its_session(flow: Flow, tmp_path: Path) -> None:
    psi = release(flow, operation="psi_cardinality")
    psi["kind"] = "computation.psi_cardinality"
    psi["refs"] = {**psi["refs"], "session": "psi-unopened"}
    at = flow.seq_of("computation.aggregate")
    code, found, out = insert_at(flow, at, psi, tmp_path)
    assert code == 1
    # the grant does not cover psi_cardinality either: both are named, on the same line
    assert found == {(at + 1, "release_without_opening"), (at + 1, "grant_mismatch")}, out


# -- the pure checker on synthetic streams ------------------------------------------------

CONSUMER, OTHER, OPERATOR = "c" * 64, "d" * 64, "e" * 64


def entry(
    kind: str, time: str = "2026-11-25T07:00:00.000Z", actor: str = CONSUMER, **kw: Any
) -> dict[str, Any]:
    return {"kind": kind, "time": time, "actor": actor, "refs": {}, "attrs": {}, **kw}


def grant(**attrs: Any) -> dict[str, Any]:
    return entry(
        "grant.created",
        actor=OPERATOR,
        refs={"grant": "grant:1", "consumer": CONSUMER, "request": "req-1", "zone": "z"},
        attrs={
            "datasets": "a,b",
            "operations": "aggregate,psi_members",
            "purpose": "financial-services",
            "expires": "2026-11-26T00:00:00Z",
            **attrs,
        },
    )


def compute(time: str = "2026-11-25T08:00:00.000Z", **attrs: Any) -> dict[str, Any]:
    return entry(
        "computation.aggregate",
        time=time,
        refs={"zone": "z", "dataset": "a"},
        attrs={
            "rule": "grant:1",
            "operation": "aggregate",
            "purpose": PURPOSE,
            "epsilon": "0.4",
            **attrs,
        },
    )


def run(*stream: dict[str, Any]) -> list[tuple[int, str]]:
    checker = RulesChecker()
    for line, e in enumerate(stream, start=1):
        checker.feed(e, line)
    return [(f.line, str(f.kind)) for f in checker.report().faults]


Case = Callable[[], list[dict[str, Any]]]
CASES: list[tuple[str, Case, list[tuple[int, str]]]] = [
    ("a child purpose under a parent grant", lambda: [grant(), compute()], []),
    (
        "another consumer",
        lambda: [grant(), {**compute(), "actor": OTHER}],
        [(2, "grant_mismatch")],
    ),
    (
        "a dataset outside the grant",
        lambda: [grant(), {**compute(), "refs": {"zone": "z", "dataset": "c"}}],
        [(2, "grant_mismatch")],
    ),
    (
        "an operation outside it",
        lambda: [grant(), compute(operation="export")],
        [(2, "grant_mismatch")],
    ),
    (
        "a purpose outside it",
        lambda: [grant(), compute(purpose="urban-planning")],
        [(2, "grant_mismatch")],
    ),
    (
        "at the expiry second",
        lambda: [grant(), compute("2026-11-26T00:00:00.000Z")],
        [(2, "grant_expired")],
    ),
    (
        "the default budget of 1: the third 0.4 is over",
        lambda: [grant(), compute(), compute(), compute()],
        [(4, "budget_exceeded")],
    ),
    (
        "a new window starts from nothing",
        lambda: [
            grant(),
            compute(),
            compute(),
            compute("2026-11-25T09:00:00.000Z", **{"window.z/a": "2026-11-25T09:00:00.000Z"}),
        ],
        [],
    ),
    (
        "a zone suspended, then reinstated",
        lambda: [
            grant(),
            entry("zone.suspended", actor=OPERATOR, refs={"zone": "z"}),
            compute(epsilon="0"),
            entry("zone.reinstated", actor=OPERATOR, refs={"zone": "z"}),
            compute(epsilon="0"),
        ],
        [(3, "action_while_suspended")],
    ),
    (
        "a grant for a suspended consumer",
        lambda: [
            entry("principal.suspended", actor=OPERATOR, refs={"principal": CONSUMER}),
            grant(),
        ],
        [(2, "action_while_suspended")],
    ),
    (
        "a node release whose task was terminated",
        lambda: [
            grant(),
            entry("task.authorized", refs={"zone": "z", "node": "n", "task": "t1"}),
            entry("task.terminated", actor="-", refs={"task": "t1"}),
            compute(epsilon="0", node_task="t1"),
        ],
        [(4, "release_without_task")],
    ),
    (
        "a private join released twice",
        lambda: [
            grant(),
            entry("psi.session_opened", refs={"zone": "z", "dataset": "a", "session": "s"}),
            *[
                {
                    **compute(epsilon="0", operation="psi_members"),
                    "kind": "computation.psi_members",
                    "refs": {"zone": "z", "dataset": "a", "session": "s"},
                }
                for _ in range(2)
            ],
        ],
        [(4, "release_without_opening")],
    ),
    # cross-border: a CN provider's zone z, a US consumer
    (
        "a release abroad with its exempt decision",
        lambda: [*abroad(), grant(), compute(epsilon="0"), decision("exempt")],
        [],
    ),
    (
        "a release abroad with no decision after it",
        lambda: [*abroad(), grant(), compute(epsilon="0"), compute(epsilon="0"), decision()],
        [(5, "xborder_without_decision")],
    ),
    (
        "a refused flow released anyway",
        lambda: [*abroad(), grant(), compute(epsilon="0"), decision("refuse")],
        [(6, "xborder_refused_released")],
    ),
    (
        "a refusal ledgered alone releases nothing",
        lambda: [*abroad(), grant(), decision("refuse"), decision("contract")],
        [],
    ),
    (
        "a contract abroad under a live approval",
        lambda: [*abroad(), approval(), grant(), compute(epsilon="0"), decision("contract", "a1")],
        [],
    ),
    (
        "a contract abroad citing no approval",
        lambda: [*abroad(), approval(), grant(), compute(epsilon="0"), decision("contract")],
        [(7, "xborder_without_approval")],
    ),
    (
        "an assessment abroad citing a contract",
        lambda: [
            *abroad(),
            approval(),
            grant(),
            compute(epsilon="0"),
            decision("assessment", "a1"),
        ],
        [(7, "xborder_without_approval")],
    ),
    (
        "a contract abroad after its approval ran out",
        lambda: [
            *abroad(),
            approval(valid_until="2026-11-25T07:30:00Z"),
            grant(),
            compute(epsilon="0"),
            decision("contract", "a1"),
        ],
        [(7, "xborder_without_approval")],
    ),
    (
        "a consumer at home needs no decision",
        lambda: [*abroad(consumer="CN"), grant(), compute(epsilon="0")],
        [],
    ),
]

PROVIDER = "f" * 64


def abroad(consumer: str = "US") -> list[dict[str, Any]]:
    def registered(key: str, where: str) -> dict[str, Any]:
        return entry(
            "principal.registered",
            actor=OPERATOR,
            refs={"principal": key},
            attrs={"kind": "agency", "jurisdiction": where, "ciio": 0},
        )

    return [
        registered(PROVIDER, "CN"),
        registered(CONSUMER, consumer),
        entry("zone.created", actor=PROVIDER, refs={"zone": "z"}),
    ]


def approval(document: str = "contract", **attrs: Any) -> dict[str, Any]:
    return entry(
        "xborder.approval_recorded",
        actor=OPERATOR,
        refs={"approval": "a1", "provider": PROVIDER},
        attrs={
            "document": document,
            "valid_from": "2026-11-01T00:00:00Z",
            "valid_until": "2027-11-01T00:00:00Z",
            **attrs,
        },
    )


def decision(outcome: str = "exempt", cited: str | None = None) -> dict[str, Any]:
    refs = {"zone": "z", "dataset": "a", "provider": PROVIDER}
    if cited is not None:
        refs["approval"] = cited
    return entry(
        "xborder.decision",
        time="2026-11-25T08:00:00.000Z",
        refs=refs,
        attrs={"decision": outcome, "operation": "aggregate"},
    )


@pytest.mark.parametrize(("name", "stream", "expected"), CASES, ids=[c[0] for c in CASES])
def test_checker_on_synthetic_streams(
    name: str, stream: Case, expected: list[tuple[int, str]]
) -> None:
    assert run(*stream()) == expected


def test_faults_beyond_the_cap_are_counted() -> None:
    lines = [canonicalize(compute(rule="grant:none", epsilon="0")) for _ in range(5)]
    report = check_rules(lines, max_faults=2)
    assert not report.ok and len(report.faults) == 2 and report.omitted == 3
    assert {f.kind for f in report.faults} == {RuleFaultKind.COMPUTATION_WITHOUT_GRANT}


def test_the_auditor_defaults_are_the_exchanges() -> None:
    from exchange.node.analysis import DEFAULT_EPSILON_BUDGET as NODE_BUDGET
    from exchange.node.analysis import DEFAULT_REFRESH_SECONDS as NODE_REFRESH

    assert (DEFAULT_EPSILON_BUDGET, DEFAULT_REFRESH_SECONDS) == (NODE_BUDGET, NODE_REFRESH)


def test_rules_module_imports_neither_server_nor_node() -> None:
    import ast

    import exchange.audit.rules as module

    tree = ast.parse(Path(module.__file__).read_text("utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert not [m for m in imported if m.startswith(("exchange.server", "exchange.node"))]
