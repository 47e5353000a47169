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

These are pure ε-DP mechanisms: they spend no δ. The one place δ enters is a **noisy gate**
(:class:`Gate`): the release/suppress decision for a group is taken on a noisy distinct-subject
count, never the exact one. Where the set of groups is fixed in advance (one global group, the
cells a requester names, the single count of a private join) the gate costs its ε share and no
δ. Where groups come from the data (``GROUP BY``), a group that exists only because of one
subject must stay hidden with high probability: the threshold is raised to
``τ = max(k, 1 + ⌈b·ln(M/δ)⌉)`` for noise scale ``b`` and ``M`` groups one subject can touch, so
such a group opens with probability at most δ (DP thresholding, Korolova et al. 2009; Wilson et
al. 2020). ``docs/privacy.md`` states the accounting per computation.

Every ε a caller sends goes through :func:`parse_epsilon` (one type: a decimal with at most nine
places, between a floor and a ceiling); every failure of a mechanism is an
:class:`~exchange.errors.InvalidInputError`, never a 5xx.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, InvalidOperation, localcontext
from functools import cache, lru_cache
from typing import Any

from exchange.errors import InvalidInputError

__all__ = [
    "EPSILON_PLACES",
    "MAX_EPSILON",
    "MIN_EPSILON",
    "DpMechanisms",
    "Gate",
    "count_mechanism",
    "laplace_count",
    "laplace_counts",
    "laplace_std",
    "laplace_sum",
    "laplace_sums",
    "parse_epsilon",
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
#: the most fractional digits of an ε a caller sends
EPSILON_PLACES = 9
#: an ε above this is no meaningful protection
MAX_EPSILON = Decimal(10)
#: the least ε one release may spend (settings may raise it): with a budget of 1 a consumer gets
#: at most 100 releases per window, so probing one subject at a time is never nearly free
MIN_EPSILON = Decimal("0.01")


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


def parse_epsilon(
    value: object,
    *,
    floor: Decimal = MIN_EPSILON,
    ceiling: Decimal = MAX_EPSILON,
    what: str = "epsilon",
) -> Decimal:
    """The one way an ε enters zonex: a decimal string (``"0.5"``), an integer or a Decimal,
    finite, with at most :data:`EPSILON_PLACES` fractional digits, in ``[floor, ceiling]``.
    Floats and booleans are refused (signed objects carry no floats)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise InvalidInputError(f'{what} is a decimal string such as "0.5"', reason="bad_epsilon")
    if isinstance(value, str):
        text = value.strip()
        if not 0 < len(text) <= 32:
            raise InvalidInputError(
                f'{what} is a decimal string such as "0.5"', reason="bad_epsilon"
            )
        try:
            eps = Decimal(text)
        except InvalidOperation:
            raise InvalidInputError(
                f'{what} is a decimal string such as "0.5"', reason="bad_epsilon"
            ) from None
    else:
        eps = Decimal(value)
    if not eps.is_finite():
        raise InvalidInputError(f"{what} must be a finite number", reason="bad_epsilon")
    # places counted from the digits: normalize() overflows the context on "1E+999999999"
    _, digits, exponent = eps.as_tuple()
    trailing = len(digits) - len(bytes(digits).rstrip(b"\0"))  # zeros that add no place
    if isinstance(exponent, int) and any(digits) and exponent + trailing < -EPSILON_PLACES:
        raise InvalidInputError(
            f"{what} has at most {EPSILON_PLACES} decimal places", reason="bad_epsilon"
        )
    if eps > ceiling:
        raise InvalidInputError(f"{what} must be at most {_text(ceiling)}", reason="bad_epsilon")
    if eps < floor or eps <= 0:
        raise InvalidInputError(
            f"{what} must be at least {_text(floor)} (the least one release may spend)",
            reason="epsilon_below_floor",
        )
    # one spelling per value: "0.50" and "0.5" are the same ε on a receipt
    return Decimal(_text(eps))


def _text(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


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


def _calibrated_with_scale(
    make: Any, scale: Decimal, d_in: Any, epsilon: Decimal
) -> tuple[Any, float]:
    """A mechanism from ``make(scale)`` whose privacy map gives at most ``epsilon`` for
    ``d_in``, and the scale it was built with. The scale starts rounded up from the exact one
    and grows by a hair until OpenDP's map (which rounds conservatively) agrees. An OpenDP
    failure (an extreme scale, say) is bad input, never a 5xx."""
    candidate = max(_float_up(scale), math.ulp(0.0))
    if not math.isfinite(candidate):
        raise InvalidInputError("epsilon is too small for this value's sensitivity")
    try:
        for _ in range(64):
            measurement = make(candidate)
            # the privacy map is OpenDP's own proof obligation; compare it exactly, as decimals
            if Decimal(measurement.map(d_in)) <= epsilon:
                return measurement, candidate
            candidate = math.nextafter(candidate * (1 + 2**-40), math.inf)
    except InvalidInputError:
        raise
    except Exception as exc:  # OpenDP raises its own error type for any refused parameter
        raise InvalidInputError(f"the noise mechanism refused these parameters: {exc}") from exc
    raise InvalidInputError("no noise scale meets this epsilon")  # pragma: no cover


def count_mechanism(epsilon: Decimal, sensitivity: int = 1) -> Any:
    """The discrete Laplace measurement for an integer of the given sensitivity at ``epsilon``
    (an OpenDP ``Measurement``; its ``map(sensitivity)`` is at most ``epsilon``)."""
    return _count_mechanism(_positive(epsilon), _contributions(sensitivity))[0]


# built (and its privacy map checked) once per (ε, Δ): a release noises every group with the
# same mechanism, and building one costs far more than drawing from it
@lru_cache(maxsize=1024, typed=True)
def _count_mechanism(epsilon: Decimal, sensitivity: int) -> tuple[Any, float]:
    """:func:`count_mechanism` and the scale it was built with (a gate's threshold needs it)."""
    dp = _prelude()
    space = dp.atom_domain(T="i64"), dp.absolute_distance(T="i64")
    return _calibrated_with_scale(
        lambda s: dp.m.make_laplace(*space, scale=s),
        scale_for(epsilon, Decimal(sensitivity)),
        sensitivity,
        epsilon,
    )


def sum_mechanism(
    lower: Decimal, upper: Decimal, epsilon: Decimal, *, contributions: int = 1
) -> Any:
    """The Laplace measurement for a sum of values clamped to ``[lower, upper]`` with up to
    ``contributions`` rows per subject, at ``epsilon`` (None when the bounds are both 0: such a
    sum is 0 whatever the data, and needs no noise)."""
    built = _sum_mechanism(lower, upper, epsilon, contributions)
    return None if built is None else built[0]


@lru_cache(maxsize=1024, typed=True)
def _sum_mechanism(
    lower: Decimal, upper: Decimal, epsilon: Decimal, contributions: int
) -> tuple[Any, float] | None:
    """:func:`sum_mechanism` and the scale it was built with (its vector twin needs it)."""
    eps = _positive(epsilon)
    sensitivity = sum_sensitivity(lower, upper, contributions)
    dp = _prelude()
    space = dp.atom_domain(T=float, nan=False), dp.absolute_distance(T=float)
    if sensitivity == 0:
        # every value is clamped to 0: the sum is 0 whatever the data, and needs no noise
        return None
    return _calibrated_with_scale(
        lambda s: dp.m.make_laplace(*space, scale=s),
        scale_for(eps, sensitivity),
        _float_up(sensitivity),
        eps,
    )


# -- vector twins: one OpenDP call noises every group of a released column -------------------
#
# A release noises each released group's value of a column, and a gate each group's distinct
# count, independently at one scale. One OpenDP call costs ~100-180 µs, most of it the
# bindings' conversions, whatever it draws: one call per column (and one for the gate) instead
# of one per value.
#
# Why each element of a vector draw has exactly the distribution of a scalar draw today: the
# vector twin is built with the very scale (the same float) the scalar mechanism was calibrated
# to, and OpenDP (0.16, ``MakeNoise`` for ``AtomDomain``) builds the scalar mechanism as
# ``make_vec >> (this vector mechanism) >> index 0``: one distribution (the same discrete
# Laplace, and for floats the same granularity), sampled once per element, independently of
# every other element. So a group's noise neither depends on how many groups are drawn with it
# nor is shared with any of them, and the accounting (docs/privacy.md: per group, parallel
# composition over groups, sequential over a group's values and its gate) is unchanged. The
# twin's privacy map is checked equal to the scalar one's when it is built.


@lru_cache(maxsize=1024, typed=True)
def _count_vector(epsilon: Decimal, sensitivity: int) -> Any:
    """The vector twin of ``_count_mechanism(epsilon, sensitivity)``: built once per (ε, Δ)."""
    scalar, scale = _count_mechanism(epsilon, sensitivity)
    dp = _prelude()
    space = dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64")
    return _vector_twin(lambda: dp.m.make_laplace(*space, scale=scale), scalar, sensitivity)


@lru_cache(maxsize=1024, typed=True)
def _sum_vector(lower: Decimal, upper: Decimal, epsilon: Decimal, contributions: int) -> Any:
    """The vector twin of ``_sum_mechanism(...)`` (None where that is None)."""
    built = _sum_mechanism(lower, upper, epsilon, contributions)
    if built is None:
        return None
    scalar, scale = built
    dp = _prelude()
    space = dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float)
    d_in = _float_up(sum_sensitivity(lower, upper, contributions))
    return _vector_twin(lambda: dp.m.make_laplace(*space, scale=scale), scalar, d_in)


def _vector_twin(make: Any, scalar: Any, d_in: Any) -> Any:
    """``make()``, refused unless its privacy map at ``d_in`` is the scalar mechanism's."""
    try:
        vector = make()
        same = Decimal(vector.map(d_in)) == Decimal(scalar.map(d_in))
    except Exception as exc:  # OpenDP raises its own error type for any refused parameter
        raise InvalidInputError(f"the noise mechanism refused these parameters: {exc}") from exc
    if not same:  # pragma: no cover - an OpenDP upgrade that changes the construction
        raise RuntimeError("the vector noise mechanism does not match the scalar one")
    return vector


def _draw(measurement: Any, values: list[Any]) -> list[Any]:
    """One OpenDP call noising every element of ``values``."""
    if not values:
        return []
    noisy = _invoke(measurement, values)
    if not isinstance(noisy, list) or len(noisy) != len(values):
        raise RuntimeError("the noise mechanism returned a vector of another length")
    return noisy


def _count_value(true: int) -> int:
    if isinstance(true, bool) or not isinstance(true, int) or abs(true) > MAX_COUNT:
        raise ValueError("a count must be an integer within ±2^62")
    return true


def _sum_value(true: Decimal | int) -> Decimal:
    if isinstance(true, bool) or not isinstance(true, (Decimal, int)):
        raise ValueError("a sum must be a Decimal or an int")
    value = Decimal(true)
    if not value.is_finite():
        raise ValueError("a sum must be finite")
    return value


def laplace_count(true: int, epsilon: Decimal, *, sensitivity: int = 1) -> int:
    """``true`` plus discrete Laplace noise of scale ``sensitivity / epsilon``."""
    return int(_invoke(count_mechanism(epsilon, sensitivity), _count_value(true)))


def laplace_counts(trues: Sequence[int], epsilon: Decimal, *, sensitivity: int = 1) -> list[int]:
    """Each of ``trues`` plus its own discrete Laplace noise of scale ``sensitivity /
    epsilon``, drawn in one call: element by element what :func:`laplace_count` would give."""
    values = [_count_value(t) for t in trues]
    vector = _count_vector(_positive(epsilon), _contributions(sensitivity))
    return [int(v) for v in _draw(vector, values)]


def _invoke(measurement: Any, value: Any) -> Any:
    try:
        return measurement(value)
    except Exception as exc:  # an OpenDP sampling failure is refused, never a 5xx
        raise InvalidInputError(f"the noise mechanism failed: {exc}") from exc


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
    value = _sum_value(true)
    measurement = sum_mechanism(lower, upper, epsilon, contributions=contributions)
    if measurement is None:
        return value
    noisy = _invoke(measurement, float(value))
    return Decimal(repr(float(noisy)))


def laplace_sums(
    trues: Sequence[Decimal | int],
    lower: Decimal,
    upper: Decimal,
    epsilon: Decimal,
    *,
    contributions: int = 1,
) -> list[Decimal]:
    """Each of ``trues`` plus its own Laplace noise of the scale :func:`laplace_sum` uses,
    drawn in one call: element by element what :func:`laplace_sum` would give."""
    values = [_sum_value(t) for t in trues]
    vector = _sum_vector(lower, upper, epsilon, _contributions(contributions))
    if vector is None:
        return values
    noisy = _draw(vector, [float(v) for v in values])
    return [Decimal(repr(float(n))) for n in noisy]


@dataclass(frozen=True)
class DpMechanisms:
    """The noise for one release: the query's total ``epsilon`` and the mechanisms spending it.

    The query's ε is split between its noisy values (:func:`split_epsilon`); each value of each
    released group draws its own noise (:meth:`counts` and :meth:`sums` draw a column's values
    of every released group in one call, each with its own independent noise). Pure ε-DP:
    ``delta`` is always 0.
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

    def counts(self, trues: Sequence[int], epsilon: Decimal, *, sensitivity: int = 1) -> list[int]:
        return laplace_counts(trues, epsilon, sensitivity=sensitivity)

    def sums(
        self,
        trues: Sequence[Decimal | int],
        lower: Decimal,
        upper: Decimal,
        epsilon: Decimal,
        *,
        contributions: int = 1,
    ) -> list[Decimal]:
        return laplace_sums(trues, lower, upper, epsilon, contributions=contributions)


@dataclass(frozen=True)
class Gate:
    """A release/suppress decision taken on a noisy distinct-subject count (never the exact one).

    ``epsilon`` is the share the gate spends; ``sensitivity`` is how many groups one subject can
    touch (``M``, its rows); ``delta`` is ``None`` where the groups are fixed in advance (no
    group's existence depends on the data) and otherwise the chance that a group holding only
    one subject is released. :attr:`threshold` is ``k`` for fixed groups and
    ``max(k, 1 + ⌈b·ln(M/δ)⌉)`` otherwise, ``b`` the scale of the discrete Laplace noise as
    built (so ``P[noise ≥ t] ≤ e^{-t/b}`` bounds the chance of each of the ``M`` groups).
    """

    k: int
    epsilon: Decimal
    sensitivity: int = 1
    delta: Decimal | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "epsilon", _positive(self.epsilon))
        _contributions(self.sensitivity)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError("k must be a positive integer")
        if self.delta is not None and not Decimal(0) < Decimal(self.delta) < 1:
            raise InvalidInputError(
                "a gate over groups found in the data needs 0 < delta < 1", reason="delta_required"
            )

    @property
    def _built(self) -> tuple[Any, float]:
        return _count_mechanism(self.epsilon, self.sensitivity)

    @property
    def scale(self) -> Decimal:
        return Decimal(self._built[1])

    @property
    def threshold(self) -> int:
        if self.delta is None:
            return self.k
        with localcontext() as ctx:
            ctx.prec = _PRECISION
            tail = self.scale * (Decimal(self.sensitivity) / Decimal(self.delta)).ln()
            lifted = 1 + int(tail.to_integral_value(rounding=ROUND_CEILING))
        return max(self.k, lifted)

    def noisy(self, true: int) -> int:
        """The noisy count the decision is taken on (released nowhere by itself)."""
        return int(_invoke(self._built[0], _count_value(true)))

    def noisy_each(self, trues: Sequence[int]) -> list[int]:
        """:meth:`noisy` of every group in one draw: the same scale, each its own noise."""
        values = [_count_value(t) for t in trues]
        return [int(v) for v in _draw(_count_vector(self.epsilon, self.sensitivity), values)]

    def opens(self, true: int) -> bool:
        """Whether a group with ``true`` distinct subjects is released."""
        return self.noisy(true) >= self.threshold

    def opens_each(self, trues: Sequence[int]) -> list[bool]:
        """:meth:`opens` of every group, its noisy counts drawn in one call."""
        threshold = self.threshold
        return [noisy >= threshold for noisy in self.noisy_each(trues)]
