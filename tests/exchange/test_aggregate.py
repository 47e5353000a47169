"""Clean-room SQL aggregates on a real server: analysis rules, k suppression, differential
privacy budgets charged exactly under concurrency, receipts verified offline, and queries that
try to reach around the rules."""

from __future__ import annotations

import csv
import dataclasses
import json
import statistics
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto.errors import VerificationError
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange import budget
from exchange.analysis import AnalysisRules, ColumnRule, Disclosure
from exchange.dp import DpMechanisms
from exchange.errors import BudgetExhaustedError
from exchange.models import BudgetRow, GrantRow
from exchange.sdk import ApiError
from exchange.sqlcheck import TableColumn, TableRules, TableStats, check_query, postprocess
from exchange.storage import WRITE
from policy.levels import Level
from tests.conftest import LiveServer
from tests.exchange.test_access import EXAMPLES, L3_LEVELS, PURPOSE, entries, granted

SQL = (
    "SELECT district, COUNT(*) AS n, AVG(tax_paid_2025) AS avg_tax FROM companies GROUP BY district"
)
TAX_BOUNDS = {"lower": "0", "upper": "2000000"}


def _rules(**overrides: Any) -> dict[str, Any]:
    rules: dict[str, Any] = {
        "min_group_size": 10,
        "columns": {
            "company_id": {"disclosure": "join_only"},
            "district": {"disclosure": "plaintext"},
            "industry": {"disclosure": "plaintext"},
            "founded_year": {"disclosure": "plaintext"},
            "employees": {"disclosure": "plaintext", "lower": "0", "upper": "5000"},
            "registered_capital": {"disclosure": "after_aggregate"},
            "tax_paid_2025": {"disclosure": "after_aggregate", **TAX_BOUNDS},
        },
    }
    rules.update(overrides)
    return rules


