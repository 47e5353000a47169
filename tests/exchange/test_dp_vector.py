"""One OpenDP call noises every group of a released column (and the gate's counts of every
group): each element has the distribution of one scalar draw at the same scale, independent of
the others and of how many groups are drawn, and a release has the shape it had when every value
was drawn on its own.

The statistical checks are Chernoff bounds computed here, not rules of thumb: for the mean of n
independent copies of a variable X ≥ 0 with moment generating function M,
``P[mean ≥ t] ≤ exp(-n·(λt - ln M(λ)))`` for every λ > 0, and ``P[mean ≤ t] ≤
exp(-n·(-λt - ln M(-λ)))`` likewise. :func:`window` finds the narrowest interval whose two tails
are each at most :data:`TAIL`, and asserts that the interval is narrow enough to catch a scale
off by a factor of 1.25: a false failure has probability at most ``2·TAIL`` per window, and no
test below checks more than two windows, so each fails spuriously with probability below 1e-9.
The other checks use Hoeffding's inequality, ``P[|mean - p| ≥ t] ≤ 2·exp(-2·m·t²)`` for m
independent indicators, with the bound stated where it is used.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from exchange.errors import InvalidInputError
from exchange.node import dp
from exchange.node.analysis import AnalysisRules, ColumnRule, Disclosure
from exchange.node.sqlcheck import CheckedQuery, TableColumn, TableRules, check_query, postprocess
from policy.levels import Level

D = Decimal
#: the chance each tail of a window leaves a correct sampler outside it
TAIL = 2.5e-10
#: draws per window
DRAWS = 6000


# -- Chernoff windows ----------------------------------------------------------------------------


def _tail(log_mgf: Callable[[float], float], n: int, t: float, lambdas: list[float]) -> float:
    """The Chernoff bound exp(-n·(λt - ln M(λ))), best over ``lambdas``: on P[mean ≥ t] for
    positive λ, on P[mean ≤ t] for negative λ."""
    best = min(-(lam * t - log_mgf(lam)) for lam in lambdas)
    return math.exp(n * best) if n * best > -700 else 0.0


#: λ·scale over (0, 1) for the upper tail (every M below is finite there), (-50, 0) below
UP = [i / 400 for i in range(1, 400)]
DOWN = [-i / 40 for i in range(1, 2000)]


def window(
    log_mgf: Callable[[float], float], mean: float, n: int, scale: float
) -> tuple[float, float]:
    """The narrowest [lo, hi] (to 0.1 % of ``mean``) whose Chernoff tails for the mean of ``n``
    draws are each at most TAIL."""
    up, down = [u / scale for u in UP], [u / scale for u in DOWN]
    steps = [i / 1000 for i in range(1, 1000)]
    hi = next(mean * (1 + s) for s in steps if _tail(log_mgf, n, mean * (1 + s), up) <= TAIL)
    lo = next(mean * (1 - s) for s in steps if _tail(log_mgf, n, mean * (1 - s), down) <= TAIL)
    # the test has power: a mean absolute noise 1.25 times too large or too small falls outside
    assert hi < 1.25 * mean and lo > mean / 1.25, (lo, mean, hi)
    return lo, hi


def laplace_abs_log_mgf(scale: float) -> Callable[[float], float]:
    """ln E[exp(λ|X|)] for X Laplace of scale b: |X| is exponential with mean b (the float
    noise is OpenDP's discretized Laplace, rounded to a double: off by a relative 2⁻⁵² at most,
    far inside any window here)."""
    return lambda lam: -math.log(1 - lam * scale)


def discrete_laplace_abs_mean(scale: float) -> float:
    """E|X| for discrete Laplace noise, P(x) ∝ α^|x| with α = exp(-1/b): 2α / (1 - α²)."""
    a = math.exp(-1 / scale)
    return 2 * a / (1 - a * a)


def discrete_laplace_abs_log_mgf(scale: float) -> Callable[[float], float]:
    """ln E[exp(λ|X|)] for discrete Laplace noise: ((1-α)/(1+α))·(1 + α·e^λ)/(1 - α·e^λ)."""
    a = math.exp(-1 / scale)
    return lambda lam: (
        math.log((1 - a) / (1 + a)) + math.log1p(a * math.exp(lam)) - math.log1p(-a * math.exp(lam))
    )


def check_count_scale(noise: list[int], scale: float) -> None:
    mean = discrete_laplace_abs_mean(scale)
    lo, hi = window(discrete_laplace_abs_log_mgf(scale), mean, len(noise), scale)
    observed = sum(abs(x) for x in noise) / len(noise)
    assert lo <= observed <= hi, (lo, observed, hi)


def check_sum_scale(noise: list[float], scale: float) -> None:
    lo, hi = window(laplace_abs_log_mgf(scale), scale, len(noise), scale)
    observed = sum(abs(x) for x in noise) / len(noise)
    assert lo <= observed <= hi, (lo, observed, hi)


def test_the_windows_are_what_the_module_says() -> None:
    # n = 6000 exponential draws: about ±6 % around the mean at 2.5e-10 per tail
    lo, hi = window(laplace_abs_log_mgf(1.0), 1.0, DRAWS, 1.0)
    assert 0.9 < lo < 0.95 and 1.05 < hi < 1.1
    assert _tail(laplace_abs_log_mgf(1.0), DRAWS, lo, DOWN) <= TAIL
    assert _tail(laplace_abs_log_mgf(1.0), DRAWS, hi, UP) <= TAIL


# -- (a) the scale of vector draws ---------------------------------------------------------------


@pytest.mark.parametrize(("epsilon", "sensitivity"), [(D("0.5"), 1), (D("1.5"), 3), (D(2), 1)])
def test_vector_count_noise_has_the_documented_scale(epsilon: Decimal, sensitivity: int) -> None:
    scale = float(dp.scale_for(epsilon, D(sensitivity)))
    noisy = dp.laplace_counts([1000] * DRAWS, epsilon, sensitivity=sensitivity)
    assert all(isinstance(x, int) for x in noisy)
    check_count_scale([x - 1000 for x in noisy], scale)


def test_vector_sum_noise_has_the_documented_scale() -> None:
    lower, upper, epsilon, true = D(-200), D(1000), D(2), D("123456.75")
    scale = float(dp.scale_for(epsilon, dp.sum_sensitivity(lower, upper, 3)))  # 1500
    noisy = dp.laplace_sums([true] * DRAWS, lower, upper, epsilon, contributions=3)
    assert all(isinstance(x, Decimal) for x in noisy)
    check_sum_scale([float(x - true) for x in noisy], scale)


def test_the_gates_vector_counts_have_its_scale() -> None:
    gate = dp.Gate(10, D("0.25"), sensitivity=2, delta=D("1e-7"))
    noisy = gate.noisy_each([500] * DRAWS)
    check_count_scale([x - 500 for x in noisy], float(gate.scale))
    # the scale is the one the scalar mechanism was calibrated to, within OpenDP's rounding
    assert abs(gate.scale - dp.scale_for(D("0.25"), D(2))) < D("1e-9")


def test_the_vector_twins_are_cached_and_spend_what_the_scalar_mechanisms_spend() -> None:
    epsilon = D("0.37")
    twin = dp._count_vector(epsilon, 2)
    assert dp._count_vector(epsilon, 2) is twin
    assert D(twin.map(2)) == D(dp.count_mechanism(epsilon, 2).map(2)) <= epsilon
    sums = dp._sum_vector(D(0), D(10), epsilon, 4)
    assert dp._sum_vector(D(0), D(10), epsilon, 4) is sums
    scalar = dp.sum_mechanism(D(0), D(10), epsilon, contributions=4)
    assert D(sums.map(40.0)) == D(scalar.map(40.0)) <= epsilon


# -- (b) a group's noise is its own, whatever is drawn with it -----------------------------------


@pytest.mark.parametrize("groups", [1, 3, 64])
def test_a_groups_noise_does_not_depend_on_how_many_groups_are_drawn(groups: int) -> None:
    """Vectors of 1, 3 or 64 groups: every element has the scale of a single draw (a mechanism
    that split ε over the groups, or scaled the noise by their number, falls outside)."""
    calls = math.ceil(DRAWS / groups)
    counts: list[int] = []
    sums: list[float] = []
    for _ in range(calls):
        counts += dp.laplace_counts([0] * groups, D(1), sensitivity=2)
        sums += [float(x) for x in dp.laplace_sums([0] * groups, D(0), D(100), D(1))]
    check_count_scale(counts, 2.0)
    check_sum_scale(sums, 100.0)


def test_no_draw_is_shared_between_groups() -> None:
    """Within one vector, two groups' noises are independent: for m disjoint pairs (x, y),

    - sums: P[sign x = sign y] = 1/2 (continuous symmetric noise); Hoeffding with m = 10000 and
      t = 0.04 bounds a false failure by 2·exp(-32) < 3e-14; one draw added to every group
      would agree always;
    - counts: P[x = y] = Σ p(k)², exactly ((1-α)/(1+α))² (1+α²)/(1-α²); the same bound.
    """
    m, t = 10_000, 0.04
    sums = [float(x) for x in dp.laplace_sums([0] * (2 * m), D(0), D(100), D(1))]
    agree = sum((a > 0) == (b > 0) for a, b in zip(sums[::2], sums[1::2], strict=True)) / m
    assert abs(agree - 0.5) < t
    assert len(set(sums)) > 1.99 * m  # and no two groups got the same value
    scale = 2.0
    counts = dp.laplace_counts([0] * (2 * m), D("0.5"))
    a = math.exp(-1 / scale)
    p_equal = ((1 - a) / (1 + a)) ** 2 * (1 + a * a) / (1 - a * a)
    equal = sum(x == y for x, y in zip(counts[::2], counts[1::2], strict=True)) / m
    assert abs(equal - p_equal) < t


def test_a_release_draws_each_column_once_with_one_mechanism_whatever_the_number_of_groups(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The release of 1 group and of 64: the gate and every noisy column are one OpenDP call
    each, with the very mechanism (so the scale) of the other release, one element per group."""
    calls: list[tuple[Any, int]] = []
    invoke = dp._invoke

    def spy(measurement: Any, value: Any) -> Any:
        calls.append((measurement, len(value) if isinstance(value, list) else -1))
        return invoke(measurement, value)

    monkeypatch.setattr(dp, "_invoke", spy)
    checked = check_query(QUERIES[0], TABLES, with_dp=True)
    seen: dict[int, list[tuple[Any, int]]] = {}
    for groups in (1, 64):
        calls.clear()
        released = postprocess(checked, _groups(checked, groups), dp=dp.DpMechanisms(D("0.8")))
        assert len(released.rows) == groups
        seen[groups] = list(calls)
    # the gate, two counts and two sums (AVG reads one of each): five calls each time
    assert [n for _, n in seen[1]] == [1] * 5
    assert [n for _, n in seen[64]] == [64] * 5
    assert [m for m, _ in seen[1]] == [m for m, _ in seen[64]]


