"""Differential-privacy noise: calibration checked against OpenDP's privacy maps and
statistically, with tolerances of six standard errors (a false failure has probability of the
order of 1e-9 per check, so the tests are not flaky, yet a wrong scale by a factor of 1.5 or a
biased sampler fails them)."""

from __future__ import annotations

import ast
import math
import statistics
from decimal import Decimal
from pathlib import Path

import pytest

from exchange.errors import InvalidInputError
from exchange.node import dp

D = Decimal
DRAWS = 4000
SIGMAS = 6
ROOT = Path(__file__).resolve().parents[2]


def discrete_laplace_moments(scale: float) -> tuple[float, float]:
    """Exact variance and fourth moment of discrete Laplace noise, P(k) ∝ exp(-|k|/scale)."""
    t = math.exp(-1 / scale)
    norm = (1 - t) / (1 + t)
    terms = range(-int(60 * scale) - 60, int(60 * scale) + 61)
    var = sum(k**2 * norm * t ** abs(k) for k in terms)
    m4 = sum(k**4 * norm * t ** abs(k) for k in terms)
    return var, m4


def check_moments(samples: list[float], true: float, var: float, m4: float) -> None:
    """Mean within 6 standard errors of ``true``; sample variance within 6 standard errors of
    ``var`` (the standard error of a sample variance is sqrt((μ4 - σ⁴) / n))."""
    n = len(samples)
    mean = statistics.fmean(samples)
    assert abs(mean - true) <= SIGMAS * math.sqrt(var / n), (mean, true)
    s2 = statistics.variance(samples)
    assert abs(s2 - var) <= SIGMAS * math.sqrt((m4 - var**2) / n), (s2, var)


# -- calibration ---------------------------------------------------------------------------------


def test_scale_and_std() -> None:
    assert dp.scale_for(D("0.5"), D(1)) == D(2)
    assert dp.scale_for(D(2), D(1000)) == D(500)
    assert abs(dp.laplace_std(D(2)) - D("2.828427124746190097603377448")) < D("1e-27")


@pytest.mark.parametrize("epsilon", [D(0), D(-1), D("NaN"), D("Infinity"), 0.5, True])
def test_epsilon_must_be_positive(epsilon: object) -> None:
    with pytest.raises(InvalidInputError):
        dp.scale_for(epsilon, D(1))  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError):
        dp.DpMechanisms(epsilon)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("epsilon", "parts"), [(D(1), 3), (D("0.1"), 7), (D("2.5"), 1), (D("1e-6"), 4)]
)
def test_split_never_overspends(epsilon: Decimal, parts: int) -> None:
    share = dp.split_epsilon(epsilon, parts)
    assert 0 < share * parts <= epsilon
    assert epsilon - share * parts < parts * dp.EPSILON_QUANTUM


def test_split_refuses_dust() -> None:
    with pytest.raises(InvalidInputError):
        dp.split_epsilon(D("1e-13"), 2)


def test_sum_sensitivity() -> None:
    assert dp.sum_sensitivity(D(0), D(1000)) == D(1000)
    assert dp.sum_sensitivity(D(-5000), D(10)) == D(5000)
    assert dp.sum_sensitivity(D(-5), D(10), 3) == D(30)
    with pytest.raises(InvalidInputError):
        dp.sum_sensitivity(D(2), D(1))


@pytest.mark.parametrize(
    ("epsilon", "sensitivity"),
    [(D(1), 1), (D("0.1"), 1), (D("0.3"), 3), (D("0.333333333333"), 2), (D(7), 10)],
)
def test_count_mechanism_privacy_map(epsilon: Decimal, sensitivity: int) -> None:
    m = dp.count_mechanism(epsilon, sensitivity)
    spent = Decimal(m.map(sensitivity))
    assert spent <= epsilon
    assert spent >= epsilon * (1 - D("1e-9"))  # not over-noised either


