"""Analysis rules: what an ``aggregate`` computation may disclose about each column of a dataset.

A provider sets one :class:`AnalysisRules` per dataset (versioned; the highest version applies).
For every column it says how the column may appear in a consumer's query (:class:`Disclosure`);
for the dataset it sets the minimum group size ``k`` (distinct subjects), whether differential
privacy is required, and the privacy budget ε (and δ) each consumer may spend per refresh window.

Where a column may appear:

=================== ========= ========= ============== ======== ==========
disclosure          SELECT /  inside an  WHERE          JOIN ON  notes
                    GROUP BY  aggregate  (filter)       equality
=================== ========= ========= ============== ======== ==========
``plaintext``       yes       yes        yes            yes      L1/L2 only
``after_aggregate`` no        yes        no             no
``join_only``       no        no         no             yes
``filter_only``     no        no         yes            no
``none``            no        no         no             no       CORE always
=================== ========= ========= ============== ======== ==========

A ``plaintext`` column is published data (L1/L2): a consumer may group by it, and so may also
filter and join on it, since a filter or join on a value it can see reveals nothing more. An
``after_aggregate`` column may *not* be filtered: ``WHERE tax_paid > 900000`` lets a consumer cut
a group down to the few subjects above a threshold and, by differencing queries with moving
thresholds, rebuild individual values; a provider who wants a sensitive column to narrow queries
marks it ``filter_only`` and so accepts that risk explicitly.

Sums and averages clamp every value to the column's declared ``[lower, upper]``. Clamping bounds
a single subject's influence (the sensitivity the DP noise is scaled to) and keeps one large
value from dominating a group even without noise; a numeric column without bounds can be counted
but never summed or averaged.

Rules may only tighten the classification (DESIGN, "Classification"): :func:`check_rules`
refuses rules that would make an L3+ column plaintext, let an L4 or IMPORTANT dataset release
without differential privacy, or expose a CORE column at all; :func:`default_rules` derives the
tightest reasonable rules from the column levels. :func:`effective_disclosure` applies the same
floor again at query time, so even a stored rule that slipped past the check cannot loosen it.

Differential privacy by default (DESIGN, "Privacy defaults"): a release whose input set the
consumer controls (a filter, an id list) is differentially private whenever it touches a column
at L3 or above (:func:`requires_dp`). A provider may let an L3 dataset release exactly with
``exact_release: true`` in its rules (ledgered with the rules, shown in the catalog as
"exact: differencing possible"); never with an L4, IMPORTANT or CORE column. ``delta`` is the δ
one release may spend on a noisy gate over groups found in the data
(:class:`exchange.node.dp.Gate`); ``0`` allows no such gate, so a differentially private ``GROUP
BY`` is refused.

Privacy units: the dataset's subject column names the entity protected (a company, a person).
``k`` counts distinct subjects per released group. ``max_rows_per_subject`` bounds how many rows
one subject may contribute to a differentially private release (rows beyond it are dropped by
the query rewrite); the noise is scaled to it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from exchange.domain import Column, Dataset
from exchange.errors import InvalidInputError
from exchange.node.dp import MAX_EPSILON, parse_epsilon
from policy.levels import Level

__all__ = [
    "DEFAULT_DELTA",
    "DEFAULT_EPSILON_BUDGET",
    "DEFAULT_K",
    "DEFAULT_REFRESH_SECONDS",
    "EXACT_RELEASE_NOTE",
    "MAX_EPSILON",
    "MAX_K",
    "MIN_K",
    "NUMERIC_TYPES",
    "AnalysisRules",
    "ColumnRule",
    "Disclosure",
    "check_rules",
    "default_rules",
    "effective_disclosure",
    "requires_dp",
]

#: the smallest group size a provider may set: a group of one is a single subject's row
MIN_K = 2
#: the largest group size (beyond it nothing but whole-population counts would ever be released)
MAX_K = 100_000
#: the default minimum group size. SCQL's default group-by threshold is 4; ten distinct subjects
#: is the more common statistical-disclosure floor for business and personal records.
DEFAULT_K = 10
#: the default ε each consumer may spend per dataset and refresh window
DEFAULT_EPSILON_BUDGET = Decimal(1)
#: the default refresh window: 30 days, matching the monthly report cycle (月报)
DEFAULT_REFRESH_SECONDS = 30 * 24 * 3600
#: the largest δ a rule may set (δ should be far below 1/n; Laplace releases spend none)
MAX_DELTA = Decimal("1e-4")
#: the δ one release spends on a gate over groups found in the data, unless the rules say
#: otherwise: a group holding one subject opens with probability at most 1e-7
DEFAULT_DELTA = Decimal("1e-7")
#: how the catalog shows a dataset whose rules set ``exact_release``
EXACT_RELEASE_NOTE = "exact: differencing possible"
MIN_REFRESH_SECONDS = 3600
MAX_REFRESH_SECONDS = 366 * 24 * 3600
MAX_ROWS_PER_SUBJECT = 10_000
#: clamping bounds are at most this large in magnitude and carry at most nine fractional digits
MAX_BOUND = Decimal(10) ** 15
MIN_BOUND_EXPONENT = -9
#: portable column types that may be summed and averaged
NUMERIC_TYPES = frozenset({"integer", "decimal"})

_RULES_KEYS = frozenset(
    {
        "version",
        "min_group_size",
        "dp_required",
        "epsilon_budget",
        "delta",
        "refresh_seconds",
        "max_rows_per_subject",
        "exact_release",
        "columns",
    }
)
_COLUMN_KEYS = frozenset({"disclosure", "lower", "upper"})


class Disclosure(StrEnum):
    """How a column may appear in an aggregate query (see the module table)."""

    PLAINTEXT = "plaintext"
    AFTER_AGGREGATE = "after_aggregate"
    JOIN_ONLY = "join_only"
    FILTER_ONLY = "filter_only"
    NONE = "none"

    @property
    def may_group(self) -> bool:
        """May appear as a GROUP BY dimension (and so be selected plainly)."""
        return self is Disclosure.PLAINTEXT

    @property
    def may_aggregate(self) -> bool:
        """May appear inside COUNT, COUNT DISTINCT, SUM, AVG, MIN or MAX."""
        return self in (Disclosure.PLAINTEXT, Disclosure.AFTER_AGGREGATE)

    @property
    def may_filter(self) -> bool:
        """May appear in WHERE."""
        return self in (Disclosure.PLAINTEXT, Disclosure.FILTER_ONLY)

    @property
    def may_join(self) -> bool:
        """May appear in a JOIN ON equality."""
        return self in (Disclosure.PLAINTEXT, Disclosure.JOIN_ONLY)


def effective_disclosure(disclosure: Disclosure | str, level: Level | str) -> Disclosure:
    """``disclosure`` floored by ``level``: a CORE column is never referenced and an L3+ column
    is never plaintext, whatever a rule says (an L3+ "plaintext" reads as ``after_aggregate``)."""
    d, lv = Disclosure(disclosure), Level(level)
    if lv >= Level.CORE:
        return Disclosure.NONE
    if lv >= Level.L3 and d is Disclosure.PLAINTEXT:
        return Disclosure.AFTER_AGGREGATE
    return d


def _decimal(value: object, what: str) -> Decimal:
    """A finite decimal from a Decimal, an int or a decimal string (never a float)."""
    if isinstance(value, (bool, float)):
        raise InvalidInputError(f"{what} must be a decimal string, not a {type(value).__name__}")
    if isinstance(value, Decimal):
        result = value
    elif isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, str) and 0 < len(value) <= 64:
        try:
            result = Decimal(value.strip())
        except InvalidOperation:
            raise InvalidInputError(f"{what} is not a decimal number") from None
    else:
        raise InvalidInputError(f"{what} must be a decimal string")
    if not result.is_finite():
        raise InvalidInputError(f"{what} must be finite")
    return result


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(f"{what} must be an integer")
    if not low <= value <= high:
        raise InvalidInputError(f"{what} must be between {low} and {high}")
    return value


def _to_text(value: Decimal) -> str:
    """Plain positional notation without trailing zeros: ``Decimal('1E+3')`` is ``'1000'``."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