# -- (c) a release has the shape it had ----------------------------------------------------------

COLUMNS = (
    TableColumn("firm", "text", Level.L2),
    TableColumn("district", "text", Level.L1),
    TableColumn("revenue", "decimal", Level.L3),
    TableColumn("staff", "integer", Level.L3),
)
RULES = AnalysisRules(
    columns={
        "firm": ColumnRule(Disclosure.JOIN_ONLY),
        "district": ColumnRule(Disclosure.PLAINTEXT),
        "revenue": ColumnRule(Disclosure.AFTER_AGGREGATE, D(0), D(1000)),
        "staff": ColumnRule(Disclosure.AFTER_AGGREGATE, D(0), D(50)),
    },
    min_group_size=5,
)
TABLES = {"firms": TableRules("firms", COLUMNS, "firm", RULES, zone="z")}
QUERIES = [
    "SELECT district, COUNT(*), SUM(revenue), AVG(revenue), SUM(staff) FROM firms "
    "GROUP BY district",
    "SELECT COUNT(*), SUM(revenue), AVG(staff) FROM firms",
    "SELECT district, COUNT(*) AS n, SUM(revenue) AS s FROM firms GROUP BY district "
    "ORDER BY s DESC LIMIT 3",
]
#: distinct subjects per group: above and below every threshold, and a group with none
GROUPS = [("a", 400), ("b", 3), ("c", 1000), ("d", 60), ("e", None), ("f", 17), ("g", 250)]


