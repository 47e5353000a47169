"""Analysis rules: defaults follow the classification, rules can only tighten it, and the JSON
form round-trips without floats."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from exchange.domain import Column, Dataset
from exchange.errors import InvalidInputError
from exchange.node.analysis import (
    MAX_K,
    MIN_K,
    AnalysisRules,
    ColumnRule,
    Disclosure,
    check_rules,
    default_rules,
    effective_disclosure,
)
from policy.levels import Level

D = Decimal
X = Disclosure


def dataset(*columns: Column, subject: str = "company_id") -> Dataset:
    levels = [Level(c.level) for c in columns]
    return Dataset(
        zone="tax-zone",
        name="tax_records",
        description="",
        subject_column=subject,
        columns=columns,
        level=max(levels, key=lambda lv: lv.severity).value,
        row_count=0,
        digest="0" * 64,
        source="import",
        created_at=datetime(2025, 1, 1, tzinfo=UTC),
    )


ALL_LEVELS = (
    Column("company_id", "text", "L2"),
    Column("district", "text", "L1"),
    Column("year", "integer", "L2"),
    Column("tax_paid", "decimal", "L3"),
    Column("income", "decimal", "L4"),
    Column("strategic_stock", "integer", "IMPORTANT"),
    Column("secret", "text", "CORE"),
)


# -- disclosures ---------------------------------------------------------------------------------


def test_disclosure_table() -> None:
    table = {
        X.PLAINTEXT: (True, True, True, True),
        X.AFTER_AGGREGATE: (False, True, False, False),
        X.JOIN_ONLY: (False, False, False, True),
        X.FILTER_ONLY: (False, False, True, False),
        X.NONE: (False, False, False, False),
    }
    for d, (group, agg, filt, join) in table.items():
        assert (d.may_group, d.may_aggregate, d.may_filter, d.may_join) == (group, agg, filt, join)


@pytest.mark.parametrize("disclosure", list(Disclosure))
def test_core_is_never_disclosed(disclosure: Disclosure) -> None:
    assert effective_disclosure(disclosure, Level.CORE) is X.NONE


@pytest.mark.parametrize("level", [Level.L3, Level.L4, Level.IMPORTANT])
def test_l3_and_above_are_never_plaintext(level: Level) -> None:
    assert effective_disclosure(X.PLAINTEXT, level) is X.AFTER_AGGREGATE
    for other in (X.AFTER_AGGREGATE, X.JOIN_ONLY, X.FILTER_ONLY, X.NONE):
        assert effective_disclosure(other, level) is other


def test_l1_l2_keep_their_disclosure() -> None:
    for level in (Level.L1, Level.L2):
        for d in Disclosure:
            assert effective_disclosure(d, level) is d


# -- defaults ------------------------------------------------------------------------------------


def test_default_rules_follow_levels() -> None:
    rules = default_rules(ALL_LEVELS, "company_id")
    got = {name: rule.disclosure for name, rule in rules.columns.items()}
    assert got == {
        "company_id": X.JOIN_ONLY,
        "district": X.PLAINTEXT,
        "year": X.PLAINTEXT,
        "tax_paid": X.AFTER_AGGREGATE,
        "income": X.AFTER_AGGREGATE,
        "strategic_stock": X.AFTER_AGGREGATE,
        "secret": X.NONE,
    }
    assert rules.dp_required
    assert all(not rule.bounded for rule in rules.columns.values())
    assert rules.min_group_size >= MIN_K
    check_rules(rules, dataset(*ALL_LEVELS))


def test_default_rules_without_high_levels_need_no_dp() -> None:
    cols = ALL_LEVELS[:4]
    rules = default_rules(cols, "company_id")
    assert not rules.dp_required
    check_rules(rules, dataset(*cols))


@pytest.mark.parametrize("level", ["L4", "IMPORTANT"])
def test_one_high_column_makes_the_dataset_dp(level: str) -> None:
    cols = (Column("company_id", "text", "L2"), Column("v", "decimal", level))
    assert default_rules(cols, "company_id").dp_required


def test_core_subject_stays_none() -> None:
    cols = (Column("company_id", "text", "CORE"), Column("district", "text", "L1"))
    rules = default_rules(cols, "company_id")
    assert rules.rule_for("company_id").disclosure is X.NONE


def test_default_rules_need_a_real_subject() -> None:
    with pytest.raises(InvalidInputError):
        default_rules(ALL_LEVELS, "nope")


def test_unnamed_columns_are_none() -> None:
    assert AnalysisRules().rule_for("anything").disclosure is X.NONE


# -- check_rules: rules only tighten -------------------------------------------------------------


def _with(rules: AnalysisRules, **columns: ColumnRule) -> AnalysisRules:
    return AnalysisRules(
        columns={**rules.columns, **columns},
        dp_required=rules.dp_required,
        min_group_size=rules.min_group_size,
    )


BASE = default_rules(ALL_LEVELS, "company_id")


@pytest.mark.parametrize(
    ("column", "rule"),
    [
        ("tax_paid", ColumnRule(X.PLAINTEXT)),
        ("income", ColumnRule(X.PLAINTEXT)),
        ("strategic_stock", ColumnRule(X.PLAINTEXT)),
        ("secret", ColumnRule(X.AFTER_AGGREGATE)),
        ("secret", ColumnRule(X.JOIN_ONLY)),
        ("secret", ColumnRule(X.FILTER_ONLY)),
        ("district", ColumnRule(X.PLAINTEXT, D(0), D(1))),
        ("company_id", ColumnRule(X.FILTER_ONLY)),
        ("company_id", ColumnRule(X.PLAINTEXT)),
    ],
)
def test_check_rules_refuses_loosening(column: str, rule: ColumnRule) -> None:
    with pytest.raises(InvalidInputError):
        check_rules(_with(BASE, **{column: rule}), dataset(*ALL_LEVELS))


def test_check_rules_accepts_tightening_and_bounds() -> None:
    tight = _with(
        BASE,
        district=ColumnRule(X.FILTER_ONLY),
        tax_paid=ColumnRule(X.AFTER_AGGREGATE, D(0), D("1e6")),
        income=ColumnRule(X.NONE),
        company_id=ColumnRule(X.AFTER_AGGREGATE),
    )
    check_rules(tight, dataset(*ALL_LEVELS))


@pytest.mark.parametrize("level", ["L4", "IMPORTANT"])
def test_check_rules_requires_dp_for_high_levels(level: str) -> None:
    cols = (Column("company_id", "text", "L2"), Column("v", "decimal", level))
    rules = AnalysisRules(columns={"v": ColumnRule(X.AFTER_AGGREGATE)}, dp_required=False)
    with pytest.raises(InvalidInputError, match="differential privacy"):
        check_rules(rules, dataset(*cols))


@pytest.mark.parametrize(
    "rule",
    [
        ColumnRule(X.AFTER_AGGREGATE, D(0), D(1_000_000)),
        ColumnRule(X.JOIN_ONLY, D(0), D(10)),
        ColumnRule(X.NONE, D(-1), D(1)),
    ],
)
def test_check_rules_refuses_bounds_on_the_subject_column(rule: ColumnRule) -> None:
    """Identifiers are never values: bounds would let a numeric subject id be summed or
    averaged (clamped, but still the id), so the subject column takes none."""
    cols = (Column("staff_no", "integer", "L2"), Column("district", "text", "L1"))
    rules = AnalysisRules(columns={"staff_no": rule, "district": ColumnRule(X.PLAINTEXT)})
    with pytest.raises(InvalidInputError, match="subject column") as info:
        check_rules(rules, dataset(*cols, subject="staff_no"))
    assert info.value.extra == {"reason": "subject_value"}
    # the same bounds on a column that is not the subject are fine
    other = AnalysisRules(columns={"staff_no": rule, "district": ColumnRule(X.JOIN_ONLY)})
    check_rules(other, dataset(*cols, subject="district"))


def test_check_rules_refuses_unknown_columns() -> None:
    rules = AnalysisRules(columns={"ghost": ColumnRule(X.NONE)})
    with pytest.raises(InvalidInputError, match="ghost"):
        check_rules(rules, dataset(*ALL_LEVELS[:2]))


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_group_size": 1},
        {"min_group_size": 0},
        {"min_group_size": MAX_K + 1},
        {"min_group_size": True},
        {"min_group_size": 2.5},
        {"epsilon_budget": D(0)},
        {"epsilon_budget": D(-1)},
        {"epsilon_budget": D(11)},
        {"epsilon_budget": D("NaN")},
        {"epsilon_budget": 0.5},
        {"delta": D("-1e-9")},
        {"delta": D("0.01")},
        {"refresh_seconds": 59},
        {"refresh_seconds": 10**9},
        {"max_rows_per_subject": 0},
        {"version": 0},
        {"dp_required": "yes"},
    ],
)
def test_rules_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(InvalidInputError):
        AnalysisRules(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        (D(2), D(1)),
        (D(0), None),
        (None, D(0)),
        (D("-1e16"), D(0)),
        (D("0.0000000001"), D(1)),
        (D("Infinity"), D("Infinity")),
        (0.5, 1.0),
    ],
)
def test_bounds_validation(lower: object, upper: object) -> None:
    with pytest.raises(InvalidInputError):
        ColumnRule(X.AFTER_AGGREGATE, lower, upper)  # type: ignore[arg-type]


def test_bad_disclosure() -> None:
    with pytest.raises(InvalidInputError):
        ColumnRule("everything")  # type: ignore[arg-type]


def test_k_limits_are_accepted() -> None:
    assert AnalysisRules(min_group_size=MIN_K).min_group_size == 2
    assert AnalysisRules(min_group_size=MAX_K).min_group_size == MAX_K


def test_rules_are_frozen() -> None:
    rules = AnalysisRules(columns={"a": ColumnRule(X.PLAINTEXT)})
    with pytest.raises(TypeError):
        rules.columns["b"] = ColumnRule(X.NONE)  # type: ignore[index]


# -- JSON ----------------------------------------------------------------------------------------


def test_json_round_trip_and_shape() -> None:
    rules = AnalysisRules(
        columns={
            "tax_paid": ColumnRule(X.AFTER_AGGREGATE, D("-12.50"), D("1E+6")),
            "district": ColumnRule(X.PLAINTEXT),
        },
        min_group_size=7,
        dp_required=True,
        epsilon_budget=D("0.75"),
        delta=D("1e-7"),
        refresh_seconds=86400,
        max_rows_per_subject=3,
        version=4,
    )
    doc = rules.to_json()
    text = json.dumps(doc)
    assert _no_floats(doc)
    assert doc["columns"]["tax_paid"] == {
        "disclosure": "after_aggregate",
        "lower": "-12.5",
        "upper": "1000000",
    }
    assert doc["epsilon_budget"] == "0.75"
    assert doc["delta"] == "0.0000001"
    assert list(doc["columns"]) == ["district", "tax_paid"]
    assert AnalysisRules.from_json(json.loads(text)) == rules


def _no_floats(value: object) -> bool:
    if isinstance(value, float):
        return False
    if isinstance(value, dict):
        return all(_no_floats(v) for v in value.values())
    if isinstance(value, list):
        return all(_no_floats(v) for v in value)
    return True


bounds = st.decimals(
    min_value=D("-1e12"), max_value=D("1e12"), places=4, allow_nan=False, allow_infinity=False
)


@given(
    st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_]{0,10}", fullmatch=True),
        st.tuples(st.sampled_from(list(Disclosure)), st.none() | st.tuples(bounds, bounds)),
        max_size=6,
    ),
    st.integers(MIN_K, MAX_K),
    st.booleans(),
    st.decimals(min_value=D("0.01"), max_value=D(10), places=3),
)
def test_json_round_trip_property(
    columns: dict[str, tuple[Disclosure, tuple[Decimal, Decimal] | None]],
    k: int,
    dp: bool,
    epsilon: Decimal,
) -> None:
    parsed = {}
    for name, (disclosure, pair) in columns.items():
        if pair is None:
            parsed[name] = ColumnRule(disclosure)
        else:
            lo, hi = sorted(pair)
            parsed[name] = ColumnRule(disclosure, lo, hi)
    rules = AnalysisRules(columns=parsed, min_group_size=k, dp_required=dp, epsilon_budget=epsilon)
    doc = rules.to_json()
    assert _no_floats(doc)
    assert AnalysisRules.from_json(json.loads(json.dumps(doc))) == rules


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"surprise": 1},
        {"columns": []},
        {"columns": {"a": "plaintext"}},
        {"columns": {"a": {"disclosure": "everything"}}},
        {"columns": {"a": {"disclosure": "plaintext", "extra": 1}}},
        {"columns": {"a": {"disclosure": "after_aggregate", "lower": 0.5, "upper": "1"}}},
        {"columns": {"a": {"disclosure": "after_aggregate", "lower": "x", "upper": "1"}}},
        {"epsilon_budget": 1.0},
        {"epsilon_budget": "lots"},
        {"min_group_size": "10"},
        {"dp_required": 1},
    ],
)
def test_from_json_refuses(doc: object) -> None:
    with pytest.raises(InvalidInputError):
        AnalysisRules.from_json(doc)


def test_from_json_defaults() -> None:
    assert AnalysisRules.from_json({}) == AnalysisRules()
