"""Differential-privacy noise for aggregate releases, drawn from OpenDP mechanisms.

Counts get discrete Laplace noise (OpenDP's ``make_laplace`` over an ``i64`` atom domain, the
geometric mechanism) so a noisy count is still an integer; sums get Laplace noise over floats,
which OpenDP samples on a discretized grid, so the float-rounding attacks on textbook Laplace
samplers do not apply. Noise comes from OpenDP's own cryptographically secure sampler; nothing
here uses Python's ``random``.

Calibration: to spend ε on a value whose sensitivity (the most one privacy unit can move it) is
Δ, the Laplace scale is ``b = Δ / ε``; the noise has mean 0 and standard deviation ``√2·b``
(:func:`laplace_std`). A count's Δ is the number of rows one subject may contribute; a clamped
sum's Δ is that number times ``max(|lower|, |upper|)`` (neighbouring datasets add or remove one
subject). Every mechanism is built with a scale rounded *up* from the exact decimal and then
checked against OpenDP's own privacy map: the ε it reports for Δ must not exceed the ε charged,
compared exactly as decimals. ε is accounted in :class:`~decimal.Decimal`;
:func:`split_epsilon` divides a query's ε between its noisy values by sequential composition,
rounding each share down so the shares never add up to more than the whole.

These are pure ε-DP mechanisms: they spend no δ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, localcontext
from functools import cache
from typing import Any

from exchange.errors import InvalidInputError

__all__ = [
    "DpMechanisms",
    "count_mechanism",
    "laplace_count",
    "laplace_std",
    "laplace_sum",
    "scale_for",
    "split_epsilon",
    "sum_mechanism",
    "sum_sensitivity",
]

#: ε shares are rounded down to this quantum
EPSILON_QUANTUM = Decimal("1e-12")
#: the largest |count| the integer mechanism accepts (OpenDP's i64, with room for the noise)
MAX_COUNT = 2**62
_PRECISION = 50


@cache
def _prelude() -> Any:
    """OpenDP's prelude with the ``contrib`` mechanisms enabled (once, on first use)."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


def _positive(epsilon: Decimal, what: str = "epsilon") -> Decimal:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (Decimal, int)):
        raise InvalidInputError(f"{what} must be a decimal")
    value = Decimal(epsilon)
    if not value.is_finite() or value <= 0:
        raise InvalidInputError(f"{what} must be above 0")
    return value


def scale_for(epsilon: Decimal, sensitivity: Decimal) -> Decimal:
    """The Laplace scale ``Δ / ε`` that spends ``epsilon`` on a value of sensitivity ``Δ``."""
    eps = _positive(epsilon)
    delta = Decimal(sensitivity)
    if not delta.is_finite() or delta < 0:
        raise InvalidInputError("sensitivity must be a finite number of at least 0")
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        return delta / eps


def laplace_std(scale: Decimal) -> Decimal:
    """The standard deviation ``√2·b`` of Laplace noise of scale ``b``."""
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        return Decimal(2).sqrt() * Decimal(scale)


def split_epsilon(epsilon: Decimal, parts: int) -> Decimal:
    """Each of ``parts`` equal shares of ``epsilon``, rounded down so that
    ``parts * share <= epsilon`` (sequential composition never overspends)."""
    eps = _positive(epsilon)
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError("parts must be a positive integer")
    with localcontext() as ctx:
        ctx.prec = _PRECISION
        share = (eps / parts).quantize(EPSILON_QUANTUM, rounding=ROUND_FLOOR)
    if share <= 0:
        raise InvalidInputError("epsilon is too small to split between the released values")
    return share


def sum_sensitivity(lower: Decimal, upper: Decimal, contributions: int = 1) -> Decimal:
    """How far one subject moves a sum of values clamped to ``[lower, upper]`` when it
    contributes up to ``contributions`` rows: ``contributions · max(|lower|, |upper|)``."""
    lo, hi = Decimal(lower), Decimal(upper)
    if not (lo.is_finite() and hi.is_finite()) or lo > hi:
        raise InvalidInputError("clamping bounds must be finite with lower <= upper")
    _contributions(contributions)
    return contributions * max(abs(lo), abs(hi))


def _contributions(contributions: int) -> int:
    if isinstance(contributions, bool) or not isinstance(contributions, int) or contributions < 1:
        raise ValueError("contributions must be a positive integer")
    return contributions