def _raw(checked: CheckedQuery, groups: list[tuple[str, int | None]]) -> list[tuple[Any, ...]]:
    rows = []
    for name, distinct in groups:
        row: list[Any] = []
        for c in checked.columns:
            if c.kind == "dimension":
                row.append(name)
            elif c.kind == "k":
                row.append(distinct)
            elif c.kind == "sum":
                row.append(None if distinct is None else D(distinct) * D("12.5"))
            else:
                row.append(0 if distinct is None else distinct * 2)
        rows.append(tuple(row))
    if not any(c.kind == "dimension" for c in checked.columns):
        rows = rows[:1]
    return rows


def _groups(checked: CheckedQuery, n: int) -> list[tuple[Any, ...]]:
    """``n`` groups of 10⁶ subjects each: far above any threshold here (open but with
    probability below e^-1000)."""
    return _raw(checked, [(f"g{i:03}", 1_000_000) for i in range(n)])


#: what the release was before the noise was drawn per column, with the noise set to zero
#: (the OpenDP call replaced by the identity): the JSON and the Python types of the rows
BEFORE = [
    {
        "json": {
            "columns": ["district", "count_star", "sum_revenue", "avg_revenue", "sum_staff"],
            "rows": [
                ["a", 800, "5000", "6.25", "5000"],
                ["c", 2000, "12500", "6.25", "12500"],
                ["g", 500, "3125", "6.25", "3125"],
            ],
            "suppressed": None,
            "k": 5,
            "level": "L3",
            "epsilon": "0.8",
            "delta": "0.0000001",
            "gate": {
                "k": 5,
                "threshold": 102,
                "epsilon": "0.16",
                "delta": "0.0000001",
                "sensitivity": "1",
                "scale": "6.250000000005685230064500502",
            },
            "noise": [
                {
                    "value": "count(*)",
                    "mechanism": "discrete_laplace",
                    "sensitivity": "1",
                    "scale": "6.25",
                    "epsilon": "0.16",
                },
                {
                    "value": "sum(firms.revenue)",
                    "mechanism": "laplace",
                    "sensitivity": "1000",
                    "scale": "6250",
                    "epsilon": "0.16",
                },
                {
                    "value": "count(firms.revenue)",
                    "mechanism": "discrete_laplace",
                    "sensitivity": "1",
                    "scale": "6.25",
                    "epsilon": "0.16",
                },
                {
                    "value": "sum(firms.staff)",
                    "mechanism": "laplace",
                    "sensitivity": "50",
                    "scale": "312.5",
                    "epsilon": "0.16",
                },
            ],
        },
        "types": [["str", "int", "Decimal", "Decimal", "Decimal"]] * 3,
    },
    {
        "json": {
            "columns": ["count_star", "sum_revenue", "avg_staff"],
            "rows": [[800, "5000", "6.25"]],
            "suppressed": None,
            "k": 5,
            "level": "L3",
            "epsilon": "0.8",
            "delta": "0",
            "gate": {
                "k": 5,
                "threshold": 5,
                "epsilon": "0.16",
                "delta": None,
                "sensitivity": "1",
                "scale": "6.250000000005685230064500502",
            },
            "noise": [
                {
                    "value": "count(*)",
                    "mechanism": "discrete_laplace",
                    "sensitivity": "1",
                    "scale": "6.25",
                    "epsilon": "0.16",
                },
                {
                    "value": "sum(firms.revenue)",
                    "mechanism": "laplace",
                    "sensitivity": "1000",
                    "scale": "6250",
                    "epsilon": "0.16",
                },
                {
                    "value": "sum(firms.staff)",
                    "mechanism": "laplace",
                    "sensitivity": "50",
                    "scale": "312.5",
                    "epsilon": "0.16",
                },
                {
                    "value": "count(firms.staff)",
                    "mechanism": "discrete_laplace",
                    "sensitivity": "1",
                    "scale": "6.25",
                    "epsilon": "0.16",
                },
            ],
        },
        "types": [["int", "Decimal", "Decimal"]],
    },
    {
        "json": {
            "columns": ["district", "n", "s"],
            "rows": [["c", 2000, "12500"], ["a", 800, "5000"], ["g", 500, "3125"]],
            "suppressed": None,
            "k": 5,
            "level": "L3",
            "epsilon": "0.8",
            "delta": "0.0000001",
            "gate": {
                "k": 5,
                "threshold": 62,
                "epsilon": "0.266666666666",
                "delta": "0.0000001",
                "sensitivity": "1",
                "scale": "3.750000000012786216530003003",
            },
            "noise": [
                {
                    "value": "count(*)",
                    "mechanism": "discrete_laplace",
                    "sensitivity": "1",
                    "scale": "3.750000000009375000000023438",
                    "epsilon": "0.266666666666",
                },
                {
                    "value": "sum(firms.revenue)",
                    "mechanism": "laplace",
                    "sensitivity": "1000",
                    "scale": "3750.000000009375000000023438",
                    "epsilon": "0.266666666666",
                },
            ],
        },
        "types": [["str", "int", "Decimal"]] * 3,
    },
]