@pytest.mark.parametrize(
    ("lower", "upper", "epsilon", "contributions"),
    [
        (D(0), D(1000), D(1), 1),
        (D(-250), D(100), D("0.1"), 1),
        (D("0.5"), D("99.75"), D("0.37"), 4),
    ],
)
def test_sum_mechanism_privacy_map(
    lower: Decimal, upper: Decimal, epsilon: Decimal, contributions: int
) -> None:
    m = dp.sum_mechanism(lower, upper, epsilon, contributions=contributions)
    sensitivity = dp.sum_sensitivity(lower, upper, contributions)
    assert Decimal(m.map(float(sensitivity))) <= epsilon


def test_zero_width_bounds_need_no_noise() -> None:
    assert dp.laplace_sum(D(0), D(0), D(0), D(1)) == 0


# -- statistics ----------------------------------------------------------------------------------


def test_count_noise_is_calibrated() -> None:
    epsilon, true = D("0.5"), 1000
    samples = [dp.laplace_count(true, epsilon) for _ in range(DRAWS)]
    assert all(isinstance(s, int) for s in samples)
    var, m4 = discrete_laplace_moments(2.0)
    check_moments([float(s) for s in samples], true, var, m4)
    assert len(set(samples)) > 15  # the noise really varies


def test_count_noise_scales_with_sensitivity() -> None:
    # sensitivity 3 at ε = 1.5 is the same scale (2) as sensitivity 1 at ε = 0.5
    samples = [dp.laplace_count(0, D("1.5"), sensitivity=3) for _ in range(DRAWS)]
    var, m4 = discrete_laplace_moments(2.0)
    check_moments([float(s) for s in samples], 0, var, m4)


def test_sum_noise_is_calibrated() -> None:
    lower, upper, epsilon, true = D(-200), D(1000), D(2), D("123456.75")
    scale = float(dp.scale_for(epsilon, dp.sum_sensitivity(lower, upper)))  # 500
    samples = [float(dp.laplace_sum(true, lower, upper, epsilon)) for _ in range(DRAWS)]
    check_moments(samples, float(true), 2 * scale**2, 24 * scale**4)
    # Laplace-shaped, not merely the right variance: P(|noise| <= b) = 1 - 1/e (a Gaussian of
    # the same variance gives 0.52)
    inside = sum(abs(s - float(true)) <= scale for s in samples) / DRAWS
    p = 1 - math.exp(-1)
    assert abs(inside - p) <= SIGMAS * math.sqrt(p * (1 - p) / DRAWS)
    assert len(set(samples)) == DRAWS


def test_sum_noise_scales_with_contributions() -> None:
    one = dp.sum_mechanism(D(0), D(10), D(1))
    four = dp.sum_mechanism(D(0), D(10), D(1), contributions=4)
    assert Decimal(four.map(40.0)) <= 1
    assert one.map(40.0) > 3.9  # the same scale would spend four times the ε


def test_mechanisms_object() -> None:
    mech = dp.DpMechanisms(D("0.8"))
    assert mech.delta == 0
    assert isinstance(mech.count(10, D("0.4")), int)
    assert isinstance(mech.sum(D(10), D(0), D(5), D("0.4")), Decimal)