def _float_up(value: Decimal) -> float:
    """The smallest float not below ``value``."""
    result = float(value)
    if Decimal(result) < value:
        result = math.nextafter(result, math.inf)
    return result


def _calibrated(make: Any, scale: Decimal, d_in: Any, epsilon: Decimal) -> Any:
    """A mechanism from ``make(scale)`` whose privacy map gives at most ``epsilon`` for
    ``d_in``. The scale starts rounded up from the exact one and grows by a hair until OpenDP's
    map (which rounds conservatively) agrees."""
    candidate = max(_float_up(scale), math.ulp(0.0))
    for _ in range(64):
        measurement = make(candidate)
        # the privacy map is OpenDP's own proof obligation; compare it exactly, as decimals
        if Decimal(measurement.map(d_in)) <= epsilon:
            return measurement
        candidate = math.nextafter(candidate * (1 + 2**-40), math.inf)
    raise InvalidInputError("no noise scale meets this epsilon")  # pragma: no cover


def count_mechanism(epsilon: Decimal, sensitivity: int = 1) -> Any:
    """The discrete Laplace measurement for an integer of the given sensitivity at ``epsilon``
    (an OpenDP ``Measurement``; its ``map(sensitivity)`` is at most ``epsilon``)."""
    eps = _positive(epsilon)
    _contributions(sensitivity)
    dp = _prelude()
    space = dp.atom_domain(T="i64"), dp.absolute_distance(T="i64")
    return _calibrated(
        lambda s: dp.m.make_laplace(*space, scale=s),
        scale_for(eps, Decimal(sensitivity)),
        sensitivity,
        eps,
    )


def sum_mechanism(
    lower: Decimal, upper: Decimal, epsilon: Decimal, *, contributions: int = 1
) -> Any:
    """The Laplace measurement for a sum of values clamped to ``[lower, upper]`` with up to
    ``contributions`` rows per subject, at ``epsilon``."""
    eps = _positive(epsilon)
    sensitivity = sum_sensitivity(lower, upper, contributions)
    dp = _prelude()
    space = dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float)
    if sensitivity == 0:
        # every value is clamped to 0: the sum is 0 whatever the data, and needs no noise
        return None
    return _calibrated(
        lambda s: dp.m.make_laplace(*space, scale=s),
        scale_for(eps, sensitivity),
        _float_up(sensitivity),
        eps,
    )


def laplace_count(true: int, epsilon: Decimal, *, sensitivity: int = 1) -> int:
    """``true`` plus discrete Laplace noise of scale ``sensitivity / epsilon``."""
    if isinstance(true, bool) or not isinstance(true, int) or abs(true) > MAX_COUNT:
        raise ValueError("a count must be an integer within ±2^62")
    noisy = count_mechanism(epsilon, sensitivity)(true)
    return int(noisy)


def laplace_sum(
    true: Decimal | int,
    lower: Decimal,
    upper: Decimal,
    epsilon: Decimal,
    *,
    contributions: int = 1,
) -> Decimal:
    """``true`` (a sum of values clamped to ``[lower, upper]``) plus Laplace noise of scale
    ``contributions · max(|lower|, |upper|) / epsilon``, as a decimal."""
    if isinstance(true, bool) or not isinstance(true, (Decimal, int)):
        raise ValueError("a sum must be a Decimal or an int")
    value = Decimal(true)
    if not value.is_finite():
        raise ValueError("a sum must be finite")
    measurement = sum_mechanism(lower, upper, epsilon, contributions=contributions)
    if measurement is None:
        return value
    noisy = measurement(float(value))
    return Decimal(repr(float(noisy)))


@dataclass(frozen=True)
class DpMechanisms:
    """The noise for one release: the query's total ``epsilon`` and the mechanisms spending it.

    The query's ε is split between its noisy values (:func:`split_epsilon`); each value of each
    released group draws its own noise. Pure ε-DP: ``delta`` is always 0.
    """

    epsilon: Decimal

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _positive(self.epsilon))

    @property
    def delta(self) -> Decimal:
        return Decimal(0)

    def count(self, true: int, epsilon: Decimal, *, sensitivity: int = 1) -> int:
        return laplace_count(true, epsilon, sensitivity=sensitivity)

    def sum(
        self,
        true: Decimal | int,
        lower: Decimal,
        upper: Decimal,
        epsilon: Decimal,
        *,
        contributions: int = 1,
    ) -> Decimal:
        return laplace_sum(true, lower, upper, epsilon, contributions=contributions)