def _companies() -> list[dict[str, str]]:
    with (EXAMPLES / "companies.csv").open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def parties(server: LiveServer) -> dict[str, SigningKey]:
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
        p.register_dataset(
            "tax",
            "companies",
            levels=L3_LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    return keys


def _grant(server: LiveServer, keys: dict[str, SigningKey]) -> None:
    granted(server, keys, ["companies"], ["aggregate"])


def test_rules_are_versioned_checked_and_ledgered(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c:
        defaults = c.analysis_rules("tax", "companies")
        assert defaults["default"] is True and defaults["version"] == 0
        # defaults follow the levels: L3 after_aggregate, subject join_only, no bounds
        assert defaults["rules"]["columns"]["tax_paid_2025"]["disclosure"] == "after_aggregate"
        assert defaults["rules"]["columns"]["tax_paid_2025"]["upper"] is None
        with pytest.raises(ApiError) as exc:
            c.set_analysis_rules("tax", "companies", _rules())
        assert exc.value.status == 403
    with server.client(parties["provider"]) as p:
        first = p.set_analysis_rules("tax", "companies", _rules())
        second = p.set_analysis_rules("tax", "companies", _rules(min_group_size=20))
        assert (first["version"], second["version"]) == (1, 2)
        assert p.analysis_rules("tax", "companies")["rules"]["min_group_size"] == 20
        loosen = _rules()
        loosen["columns"]["tax_paid_2025"] = {"disclosure": "plaintext"}
        for bad in (
            loosen,
            _rules(min_group_size=1),
            _rules(epsilon_budget=0.5),  # floats are refused: decimal strings only
            _rules(columns={"no_such_column": {"disclosure": "plaintext"}}),
        ):
            with pytest.raises(ApiError) as exc:
                p.set_analysis_rules("tax", "companies", bad)
            assert exc.value.status == 422 and exc.value.body["type"].startswith("urn:zonex")
        # a refused change leaves the stored rules as they were
        assert p.analysis_rules("tax", "companies")["version"] == 2
    logged = entries(server, "analysis.rules_set")
    assert [e["attrs"]["version"] for e in logged] == [1, 2]
    assert all(len(e["digests"]["rules"]) == 64 for e in logged)


def test_aggregate_exact_suppressed_and_receipted(
    server: LiveServer, parties: dict[str, SigningKey], tmp_path: Path
) -> None:
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    with server.client(parties["consumer"]) as c:
        with pytest.raises(ApiError) as exc:
            c.aggregate("tax", SQL, PURPOSE)
        assert exc.value.status == 403 and exc.value.code == "denied"
        _grant(server, parties)
        out = c.aggregate("tax", SQL, PURPOSE)
        by_two = c.aggregate(
            "tax",
            "SELECT district, industry, COUNT(*) FROM companies GROUP BY district, industry",
            PURPOSE,
        )
    result = out["result"]
    assert result["columns"] == ["district", "n", "avg_tax"]
    assert result["epsilon"] == "0" and result["level"] == "L3" and result["suppressed"] == 0
    rows = _companies()
    groups: dict[str, list[int]] = defaultdict(list)
    for r in rows:
        groups[r["district"]].append(min(2_000_000, int(r["tax_paid_2025"])))
    assert {r[0] for r in result["rows"]} == set(groups)
    for district, n, avg in result["rows"]:
        assert n == len(groups[district])
        assert abs(Decimal(avg) - Decimal(sum(groups[district])) / n) < Decimal("1e-6")

    # 8 districts x 7 industries: many cells have fewer than 10 companies and are hidden
    two = by_two["result"]
    assert two["suppressed"] > 0
    assert all(row[2] >= 10 for row in two["rows"])
    assert len(two["rows"]) + two["suppressed"] == len(
        {(r["district"], r["industry"]) for r in rows}
    )

    statement, _ = verify_receipt(out["receipt"], result, server.log_verifier())
    assert statement["kind"] == "aggregate" and statement["k"] == 10
    assert statement["rules_version"] == {"companies": 1}
    assert statement["output_level"] == "L3" and statement["epsilon"] == "0"
    assert statement["grant"].startswith("grant:")
    tampered = json.loads(json.dumps(result))
    tampered["rows"][0][1] += 1
    with pytest.raises(VerificationError):
        verify_receipt(out["receipt"], tampered, server.log_verifier())
    # the ledger holds the computation, not the rows
    (entry,) = entries(server, "computation.aggregate")[:1]
    assert entry["attrs"]["groups"] == len(result["rows"])
    assert "huangpu" not in json.dumps(entries(server))


@pytest.mark.parametrize(
    ("sql", "reason"),
    [
        ("SELECT company_id, tax_paid_2025 FROM companies", "row_level_output"),
        ("SELECT COUNT(*) FROM companies; DROP TABLE companies", "multiple_statements"),
        (
            "SELECT district, COUNT(*) FROM companies GROUP BY district "
            "UNION SELECT company_id, 1 FROM companies",
            "set_operation",
        ),
        ("SELECT SUM(tax_paid_2025) FROM companies WHERE tax_paid_2025 > 900000", None),
        ("SELECT COUNT(*), (SELECT MAX(tax_paid_2025) FROM companies) FROM companies", None),
        ("SELECT SUM(CASE WHEN company_id = 'x' THEN tax_paid_2025 END) FROM companies", None),
        ("SELECT COUNT(*) FROM information_schema.tables", None),
        ('SELECT SUM("TAX_PAID_2025") FROM companies', None),
        ("SELECT district, COUNT(*) /* */ FROM companies GROUP BY district -- x\n; SELECT 1", None),
    ],
)
def test_queries_that_escape_the_rules_are_refused(
    server: LiveServer, parties: dict[str, SigningKey], sql: str, reason: str | None
) -> None:
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    _grant(server, parties)
    with server.client(parties["consumer"]) as c, pytest.raises(ApiError) as exc:
        c.aggregate("tax", sql, PURPOSE)
    assert exc.value.status == 422
    assert exc.value.code == "query_rejected"
    assert exc.value.body["type"] == "urn:zonex:problem:query_rejected"
    if reason is not None:
        assert exc.value.body["reason"] == reason
    assert entries(server, "computation.aggregate") == []


def test_dp_budget_is_charged_and_exhausted(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules(
            "tax", "companies", _rules(dp_required=True, epsilon_budget="1", refresh_seconds=3600)
        )
    _grant(server, parties)
    sql = "SELECT district, COUNT(*), SUM(tax_paid_2025) FROM companies GROUP BY district"
    with server.client(parties["consumer"]) as c:
        (before,) = c.budgets("tax")
        assert (before["budget"], before["spent"], before["remaining"]) == ("1", "0", "1")
        first = c.aggregate("tax", sql, PURPOSE, epsilon="0.4")
        res = first["result"]
        assert res["epsilon"] == "0.4"
        assert {n["mechanism"] for n in res["noise"]} == {"discrete_laplace", "laplace"}
        c.aggregate("tax", sql, PURPOSE)  # the default ε, 0.1
        c.aggregate("tax", sql, PURPOSE, epsilon="0.5")
        (after,) = c.budgets("tax")
        assert (after["spent"], after["remaining"]) == ("1", "0")
        with pytest.raises(ApiError) as exc:
            c.aggregate("tax", sql, PURPOSE, epsilon="0.01")
        assert exc.value.status == 429
        assert exc.value.body["type"] == "urn:zonex:problem:budget_exhausted"
        assert exc.value.body["remaining"] == "0"
        with pytest.raises(ApiError) as exc:
            c.aggregate("tax", sql, PURPOSE, epsilon="0.0.1")
        assert exc.value.status == 422
    statement, _ = verify_receipt(first["receipt"], first["result"], server.log_verifier())
    assert statement["epsilon"] == "0.4"
    assert len(entries(server, "computation.aggregate")) == 3


def test_budget_is_exact_under_eight_concurrent_clients(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules(
            "tax", "companies", _rules(dp_required=True, epsilon_budget="1", refresh_seconds=3600)
        )
    _grant(server, parties)
    sql = "SELECT industry, COUNT(*) FROM companies GROUP BY industry"

    def attempt(_: int) -> int:
        with server.client(parties["consumer"]) as c:
            try:
                c.aggregate("tax", sql, PURPOSE, epsilon="0.15")
                return 200
            except ApiError as exc:
                return exc.status

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(attempt, range(16)))
    # 6 x 0.15 = 0.9 fits in 1; a seventh would overspend
    assert statuses.count(200) == 6
    assert statuses.count(429) == 10
    with server.client(parties["consumer"]) as c:
        (state,) = c.budgets("tax")
    assert Decimal(state["spent"]) == Decimal("0.9")
    assert len(entries(server, "computation.aggregate")) == 6


def test_budget_refreshes_with_the_window(server: LiveServer) -> None:
    """The charge is per window; a new window starts with nothing spent."""
    engine = server.exchange.engine
    start = datetime(2026, 1, 1, tzinfo=UTC)
    args = ("key:consumer", "tax", "companies")
    with Session(engine) as session:
        for _ in range(4):
            budget.charge(session, *args, Decimal("0.25"), Decimal(1), 3600, now=start)
        with pytest.raises(BudgetExhaustedError):
            budget.charge(session, *args, Decimal("0.01"), Decimal(1), 3600, now=start)
        later = start + timedelta(seconds=3599)
        assert budget.remaining(session, *args, Decimal(1), 3600, now=later).remaining == 0
        fresh = start + timedelta(seconds=3600)
        state = budget.charge(session, *args, Decimal("0.5"), Decimal(1), 3600, now=fresh)
        assert state.spent == Decimal("0.5") and state.window_start == fresh
        session.commit()


def _table(rules: AnalysisRules) -> dict[str, TableRules]:
    columns = (
        TableColumn("company_id", "text", Level.L2),
        TableColumn("district", "text", Level.L1),
        TableColumn("founded_year", "integer", Level.L1),
        TableColumn("tax_paid_2025", "integer", Level.L3),
    )
    return {"companies": TableRules("companies", columns, "company_id", rules)}


def _rules_obj(dp: bool) -> AnalysisRules:
    return AnalysisRules(
        columns={
            "company_id": ColumnRule(Disclosure.JOIN_ONLY),
            "district": ColumnRule(Disclosure.PLAINTEXT),
            "founded_year": ColumnRule(Disclosure.PLAINTEXT),
            "tax_paid_2025": ColumnRule(Disclosure.AFTER_AGGREGATE, Decimal(0), Decimal(2_000_000)),
        },
        dp_required=dp,
    )


def _raw(sql: str, rows: list[dict[str, str]], rules: AnalysisRules, dp: bool) -> Any:
    """Check and rewrite ``sql`` and run it on DuckDB over ``rows``: (checked, raw rows)."""
    import duckdb

    checked = check_query(sql, _table(rules), with_dp=dp)
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE companies (company_id VARCHAR, district VARCHAR, founded_year BIGINT, "
        "tax_paid_2025 BIGINT)"
    )
    con.executemany(
        "INSERT INTO companies VALUES (?, ?, ?, ?)",
        [
            (r["company_id"], r["district"], int(r["founded_year"]), int(r["tax_paid_2025"]))
            for r in rows
        ],
    )
    sql_text = checked.sql
    params = dict(checked.params)
    for name in sorted(params, key=len, reverse=True):
        sql_text = sql_text.replace(f":{name}", f"${name}")
    return checked, con.execute(sql_text, params).fetchall()


def _run(sql: str, rows: list[dict[str, str]], rules: AnalysisRules) -> Any:
    checked, raw = _raw(sql, rows, rules, False)
    return postprocess(checked, raw)


def test_differencing_attack_yields_nothing_usable() -> None:
    """Two queries whose groups differ by exactly one subject: k hides a cut-down group, and
    with DP the difference of the sums is buried in noise far larger than the victim's value."""
    rows = _companies()
    cells: dict[tuple[str, int], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        cells[(r["district"], int(r["founded_year"]))].append(r)
    (district, year), (victim,) = next((k, v) for k, v in sorted(cells.items()) if len(v) == 1)
    all_q = "SELECT district, SUM(tax_paid_2025) FROM companies GROUP BY district"
    cut_q = (
        f"SELECT district, SUM(tax_paid_2025) FROM companies WHERE founded_year <> {year} "
        "GROUP BY district"
    )
    only_q = (
        f"SELECT district, SUM(tax_paid_2025) FROM companies WHERE founded_year = {year} "
        "GROUP BY district"
    )
    # the group holding only the victim is suppressed by k
    alone = _run(only_q, rows, _rules_obj(False))
    assert all(r[0] != district for r in alone.rows)
    assert alone.suppressed >= 1
    # k alone does not stop differencing two large groups (documented; L4 requires DP) ...
    exact_all = dict(_run(all_q, rows, _rules_obj(False)).rows)
    exact_cut = dict(_run(cut_q, rows, _rules_obj(False)).rows)
    assert Decimal(exact_all[district]) - Decimal(exact_cut[district]) == int(
        victim["tax_paid_2025"]
    )
    # ... with DP (ε = 1 per query) the difference is dominated by noise
    all_checked, all_raw = _raw(all_q, rows, _rules_obj(True), True)
    cut_checked, cut_raw = _raw(cut_q, rows, _rules_obj(True), True)
    dp = DpMechanisms(Decimal(1))
    diffs = []
    for _ in range(400):
        a = dict(postprocess(all_checked, all_raw, dp=dp).rows)
        b = dict(postprocess(cut_checked, cut_raw, dp=dp).rows)
        diffs.append(float(Decimal(a[district]) - Decimal(b[district])))
    spread = statistics.pstdev(diffs)
    # each sum gets Laplace noise of scale b = 2,000,000 / ε (std √2·b); the difference of two
    # independent draws has std 2·b = 4·10^6, some forty times a typical tax payment
    assert 3.2e6 < spread < 4.8e6
    assert spread > 4 * int(victim["tax_paid_2025"])


def _stats_table(stats: TableStats | None) -> dict[str, TableRules]:
    (rules,) = _table(_rules_obj(False)).values()
    return {"companies": dataclasses.replace(rules, stats=stats)}


@pytest.mark.parametrize("dp", [False, True])
def test_snapshot_statistics_only_skip_work_that_cannot_change_the_result(dp: bool) -> None:
    sql = "SELECT district, SUM(tax_paid_2025) FROM companies GROUP BY district"
    inside = TableStats(True, {"tax_paid_2025": (Decimal(0), Decimal(1_999_999))})
    outside = TableStats(True, {"tax_paid_2025": (Decimal(-1), Decimal(10))})
    repeated = TableStats(False, {"tax_paid_2025": (Decimal(0), Decimal(10))})
    fast = check_query(sql, _stats_table(inside), with_dp=dp)
    assert "DISTINCT" not in fast.sql and "LEAST" not in fast.sql and "ROW_NUMBER" not in fast.sql
    assert fast.contributions == (1 if dp else 0)
    clamped = check_query(sql, _stats_table(outside), with_dp=dp)
    assert "LEAST" in clamped.sql and "DISTINCT" not in clamped.sql
    for stats in (repeated, None):
        slow = check_query(sql, _stats_table(stats), with_dp=dp)
        assert "COUNT(DISTINCT" in slow.sql
        assert ("ROW_NUMBER" in slow.sql) is dp


def test_statistics_are_computed_per_snapshot(
    server: LiveServer, parties: dict[str, SigningKey], tmp_path: Path
) -> None:
    """Values above the declared bound are clamped (the range is outside), and a dataset whose
    subjects repeat keeps its distinct-subject count: results match a plaintext computation."""
    rows = _companies()
    doubled = tmp_path / "doubled.csv"
    with doubled.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + rows[:40])  # 40 companies appear twice
    with server.client(parties["provider"]) as p:
        p.register_dataset(
            "tax", "doubled", levels=L3_LEVELS, subject_column="company_id", file=doubled
        )
        p.set_analysis_rules(
            "tax",
            "doubled",
            _rules(
                columns={
                    **_rules()["columns"],
                    "tax_paid_2025": {
                        "disclosure": "after_aggregate",
                        "lower": "0",
                        "upper": "500000",
                    },
                }
            ),
        )
    granted(server, parties, ["doubled"], ["aggregate"])
    with server.client(parties["consumer"]) as c:
        out = c.aggregate(
            "tax",
            "SELECT district, COUNT(*), SUM(tax_paid_2025) FROM doubled GROUP BY district",
            PURPOSE,
        )["result"]
    all_rows = rows + rows[:40]
    expected: dict[str, list[int]] = defaultdict(list)
    for r in all_rows:
        expected[r["district"]].append(min(500_000, int(r["tax_paid_2025"])))
    assert any(int(r["tax_paid_2025"]) > 500_000 for r in all_rows)
    for district, n, total in out["rows"]:
        assert n == len(expected[district])
        assert Decimal(total) == sum(expected[district])


def test_same_file_with_other_levels_in_another_zone_gets_its_own_check(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    """The same CSV (same snapshot digest, same dataset name, default rules in both) registered
    with registered_capital at L2 in one zone and L3 in another: grouping by it is allowed in
    the first and must still be refused in the second, after the first was checked."""
    sql = "SELECT registered_capital, COUNT(*) FROM companies GROUP BY registered_capital"
    with server.client(parties["provider"]) as p:
        p.create_zone("sealed", "the same registry, capital graded L3")
        p.register_dataset(
            "sealed",
            "companies",
            levels={**L3_LEVELS, "registered_capital": "L3"},
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
        with server.client(parties["consumer"]) as c:
            req = c.request_access(
                "sealed",
                ["companies"],
                ["aggregate"],
                PURPOSE,
                duration_seconds=86400,
                justification="stats",
            )
        p.approve(req["id"])
    _grant(server, parties)
    with server.client(parties["consumer"]) as c:
        c.aggregate("tax", sql, PURPOSE)  # L2 there: plaintext, may be grouped by
        with pytest.raises(ApiError) as exc:
            c.aggregate("sealed", sql, PURPOSE)
        assert exc.value.status == 422 and exc.value.body["reason"] == "column_not_allowed"


@pytest.mark.parametrize("change", ["revoked", "expired"])
def test_grant_gone_before_release_refuses_the_result(
    server: LiveServer, parties: dict[str, SigningKey], change: str
) -> None:
    """A worker whose policy cache still allows the call (here: the grant row changed behind
    the cache's back) is refused at release, inside the ledger transaction: no result, no ε
    spent, the refusal ledgered."""
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    _grant(server, parties)
    with server.client(parties["consumer"]) as c:
        c.aggregate("tax", SQL, PURPOSE)  # allowed while the grant stands
        # a write transaction from the start (BEGIN IMMEDIATE on SQLite): it reads, then writes,
        # while the ledger's ticker may be committing a checkpoint
        with Session(server.exchange.engine.execution_options(**WRITE)) as s, s.begin():
            (row,) = s.execute(select(GrantRow)).scalars().all()
            grant_id = row.id
            if change == "revoked":
                row.status = "revoked"
            else:
                row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
        computed = len(entries(server, "computation.aggregate"))
        with pytest.raises(ApiError) as exc:
            c.aggregate("tax", SQL, PURPOSE, epsilon="0.5")
    assert exc.value.status == 403
    assert exc.value.body.get("reason") == ("not_granted" if change == "revoked" else "expired")
    assert len(entries(server, "computation.aggregate")) == computed
    denial = entries(server, "access.denied")[-1]
    assert denial["attrs"]["step"] == "release" and denial["attrs"]["rule"] == grant_id
    with Session(server.exchange.engine) as s:
        spent = s.execute(select(BudgetRow.spent)).scalars().all()
    assert all(Decimal(v) == 0 for v in spent)  # the refused ε = 0.5 was not charged
