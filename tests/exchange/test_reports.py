"""Monthly and quarterly reports (月报季评): exact measures over a synthetic signed bundle, and
the whole flow over a real exchange's bundle: build (JSON, CSV, HTML, PDF), verify, tamper,
publish on the ledger, refused publishers."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pypdf
import pytest
from typer.testing import CliRunner

from crypto.canonical import canonicalize
from crypto.keys import SigningKey
from exchange.audit.report import (
    CSV_COLUMNS,
    PeriodError,
    compute_report,
    parse_period,
    report_from_bundle,
)
from exchange.cli import app
from exchange.client.sdk import ApiError, SignatureAuth
from exchange.keyfile import write_private_key
from tests.conftest import EXAMPLES, L3_LEVELS, LiveServer, live_exchange
from tests.exchange.ledger_bundles import build_bundle

# one world for the module, its tests in order on one worker
pytestmark = pytest.mark.xdist_group(name="reports")

PURPOSE = "credit-assessment"


def cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    return result.exit_code, result.output


# -- a synthetic bundle with known counts -----------------------------------------------------

C = "c" * 64  # the consumer
D = "d" * 64  # a key whose requests fail authentication
P = "e" * 64  # the provider
M = "f" * 64  # the monitor


def _e(
    time: str, kind: str, actor: str = "-", refs: Any = None, attrs: Any = None
) -> dict[str, Any]:
    return {"time": time, "kind": kind, "actor": actor, "refs": refs or {}, "attrs": attrs or {}}


def _c(time: str, kind: str, zone: str, level: str, purpose: str, **attrs: Any) -> dict[str, Any]:
    refs = {"zone": zone, "dataset": "companies"}
    base = {"level": level, "purpose": purpose, "operation": kind, "rule": "grant:x"}
    return _e(time, f"computation.{kind}", C, refs, {**base, **attrs})


NOV = "2026-11-0"


def _spent(total: str) -> dict[str, str]:
    """The window total a charge to tax/companies records."""
    return {"spent.tax/companies": total, "window.tax/companies": "2026-10-01T00:00:00.000Z"}


SYNTHETIC = [
    _e(
        "2026-10-01T00:00:00.000Z",
        "analysis.rules_set",
        P,
        {"zone": "tax", "dataset": "companies"},
        {"epsilon_budget": "2", "refresh_seconds": 86400 * 90, "version": 1},
    ),
    _e("2026-10-20T08:00:00.000Z", "access.requested", C, {"request": "req-1", "zone": "tax"}),
    _e(
        "2026-10-21T08:00:00.500Z",
        "grant.created",
        P,
        {"grant": "grant:0", "consumer": C, "request": "req-1"},
        {"purpose": PURPOSE, "expires": "2026-11-15T00:00:00Z"},
    ),
    _e("2026-11-01T00:00:00.000Z", "access.requested", C, {"request": "req-2", "zone": "tax"}),
    _e(
        "2026-11-01T00:00:10.000Z",
        "grant.created",
        P,
        {"grant": "grant:1", "consumer": C, "request": "req-2"},
        {"purpose": PURPOSE, "expires": "2026-11-20T00:00:00Z"},
    ),
    _e("2026-11-02T09:00:00.000Z", "access.requested", C, {"request": "req-3", "zone": "health"}),
    _e(
        "2026-11-02T09:00:30.000Z",
        "grant.created",
        P,
        {"grant": "grant:2", "consumer": C, "request": "req-3"},
        {"purpose": "research", "expires": "2026-12-31T00:00:00Z"},
    ),
    _c(NOV + "3T10:00:00.000Z", "aggregate", "tax", "L3", PURPOSE, epsilon="0.5", **_spent("0.5")),
    _c(NOV + "3T10:01:00.000Z", "aggregate", "tax", "L3", PURPOSE, epsilon="0.25", **_spent(".75")),
    _c(NOV + "3T10:02:00.000Z", "psi_cardinality", "tax", "L3", PURPOSE, y_count=240),
    _e(
        NOV + "3T10:02:00.000Z",
        "psi.session_opened",
        C,
        {"zone": "tax", "dataset": "companies", "session": "psi_1"},
        {"level": "L3", "purpose": PURPOSE, "mode": "cardinality", "x_count": 32},
    ),
    _e(
        NOV + "3T10:03:00.000Z",
        "psi.session_opened",
        C,
        {"zone": "tax", "dataset": "companies", "session": "psi_2"},
        {"level": "L3", "purpose": PURPOSE, "mode": "cardinality", "x_count": 50},
    ),
    _e(
        NOV + "3T10:04:00.000Z",
        "psi.session_failed",
        C,
        {"zone": "tax", "dataset": "companies", "session": "psi_2"},
        {"mode": "cardinality", "reason": "too_small"},
    ),
    _e(
        NOV + "4T10:00:00.000Z",
        "access.denied",
        C,
        {"zone": "tax", "dataset": "companies"},
        {"reason": "level_ceiling", "level": "L3", "purpose": PURPOSE, "rule": "ceiling:L3:export"},
    ),
    _e(
        NOV + "4T10:01:00.000Z",
        "access.denied",
        C,
        {"zone": "health", "dataset": "visits"},
        {"reason": "not_granted", "level": "L4", "purpose": "research", "rule": ""},
    ),
    _e(NOV + "4T11:00:00.000Z", "request.rejected", D, {}, {"reason": "bad_signature"}),
    _e(
        NOV + "4T11:01:00.000Z",
        "request.rejected.summary",
        "-",
        {},
        {"since": "x", "count.stale": 3, "count.bad_signature": 2},
    ),
    _e(
        NOV + "4T11:02:00.000Z",
        "request.refused",
        C,
        {},
        {"code": "query_rejected", "reason": "row_level_output", "status": 422},
    ),
    _e(
        NOV + "4T11:03:00.000Z",
        "request.refused.summary",
        "-",
        {},
        {"since": "x", "count.invalid_input.missing": 4, f"actor.{C}": 4},
    ),
    _e("2026-11-10T00:00:00.000Z", "grant.revoked", P, {"grant": "grant:1", "zone": "tax"}),
    _c("2026-11-11T00:00:00.000Z", "he_score", "health", "L4", "research", entities=7),
    _e(
        "2026-11-12T00:00:00.000Z",
        "incident.opened",
        M,
        {"incident": "inc-1", "principal": C, "zone": "tax"},
        {"detector": "epsilon_burn", "response": "suspend", "severity": "high"},
    ),
    _e("2026-11-12T00:00:01.000Z", "principal.suspended", M, {"principal": C, "incident": "inc-1"}),
    _e("2026-11-12T00:00:02.000Z", "zone.suspended", P, {"zone": "health"}),
    _e(
        "2026-11-13T00:00:00.000Z", "incident.labelled", P, {"incident": "inc-1"}, {"label": "true"}
    ),
    _e(
        "2026-11-14T00:00:00.000Z",
        "xborder.decision",
        C,
        {"zone": "tax", "dataset": "companies", "provider": P},
        {"decision": "refuse", "basis": "sensitive_pi", "pi": "sensitive"},
    ),
    _e("2026-11-15T00:00:00.000Z", "report.published", P, {"report": "r-1"}, {"period": "2026-10"}),
    _c("2026-12-01T00:00:00.000Z", "aggregate", "tax", "L3", PURPOSE, epsilon="1"),
    _e("2026-12-02T00:00:00.000Z", "ledger.exported", P),
]

#: every row of the November report, in its order (consumer C's key id written as C)
EXPECTED_NOVEMBER = """\
period,measure,zone,level,purpose,consumer,kind_or_reason,value
2026-11,computations,health,L4,research,C,he_score,1
2026-11,computations,tax,L3,credit-assessment,C,aggregate,2
2026-11,computations,tax,L3,credit-assessment,C,psi_cardinality,1
2026-11,epsilon.spent,tax,L3,credit-assessment,C,,0.75
2026-11,epsilon.left,tax,,,C,companies,1.25
2026-11,denials.policy,health,L4,research,C,not_granted,1
2026-11,denials.policy,tax,L3,credit-assessment,C,level_ceiling,1
2026-11,denials.authentication,,,,,bad_signature,2
2026-11,denials.authentication,,,,,stale,3
2026-11,denials.authentication,,,,D,bad_signature,1
2026-11,denials.refused,,,,,invalid_input/missing,4
2026-11,denials.refused,,,,C,query_rejected/row_level_output,1
2026-11,psi.sessions,tax,L3,credit-assessment,C,cardinality,2
2026-11,psi.ids_sent,tax,L3,credit-assessment,C,cardinality,82
2026-11,psi.ids_sent.max,tax,L3,credit-assessment,C,cardinality,50
2026-11,psi.provider_ids.max,tax,L3,credit-assessment,C,psi_cardinality,240
2026-11,psi.sessions_ended,tax,,,C,failed,1
2026-11,scorings,health,L4,research,C,released,1
2026-11,scorings.entities,health,L4,research,C,,7
2026-11,grants.opened,health,,research,C,,1
2026-11,grants.opened,tax,,credit-assessment,C,,1
2026-11,grants.revoked,tax,,credit-assessment,C,,1
2026-11,grants.expired,tax,,credit-assessment,C,,1
2026-11,approval.latency.count,health,,research,,,1
2026-11,approval.latency.count,tax,,credit-assessment,,,1
2026-11,approval.latency.median_ms,health,,research,,,30000
2026-11,approval.latency.median_ms,tax,,credit-assessment,,,10000
2026-11,approval.latency.max_ms,health,,research,,,30000
2026-11,approval.latency.max_ms,tax,,credit-assessment,,,10000
2026-11,suspensions,,,,C,principal/monitor,1
2026-11,suspensions,health,,,,zone,1
2026-11,incidents.opened,tax,,,C,epsilon_burn/suspend,1
2026-11,incidents.labelled,,,,,epsilon_burn/true,1
2026-11,xborder.decisions,tax,,,C,refuse/sensitive_pi,1
2026-11,reports.published,,,,,2026-10,1
""".replace(",C,", "," + C + ",").replace(",D,", "," + D + ",")


@dataclass
class Synthetic:
    path: Path
    log_key: str


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Synthetic:
    overrides = dict(enumerate(SYNTHETIC))
    for entry in overrides.values():
        entry["digests"] = {}
    bundle = build_bundle(len(SYNTHETIC), [10, len(SYNTHETIC)], overrides=overrides)
    path = tmp_path_factory.mktemp("synthetic") / "ledger.jsonl"
    path.write_bytes(bundle.data())
    return Synthetic(path, bundle.signer.verifier_key())


def test_november_measures_are_exact(synthetic: Synthetic) -> None:
    from crypto.note import NoteVerifier

    verifier = NoteVerifier.from_verifier_key(synthetic.log_key)
    report = report_from_bundle(synthetic.path, verifier, parse_period("2026-11"))
    assert report.to_csv() == EXPECTED_NOVEMBER
    assert (report.entries, report.entries_in_period) == (len(SYNTHETIC), len(SYNTHETIC) - 5)
    assert (report.first_seq, report.last_seq) == (3, len(SYNTHETIC) - 3)
    # the budget is on the ledger for every charge; the private join's epsilon is not
    assert report.notes == ("psi_epsilon_not_on_ledger",)
    # the same entries, read again, give the same bytes; the canonical JSON is RFC 8785
    again = report_from_bundle(synthetic.path, verifier, parse_period("2026-11"))
    assert again.canonical() == report.canonical()
    assert json.loads(report.canonical())["bundle_root"] == report.bundle_root
    assert canonicalize(json.loads(report.canonical())) == report.canonical()


def test_quarter_rows_are_per_month_and_later_entries_only_close_grants(
    synthetic: Synthetic,
) -> None:
    entries = [json.loads(line) for line in synthetic.path.read_bytes().splitlines()[:-2]]
    quarter = compute_report(entries, parse_period("2026Q4"))
    assert quarter.period.months == ("2026-10", "2026-11", "2026-12")
    assert quarter.total("computations", key="aggregate", period="2026-12") == 1
    assert quarter.total("computations", key="aggregate") == 3
    assert quarter.total("epsilon.spent") == 1.75
    # the December release records no window total: spent only, and the report says so
    assert quarter.select("epsilon.left", period="2026-12") == []
    assert "epsilon_budget_not_on_ledger" in quarter.notes
    # grant:0 was requested and opened in October and expired in November
    assert quarter.total("grants.opened", period="2026-10") == 1
    assert quarter.select("approval.latency.max_ms", period="2026-10")[0].value == "86400500"
    assert quarter.total("grants.expired", period="2026-11") == 1
    # grant:2 expires on 2026-12-31, after the last entry: not expired as far as the ledger shows
    assert quarter.total("grants.expired", period="2026-12") == 0
    # a month with nothing recorded
    empty = compute_report(entries, parse_period("2027-01"))
    assert empty.rows == () and empty.entries_in_period == 0 and empty.first_seq is None
    assert empty.to_csv() == ",".join(CSV_COLUMNS) + "\n"


def test_kinds_of_other_services_may_be_absent() -> None:
    plain = [{**e, "seq": i, "digests": {}} for i, e in enumerate(SYNTHETIC[:12])]
    report = compute_report(plain, parse_period("2026-11"))
    names = {m.measure for m in report.rows}
    assert "computations" in names
    assert not names & {"incidents.opened", "xborder.decisions", "reports.published"}


@pytest.mark.parametrize("text", ["2026-13", "2026-1", "2026Q5", "26Q4", "Q4 2026", "", "0000-01"])
def test_bad_periods_are_one_readable_error(text: str) -> None:
    with pytest.raises(PeriodError, match="YYYY-MM"):
        parse_period(text)


# -- a real exchange's bundle -----------------------------------------------------------------


@dataclass
class World:
    server: LiveServer
    tmp: Path
    keys: dict[str, Path]
    bundle: Path
    log_pub: Path
    out: Path
    period: str
    build_output: str


def _month_of(bundle: Path, kind: str) -> str:
    for line in bundle.read_bytes().splitlines():
        entry = json.loads(line)
        if entry.get("kind") == kind:
            return str(entry["time"][:7])
    raise AssertionError(f"no {kind} entry")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """A tax bureau's L3 zone, a bank with a grant for aggregates and PSI cardinality, one
    DP aggregate, one PSI session, a denied export, a refused query, a revoked grant; the
    auditor exports the ledger and builds the month's report with the CLI."""
    tmp = tmp_path_factory.mktemp("reports")
    data_dir = tmp / "exchange"
    with live_exchange(data_dir) as server:
        keys = {n: SigningKey.generate() for n in ("provider", "consumer", "auditor")}
        with server.client(server.operator) as op:
            op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
            op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
            op.register_principal("City Audit Office", "auditor", keys["auditor"].public_key)
        with server.client(keys["provider"]) as p:
            p.create_zone("tax", "tax records")
            p.register_dataset(
                "tax",
                "companies",
                levels=L3_LEVELS,
                subject_column="company_id",
                file=EXAMPLES / "companies.csv",
            )
        with server.client(keys["consumer"]) as c:
            req = c.request_access(
                "tax",
                ["companies"],
                ["aggregate", "psi_cardinality"],
                PURPOSE,
                duration_seconds=86400,
                justification="credit line review",
            )
        with server.client(keys["provider"]) as p:
            grant = p.approve(req["id"])["grant_id"]
        with server.client(keys["consumer"]) as c:
            sql = "SELECT district, COUNT(*) AS n FROM companies GROUP BY district"
            c.aggregate("tax", sql, PURPOSE, epsilon="0.5")
            with pytest.raises(ApiError):
                c.export("tax", "companies", PURPOSE)  # above the L3 ceiling: denied
            with pytest.raises(ApiError):
                c.aggregate("tax", "SELECT * FROM companies", PURPOSE)  # rows: refused
            with (EXAMPLES / "companies.csv").open(encoding="utf-8") as f:
                ids = [row["company_id"] for row in csv.DictReader(f)][:30]
            c.psi_join("tax", "companies", "cardinality", ids, PURPOSE, epsilon="0.5")
        with server.client(keys["provider"]) as p:
            p.revoke(grant, "review finished")
        paths = {}
        for name, key in keys.items():
            paths[name] = tmp / f"{name}.key"
            write_private_key(paths[name], key)
        bundle, log_pub = tmp / "ledger.jsonl", data_dir / "log.pub"
        code, output = cli(
            "ledger", "export", "--out", str(bundle), "--url", server.url,
            "--key", str(paths["auditor"]),
        )  # fmt: skip
        assert code == 0, output
        period = _month_of(bundle, "computation.aggregate")
        out = tmp / "report"
        code, output = cli(
            "report", "--bundle", str(bundle), "--log-key", str(log_pub),
            "--month", period, "--out", str(out),
        )  # fmt: skip
        assert code == 0, output
        yield World(server, tmp, paths, bundle, log_pub, out, period, output)