@dataclass(frozen=True)
class ColumnRule:
    """One column's rule: its disclosure and, for numeric columns, the clamping bounds."""

    disclosure: Disclosure
    lower: Decimal | None = None
    upper: Decimal | None = None

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "disclosure", Disclosure(self.disclosure))
        except ValueError:
            raise InvalidInputError(
                f"disclosure must be one of {', '.join(d.value for d in Disclosure)}"
            ) from None
        if (self.lower is None) != (self.upper is None):
            raise InvalidInputError("clamping bounds need both lower and upper")
        if self.lower is not None and self.upper is not None:
            lower = _decimal(self.lower, "lower bound")
            upper = _decimal(self.upper, "upper bound")
            for bound in (lower, upper):
                if abs(bound) > MAX_BOUND:
                    raise InvalidInputError(f"clamping bounds are limited to ±{MAX_BOUND:f}")
                exponent = bound.as_tuple().exponent
                if isinstance(exponent, int) and exponent < MIN_BOUND_EXPONENT:
                    raise InvalidInputError("clamping bounds carry at most 9 fractional digits")
            if lower > upper:
                raise InvalidInputError("the lower clamping bound is above the upper one")
            object.__setattr__(self, "lower", lower)
            object.__setattr__(self, "upper", upper)

    @property
    def bounded(self) -> bool:
        return self.lower is not None

    def to_json(self) -> dict[str, Any]:
        return {
            "disclosure": self.disclosure.value,
            "lower": None if self.lower is None else _to_text(self.lower),
            "upper": None if self.upper is None else _to_text(self.upper),
        }

    @classmethod
    def from_json(cls, data: object, column: str = "column") -> ColumnRule:
        if not isinstance(data, Mapping):
            raise InvalidInputError(f"the rule for {column!r} must be an object")
        unknown = set(data) - _COLUMN_KEYS
        if unknown:
            raise InvalidInputError(f"unknown keys in the rule for {column!r}: {sorted(unknown)}")
        disclosure = data.get("disclosure")
        if disclosure not in _DISCLOSURES:
            raise InvalidInputError(
                f"the rule for {column!r} needs a disclosure: one of "
                f"{', '.join(d.value for d in Disclosure)}"
            )
        lower, upper = data.get("lower"), data.get("upper")
        return cls(
            Disclosure(disclosure),
            None if lower is None else _decimal(lower, f"lower bound of {column!r}"),
            None if upper is None else _decimal(upper, f"upper bound of {column!r}"),
        )


