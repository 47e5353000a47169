"""Classification levels, operations and the default ceilings (DESIGN, "Classification").

Levels follow GB/T 43697-2024: general data in four grades (``L1``-``L4``), then important data
(重要数据) and core data (核心数据). Each level has a *ceiling*: the operations that may run on a
dataset of that level at most. Zones and datasets may tighten a ceiling, never loosen it; a result
takes the highest level of its inputs (就高从严) and is never downgraded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from types import MappingProxyType

from policy.errors import CeilingError

__all__ = [
    "DEFAULT_CEILINGS",
    "Ceilings",
    "Level",
    "Obligation",
    "Operation",
    "allowed",
    "max_level",
    "obligations",
    "tighten",
]


class Level(StrEnum):
    """A classification level, totally ordered by severity (``L1`` lowest, ``CORE`` highest).

    Comparisons use severity, not the spelling: ``Level.L4 < Level.IMPORTANT``. A plain string on
    the other side is read as a level (and rejected if it is not one).
    """

    L1 = "L1"
    L2 = "L2"
    L3 = "L3"
    L4 = "L4"
    IMPORTANT = "IMPORTANT"
    CORE = "CORE"

    @property
    def severity(self) -> int:
        """0 for ``L1`` up to 5 for ``CORE``."""
        return _SEVERITY[self]

    # str defines the comparisons, so total_ordering would not replace them: define all four.
    def __lt__(self, other: str) -> bool:
        return self.severity < Level(other).severity

    def __le__(self, other: str) -> bool:
        return self.severity <= Level(other).severity

    def __gt__(self, other: str) -> bool:
        return self.severity > Level(other).severity

    def __ge__(self, other: str) -> bool:
        return self.severity >= Level(other).severity


_SEVERITY: Mapping[Level, int] = MappingProxyType({level: i for i, level in enumerate(Level)})


class Operation(StrEnum):
    """A computation a consumer can ask to run on a dataset (DESIGN, "Computations")."""

    EXPORT = "export"
    AGGREGATE = "aggregate"
    PSI_CARDINALITY = "psi_cardinality"
    PSI_MEMBERS = "psi_members"
    PSI_AGGREGATE = "psi_aggregate"
    HE_SCORE = "he_score"
    SECURE_SUM = "secure_sum"


class Obligation(StrEnum):
    """A condition the exchange must meet when it runs an allowed operation at a level."""

    #: row export returns masked columns
    MASK_COLUMNS = "mask_columns"
    #: groups or intersections under k are suppressed
    K_ANONYMITY = "k_anonymity"
    #: the released value carries differential-privacy noise
    DIFFERENTIAL_PRIVACY = "differential_privacy"
    #: each scored entity has a live consent for the consumer and purpose
    CONSENT = "consent"
    #: the operator approved the grant as well as the zone's provider
    OPERATOR_APPROVAL = "operator_approval"
    #: the zone's provider approved the grant (every grant; stated for important data)
    ZONE_APPROVAL = "zone_approval"


#: A ceiling table: for each level, the operations allowed at most.
Ceilings = Mapping[Level, frozenset[Operation]]

_ALL = frozenset(Operation)
_O = Operation

#: The DESIGN default ceilings. Zones and datasets may only remove operations from these.
DEFAULT_CEILINGS: Ceilings = MappingProxyType(
    {
        Level.L1: _ALL,
        Level.L2: _ALL,
        # psi_cardinality is below psi_members: whoever learns the members learns their count.
        Level.L3: frozenset(
            {
                _O.AGGREGATE,
                _O.PSI_CARDINALITY,
                _O.PSI_MEMBERS,
                _O.PSI_AGGREGATE,
                _O.HE_SCORE,
                _O.SECURE_SUM,
            }
        ),
        Level.L4: frozenset({_O.AGGREGATE, _O.PSI_AGGREGATE, _O.HE_SCORE, _O.SECURE_SUM}),
        Level.IMPORTANT: frozenset({_O.AGGREGATE, _O.SECURE_SUM}),
        Level.CORE: frozenset(),
    }
)

_OB = Obligation
_IMPORTANT_OBLIGATIONS = frozenset(
    {_OB.DIFFERENTIAL_PRIVACY, _OB.OPERATOR_APPROVAL, _OB.ZONE_APPROVAL}
)

# Obligations per (level, operation); allowed pairs not listed here carry none. HE scoring needs a
# consent at every level (DESIGN, "Consent": "HE scoring of an entity requires one").
_OBLIGATIONS: Mapping[tuple[Level, Operation], frozenset[Obligation]] = MappingProxyType(
    {
        (Level.L1, _O.HE_SCORE): frozenset({_OB.CONSENT}),
        (Level.L2, _O.EXPORT): frozenset({_OB.MASK_COLUMNS}),
        (Level.L2, _O.HE_SCORE): frozenset({_OB.CONSENT}),
        (Level.L3, _O.HE_SCORE): frozenset({_OB.CONSENT}),
        (Level.L4, _O.AGGREGATE): frozenset({_OB.K_ANONYMITY, _OB.DIFFERENTIAL_PRIVACY}),
        (Level.L4, _O.HE_SCORE): frozenset({_OB.CONSENT}),
        (Level.IMPORTANT, _O.AGGREGATE): _IMPORTANT_OBLIGATIONS,
        (Level.IMPORTANT, _O.SECURE_SUM): _IMPORTANT_OBLIGATIONS,
    }
)


def max_level(levels: Iterable[Level | str]) -> Level:
    """The highest level of ``levels`` (就高从严): a dataset's level from its columns, a result's
    level from its inputs. Raises :class:`ValueError` on an empty iterable or an unknown level."""
    found = [Level(level) for level in levels]
    if not found:
        raise ValueError("max_level() of no levels")
    return max(found, key=_SEVERITY.__getitem__)


def allowed(
    level: Level | str, operation: Operation | str, ceilings: Ceilings = DEFAULT_CEILINGS
) -> bool:
    """Whether ``operation`` is within the ceiling of ``level``.

    ``ceilings`` is a tightened table (see :func:`tighten`); it is intersected with the defaults
    again here, so a table that somehow lists more than the defaults cannot loosen them.
    """
    lv, op = Level(level), Operation(operation)
    return op in DEFAULT_CEILINGS[lv] and op in ceilings.get(lv, frozenset())


def tighten(
    default: Ceilings = DEFAULT_CEILINGS,
    zone_ceiling: Mapping[Level, Iterable[Operation]] | None = None,
    dataset_ceiling: Mapping[Level, Iterable[Operation]] | None = None,
) -> Ceilings:
    """The effective ceiling table: ``default`` narrowed by a zone's and a dataset's tables.

    Each table maps a level to the operations allowed at most; a level a table does not mention
    keeps the ceiling it had. A table that lists an operation beyond the defaults for its level
    is an attempt to loosen them and raises :class:`CeilingError`. The result is the
    intersection, so a dataset can never undo what its zone removed.
    """
    result: dict[Level, frozenset[Operation]] = {}
    for level in Level:
        base = frozenset(default.get(level, frozenset())) & DEFAULT_CEILINGS[level]
        for name, table in (("zone", zone_ceiling), ("dataset", dataset_ceiling)):
            if not table or level not in table:
                continue
            ops = frozenset(Operation(op) for op in table[level])
            extra = ops - DEFAULT_CEILINGS[level]
            if extra:
                raise CeilingError(
                    f"the {name} ceiling for {level} lists {', '.join(sorted(extra))}, beyond the "
                    "default ceiling: ceilings may be tightened, never loosened"
                )
            base &= ops
        result[level] = base
    return MappingProxyType(result)


def obligations(level: Level | str, operation: Operation | str) -> frozenset[Obligation]:
    """The obligations attached to running ``operation`` on data of ``level``.

    Raises :class:`CeilingError` if the operation is above the level's default ceiling: there is
    nothing to oblige for an operation that may not run.
    """
    lv, op = Level(level), Operation(operation)
    if op not in DEFAULT_CEILINGS[lv]:
        raise CeilingError(f"{op} is above the ceiling of {lv}")
    return _OBLIGATIONS.get((lv, op), frozenset())