def test_build_writes_all_four_files(world: World) -> None:
    for name in ("report.json", "report.csv", "report.html", "report.pdf"):
        assert (world.out / name).stat().st_size > 0, name
    assert f"report {world.period}:" in world.build_output


def test_measures_of_the_real_workflow(world: World) -> None:
    doc = json.loads((world.out / "report.json").read_bytes())
    rows = list(csv.DictReader(io.StringIO((world.out / "report.csv").read_text("utf-8"))))
    assert [list(r) for r in rows[:1]] == [list(CSV_COLUMNS)]
    assert len(rows) == len(doc["measures"])

    def value(measure: str, key: str = "") -> str | None:
        found = [r["value"] for r in rows if r["measure"] == measure and r["kind_or_reason"] == key]
        assert len(found) <= 1
        return found[0] if found else None

    def here(kind: str) -> bool:  # a run that crosses midnight at a month's end splits
        return _month_of(world.bundle, kind) == world.period

    assert value("computations", "aggregate") == "1"
    if here("computation.psi_cardinality"):
        assert value("computations", "psi_cardinality") == "1"
        assert value("psi.sessions", "cardinality") == "1"
        assert value("psi.ids_sent", "cardinality") == "30"
        assert value("psi.provider_ids.max", "psi_cardinality") == "240"
    # the aggregate's and the private join's epsilon, of the default budget (no rules set: 1)
    assert value("epsilon.spent") == "1"
    assert value("epsilon.left", "companies") == "0"
    if here("access.denied"):
        assert value("denials.policy", "level_ceiling") == "1"
    if here("request.refused"):
        assert value("denials.refused", "query_rejected/row_level_output") == "1"
    if here("grant.created"):
        assert value("grants.opened") == "1"
        assert int(value("approval.latency.max_ms") or -1) >= 0
    if here("grant.revoked"):
        assert value("grants.revoked") == "1"
    # kinds this workflow does not produce have no rows, and nothing failed for their absence
    assert value("incidents.opened") is None and value("xborder.decisions") is None
    consumer = {r["consumer"] for r in rows if r["measure"] == "computations"}
    assert len(consumer) == 1 and re.fullmatch(r"[0-9a-f]{64}", consumer.pop())


