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
from exchange.client.sdk import ApiError
from exchange.errors import BudgetExhaustedError
from exchange.node.analysis import AnalysisRules, ColumnRule, Disclosure
from exchange.node.dp import DpMechanisms
from exchange.node.sqlcheck import TableColumn, TableRules, TableStats, check_query, postprocess
from exchange.server import budget
from exchange.server.models import BudgetRow, GrantRow
from exchange.server.storage import WRITE
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
    """The provider opted out of DP by default (``exact_release``): exact values, an exact k
    gate, and the count of suppressed groups."""
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules(exact_release=True))
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
    assert statement["delta"] == "0" and result["gate"] is None
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


def test_a_charge_made_by_another_worker_still_refuses_the_overdraft(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    """This process's pre-check trusts the spend it last saw; a charge another worker made
    since (here, written straight to the database) is caught by the charge in the release's
    ledger transaction: 429, nothing released, nothing ledgered as a computation."""
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules(
            "tax", "companies", _rules(dp_required=True, epsilon_budget="1", refresh_seconds=3600)
        )
    _grant(server, parties)
    sql = "SELECT district, COUNT(*) FROM companies GROUP BY district"
    consumer = parties["consumer"].key_id
    with server.client(parties["consumer"]) as c:
        c.aggregate("tax", sql, PURPOSE, epsilon="0.3")  # seen here: 0.3 spent
        with Session(server.exchange.engine) as session:  # another worker spends 0.6 more
            budget.charge(session, consumer, "tax", "companies", Decimal("0.6"), Decimal(1), 3600)
            session.commit()
        with pytest.raises(ApiError) as exc:
            c.aggregate("tax", sql, PURPOSE, epsilon="0.2")  # 0.3 + 0.2 fits what was seen
        assert exc.value.status == 429
        assert exc.value.body["type"] == "urn:zonex:problem:budget_exhausted"
        (state,) = c.budgets("tax")
    assert Decimal(state["spent"]) == Decimal("0.9")
    assert len(entries(server, "computation.aggregate")) == 1


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
    """DP required, or the provider's opt-out from DP by default (exact releases)."""
    return AnalysisRules(
        columns={
            "company_id": ColumnRule(Disclosure.JOIN_ONLY),
            "district": ColumnRule(Disclosure.PLAINTEXT),
            "founded_year": ColumnRule(Disclosure.PLAINTEXT),
            "tax_paid_2025": ColumnRule(Disclosure.AFTER_AGGREGATE, Decimal(0), Decimal(2_000_000)),
        },
        dp_required=dp,
        exact_release=not dp,
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
    # ... with DP (ε = 1 per query) the difference is dominated by noise. The filters keep the
    # victim's district: one global group, gated at k
    dp_all = f"SELECT SUM(tax_paid_2025) FROM companies WHERE district = '{district}'"
    dp_cut = dp_all + f" AND founded_year <> {year}"
    all_checked, all_raw = _raw(dp_all, rows, _rules_obj(True), True)
    cut_checked, cut_raw = _raw(dp_cut, rows, _rules_obj(True), True)
    assert all_raw[0][-1] >= 24 and all_raw[0][0] - cut_raw[0][0] == int(victim["tax_paid_2025"])
    dp = DpMechanisms(Decimal(1))
    diffs = []
    for _ in range(400):
        a = postprocess(all_checked, all_raw, dp=dp).rows
        b = postprocess(cut_checked, cut_raw, dp=dp).rows
        if a and b:
            diffs.append(float(Decimal(a[0][0]) - Decimal(b[0][0])))
    # half of ε for the gate (scale 2, k = 10): a group of 23 or more fails it with probability
    # at most e^(-14/2) < 1e-3, so more than 100 of 400 trials lose a release with < 1e-200
    assert len(diffs) >= 300
    spread = statistics.pstdev(diffs)
    # each sum gets Laplace noise of scale b = 2,000,000 / 0.5 = 4·10^6 (std √2·b); the
    # difference of two independent draws has std 2·b = 8·10^6. The sample variance's relative
    # standard error is sqrt(3.5 / 300) < 0.11: the bounds below are more than six of them
    # away (a normal tail under 1e-9)
    assert 4.4e6 < spread < 11.2e6
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
                exact_release=True,
                columns={
                    **_rules()["columns"],
                    "tax_paid_2025": {
                        "disclosure": "after_aggregate",
                        "lower": "0",
                        "upper": "500000",
                    },
                },
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
        p.set_analysis_rules("tax", "companies", _rules(exact_release=True))
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


# -- privacy by construction: what no sequence of allowed calls may reveal -----------------------


def _lonely() -> tuple[str, int, list[dict[str, str]]]:
    """A district, a founding year that only one of its companies has, and the district's
    companies (the first is the one alone in that year)."""
    rows = _companies()
    cells: dict[tuple[str, int], list[dict[str, str]]] = defaultdict(list)
    for r in rows:
        cells[(r["district"], int(r["founded_year"]))].append(r)
    (district, year), (victim,) = next((k, v) for k, v in sorted(cells.items()) if len(v) == 1)
    others = [r for r in rows if r["district"] == district and r is not victim]
    return district, year, [victim, *others]


def _spent(server: LiveServer) -> tuple[Decimal, Decimal]:
    with Session(server.exchange.engine) as s:
        rows = s.execute(select(BudgetRow)).scalars().all()
    return sum((Decimal(r.spent) for r in rows), Decimal(0)), sum(
        (Decimal(r.delta_spent) for r in rows), Decimal(0)
    )


def test_differencing_at_l3_is_dp_by_default_and_charged(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    """The provider set bounds but no ``exact_release``: two SUMs whose filters differ by one
    company used to come back exact, their difference that company's tax. Now both are
    differentially private at the default ε, charged to the one budget, with receipts."""
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    _grant(server, parties)
    district, year, members = _lonely()
    both = f"SELECT SUM(tax_paid_2025) AS total FROM companies WHERE district = '{district}'"
    cut = both + f" AND founded_year <> {year}"
    with server.client(parties["consumer"]) as c:
        answers = [c.aggregate("tax", q, PURPOSE) for q in (both, cut)]
        (state,) = c.budgets("tax")
    exact = [
        sum(min(2_000_000, int(r["tax_paid_2025"])) for r in rows)
        for rows in (members, members[1:])
    ]
    for answer, value in zip(answers, exact, strict=True):
        result = answer["result"]
        assert result["epsilon"] == "0.1" and result["delta"] == "0"
        assert result["suppressed"] is None and result["gate"]["threshold"] == 10
        (noise,) = result["noise"]
        assert noise["mechanism"] == "laplace" and noise["epsilon"] == "0.05"
        # a released sum is the exact one only if its Laplace noise (scale 2e6 / 0.05 = 4e7)
        # rounds to 0 in a double near 1e7: probability below 1e-15
        for (total,) in result["rows"]:
            assert Decimal(total) != value
        statement, _ = verify_receipt(answer["receipt"], result, server.log_verifier())
        assert statement["epsilon"] == "0.1" and statement["delta"] == "0"
    assert state["spent"] == "0.2"


def test_membership_probe_at_k_is_gated_noisily_and_charged(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    """A group of exactly k companies, then the same group without one of them: an exact gate
    answers "released" then "suppressed", and told the consumer, for free, that the company is
    in the group. Under DP the decision is taken on a noisy count, the answer never says how
    many groups were suppressed, and every call is charged whether its group opened or not."""
    district, year, members = _lonely()
    k = len(members)
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules(min_group_size=k, epsilon_budget="10"))
    _grant(server, parties)
    whole = f"SELECT COUNT(*), SUM(tax_paid_2025) FROM companies WHERE district = '{district}'"
    probes = [whole, whole + f" AND founded_year <> {year}"] * 2
    with server.client(parties["consumer"]) as c:
        answers = [c.aggregate("tax", q, PURPOSE, epsilon="0.5") for q in probes]
        grouped = c.aggregate(
            "tax",
            "SELECT district, COUNT(*), SUM(tax_paid_2025) FROM companies GROUP BY district",
            PURPOSE,
            epsilon="0.5",
        )
    for answer in answers:
        result = answer["result"]
        assert result["suppressed"] is None and len(result["rows"]) <= 1
        assert result["gate"] == {
            "k": k,
            "threshold": k,  # one global group: fixed in advance, no δ
            "epsilon": "0.166666666666",
            "delta": None,
            "sensitivity": "1",
            "scale": result["gate"]["scale"],
        }
        statement, _ = verify_receipt(answer["receipt"], result, server.log_verifier())
        assert (statement["epsilon"], statement["delta"]) == ("0.5", "0")
    # GROUP BY finds its groups in the data: the gate spends the rules' δ (default 1e-7)
    result = grouped["result"]
    assert result["delta"] == "0.0000001" and result["gate"]["delta"] == "0.0000001"
    assert result["gate"]["threshold"] > k
    # charged for every call, suppressed or not: 5 x 0.5, and δ once
    assert _spent(server) == (Decimal("2.5"), Decimal("1e-7"))
    logged = entries(server, "computation.aggregate")
    assert len(logged) == 5 and all("suppressed" not in e["attrs"] for e in logged)


def test_identifier_and_text_extremes_are_refused(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    opened = _rules()
    opened["columns"]["company_id"] = {"disclosure": "after_aggregate"}
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", opened)
    _grant(server, parties)
    with server.client(parties["consumer"]) as c:
        for sql, reason in (
            ("SELECT MIN(company_id) FROM companies", "subject_value"),
            ("SELECT district, MAX(company_id) FROM companies GROUP BY district", "subject_value"),
            ("SELECT MAX(industry) FROM companies", "min_max_type"),
        ):
            with pytest.raises(ApiError) as exc:
                c.aggregate("tax", sql, PURPOSE)
            assert exc.value.status == 422 and exc.value.body["reason"] == reason
        counted = c.aggregate("tax", "SELECT COUNT(DISTINCT company_id) FROM companies", PURPOSE)
    assert counted["result"]["rows"] == [[len(_companies())]]  # L2: exact
    assert len(entries(server, "computation.aggregate")) == 1


@pytest.mark.parametrize(
    ("epsilon", "reason"),
    [
        ("1e-30", "bad_epsilon"),
        ("1E+999999999", "bad_epsilon"),
        ("0.0000000001", "bad_epsilon"),
        ("10.000000001", "bad_epsilon"),
        ("-1", "epsilon_below_floor"),
        ("0.000000001", "epsilon_below_floor"),
        ("0", "epsilon_below_floor"),
    ],
)
def test_extreme_epsilon_is_422_with_a_reason(
    server: LiveServer, parties: dict[str, SigningKey], epsilon: str, reason: str
) -> None:
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    _grant(server, parties)
    with server.client(parties["consumer"]) as c, pytest.raises(ApiError) as exc:
        c.aggregate("tax", "SELECT SUM(tax_paid_2025) FROM companies", PURPOSE, epsilon=epsilon)
    assert exc.value.status == 422 and exc.value.body["reason"] == reason
    assert entries(server, "computation.aggregate") == []
    assert _spent(server) == (0, 0)


def test_the_release_floor_comes_from_the_settings(
    server: LiveServer, parties: dict[str, SigningKey], monkeypatch: pytest.MonkeyPatch
) -> None:
    from exchange.node import dp
    from exchange.server.compute import aggregate, secure_sum

    # one parser for ε: exchange.node.dp's, wherever an ε enters
    for module in (aggregate, secure_sum):
        assert getattr(module, "parse_epsilon", dp.parse_epsilon) is dp.parse_epsilon
    raised = server.exchange.settings.model_copy(update={"min_release_epsilon": Decimal("0.2")})
    monkeypatch.setattr(server.exchange, "settings", raised)
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    _grant(server, parties)
    sql = "SELECT SUM(tax_paid_2025) FROM companies"
    with server.client(parties["consumer"]) as c:
        with pytest.raises(ApiError) as exc:
            c.aggregate("tax", sql, PURPOSE, epsilon="0.1")
        assert exc.value.body["reason"] == "epsilon_below_floor"
        # the default ε (0.1) is lifted to the floor
        assert c.aggregate("tax", sql, PURPOSE)["result"]["epsilon"] == "0.2"


def test_exact_release_is_the_providers_ledgered_opt_out_shown_in_the_catalog(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    def release(c: Any) -> str | None:
        (zone,) = [z for z in c.catalog()["zones"] if z["name"] == "tax"]
        (d,) = zone["datasets"]
        assert d["exact_release"] is (d["release_note"] is not None)
        return d["release_note"]  # type: ignore[no-any-return]

    sql = "SELECT district, SUM(tax_paid_2025) FROM companies GROUP BY district"
    _grant(server, parties)
    with server.client(parties["consumer"]) as c, server.client(parties["provider"]) as p:
        assert release(c) is None
        p.set_analysis_rules("tax", "companies", _rules(exact_release=True))
        assert release(c) == "exact: differencing possible"
        exact = c.aggregate("tax", sql, PURPOSE)["result"]
        assert exact["epsilon"] == "0" and exact["suppressed"] == 0 and exact["gate"] is None
        p.set_analysis_rules("tax", "companies", _rules())
        assert release(c) is None
        private = c.aggregate("tax", sql, PURPOSE)["result"]
        assert private["epsilon"] == "0.1" and private["suppressed"] is None
    logged = entries(server, "analysis.rules_set")
    assert len(logged) == 2  # the opt-out and its withdrawal are both on the ledger


def test_the_cli_warns_when_a_provider_opts_out_and_shows_it_in_the_catalog(
    server: LiveServer, parties: dict[str, SigningKey], tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from exchange.cli import app
    from exchange.keyfile import write_private_key

    paths = {}
    for name in ("provider", "consumer"):
        paths[name] = tmp_path / f"{name}.key"
        write_private_key(paths[name], parties[name])
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(_rules(exact_release=True)))

    def run(key: str, *args: str) -> str:
        out = CliRunner().invoke(
            app, [*args, "--url", server.url, "--key", str(paths[key])], catch_exceptions=False
        )
        assert out.exit_code == 0, out.output
        return out.output

    text = run("provider", "dataset", "rules", "tax", "companies", "--set", str(rules))
    assert "warning" in text.lower() and "differencing" in text
    shown = run("consumer", "catalog")
    assert "exact:" in shown and "differencing" in shown  # the table may wrap the note
    rules.write_text(json.dumps(_rules()))
    text = run("provider", "dataset", "rules", "tax", "companies", "--set", str(rules))
    assert "warning" not in text.lower()