_DISCLOSURES = frozenset(d.value for d in Disclosure)
_NO_RULE = ColumnRule(Disclosure.NONE)


@dataclass(frozen=True)
class AnalysisRules:
    """A dataset's analysis rules. A column without a rule is ``none`` (deny by default).

    ``epsilon_budget`` and ``delta`` are what one consumer may spend on the dataset per
    ``refresh_seconds`` window; ``min_group_size`` is ``k``, counted in distinct subjects.
    """

    columns: Mapping[str, ColumnRule] = field(default_factory=dict)
    min_group_size: int = DEFAULT_K
    dp_required: bool = False
    epsilon_budget: Decimal = DEFAULT_EPSILON_BUDGET
    delta: Decimal = DEFAULT_DELTA
    refresh_seconds: int = DEFAULT_REFRESH_SECONDS
    max_rows_per_subject: int = 1
    #: the provider's opt-out from DP by default at L3 (never at L4 and above): exact
    #: releases, with differencing possible
    exact_release: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.columns, Mapping):
            raise InvalidInputError("columns must map column names to rules")
        for name, rule in self.columns.items():
            if not isinstance(name, str) or not isinstance(rule, ColumnRule):
                raise InvalidInputError("columns must map column names to rules")
        object.__setattr__(self, "columns", MappingProxyType(dict(sorted(self.columns.items()))))
        _int(self.min_group_size, "min_group_size (k)", MIN_K, MAX_K)
        if not isinstance(self.dp_required, bool):
            raise InvalidInputError("dp_required must be true or false")
        if not isinstance(self.exact_release, bool):
            raise InvalidInputError("exact_release must be true or false")
        if self.exact_release and self.dp_required:
            raise InvalidInputError("exact_release and dp_required contradict each other")
        epsilon = parse_epsilon(self.epsilon_budget, what="epsilon_budget")
        delta = _decimal(self.delta, "delta")
        if not Decimal(0) <= delta <= MAX_DELTA:
            raise InvalidInputError(f"delta must be between 0 and {MAX_DELTA}")
        object.__setattr__(self, "epsilon_budget", epsilon)
        object.__setattr__(self, "delta", delta)
        _int(self.refresh_seconds, "refresh_seconds", MIN_REFRESH_SECONDS, MAX_REFRESH_SECONDS)
        _int(self.max_rows_per_subject, "max_rows_per_subject", 1, MAX_ROWS_PER_SUBJECT)
        _int(self.version, "version", 1, 2**31 - 1)

    def rule_for(self, column: str) -> ColumnRule:
        """The rule for ``column``; ``none`` if the rules do not name it."""
        return self.columns.get(column, _NO_RULE)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form: no floats, decimals as strings (DESIGN, "Canonical JSON")."""
        return {
            "version": self.version,
            "min_group_size": self.min_group_size,
            "dp_required": self.dp_required,
            "epsilon_budget": _to_text(self.epsilon_budget),
            "delta": _to_text(self.delta),
            "refresh_seconds": self.refresh_seconds,
            "max_rows_per_subject": self.max_rows_per_subject,
            "exact_release": self.exact_release,
            "columns": {name: rule.to_json() for name, rule in self.columns.items()},
        }

    @classmethod
    def from_json(cls, data: object) -> AnalysisRules:
        """Parse :meth:`to_json`'s form; unknown keys, floats and bad values are refused."""
        if not isinstance(data, Mapping):
            raise InvalidInputError("analysis rules must be an object")
        unknown = set(data) - _RULES_KEYS
        if unknown:
            raise InvalidInputError(f"unknown keys in analysis rules: {sorted(unknown)}")
        columns = data.get("columns", {})
        if not isinstance(columns, Mapping):
            raise InvalidInputError("columns must be an object")
        parsed = {
            str(name): ColumnRule.from_json(rule, str(name)) for name, rule in columns.items()
        }
        defaults = cls()
        return cls(
            columns=parsed,
            min_group_size=data.get("min_group_size", defaults.min_group_size),
            dp_required=data.get("dp_required", defaults.dp_required),
            epsilon_budget=_decimal(
                data.get("epsilon_budget", defaults.epsilon_budget), "epsilon_budget"
            ),
            delta=_decimal(data.get("delta", defaults.delta), "delta"),
            refresh_seconds=data.get("refresh_seconds", defaults.refresh_seconds),
            max_rows_per_subject=data.get("max_rows_per_subject", defaults.max_rows_per_subject),
            exact_release=data.get("exact_release", defaults.exact_release),
            version=data.get("version", defaults.version),
        )