def test_json_and_csv_are_byte_identical_across_runs(world: World) -> None:
    again = world.tmp / "again"
    code, output = cli(
        "report", "--bundle", str(world.bundle), "--log-key", str(world.log_pub),
        "--month", world.period, "--out", str(again),
    )  # fmt: skip
    assert code == 0, output
    for name in ("report.json", "report.csv"):
        assert (again / name).read_bytes() == (world.out / name).read_bytes(), name


def test_html_is_self_contained_with_inline_charts_and_chinese(world: World) -> None:
    page = (world.out / "report.html").read_text("utf-8")
    assert page.count("<svg") >= 3  # computations, denials, epsilon
    assert 'id="chart-computations"' in page and 'id="chart-epsilon"' in page
    # nothing from a network or a file beside it: no URL at all, no script, no stylesheet link
    assert not re.search(r"https?://", page, re.IGNORECASE)
    assert not re.search(r"""(src|href)\s*=""", page) and "<link" not in page
    assert "<script" not in page
    assert "月报" in page and "Monthly report" in page and "策略拒绝" in page


def test_pdf_has_chinese_headings_and_the_key_figures(world: World) -> None:
    reader = pypdf.PdfReader(world.out / "report.pdf")
    text = "".join(page.extract_text() for page in reader.pages)
    # pypdf reads a NUL before each glyph of the CJK (CFF, Identity-H) font fpdf2 embeds
    flat = "".join(text.replace("\x00", "").split())
    assert "月报" in flat and "汇总" in flat and "计算次数" in flat
    doc = json.loads((world.out / "report.json").read_bytes())
    digest = __import__("hashlib").sha256((world.out / "report.json").read_bytes()).hexdigest()
    assert digest in flat and doc["bundle_root"] in flat
    # the summary table's rows: measure (Chinese and English), kind, value
    spent = next(m["value"] for m in doc["measures"] if m["measure"] == "epsilon.spent")
    assert "计算次数Computationsaggregate1" in flat
    assert f"ε消耗εspent—{spent}" in flat
    assert any(page.images for page in reader.pages)  # the charts