@pytest.mark.parametrize(("sql", "before"), list(zip(QUERIES, BEFORE, strict=True)))
def test_a_release_without_noise_is_exactly_what_it_was(
    sql: str, before: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the noise set to zero, the gate opens exactly the groups at or above its threshold
    and the release is, value for value and type for type, what the per-value draws gave."""
    monkeypatch.setattr(dp, "_invoke", lambda measurement, value: value)
    checked = check_query(sql, TABLES, with_dp=True)
    released = postprocess(checked, _raw(checked, GROUPS), dp=dp.DpMechanisms(D("0.8")))
    assert json.loads(json.dumps(released.to_json())) == before["json"]
    assert [[type(v).__name__ for v in row] for row in released.rows] == before["types"]


def test_a_noisy_release_keeps_its_groups_order_and_types() -> None:
    checked = check_query(QUERIES[0], TABLES, with_dp=True)
    released = postprocess(checked, _groups(checked, 40), dp=dp.DpMechanisms(D("0.8")))
    assert [r[0] for r in released.rows] == [f"g{i:03}" for i in range(40)]
    for _, count, total, average, staff in released.rows:
        assert isinstance(count, int) and count >= 0
        assert isinstance(total, Decimal) and isinstance(staff, Decimal)
        assert isinstance(average, Decimal) and 0 <= average <= 1000
        # 200 scales from the true values: a chance below e^-200 per value
        assert abs(count - 2_000_000) < 200 * 6.25
        assert abs(total - 12_500_000) < 200 * 6250


# -- inputs ---------------------------------------------------------------------------------------


def test_vector_draws_check_their_inputs_as_the_scalar_ones_do() -> None:
    assert dp.laplace_counts([], D(1)) == []
    assert dp.laplace_sums([], D(0), D(1), D(1)) == []
    assert dp.Gate(5, D(1)).opens_each([]) == []
    with pytest.raises(InvalidInputError):
        dp.laplace_counts([], D(0))  # ε is checked even with nothing to draw
    with pytest.raises(ValueError):
        dp.laplace_counts([1, True], D(1))
    with pytest.raises(ValueError):
        dp.laplace_counts([1, 2**63], D(1))
    with pytest.raises(ValueError):
        dp.laplace_sums([D(1), D("NaN")], D(0), D(1), D(1))
    with pytest.raises(ValueError):
        dp.laplace_sums([1.5], D(0), D(1), D(1))  # type: ignore[list-item]
    with pytest.raises(ValueError):
        dp.Gate(5, D(1)).noisy_each([3, -(2**63)])
    # bounds of zero width: the sum is 0 whatever the data, no noise
    assert dp.laplace_sums([D(0), 0], D(0), D(0), D(1)) == [0, 0]


def test_the_gate_decides_each_group_as_it_decided_one() -> None:
    # 40 scales away the discrete Laplace tail is below e^-40 per draw (400 draws: < 2e-15)
    gate = dp.Gate(1000, D("0.2"))
    far = int(40 * gate.scale) + 1
    decided = gate.opens_each([gate.threshold + far, gate.threshold - far] * 200)
    assert decided == [True, False] * 200
