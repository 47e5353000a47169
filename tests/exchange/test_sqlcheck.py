"""The clean-room SQL checker: hostile queries are refused with the right reason, accepted ones
are rewritten into parameterized SQL that runs on a real DuckDB and matches a plain Python
computation, and k-suppression plus DP noise defeat a differencing attack."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import date
from decimal import Decimal, localcontext
from typing import Any

import pytest
import sqlglot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text
from sqlglot import exp

from exchange.errors import InvalidInputError
from exchange.node.analysis import AnalysisRules, ColumnRule, Disclosure
from exchange.node.dp import DpMechanisms
from exchange.node.sqlcheck import (
    K_COLUMN,
    REASONS,
    AggregateResult,
    CheckedQuery,
    QueryRejected,
    TableColumn,
    TableRules,
    check_query,
    postprocess,
)
from policy.levels import Level

D = Decimal
X = Disclosure
L1, L2, L3, L4, CORE = Level.L1, Level.L2, Level.L3, Level.L4, Level.CORE
TAX_UPPER = D(90000)

TAX_COLUMNS = (
    TableColumn("company_id", "text", L2),
    TableColumn("district", "text", L1),
    TableColumn("year", "integer", L1),
    TableColumn("tax_paid", "decimal", L3),
    TableColumn("employees", "integer", L3),
    TableColumn("sector", "text", L2),
    TableColumn("secret", "text", CORE),
)
TAX_RULES = AnalysisRules(
    columns={
        "company_id": ColumnRule(X.JOIN_ONLY),
        "district": ColumnRule(X.PLAINTEXT),
        "year": ColumnRule(X.PLAINTEXT),
        "tax_paid": ColumnRule(X.AFTER_AGGREGATE, D(0), TAX_UPPER),
        "employees": ColumnRule(X.AFTER_AGGREGATE),
        "sector": ColumnRule(X.FILTER_ONLY),
        "secret": ColumnRule(X.NONE),
    },
    min_group_size=5,
    # the provider's opt-out from DP by default at L3: exact releases, differencing possible
    exact_release=True,
)
TAX = TableRules("tax_records", TAX_COLUMNS, "company_id", TAX_RULES, zone="tax")
# the same table under the release mode a provider gets unless it opts out: DP at L3 and above
TAX_DEFAULT = TableRules(
    "tax_default",
    TAX_COLUMNS,
    "company_id",
    AnalysisRules(columns=TAX_RULES.columns, min_group_size=5),
    zone="tax",
    relation="tax_records",
)
# ... and with no δ for a gate over groups found in the data: a DP GROUP BY is refused
TAX_NO_DELTA = TableRules(
    "tax_no_delta",
    TAX_COLUMNS,
    "company_id",
    AnalysisRules(columns=TAX_RULES.columns, min_group_size=5, delta=D(0)),
    zone="tax",
    relation="tax_records",
)

COMPANY_RULES = AnalysisRules(
    columns={
        "company_id": ColumnRule(X.JOIN_ONLY),
        "industry": ColumnRule(X.PLAINTEXT),
        "region": ColumnRule(X.PLAINTEXT),
        "capital": ColumnRule(X.AFTER_AGGREGATE, D(0), D(10_000_000)),
        "listed": ColumnRule(X.PLAINTEXT),
        "founded": ColumnRule(X.PLAINTEXT),
    },
    min_group_size=5,
    exact_release=True,
)
COMPANIES = TableRules(
    "companies",
    (
        TableColumn("company_id", "text", L2),
        TableColumn("industry", "text", L1),
        TableColumn("region", "text", L1),
        TableColumn("capital", "decimal", L3),
        TableColumn("listed", "boolean", L1),
        TableColumn("founded", "date", L1),
    ),
    "company_id",
    COMPANY_RULES,
    zone="tax",
)

# the same physical table registered as sensitive personal information: L4, DP required
TAX_L4 = TableRules(
    "tax_l4",
    tuple(
        TableColumn(c.name, c.type, L4 if c.name == "tax_paid" else c.level) for c in TAX_COLUMNS
    ),
    "company_id",
    AnalysisRules(columns=TAX_RULES.columns, min_group_size=5, dp_required=True),
    zone="tax",
    relation="tax_records",
)
OTHER_ZONE = TableRules(
    "elsewhere",
    (TableColumn("company_id", "text", L2), TableColumn("x", "integer", L1)),
    "company_id",
    AnalysisRules(columns={"company_id": ColumnRule(X.JOIN_ONLY), "x": ColumnRule(X.PLAINTEXT)}),
    zone="other",
)
# subject columns a provider left open to aggregation (after_aggregate, even with bounds):
# identifiers are still never values
REGISTRY = TableRules(
    "registry",
    (TableColumn("company_id", "text", L2), TableColumn("district", "text", L1)),
    "company_id",
    AnalysisRules(
        columns={
            "company_id": ColumnRule(X.AFTER_AGGREGATE),
            "district": ColumnRule(X.PLAINTEXT),
        },
        min_group_size=5,
    ),
    zone="tax",
)
STAFF = TableRules(
    "staff",
    (TableColumn("staff_no", "integer", L2), TableColumn("district", "text", L1)),
    "staff_no",
    AnalysisRules(
        columns={
            "staff_no": ColumnRule(X.AFTER_AGGREGATE, D(0), D(1_000_000)),
            "district": ColumnRule(X.PLAINTEXT),
        },
        min_group_size=5,
    ),
    zone="tax",
)
# a table whose plaintext column holds another dataset's subject ids
PAYROLL = TableRules(
    "payroll",
    (
        TableColumn("pay_id", "text", L2),
        TableColumn("company_ref", "text", L2),
        TableColumn("staff_ref", "integer", L2),
    ),
    "pay_id",
    AnalysisRules(
        columns={
            "pay_id": ColumnRule(X.JOIN_ONLY),
            "company_ref": ColumnRule(X.PLAINTEXT),
            "staff_ref": ColumnRule(X.PLAINTEXT),
        },
        min_group_size=5,
    ),
    zone="tax",
)
TABLES = {
    t.name: t
    for t in (
        TAX,
        COMPANIES,
        TAX_L4,
        OTHER_ZONE,
        TAX_DEFAULT,
        TAX_NO_DELTA,
        REGISTRY,
        STAFF,
        PAYROLL,
    )
}

DISTRICTS = ("north", "south", "east", "west")
SECTORS = ("retail", "tech", "services")


# -- the data ------------------------------------------------------------------------------------


def district_of(i: int) -> str:
    return "tiny" if i < 3 else DISTRICTS[i % 4]


def tax_rows() -> list[dict[str, Any]]:
    rows = []
    for i in range(200):
        for year in (2024, 2025):
            if i % 17 == 0 and year == 2025:
                paid = None
            elif year == 2025:
                paid = D(i * 731 % 100_000) + D(i % 100) / 100
            else:
                paid = D(i * 373 % 95_000)
            rows.append(
                {
                    "company_id": f"c{i:03d}",
                    "district": district_of(i),
                    "year": year,
                    "tax_paid": paid,
                    "employees": i * 3 % 500,
                    "sector": "mining" if i == 7 else SECTORS[i % 3],
                    "secret": "s",
                }
            )
    return rows


def company_rows() -> list[dict[str, Any]]:
    return [
        {
            "company_id": f"c{i:03d}",
            "industry": "abcde"[i % 5],
            "region": DISTRICTS[i % 4],
            "capital": D(i * 100_007 % 20_000_000),
            "listed": i % 2 == 0,
            "founded": date(2000 + i % 20, 1 + i % 12, 1 + i % 28),
        }
        for i in range(0, 200, 2)
    ]


TAX_ROWS = tax_rows()
COMPANY_ROWS = company_rows()


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = create_engine("duckdb:///:memory:")
    with eng.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE tax_records (company_id VARCHAR, district VARCHAR, year INTEGER, "
                "tax_paid DECIMAL(18, 2), employees INTEGER, sector VARCHAR, secret VARCHAR)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO tax_records VALUES (:company_id, :district, :year, :tax_paid, "
                ":employees, :sector, :secret)"
            ),
            TAX_ROWS,
        )
        conn.execute(
            text(
                "CREATE TABLE companies (company_id VARCHAR, industry VARCHAR, region VARCHAR, "
                "capital DECIMAL(18, 2), listed BOOLEAN, founded DATE)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO companies VALUES (:company_id, :industry, :region, :capital, "
                ":listed, :founded)"
            ),
            COMPANY_ROWS,
        )
    yield eng
    eng.dispose()


def run(engine: Engine, checked: CheckedQuery, dp: DpMechanisms | None = None) -> AggregateResult:
    with engine.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text(checked.sql), dict(checked.params))]
    return postprocess(checked, rows, dp=dp)


def raw_rows(engine: Engine, checked: CheckedQuery) -> list[tuple[Any, ...]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(checked.sql), dict(checked.params))]


def clamp(v: Decimal, lo: Decimal, hi: Decimal) -> Decimal:
    return min(max(v, lo), hi)


def avg(total: Decimal, n: int) -> Decimal | None:
    if n == 0:
        return None
    with localcontext() as ctx:
        ctx.prec = 28
        return D(total) / D(n)


def reference(
    rows: list[dict[str, Any]],
    keep: Callable[[dict[str, Any]], bool],
    key: Callable[[dict[str, Any]], Any],
    value: str,
    lo: Decimal,
    hi: Decimal,
    k: int,
) -> tuple[dict[Any, tuple[int, Decimal | None, Decimal | None]], int]:
    """Per group: COUNT(*), SUM(clamped value), AVG(clamped value); groups under k dropped."""
    groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if keep(row):
            groups[key(row)].append(row)
    out: dict[Any, tuple[int, Decimal | None, Decimal | None]] = {}
    suppressed = 0
    for g, members in groups.items():
        if len({m["company_id"] for m in members}) < k:
            suppressed += 1
            continue
        values = [clamp(m[value], lo, hi) for m in members if m[value] is not None]
        total = sum(values, D(0)) if values else None
        out[g] = (len(members), total, avg(total, len(values)) if total is not None else None)
    return out, suppressed


# -- accepted queries run on DuckDB and match Python ----------------------------------------------


def test_issue_example_matches_python(engine: Engine) -> None:
    checked = check_query(
        "SELECT district, COUNT(*), AVG(tax_paid) FROM tax_records WHERE year = 2025 "
        "GROUP BY district",
        TABLES,
    )
    assert [o.name for o in checked.outputs] == ["district", "count_star", "avg_tax_paid"]
    assert [o.kind for o in checked.outputs] == ["dimension", "count", "avg"]
    assert checked.outputs[2].lower == 0 and checked.outputs[2].upper == TAX_UPPER
    assert checked.output_level == L3 and not checked.dp and checked.k == 5
    assert checked.params["p0"] == 2025
    result = run(engine, checked)
    expected, suppressed = reference(
        TAX_ROWS,
        lambda r: r["year"] == 2025,
        lambda r: r["district"],
        "tax_paid",
        D(0),
        TAX_UPPER,
        5,
    )
    assert result.suppressed == suppressed == 1  # "tiny": three companies
    assert result.epsilon == 0 and result.noise == ()
    got = {row[0]: (row[1], row[2]) for row in result.rows}
    assert got == {g: (n, a) for g, (n, _, a) in expected.items()}
    assert [row[0] for row in result.rows] == sorted(got)  # deterministic order


def test_clamping_bounds_apply(engine: Engine) -> None:
    checked = check_query(
        "SELECT district, SUM(tax_paid) AS total FROM tax_records WHERE year = 2025 "
        "GROUP BY district",
        TABLES,
    )
    result = run(engine, checked)
    expected, _ = reference(
        TAX_ROWS,
        lambda r: r["year"] == 2025,
        lambda r: r["district"],
        "tax_paid",
        D(0),
        TAX_UPPER,
        5,
    )
    assert {r[0]: r[1] for r in result.rows} == {g: s for g, (_, s, _) in expected.items()}
    unclamped = sum(r["tax_paid"] for r in TAX_ROWS if r["year"] == 2025 and r["tax_paid"])
    assert sum(r[1] for r in result.rows) < unclamped  # values above 90000 were clamped


def test_join_matches_python(engine: Engine) -> None:
    checked = check_query(
        "SELECT c.industry, COUNT(*) AS n, SUM(t.tax_paid) AS total, COUNT(DISTINCT t.district)"
        " FROM tax_records AS t JOIN companies AS c ON t.company_id = c.company_id "
        "WHERE t.year = 2025 AND c.listed = TRUE AND c.founded >= DATE '2005-01-01' "
        "GROUP BY c.industry ORDER BY n DESC, industry",
        TABLES,
    )
    assert checked.datasets == ("tax_records", "companies")
    assert checked.params["p1"] is True and checked.params["p2"] == date(2005, 1, 1)
    companies = {c["company_id"]: c for c in COMPANY_ROWS}
    joined = [{**r, **companies[r["company_id"]]} for r in TAX_ROWS if r["company_id"] in companies]
    expected, suppressed = reference(
        joined,
        lambda r: r["year"] == 2025 and r["listed"] and r["founded"] >= date(2005, 1, 1),
        lambda r: r["industry"],
        "tax_paid",
        D(0),
        TAX_UPPER,
        5,
    )
    result = run(engine, checked)
    assert result.columns == ("industry", "n", "total", "count_distinct_district")
    assert result.suppressed == suppressed
    assert {r[0]: (r[1], r[2]) for r in result.rows} == {
        g: (n, s) for g, (n, s, _) in expected.items()
    }
    counts = [r[1] for r in result.rows]
    assert counts == sorted(counts, reverse=True)


def test_min_max_count_distinct_on_public_columns(engine: Engine) -> None:
    checked = check_query(
        "SELECT industry, MIN(founded), MAX(founded), COUNT(DISTINCT region) FROM companies "
        "GROUP BY industry",
        TABLES,
    )
    result = run(engine, checked)
    for industry, lo, hi, regions in result.rows:
        members = [c for c in COMPANY_ROWS if c["industry"] == industry]
        assert lo == min(c["founded"] for c in members)
        assert hi == max(c["founded"] for c in members)
        assert regions == len({c["region"] for c in members})


def test_order_limit_offset_after_suppression(engine: Engine) -> None:
    base = "SELECT district, COUNT(*) FROM tax_records GROUP BY district ORDER BY district DESC"
    full = run(engine, check_query(base, TABLES))
    assert [r[0] for r in full.rows] == ["west", "south", "north", "east"]
    page = run(engine, check_query(base + " LIMIT 2 OFFSET 1", TABLES))
    assert [r[0] for r in page.rows] == ["south", "north"]
    assert page.suppressed == 1


def test_filters_of_every_shape(engine: Engine) -> None:
    checked = check_query(
        "SELECT district, COUNT(*) FROM tax_records WHERE (year BETWEEN 2024 AND 2025) "
        "AND district IN ('north', 'east', 'nowhere') AND NOT (sector = 'mining') "
        "AND sector IS NOT NULL AND (year <> 2024 OR year = 2024) GROUP BY district",
        TABLES,
    )
    result = run(engine, checked)
    want: dict[str, int] = defaultdict(int)
    for r in TAX_ROWS:
        if r["district"] in ("north", "east") and r["sector"] != "mining":
            want[r["district"]] += 1
    assert dict(result.rows) == want


def test_attached_relation_and_schema() -> None:
    attached = TableRules(
        "tax_records",
        TAX_COLUMNS,
        "company_id",
        TAX_RULES,
        relation="TaxRecords2025",
        relation_schema="provider",
    )
    checked = check_query("SELECT COUNT(*) FROM tax_records", {"tax_records": attached})
    assert '"provider"."TaxRecords2025" AS "t0"' in checked.sql


@pytest.mark.parametrize("dialect", ["postgres", "sqlite", "duckdb", "trino"])
def test_other_dialects_use_named_binds(dialect: str) -> None:
    checked = check_query(
        "SELECT district, SUM(tax_paid) FROM tax_l4 WHERE year = 2025 GROUP BY district",
        TABLES,
        dialect_out=dialect,
    )
    assert ":p0" in checked.sql and ":lo0" in checked.sql and ":max_rows" in checked.sql
    assert "2025" not in checked.sql
    assert len(sqlglot.parse(checked.sql, read=dialect)) == 1


def test_postgres_input_dialect() -> None:
    checked = check_query(
        "SELECT district, COUNT(*) FROM tax_records WHERE year = 2025 GROUP BY district",
        TABLES,
        dialect_in="postgres",
    )
    assert checked.params == {"p0": 2025}


# -- the rewrite never reuses user text ----------------------------------------------------------

ACCEPTED = [
    "SELECT district, COUNT(*), AVG(tax_paid) FROM tax_records WHERE year = 2025 GROUP BY district",
    "SELECT COUNT(*) FROM tax_records WHERE district = 'north''; DROP TABLE x; --'",
    "SELECT COUNT(*) FROM tax_records -- ; DROP TABLE tax_records",
    "SELECT COUNT(*) FROM tax_records /* /* */ DROP TABLE tax_records; */",
    "SELECT COUNT(*) /* :p0 */ FROM tax_records WHERE district = ':p0'",
    "SELECT DISTRICT, COUNT(*) FROM TAX_RECORDS GROUP BY DISTRICT",
    'SELECT "district", COUNT(*) FROM "tax_records" GROUP BY "district"',
    "SELECT t.district, c.industry, COUNT(*) FROM tax_records t JOIN companies c "
    "ON t.company_id = c.company_id GROUP BY t.district, c.industry",
    "SELECT COUNT(*) FROM tax_l4 WHERE sector IN ('a', 'b') AND district = 'x'",
]


@pytest.mark.parametrize("sql", ACCEPTED)
def test_rewrite_is_built_not_pasted(sql: str) -> None:
    checked = check_query(sql, TABLES)
    assert "'" not in checked.sql  # no string constant: every value is a bind parameter
    assert "--" not in checked.sql and "/*" not in checked.sql
    assert "DROP" not in checked.sql.upper()
    (statement,) = sqlglot.parse(checked.sql, read="duckdb")
    assert isinstance(statement, exp.Select)
    assert all(i.quoted for i in statement.find_all(exp.Identifier))
    physical = {t.name for t in statement.find_all(exp.Table)}
    assert physical <= {"tax_records", "companies"}
    assert not list(statement.find_all(exp.Literal))  # every constant is a bind parameter
    assert {p.name for p in statement.find_all(exp.Placeholder)} == set(checked.params)
    assert checked.columns[-1].name == K_COLUMN


def test_comment_cannot_hide_a_statement(engine: Engine) -> None:
    checked = check_query(ACCEPTED[3], TABLES)
    result = run(engine, checked)
    assert result.rows == ((len(TAX_ROWS),),)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM tax_records")).scalar() == len(TAX_ROWS)


def test_digest_is_canonical() -> None:
    a = check_query(
        "SELECT district, COUNT(*) FROM tax_records WHERE year = 2025 GROUP BY district", TABLES
    )
    b = check_query(
        "select   district,count(*)\n from tax_records -- note\n where year=2025 group by district",
        TABLES,
    )
    c = check_query(
        "SELECT district, COUNT(*) FROM tax_records WHERE year = 2024 GROUP BY district", TABLES
    )
    assert a.digest == b.digest and a.canonical == b.canonical
    assert a.digest != c.digest
    assert len(a.digest) == 64 and int(a.digest, 16) >= 0


def test_output_names() -> None:
    checked = check_query(
        'SELECT district AS "Area Name", COUNT(*) AS Total, COUNT(*), SUM(tax_paid) AS __zonex_k, '
        "AVG(tax_paid) AS count_star FROM tax_records GROUP BY district",
        TABLES,
    )
    assert [o.name for o in checked.outputs] == [
        "district",
        "total",
        "count_star_2",
        "sum_tax_paid",
        "count_star",
    ]


# -- hostile queries -----------------------------------------------------------------------------

HOSTILE = [
    # comments and stacked statements
    ("SELECT COUNT(*) FROM tax_records; DROP TABLE tax_records", "multiple_statements"),
    (
        "SELECT COUNT(*) FROM tax_records /* x */; SELECT tax_paid FROM tax_records",
        "multiple_statements",
    ),
    (
        "SELECT COUNT(*) FROM tax_records;\n-- ok\nSELECT secret FROM tax_records",
        "multiple_statements",
    ),
    (
        "SELECT COUNT(*) FROM tax_records --\nUNION SELECT COUNT(*) FROM tax_records",
        "set_operation",
    ),
    # set operations
    (
        "SELECT district, COUNT(*) FROM tax_records GROUP BY district UNION ALL "
        "SELECT company_id, tax_paid FROM tax_records",
        "set_operation",
    ),
    (
        "SELECT COUNT(*) FROM tax_records INTERSECT SELECT COUNT(*) FROM tax_records",
        "set_operation",
    ),
    ("SELECT COUNT(*) FROM tax_records EXCEPT SELECT COUNT(*) FROM tax_records", "set_operation"),
    # subqueries and CTEs
    (
        "SELECT district, (SELECT MAX(tax_paid) FROM tax_records) FROM tax_records "
        "GROUP BY district",
        "subquery",
    ),
    (
        "SELECT COUNT(*) FROM tax_records WHERE year IN "
        "(SELECT year FROM tax_records WHERE company_id = 'c001')",
        "subquery",
    ),
    ("SELECT COUNT(*) FROM (SELECT * FROM tax_records) AS x", "subquery"),
    (
        "SELECT COUNT(*) FROM tax_records WHERE EXISTS "
        "(SELECT 1 FROM tax_records WHERE tax_paid > 5)",
        "subquery",
    ),
    ("SELECT COUNT(*) FROM tax_records WHERE year = 2025 AND (SELECT 1) = 1", "subquery"),
    ("SELECT COUNT(*) FROM tax_records LIMIT (SELECT 1)", "subquery"),
    ("WITH x AS (SELECT * FROM tax_records) SELECT COUNT(*) FROM x", "cte"),
    # window functions
    (
        "SELECT district, SUM(tax_paid) OVER (PARTITION BY company_id) FROM tax_records",
        "window_function",
    ),
    ("SELECT district, ROW_NUMBER() OVER () FROM tax_records", "window_function"),
    (
        "SELECT district, COUNT(*) FROM tax_records GROUP BY district QUALIFY COUNT(*) > 1",
        "window_function",
    ),
    # CASE and friends that isolate one subject
    (
        "SELECT district, SUM(CASE WHEN company_id = 'c001' THEN tax_paid ELSE 0 END) "
        "FROM tax_records GROUP BY district",
        "case_not_allowed",
    ),
    (
        "SELECT district, SUM(IF(company_id = 'c001', tax_paid, 0)) FROM tax_records "
        "GROUP BY district",
        "case_not_allowed",
    ),
    (
        "SELECT district, SUM(tax_paid) FILTER (WHERE company_id = 'c001') FROM tax_records "
        "GROUP BY district",
        "case_not_allowed",
    ),
    (
        "SELECT district, SUM(COALESCE(tax_paid, 0)) FROM tax_records GROUP BY district",
        "function_not_allowed",
    ),
    # functions on sensitive columns, UDFs, casts
    (
        "SELECT district, SUM(ABS(tax_paid)) FROM tax_records GROUP BY district",
        "function_not_allowed",
    ),
    (
        "SELECT UPPER(district), COUNT(*) FROM tax_records GROUP BY UPPER(district)",
        "function_not_allowed",
    ),
    (
        "SELECT district, my_udf(tax_paid) FROM tax_records GROUP BY district",
        "function_not_allowed",
    ),
    (
        'SELECT district, "my_udf"(tax_paid) FROM tax_records GROUP BY district',
        "function_not_allowed",
    ),
    (
        "SELECT district, list_sum([tax_paid]) FROM tax_records GROUP BY district",
        "function_not_allowed",
    ),
    (
        "SELECT COUNT(*) FROM tax_records WHERE district = 'a' COLLATE NOCASE",
        "function_not_allowed",
    ),
    (
        "SELECT district, SUM(CAST(tax_paid AS INTEGER)) FROM tax_records GROUP BY district",
        "cast_not_allowed",
    ),
    (
        "SELECT district, SUM(tax_paid::INTEGER) FROM tax_records GROUP BY district",
        "cast_not_allowed",
    ),
    (
        "SELECT district, SUM(tax_paid * 2) FROM tax_records GROUP BY district",
        "expression_not_allowed",
    ),
    ("SELECT district, COUNT(*) + 1 FROM tax_records GROUP BY district", "expression_not_allowed"),
    (
        "SELECT district || 'x', COUNT(*) FROM tax_records GROUP BY district",
        "expression_not_allowed",
    ),
    ("SELECT COUNT(*) FROM tax_records WHERE year = 2025 OR 1 = 1", "expression_not_allowed"),
    (
        "SELECT district, COUNT(*) FROM tax_records WHERE district LIKE 'a%' GROUP BY district",
        "expression_not_allowed",
    ),
    ("SELECT COUNT(1) FROM tax_records", "expression_not_allowed"),
    # row-level output
    ("SELECT company_id, tax_paid FROM tax_records", "row_level_output"),
    ("SELECT * FROM tax_records", "row_level_output"),
    ("FROM tax_records", "row_level_output"),
    ("SELECT COUNT(*), tax_records.* FROM tax_records", "row_level_output"),
    ("SELECT district, tax_paid FROM tax_records GROUP BY district", "row_level_output"),
    ("SELECT district FROM tax_records GROUP BY district", "no_aggregate"),
    (
        "SELECT DISTINCT district, COUNT(*) FROM tax_records GROUP BY district",
        "distinct_not_allowed",
    ),
    (
        "SELECT district, SUM(DISTINCT tax_paid) FROM tax_records GROUP BY district",
        "distinct_not_allowed",
    ),
    ("SELECT district, COUNT(*) FROM tax_records GROUP BY district HAVING COUNT(*) < 3", "having"),
    # disclosure rules
    ("SELECT company_id, COUNT(*) FROM tax_records GROUP BY company_id", "column_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records GROUP BY tax_paid", "column_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE tax_paid > 900000", "column_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE company_id = 'c001'", "column_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE secret = 'x'", "column_not_allowed"),
    ("SELECT COUNT(secret) FROM tax_records", "column_not_allowed"),
    ("SELECT COUNT(sector) FROM tax_records", "column_not_allowed"),
    ("SELECT district, MIN(tax_paid) FROM tax_records GROUP BY district", "min_max_level"),
    ("SELECT district, MAX(employees) FROM tax_records GROUP BY district", "min_max_level"),
    ("SELECT district, SUM(district) FROM tax_records GROUP BY district", "type_mismatch"),
    ("SELECT district, SUM(employees) FROM tax_records GROUP BY district", "no_bounds"),
    ("SELECT district, AVG(employees) FROM tax_records GROUP BY district", "no_bounds"),
    # system tables and table functions
    ("SELECT COUNT(*) FROM information_schema.tables", "system_table"),
    ("SELECT COUNT(*) FROM pg_catalog.pg_tables", "system_table"),
    ("SELECT COUNT(*) FROM sqlite_master", "system_table"),
    ("SELECT COUNT(*) FROM duckdb_settings", "system_table"),
    ("SELECT COUNT(*) FROM main.tax_records", "system_table"),
    ("SELECT COUNT(*) FROM memory.main.tax_records", "system_table"),
    ("SELECT COUNT(*) FROM tax_records WHERE main.tax_records.year = 1", "system_table"),
    ("SELECT COUNT(*) FROM duckdb_tables()", "table_function"),
    ("SELECT COUNT(*) FROM read_csv('/etc/passwd')", "table_function"),
    ("SELECT COUNT(*) FROM 'secrets.csv'", "unknown_table"),
    ("SELECT COUNT(*) FROM other_dataset", "unknown_table"),
    # quoting tricks
    ('SELECT district, SUM("Tax_Paid") FROM tax_records GROUP BY district', "unknown_column"),
    ('SELECT COUNT(*) FROM "Tax_Records"', "unknown_table"),
    ('SELECT COUNT(*) FROM "tax_records; DROP TABLE x"', "unknown_table"),
    ('SELECT COUNT(*) FROM "tax_records" WHERE "company_id" = \'c001\'', "column_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE district = U&'\\0061'", "literal_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE district = $$a$$", "literal_not_allowed"),
    ('SELECT COUNT(*) FROM tax_records WHERE "district" = "north"', "expression_not_allowed"),
    (
        "SELECT COUNT(*) FROM tax_records WHERE tax_records.district = companies.region",
        "expression_not_allowed",
    ),
    # joins
    (
        "SELECT COUNT(*) FROM tax_records LEFT JOIN companies "
        "ON tax_records.company_id = companies.company_id",
        "join_not_allowed",
    ),
    ("SELECT COUNT(*) FROM tax_records CROSS JOIN companies", "join_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records, companies", "join_not_allowed"),
    (
        "SELECT COUNT(*) FROM tax_records JOIN companies "
        "ON tax_records.company_id < companies.company_id",
        "join_not_allowed",
    ),
    ("SELECT COUNT(*) FROM tax_records JOIN companies USING (company_id)", "join_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records NATURAL JOIN companies", "join_not_allowed"),
    (
        "SELECT COUNT(*) FROM tax_records t1 JOIN tax_records t2 ON t1.company_id = t2.company_id",
        "join_not_allowed",
    ),
    (
        "SELECT COUNT(*) FROM tax_records t JOIN elsewhere e ON t.company_id = e.company_id",
        "join_not_allowed",
    ),
    (
        "SELECT COUNT(*) FROM tax_records JOIN companies "
        "ON tax_records.tax_paid = companies.capital",
        "column_not_allowed",
    ),
    (
        "SELECT COUNT(*) FROM tax_records t JOIN companies c ON t.company_id = c.company_id "
        "AND t.sector = c.region",
        "column_not_allowed",
    ),
    (
        "SELECT COUNT(*) FROM tax_records t JOIN companies c ON t.company_id = c.company_id "
        "OR t.district = c.region",
        "join_not_allowed",
    ),
    (
        "SELECT company_id, COUNT(*) FROM tax_records t JOIN companies c "
        "ON t.company_id = c.company_id GROUP BY company_id",
        "ambiguous_column",
    ),
    # statements other than SELECT
    ("INSERT INTO tax_records VALUES (1, 2, 3, 4)", "statement_not_allowed"),
    ("DROP TABLE tax_records", "statement_not_allowed"),
    ("COPY tax_records TO '/tmp/out.csv'", "statement_not_allowed"),
    ("ATTACH '/tmp/x.db' AS x", "statement_not_allowed"),
    ("PRAGMA database_list", "statement_not_allowed"),
    ("SET enable_external_access = true", "statement_not_allowed"),
    ("UPDATE tax_records SET tax_paid = 0", "statement_not_allowed"),
    # clauses and constants
    (
        "SELECT district, COUNT(*) FROM tax_records GROUP BY district ORDER BY tax_paid",
        "order_by_not_allowed",
    ),
    ("SELECT COUNT(*) FROM tax_records LIMIT -1", "limit_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records LIMIT 10000000", "limit_not_allowed"),
    (
        "SELECT district, COUNT(*) FROM tax_records GROUP BY ROLLUP (district)",
        "group_by_not_allowed",
    ),
    ("SELECT district, COUNT(*) FROM tax_records GROUP BY 1", "group_by_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE year = ?", "literal_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE year = $1", "literal_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE year = NULL", "literal_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE year", "expression_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records WHERE district = 5", "type_mismatch"),
    ("SELECT COUNT(*) FROM tax_records WHERE year = 'x'", "type_mismatch"),
    ("SELECT COUNT(*) FROM companies WHERE founded > DATE 'yesterday'", "type_mismatch"),
    ("SELECT COUNT(*) FROM tax_records WHERE year = 99999999999999999999", "literal_not_allowed"),
    (
        "SELECT district, COUNT(*) AS n, SUM(tax_paid) AS n FROM tax_records GROUP BY district",
        "alias_not_allowed",
    ),
    ("SELECT 1", "construct_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records TABLESAMPLE 10%", "construct_not_allowed"),
    ("SELECT COUNT(*) FROM tax_records AS t(a, b)", "construct_not_allowed"),
    (
        "SELECT COUNT(*) FROM tax_records WHERE year = 2025 LIMIT 5 FOR UPDATE",
        "construct_not_allowed",
    ),
    ("", "parse_error"),
    ("   ;  ", "parse_error"),
    ("SELECT COUNT(*) FROM tax_records WHERE", "parse_error"),
    # differential privacy
    ("SELECT district, MIN(year) FROM tax_l4 GROUP BY district", "dp_unsupported"),
    ("SELECT MAX(year), COUNT(tax_paid) FROM tax_default", "dp_unsupported"),
    # a DP GROUP BY gates groups found in the data: it needs a δ the rules allow
    ("SELECT district, SUM(tax_paid) FROM tax_no_delta GROUP BY district", "delta_required"),
    # identifiers are never values: on a subject column only COUNT and COUNT DISTINCT
    ("SELECT MIN(company_id) FROM registry", "subject_value"),
    ("SELECT district, MAX(company_id) FROM registry GROUP BY district", "subject_value"),
    ("SELECT MIN(company_id) FROM tax_records", "subject_value"),
    ("SELECT SUM(staff_no) FROM staff", "subject_value"),
    ("SELECT AVG(staff_no) FROM staff", "subject_value"),
    ("SELECT district, MAX(staff_no) FROM staff GROUP BY district", "subject_value"),
    ("SELECT COUNT(*) FROM staff ORDER BY MIN(staff_no)", "subject_value"),
    # ... nor a column the query equates with one
    (
        "SELECT MAX(p.company_ref) FROM payroll p JOIN tax_records t "
        "ON p.company_ref = t.company_id",
        "subject_value",
    ),
    # MIN/MAX of text (or booleans) release one subject's raw value: numbers and dates only
    ("SELECT MAX(district) FROM tax_records", "min_max_type"),
    ("SELECT industry, MIN(region) FROM companies GROUP BY industry", "min_max_type"),
    ("SELECT MIN(listed) FROM companies", "min_max_type"),
    ("SELECT COUNT(*) FROM tax_l4 t JOIN companies c ON t.district = c.region", "join_not_allowed"),
]


@pytest.mark.parametrize(("sql", "reason"), HOSTILE)
def test_hostile_query_is_rejected(sql: str, reason: str) -> None:
    assert reason in REASONS
    with pytest.raises(QueryRejected) as info:
        check_query(sql, TABLES)
    assert info.value.reason == reason, info.value.detail


def test_enough_hostile_queries() -> None:
    assert len(HOSTILE) >= 30
    assert len({reason for _, reason in HOSTILE}) >= 25


def test_rejection_shape() -> None:
    with pytest.raises(QueryRejected) as info:
        check_query("SELECT COUNT(*) FROM tax_records WHERE tax_paid = 'TOPSECRET-42'", TABLES)
    error = info.value
    assert isinstance(error, InvalidInputError)
    assert error.code == "query_rejected" and error.status == 422
    assert error.extra == {"reason": "column_not_allowed"}
    assert "tax_paid" in error.detail
    assert "TOPSECRET" not in error.detail  # details name columns, never values


def test_dp_join_on_subjects_is_allowed() -> None:
    checked = check_query(
        "SELECT c.industry, SUM(t.tax_paid) FROM tax_l4 t JOIN companies c "
        "ON t.company_id = c.company_id GROUP BY c.industry",
        TABLES,
    )
    assert checked.dp and checked.dp_required and checked.output_level == L4
    assert "ROW_NUMBER()" in checked.sql and "LEAST(COUNT(DISTINCT" in checked.sql


def test_non_dp_join_on_a_declared_column() -> None:
    checked = check_query(
        "SELECT COUNT(*) FROM tax_records t JOIN companies c ON t.district = c.region", TABLES
    )
    assert not checked.dp and "ROW_NUMBER" not in checked.sql


def test_too_long_and_too_deep() -> None:
    with pytest.raises(QueryRejected) as info:
        check_query("SELECT COUNT(*) FROM tax_records WHERE year = 1" + " " * 20_000, TABLES)
    assert info.value.reason == "too_long"
    deep = "SELECT COUNT(*) FROM tax_records WHERE " + "(" * 3000 + "year = 1" + ")" * 3000
    with pytest.raises(QueryRejected) as info:
        check_query(deep, TABLES)
    assert info.value.reason in ("too_complex", "parse_error")
    with pytest.raises(QueryRejected):
        check_query(None, TABLES)  # type: ignore[arg-type]


# -- hypothesis: nothing but QueryRejected escapes ------------------------------------------------

TOKENS = [
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP BY",
    "ORDER BY",
    "LIMIT",
    "JOIN",
    "ON",
    "AND",
    "OR",
    "NOT",
    "UNION",
    "WITH",
    "AS",
    "IN",
    "BETWEEN",
    "IS",
    "NULL",
    "COUNT(*)",
    "COUNT(",
    "SUM(",
    "AVG(",
    "MIN(",
    "MAX(",
    "DISTINCT",
    "(",
    ")",
    ",",
    ";",
    "*",
    "=",
    "<",
    ">=",
    "'north'",
    "2025",
    "-1",
    "1.5",
    "TRUE",
    "DATE '2025-01-01'",
    "tax_records",
    "companies",
    "tax_l4",
    "t",
    "c",
    "t.",
    "c.",
    "district",
    "year",
    "tax_paid",
    "company_id",
    "sector",
    "industry",
    "region",
    '"Tax_Paid"',
    '"district"',
    "--",
    "/*",
    "*/",
    "OVER",
    "CASE",
    "WHEN",
    "THEN",
    "END",
    "::",
    "HAVING",
    "$1",
    "?",
    "read_csv(",
    "information_schema.",
    "\n",
]


def _check_only_rejects(sql: str) -> CheckedQuery | None:
    try:
        checked = check_query(sql, TABLES)
    except QueryRejected as error:
        assert error.reason in REASONS
        return None
    for value in checked.params.values():
        if isinstance(value, str) and value:
            assert f"'{value}'" not in checked.sql
    return checked


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_garbage_text_only_rejects(sql: str) -> None:
    _check_only_rejects(sql)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(TOKENS), max_size=30))
def test_token_soup_only_rejects(tokens: list[str]) -> None:
    _check_only_rejects(" ".join(tokens))


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from(["district", "year"]),
    st.sampled_from(["COUNT(*)", "SUM(tax_paid)", "AVG(tax_paid)", "COUNT(DISTINCT year)"]),
    st.text(min_size=0, max_size=40),
)
def test_any_string_constant_is_bound(dim: str, agg: str, value: str) -> None:
    quoted = "'" + value.replace("'", "''") + "'"
    sql = f"SELECT {dim}, {agg} FROM tax_records WHERE sector = {quoted} GROUP BY {dim}"
    checked = _check_only_rejects(sql)
    if checked is not None:
        assert checked.params["p0"] == value


# -- post-processing -----------------------------------------------------------------------------


def test_postprocess_guards() -> None:
    plain = check_query("SELECT COUNT(*) FROM tax_records", TABLES)
    private = check_query("SELECT COUNT(*) FROM tax_l4", TABLES)
    with pytest.raises(ValueError):
        postprocess(private, [(10, 10)])
    with pytest.raises(ValueError):
        postprocess(plain, [(10, 10)], dp=DpMechanisms(D(1)))
    with pytest.raises(ValueError):
        postprocess(plain, [(10,)])


def test_null_ordering_and_json() -> None:
    checked = check_query(
        "SELECT district, SUM(tax_paid) AS s FROM tax_records GROUP BY district "
        "ORDER BY s DESC NULLS LAST",
        TABLES,
    )
    rows = [("a", D("1.50"), 3, 9), ("b", None, 0, 9), ("c", D("7"), 2, 9), ("d", D(1), 1, 2)]
    result = postprocess(checked, [r[:2] + r[3:] for r in rows])
    assert result.rows == (("c", D(7)), ("a", D("1.50")), ("b", None))
    assert result.suppressed == 1
    doc = result.to_json()
    assert doc["rows"] == [["c", "7"], ["a", "1.5"], ["b", None]]
    assert "e" not in json.dumps(doc["epsilon"])


# -- differential privacy on a real engine -------------------------------------------------------


def test_dp_release(engine: Engine) -> None:
    checked = check_query(
        "SELECT district, COUNT(*), SUM(tax_paid), AVG(tax_paid) FROM tax_l4 WHERE year = 2025 "
        "GROUP BY district",
        TABLES,
    )
    assert checked.dp and checked.contributions == 1
    with pytest.raises(ValueError):
        run(engine, checked)
    result = run(engine, checked, DpMechanisms(D(4)))
    # GROUP BY finds its groups in the data: the gate spends the rules' δ
    assert result.epsilon == D(4) and result.delta == D("1e-7")
    assert [n.label for n in result.noise] == [
        "count(*)",
        "sum(tax_l4.tax_paid)",
        "count(tax_l4.tax_paid)",
    ]
    # four equal shares: three noisy primitives and the gate
    assert all(n.epsilon == 1 for n in result.noise)
    assert result.noise[0].scale == 1 and result.noise[1].scale == TAX_UPPER
    gate = result.gate
    assert gate is not None and gate.epsilon == 1 and gate.delta == D("1e-7")
    assert gate.threshold == 18  # max(k = 5, 1 + ceil(1 · ln(1 / 1e-7)))
    expected, _ = reference(
        TAX_ROWS,
        lambda r: r["year"] == 2025,
        lambda r: r["district"],
        "tax_paid",
        D(0),
        TAX_UPPER,
        5,
    )
    assert result.suppressed is None  # an exact count: not part of a DP release
    # each district of about fifty companies fails the gate with probability at most
    # e^(-30/b) < 1e-13 at b = 1; "tiny" (three companies) passes it with at most e^(-15/b)
    released = {r[0] for r in result.rows}
    assert set(expected) <= released <= set(expected) | {"tiny"}
    for district, count, total, average in result.rows:
        if district == "tiny":
            continue
        # P(|noise| > 80) at scale 1 is about 1e-35
        assert abs(count - expected[district][0]) <= 80
        assert isinstance(total, Decimal)
        assert average is None or 0 <= average <= TAX_UPPER


def test_dp_bounds_rows_per_subject(engine: Engine) -> None:
    # two rows (2024, 2025) per company; the DP rewrite keeps one, so counts are companies
    checked = check_query("SELECT district, COUNT(*) FROM tax_l4 GROUP BY district", TABLES)
    raw = raw_rows(engine, checked)
    companies = defaultdict(set)
    for r in TAX_ROWS:
        companies[r["district"]].add(r["company_id"])
    assert {r[0]: r[1] for r in raw} == {d: len(c) for d, c in companies.items()}
    exact = run(
        engine, check_query("SELECT district, COUNT(*) FROM tax_records GROUP BY district", TABLES)
    )
    assert {r[0]: r[1] for r in exact.rows} == {
        d: 2 * len(c) for d, c in companies.items() if len(c) >= 5
    }


def test_with_dp_on_request(engine: Engine) -> None:
    checked = check_query(
        "SELECT district, COUNT(*) FROM tax_records GROUP BY district", TABLES, with_dp=True
    )
    assert checked.dp and not checked.dp_required
    result = run(engine, checked, DpMechanisms(D(1)))
    assert result.epsilon == 1 and len(result.noise) == 1


# -- the differencing attack ---------------------------------------------------------------------
# The attacker wants one firm's value. It asks for a group, then for the same group with the
# target filtered out (the target is the only firm in its sector), and subtracts.

FIRM_COLUMNS = (
    TableColumn("company_id", "text", L2),
    TableColumn("district", "text", L1),
    TableColumn("sector", "text", L2),
    TableColumn("revenue", "decimal", L3),
)
FIRM_DISCLOSURE = {
    "company_id": ColumnRule(X.JOIN_ONLY),
    "district": ColumnRule(X.PLAINTEXT),
    "sector": ColumnRule(X.FILTER_ONLY),
    "revenue": ColumnRule(X.AFTER_AGGREGATE, D(0), D(1_000_000)),
}
# the provider opted out of DP by default (exact_release): only k stands in the way
FIRMS = TableRules(
    "firms",
    FIRM_COLUMNS,
    "company_id",
    AnalysisRules(FIRM_DISCLOSURE, min_group_size=10, exact_release=True),
)
# the same firms under the default release mode: DP at L3, with a noisy gate
FIRMS_DEFAULT = TableRules(
    "firms_default",
    FIRM_COLUMNS,
    "company_id",
    AnalysisRules(FIRM_DISCLOSURE, min_group_size=10),
    relation="firms",
)
FIRMS_DP = TableRules(
    "firms_dp",
    tuple(
        TableColumn(c.name, c.type, L4 if c.name == "revenue" else c.level) for c in FIRM_COLUMNS
    ),
    "company_id",
    AnalysisRules(FIRM_DISCLOSURE, min_group_size=10, dp_required=True),
    relation="firms",
)
TARGET_REVENUE = D(800_000)


@pytest.fixture(scope="module")
def firms_engine() -> Iterator[Engine]:
    eng = create_engine("duckdb:///:memory:")
    rows = []
    # district A: exactly k = 10 firms; district B: 30 firms; the target is B's only miner
    for i in range(10):
        rows.append(
            {"id": f"a{i}", "d": "A", "s": "mining" if i == 0 else "retail", "r": D(100_000 + i)}
        )
    for i in range(30):
        rows.append(
            {
                "id": f"b{i}",
                "d": "B",
                "s": "mining" if i == 0 else "retail",
                "r": TARGET_REVENUE if i == 0 else D(50_000 + 1000 * i),
            }
        )
    with eng.begin() as conn:
        conn.execute(
            text(
                "CREATE TABLE firms (company_id VARCHAR, district VARCHAR, "
                "sector VARCHAR, revenue DECIMAL(18, 2))"
            )
        )
        conn.execute(text("INSERT INTO firms VALUES (:id, :d, :s, :r)"), rows)
    yield eng
    eng.dispose()


ATTACK = (
    "SELECT SUM(revenue) FROM {t} WHERE district = '{d}'",
    "SELECT SUM(revenue) FROM {t} WHERE district = '{d}' AND sector <> 'mining'",
)
FIRM_TABLES = {"firms": FIRMS, "firms_dp": FIRMS_DP, "firms_default": FIRMS_DEFAULT}


def test_differencing_at_k_is_suppressed(firms_engine: Engine) -> None:
    first, second = (
        run(firms_engine, check_query(q.format(t="firms", d="A"), FIRM_TABLES)) for q in ATTACK
    )
    assert len(first.rows) == 1 and first.suppressed == 0
    assert second.rows == () and second.suppressed == 1  # nine firms: below k, nothing to subtract


def test_differencing_is_hidden_by_noise(firms_engine: Engine) -> None:
    queries = [check_query(q.format(t="firms_dp", d="B"), FIRM_TABLES) for q in ATTACK]
    raws = [raw_rows(firms_engine, q) for q in queries]
    # the exact sums would give the target away
    assert raws[0][0][0] - raws[1][0][0] == TARGET_REVENUE
    # ε = 1 per query, half for the noisy sum (sensitivity 1e6: Laplace scale b = 2e6), half
    # for the gate (k = 10 against 30 and 29 firms, scale 2)
    epsilon = D(1)
    trials = 300
    estimates = []
    for _ in range(trials):
        released = [
            postprocess(q, r, dp=DpMechanisms(epsilon)) for q, r in zip(queries, raws, strict=True)
        ]
        if all(len(r.rows) == 1 for r in released):
            estimates.append(float(released[0].rows[0][0] - released[1].rows[0][0]))
    # a gate fails a group of 29 or more at k = 10 with probability at most e^(-20/2) < 5e-5,
    # so a trial loses a release with at most 1e-4: more than 50 of 300 with less than 1e-100
    assert len(estimates) >= 250
    # the difference of two Laplace(b) draws has sd 2b = 4e6. Its sample variance has relative
    # standard error sqrt((kurtosis - 1) / n) <= sqrt(3.5 / 250) ≈ 0.12, so six standard errors
    # still leave the sample sd above 0.53 · 4e6 ≈ 2.1e6: far above the secret itself.
    spread = statistics.stdev(estimates)
    assert spread > 1.0e6 > float(TARGET_REVENUE)
    # and the attacker's estimate is rarely anywhere near the truth (expected ≈ 2% within 10%)
    close = sum(abs(e - float(TARGET_REVENUE)) <= 80_000 for e in estimates) / len(estimates)
    assert close < 0.15


# -- generated valid queries run on the engine ----------------------------------------------------

AGGREGATES = [
    "COUNT(*)",
    "COUNT(tax_paid)",
    "COUNT(DISTINCT year)",
    "SUM(tax_paid)",
    "AVG(tax_paid)",
    "MIN(year)",
    "MAX(c.founded)",
    "SUM(c.capital)",
    "AVG(c.capital)",
    "COUNT(DISTINCT c.industry)",
]
CONDITIONS = [
    "year = 2025",
    "year IN (2024, 2025)",
    "district <> 'north'",
    "sector = 'tech'",
    "sector IS NULL",
    "NOT year BETWEEN 2020 AND 2024",
    "(district = 'east' OR district = 'west')",
    "c.listed = FALSE",
    "c.founded < DATE '2010-06-01'",
    "c.region IN ('north', 'south')",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    table=st.sampled_from(["tax_records", "tax_l4"]),
    join=st.booleans(),
    dims=st.lists(st.sampled_from(["district", "year", "c.industry"]), unique=True, max_size=2),
    aggs=st.lists(st.sampled_from(AGGREGATES), min_size=1, max_size=3, unique=True),
    conds=st.lists(st.sampled_from(CONDITIONS), max_size=3, unique=True),
    limit=st.none() | st.integers(0, 5),
)
def test_generated_queries_run(
    engine: Engine,
    table: str,
    join: bool,
    dims: list[str],
    aggs: list[str],
    conds: list[str],
    limit: int | None,
) -> None:
    sql = f"SELECT {', '.join(dims + aggs)} FROM {table}"
    if join:
        sql += f" JOIN companies AS c ON {table}.company_id = c.company_id"
    if conds:
        sql += " WHERE " + " AND ".join(conds)
    if dims:
        sql += " GROUP BY " + ", ".join(dims)
    if limit is not None:
        sql += f" LIMIT {limit}"
    try:
        checked = check_query(sql, TABLES)
    except QueryRejected as error:
        # only the rules refuse: references to c. without the join, MIN/MAX under DP
        assert error.reason in ("unknown_table", "dp_unsupported"), error.detail
        return
    result = run(engine, checked, DpMechanisms(D(1)) if checked.dp else None)
    assert len(result.columns) == len(dims) + len(aggs)
    assert all(len(row) == len(result.columns) for row in result.rows)
    if limit is not None:
        assert len(result.rows) <= limit
    json.dumps(result.to_json())


def test_dataset_named_like_a_system_table() -> None:
    # dataset names may start with pg_ or duckdb_; only unknown names are read as system tables
    odd = TableRules("pg_levies", TAX_COLUMNS, "company_id", TAX_RULES)
    checked = check_query("SELECT COUNT(*) FROM pg_levies", {"pg_levies": odd})
    assert '"pg_levies" AS "t0"' in checked.sql
    with pytest.raises(QueryRejected) as info:
        check_query("SELECT COUNT(*) FROM pg_tables", {"pg_levies": odd})
    assert info.value.reason == "system_table"


# -- privacy by construction: what no sequence of allowed calls may reveal -----------------------


def test_l3_is_differentially_private_unless_every_dataset_opted_out() -> None:
    """Differencing through a filter: at L3, a release over a set the consumer chooses is DP
    unless the provider of every dataset it reads set ``exact_release``."""
    sql = "SELECT district, SUM(tax_paid) FROM {} WHERE year = 2025 GROUP BY district"
    default = check_query(sql.format("tax_default"), TABLES)
    assert default.output_level == L3 and default.dp and default.dp_required
    assert not check_query(sql.format("tax_records"), TABLES).dp  # the provider opted out
    mixed = check_query(
        "SELECT t.district, SUM(t.tax_paid) FROM tax_records t JOIN tax_default d "
        "ON t.company_id = d.company_id GROUP BY t.district",
        TABLES,
    )
    assert mixed.dp and mixed.dp_required  # one dataset without the opt-out is enough
    # below L3 the exact path stays (k is an exact gate there, and documented as one)
    assert not check_query(
        "SELECT district, COUNT(*) FROM tax_default GROUP BY district", TABLES
    ).dp
    # the exact path cannot be asked for: no release of an L3 SUM without noise
    private = check_query(ATTACK[0].format(t="firms_default", d="B"), FIRM_TABLES)
    assert private.dp
    with pytest.raises(ValueError):
        postprocess(private, [(TARGET_REVENUE, 30)])


def test_a_group_of_exactly_k_is_decided_by_a_noisy_gate(firms_engine: Engine) -> None:
    """The exact-k membership probe: district A holds exactly k = 10 firms, nine without the
    miner. An exact gate releases the first and suppresses the second every time, which tells
    the attacker that the miner is in A. Under DP both are decided on a noisy distinct count."""
    probe = (
        "SELECT COUNT(*), SUM(revenue) FROM firms_default WHERE district = 'A'",
        "SELECT COUNT(*), SUM(revenue) FROM firms_default WHERE district = 'A' "
        "AND sector <> 'mining'",
    )
    queries = [check_query(q, FIRM_TABLES) for q in probe]
    raws = [raw_rows(firms_engine, q) for q in queries]
    assert [r[0][-1] for r in raws] == [10, 9]  # exactly k, and k - 1
    opened: list[list[bool]] = [[], []]
    trials = 60
    for _ in range(trials):
        for i, (q, r) in enumerate(zip(queries, raws, strict=True)):
            released = postprocess(q, r, dp=DpMechanisms(D(1)))
            # how many groups were suppressed is an exact count: never released under DP
            assert released.suppressed is None and released.to_json()["suppressed"] is None
            assert released.gate is not None and released.gate.threshold == 10
            assert released.gate.delta is None and released.delta == 0
            opened[i].append(len(released.rows) == 1)
    gate = released.gate
    # ε = 1 split between COUNT(*), SUM and the gate: 1/3 each, discrete Laplace scale b = 3
    assert gate.epsilon == D("0.333333333333") and abs(gate.scale - 3) < D("1e-9")
    # with Z the gate's noise, a group of k opens iff Z >= 0 and one of k - 1 iff Z >= 1;
    # P(Z >= 1) = P(Z <= -1) = e^(-1/b) / (1 + e^(-1/b)) = 0.417 at b = 3. Each of the four
    # outcomes is then missing from 60 trials with probability at most 0.583^60 < 1e-14
    assert True in opened[0] and False in opened[0]
    assert True in opened[1] and False in opened[1]


def test_a_gate_over_groups_found_in_the_data_spends_delta(engine: Engine) -> None:
    checked = check_query("SELECT district, COUNT(*) FROM tax_default GROUP BY district", TABLES)
    assert not checked.dp  # L2 output: exact, with the exact k gate
    checked = check_query(
        "SELECT district, COUNT(tax_paid) FROM tax_default GROUP BY district", TABLES
    )
    assert checked.dp and checked.delta == D("1e-7") and checked.contributions == 1
    result = run(engine, checked, DpMechanisms(D(2)))
    gate = result.gate
    assert gate is not None and result.delta == D("1e-7") and result.suppressed is None
    # ε = 2 split between the count and the gate: b = M / 1 = 1, and the threshold is
    # max(k, 1 + ceil(b · ln(M / δ))) = max(5, 1 + ceil(16.12)) = 18
    assert gate.epsilon == 1 and gate.threshold == 18 and gate.delta == D("1e-7")
    doc = result.to_json()
    assert doc["delta"] == "0.0000001" and doc["gate"]["threshold"] == 18
    # the four districts hold about fifty companies each (more than 30 above the threshold):
    # each fails to open with probability at most e^(-30/b) < 1e-13
    assert set(DISTRICTS) <= {r[0] for r in result.rows}
    # secure sums name their cells: groups fixed in advance need no δ even where none is allowed
    named = check_query(
        "SELECT district, SUM(tax_paid) FROM tax_no_delta GROUP BY district",
        TABLES,
        named_groups=True,
    )
    assert named.dp and named.delta is None
    # one global group (no GROUP BY) is fixed in advance too
    assert check_query("SELECT SUM(tax_paid) FROM tax_no_delta", TABLES).delta is None


def test_identifiers_are_counted_never_valued() -> None:
    for sql in (
        "SELECT COUNT(DISTINCT company_id), COUNT(company_id) FROM registry",
        "SELECT district, COUNT(DISTINCT staff_no) FROM staff GROUP BY district",
        "SELECT COUNT(DISTINCT p.company_ref) FROM payroll p JOIN tax_records t "
        "ON p.company_ref = t.company_id",
        "SELECT MIN(year), MAX(year) FROM tax_records",  # numbers (L1) outside DP
        "SELECT MIN(founded), MAX(founded) FROM companies",  # dates (L1) outside DP
    ):
        check_query(sql, TABLES)