def test_verify_matches_then_names_a_changed_measure(world: World) -> None:
    code, output = cli(
        "report", "verify", str(world.out), "--bundle", str(world.bundle),
        "--log-key", str(world.log_pub),
    )  # fmt: skip
    assert code == 0 and output.startswith("OK: report.json and report.csv match"), output
    changed = world.tmp / "changed"
    changed.mkdir()
    doc = json.loads((world.out / "report.json").read_bytes())
    spent = next(m for m in doc["measures"] if m["measure"] == "epsilon.spent")
    recomputed, spent["value"] = spent["value"], "0.05"
    (changed / "report.json").write_bytes(canonicalize(doc))
    code, output = cli(
        "report", "verify", str(changed), "--bundle", str(world.bundle),
        "--log-key", str(world.log_pub),
    )  # fmt: skip
    assert code == 1
    assert "epsilon.spent" in output and f"0.05 in the file, {recomputed} recomputed" in output
    assert "Traceback" not in output
    # a CSV row changed while report.json is intact
    (changed / "report.json").write_bytes((world.out / "report.json").read_bytes())
    text = (world.out / "report.csv").read_text("utf-8")
    (changed / "report.csv").write_text(text.replace(",aggregate,1", ",aggregate,2"), "utf-8")
    code, output = cli(
        "report", "verify", str(changed), "--bundle", str(world.bundle),
        "--log-key", str(world.log_pub),
    )  # fmt: skip
    assert code == 1 and "report.csv:" in output and "aggregate,2" in output, output
    # report.json re-serialized (not canonical) is refused as changed
    (changed / "report.json").write_text(json.dumps(doc, indent=1), "utf-8")
    code, output = cli(
        "report", "verify", str(changed), "--bundle", str(world.bundle),
        "--log-key", str(world.log_pub),
    )  # fmt: skip
    assert code == 1 and "canonical" in output