def _needs_dp(level: Level) -> bool:
    return level >= Level.L4


def requires_dp(level: Level | str, rules: AnalysisRules) -> bool:
    """Whether a release at ``level`` (the highest level it touches) whose input set the
    consumer controls must be differentially private under ``rules``: always at L4 and above
    or when the rules require it; at L3 unless the provider opted out with ``exact_release``."""
    lv = Level(level)
    if rules.dp_required or lv >= Level.L4:
        return True
    return lv >= Level.L3 and not rules.exact_release


def default_rules(
    dataset_columns: Sequence[Column], subject_column: str, *, version: int = 1
) -> AnalysisRules:
    """The rules a dataset gets until its provider sets its own, derived from column levels.

    L1/L2 are ``plaintext``; L3 ``after_aggregate``; L4 and IMPORTANT ``after_aggregate`` with
    differential privacy required for the whole dataset; CORE ``none``. The subject column is
    ``join_only`` (``none`` if CORE). No clamping bounds are set: numeric columns can be counted
    at once, and summed or averaged only once the provider declares bounds.
    """
    names = {c.name for c in dataset_columns}
    if subject_column not in names:
        raise InvalidInputError(f"the subject column {subject_column!r} is not a column")
    columns: dict[str, ColumnRule] = {}
    dp_required = False
    for col in dataset_columns:
        level = _level(col)
        dp_required = dp_required or _needs_dp(level)
        if level >= Level.CORE:
            disclosure = Disclosure.NONE
        elif col.name == subject_column:
            disclosure = Disclosure.JOIN_ONLY
        elif level <= Level.L2:
            disclosure = Disclosure.PLAINTEXT
        else:
            disclosure = Disclosure.AFTER_AGGREGATE
        columns[col.name] = ColumnRule(disclosure)
    return AnalysisRules(columns=columns, dp_required=dp_required, version=version)