def test_bad_values() -> None:
    with pytest.raises(ValueError):
        dp.laplace_count(1.5, D(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dp.laplace_count(2**63, D(1))
    with pytest.raises(ValueError):
        dp.laplace_sum(1.5, D(0), D(1), D(1))  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        dp.laplace_sum(D("NaN"), D(0), D(1), D(1))
    with pytest.raises(ValueError):
        dp.laplace_count(1, D(1), sensitivity=0)


@pytest.mark.parametrize("module", ["exchange/node/dp.py", "exchange/node/sqlcheck.py"])
def test_no_python_random(module: str) -> None:
    tree = ast.parse((ROOT / module).read_text("utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "random" not in imported
    assert "numpy" not in imported


# -- the one ε type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ("0.5", D("0.5")),
        ("0.50", D("0.5")),
        (" 1 ", D(1)),
        (2, D(2)),
        (D("0.01"), D("0.01")),
        ("1e-2", D("0.01")),
        ("1E+1", D(10)),
        ("0.123456789", D("0.123456789")),
    ],
)
def test_epsilon_forms_that_parse(given: object, parsed: Decimal) -> None:
    eps = dp.parse_epsilon(given)
    assert eps == parsed and str(eps) == str(parsed)  # one spelling per value on a receipt


@pytest.mark.parametrize(
    ("given", "reason"),
    [
        ("0.001", "epsilon_below_floor"),
        ("0", "epsilon_below_floor"),
        ("-1", "epsilon_below_floor"),
        ("10.5", "bad_epsilon"),
        ("1e-30", "bad_epsilon"),
        ("0.0100000001", "bad_epsilon"),
        ("1E+999999999", "bad_epsilon"),
        ("NaN", "bad_epsilon"),
        ("Infinity", "bad_epsilon"),
        ("", "bad_epsilon"),
        ("x" * 40, "bad_epsilon"),
        (0.5, "bad_epsilon"),
        (True, "bad_epsilon"),
        (None, "bad_epsilon"),
        ([1], "bad_epsilon"),
    ],
)
def test_epsilon_forms_that_are_refused_with_a_reason(given: object, reason: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        dp.parse_epsilon(given)
    assert caught.value.extra["reason"] == reason


def test_epsilon_floor_and_ceiling_are_parameters() -> None:
    assert dp.parse_epsilon("0.001", floor=D("0.001")) == D("0.001")
    with pytest.raises(InvalidInputError):
        dp.parse_epsilon("0.5", floor=D(1))
    with pytest.raises(InvalidInputError):
        dp.parse_epsilon("2", ceiling=D(1))


# -- noisy gates ------------------------------------------------------------------------------


def discrete_laplace_tail(scale: Decimal, t: int) -> float:
    """P[Z ≥ t] for t ≥ 0, Z discrete Laplace with P(z) ∝ exp(-|z|/scale): q^t / (1 + q)."""
    q = math.exp(-1 / float(scale))
    return q**t / (1 + q)


@pytest.mark.parametrize(
    ("k", "epsilon", "sensitivity", "delta"),
    [
        (10, D("0.1"), 1, D("1e-7")),
        (10, D("0.333"), 3, D("1e-7")),
        (2, D(1), 1, D("0.01")),
        (5, D("0.05"), 10, D("1e-9")),
        (500, D(2), 1, D("1e-5")),
    ],
)
def test_a_gate_over_data_found_groups_opens_a_one_subject_group_with_probability_delta(
    k: int, epsilon: Decimal, sensitivity: int, delta: Decimal
) -> None:
    """Exact, not sampled: with the scale OpenDP was built with, each of the M groups one
    subject alone makes opens with probability P[Z ≥ τ - 1], and M times that is at most δ."""
    gate = dp.Gate(k, epsilon, sensitivity, delta)
    assert gate.threshold >= k
    assert sensitivity * discrete_laplace_tail(gate.scale, gate.threshold - 1) <= float(delta)
    # the scale is the one the privacy map accepted: never below Δ/ε
    assert gate.scale >= D(sensitivity) / epsilon


def test_a_gate_over_fixed_groups_is_k_and_spends_no_delta() -> None:
    gate = dp.Gate(10, D("0.1"))
    assert gate.threshold == 10 and gate.delta is None


def test_a_one_subject_group_never_opens_at_a_tiny_delta() -> None:
    # 200 draws, each opening with probability at most 1e-13: a false failure has probability
    # at most 2e-11
    gate = dp.Gate(2, D("0.5"), 1, D("1e-13"))
    assert not any(gate.opens(1) for _ in range(200))


def test_a_gate_opens_far_above_its_threshold_and_stays_shut_far_below() -> None:
    # 40 scales away the discrete Laplace tail is e^-40 < 5e-18 per draw (400 draws: < 2e-15)
    gate = dp.Gate(1000, D("0.2"))
    far = int(40 * gate.scale) + 1
    assert far < gate.threshold
    assert all(gate.opens(gate.threshold + far) for _ in range(200))
    assert not any(gate.opens(gate.threshold - far) for _ in range(200))


def test_a_gate_needs_a_usable_delta() -> None:
    with pytest.raises(InvalidInputError) as caught:
        dp.Gate(10, D("0.1"), 1, D(0))
    assert caught.value.extra["reason"] == "delta_required"