def test_a_bundle_that_does_not_verify_gets_no_report(world: World) -> None:
    lines = world.bundle.read_bytes().splitlines(keepends=True)
    tampered = world.tmp / "tampered.jsonl"
    at = next(i for i, line in enumerate(lines) if b'"computation.aggregate"' in line)
    lines[at] = lines[at].replace(b'"epsilon":"0.5"', b'"epsilon":"0.1"')
    tampered.write_bytes(b"".join(lines))
    out = world.tmp / "never"
    code, output = cli(
        "report", "--bundle", str(tampered), "--log-key", str(world.log_pub),
        "--month", world.period, "--out", str(out),
    )  # fmt: skip
    assert code == 1 and "does not verify" in output and "prev_mismatch" in output
    assert not out.exists() and "Traceback" not in output
    code, output = cli(
        "report", "--bundle", str(world.bundle), "--log-key", str(world.log_pub),
        "--month", "2026-13", "--out", str(out),
    )  # fmt: skip
    assert code == 1 and "YYYY-MM" in output and len(output.strip().splitlines()) == 1


def test_publish_records_the_report_and_verify_finds_it(world: World) -> None:
    code, output = cli(
        "report", "publish", str(world.out), "--exchange", world.server.url,
        "--key", str(world.keys["auditor"]),
    )  # fmt: skip
    assert code == 0 and "published report-" in output, output
    published = json.loads((world.out / "published.json").read_text("utf-8"))
    data = (world.out / "report.json").read_bytes()
    digest = __import__("hashlib").sha256(data).hexdigest()
    entry = world.server.exchange.ledger.entry(published["seq"])
    recorded = json.loads(entry)
    assert recorded["kind"] == "report.published"
    assert recorded["refs"] == {"report": published["id"]}
    assert recorded["digests"]["report"] == digest
    assert recorded["attrs"] == {
        "period": world.period,
        "bundle_size": json.loads(data)["bundle_size"],
    }
    # a newer bundle holds the entry: verify recomputes over the first bundle_size entries
    newer = world.tmp / "newer.jsonl"
    code, output = cli(
        "ledger", "export", "--out", str(newer), "--url", world.server.url,
        "--key", str(world.keys["auditor"]),
    )  # fmt: skip
    assert code == 0, output
    code, output = cli(
        "report", "verify", str(world.out), "--bundle", str(newer), "--log-key", str(world.log_pub)
    )
    assert code == 0 and f"published on the ledger as entry {published['seq']}" in output, output
    # someone records another digest for this period and size: verify names that entry
    doc = json.loads(data)
    forged = {k: doc[k] for k in ("period", "bundle_size", "bundle_root")}
    response = _post(world, world.keys["auditor"], {**forged, "digest": "ab" * 32})
    assert response.status_code == 201, response.text
    newest = world.tmp / "newest.jsonl"
    code, output = cli(
        "ledger", "export", "--out", str(newest), "--url", world.server.url,
        "--key", str(world.keys["auditor"]),
    )  # fmt: skip
    assert code == 0, output
    code, output = cli(
        "report", "verify", str(world.out), "--bundle", str(newest), "--log-key", str(world.log_pub)
    )
    assert code == 1 and f"entry {response.json()['seq']}" in output
    assert "recordsdigest" + "ab" * 32 in "".join(output.split())