def _level(col: Column) -> Level:
    try:
        return Level(col.level)
    except ValueError:
        raise InvalidInputError(f"column {col.name!r} has an unknown level") from None


def check_rules(rules: AnalysisRules, dataset: Dataset) -> None:
    """Refuse ``rules`` that name unknown columns or loosen the dataset's classification.

    Raises :class:`InvalidInputError` naming the first problem: an L3+ column ``plaintext``; a
    CORE column anything but ``none``; an L4 or IMPORTANT dataset without ``dp_required``;
    clamping bounds on a non-numeric column; a subject column that could be filtered or grouped
    on (which would let a consumer add or remove one chosen subject and difference the results)
    or that takes clamping bounds (identifiers are only counted).
    """
    by_name = {c.name: c for c in dataset.columns}
    unknown = sorted(set(rules.columns) - set(by_name))
    if unknown:
        raise InvalidInputError(f"the rules name unknown columns: {', '.join(unknown)}")
    levels = [_level(c) for c in dataset.columns]
    if any(_needs_dp(lv) for lv in levels) and not rules.dp_required:
        raise InvalidInputError(
            "a dataset with L4 or IMPORTANT columns requires differential privacy (dp_required)"
        )
    if rules.exact_release and any(lv > Level.L3 for lv in levels):
        raise InvalidInputError(
            "exact_release is allowed only for datasets whose columns are at most L3"
        )
    for col in dataset.columns:
        rule = rules.rule_for(col.name)
        level = _level(col)
        if level >= Level.CORE and rule.disclosure is not Disclosure.NONE:
            raise InvalidInputError(f"column {col.name!r} is CORE: its disclosure must be none")
        if level >= Level.L3 and rule.disclosure is Disclosure.PLAINTEXT:
            raise InvalidInputError(f"column {col.name!r} is {level}: it may not be plaintext")
        if rule.bounded and col.type not in NUMERIC_TYPES:
            raise InvalidInputError(
                f"column {col.name!r} is {col.type}: only numeric columns take clamping bounds"
            )
        if col.name == dataset.subject_column and (
            rule.disclosure.may_filter or rule.disclosure.may_group
        ):
            raise InvalidInputError(
                f"the subject column {col.name!r} may be join_only, after_aggregate or none"
            )
        if col.name == dataset.subject_column and rule.bounded:
            # identifiers are never values: bounds would let an id be summed or averaged
            raise InvalidInputError(
                f"the subject column {col.name!r} takes no clamping bounds: identifiers are "
                "only counted",
                reason="subject_value",
            )