def _post(world: World, key_path: Path, body: dict[str, Any]) -> httpx.Response:
    from exchange.keyfile import load_private_key

    auth = SignatureAuth(load_private_key(key_path))
    return httpx.post(f"{world.server.url}/v1/reports", json=body, auth=auth, timeout=20)


def test_only_the_operator_and_auditors_publish(world: World) -> None:
    doc = json.loads((world.out / "report.json").read_bytes())
    body = {
        "period": doc["period"],
        "bundle_size": doc["bundle_size"],
        "bundle_root": doc["bundle_root"],
        "digest": "ab" * 32,
    }
    for who in ("consumer", "provider"):
        response = _post(world, world.keys[who], body)
        assert response.status_code == 403, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["code"] == "forbidden"
    # a root that is not the ledger's at that size: another history
    response = _post(world, world.keys["auditor"], {**body, "bundle_root": "00" * 32})
    assert response.status_code == 422 and response.json()["reason"] == "root_mismatch"
    response = _post(world, world.keys["auditor"], {**body, "bundle_size": 10**9})
    assert response.status_code == 422 and response.json()["reason"] == "bad_size"
    response = _post(world, world.keys["auditor"], {**body, "period": "2026Q9"})
    assert response.status_code == 422 and response.json()["reason"] == "bad_period"
    # the operator may
    response = _post(world, world.server.data_dir / "operator.key", body)
    assert response.status_code == 201, response.text
    assert response.json()["publisher"] == world.server.operator.key_id
