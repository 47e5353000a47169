"""The clean-room SQL checker: a consumer's aggregate query, parsed, checked and rewritten.

A consumer with an ``aggregate`` grant sends one SQL statement such as::

    SELECT district, COUNT(*), AVG(tax_paid) FROM tax_records WHERE year = 2025 GROUP BY district

:func:`check_query` parses it with sqlglot and walks the tree against an *allow-list*: a node
type or argument the checker does not know is refused, so a construct sqlglot learns tomorrow
is refused too. What is allowed:

- one ``SELECT`` over datasets of one zone, joined by ``INNER JOIN ... ON`` a conjunction of
  column equalities on join columns (``join_only`` or ``plaintext``); each dataset at most once;
- selected expressions that are either a GROUP BY dimension (a ``plaintext`` column) or one of
  ``COUNT(*)``, ``COUNT(col)``, ``COUNT(DISTINCT col)``, ``SUM(col)``, ``AVG(col)``,
  ``MIN(col)``, ``MAX(col)`` on a column that may be aggregated; at least one aggregate;
  ``SUM``/``AVG`` only on numeric columns with clamping bounds; ``MIN``/``MAX`` only on L1/L2
  numbers and dates (text would release one subject's raw value) and never in a
  differentially private query (they have no bounded sensitivity); identifiers (a subject
  column, or a column the query's joins equate with one) are only counted: ``COUNT`` and
  ``COUNT(DISTINCT ...)``, never ``SUM``/``AVG``/``MIN``/``MAX``, whatever the rules say;
- ``WHERE``: ``AND``/``OR``/``NOT`` over comparisons, ``IN`` lists, ``BETWEEN`` and
  ``IS [NOT] NULL`` between a filter column (``filter_only`` or ``plaintext``) and constants;
  constants are numbers, strings, booleans and ``DATE '…'``/``TIMESTAMP '…'``;
- ``ORDER BY`` output names, dimensions or selected aggregates; ``LIMIT``/``OFFSET`` constants.
  Both are applied *after* suppression and noise (:func:`postprocess`), so the order of exact
  values never shows through the noise.

Everything else is refused with a :class:`QueryRejected` carrying a stable ``reason`` code
(:data:`REASONS`) and a detail that names the column or construct, never a data value:
multiple statements, set operations, CTEs and subqueries, window functions, CASE/IF/FILTER and
other conditional aggregation, any other function (UDFs included), casts of columns, arithmetic,
HAVING (it would let a consumer choose which groups it sees), ``SELECT *``, schema- or
catalog-qualified names and system tables, table functions, parameters.

Names: an unquoted identifier matches a dataset or column case-insensitively; a quoted one must
match exactly, so ``"Tax_Paid"`` is not ``tax_paid``. Output names are the user's alias when it
is a simple lowercase identifier, else generated (``count_star``, ``avg_tax_paid``).

Comments are dropped: the statement that runs is generated from a *new* tree built from the
resolved columns, never from the user's text or nodes. Every constant becomes a named bind
parameter (``:p0``, ``:p1`` …, usable with SQLAlchemy ``text()``); identifiers are always
quoted. SUM and AVG arguments are clamped to the declared bounds; a hidden
``COUNT(DISTINCT subject)`` per group (``__zonex_k``; the smallest over the joined datasets)
drives k-suppression. When differential privacy applies, the rewrite also bounds each subject's
contribution: the joined, filtered rows are numbered per subject (``ROW_NUMBER() OVER
(PARTITION BY subject ...)``, deterministic order) and only the first ``max_rows_per_subject``
are aggregated; a DP query may join datasets only on their subject columns, so one subject is
one privacy unit across the join.

When DP applies (DESIGN, "Privacy defaults"): a consumer chooses the input set of every query
(its WHERE, its joins), so a release is differentially private whenever its output level (the
highest level of every column it touches, subject columns included) is L4 or above, any dataset
read requires it, or the output is L3 and not *every* dataset read carries the provider's
``exact_release`` opt-out (:func:`exchange.node.analysis.requires_dp`). L1/L2 outputs, and L3
outputs of opted-out datasets, are exact, and so is their k gate.

:func:`postprocess` turns the raw rows into the released :class:`AggregateResult`. Exact: groups
with fewer than ``k`` distinct subjects are dropped and counted as ``suppressed``. DP: each
group opens only if its *noisy* distinct-subject count reaches the gate's threshold
(:class:`exchange.node.dp.Gate`); each count, count-distinct and sum gets noise from
:mod:`exchange.node.dp` and AVG is the noisy sum over the noisy count, clamped to the bounds
(post-processing costs no ε); the number of suppressed groups is not released.

DP accounting. Neighbouring datasets differ by one subject, which after the rewrite contributes
at most ``M = max_rows_per_subject`` rows (the largest over the joined datasets). Groups are
disjoint, so removing a subject moves the vector of one primitive over all groups by at most
``M`` in L1 for counts, count-distincts and the gate's distinct-subject counts, and
``M·max(|lo|, |hi|)`` for a clamped sum: each group's value gets noise at that sensitivity and
the primitive costs its ε share once (parallel composition over groups). The query's ε is split
equally between its distinct noisy primitives *and the gate* (sequential composition); AVG
reuses the SUM and COUNT it is built from. Without GROUP BY there is one global group, fixed in
advance: the gate's threshold is k and it spends no δ. With GROUP BY the groups come from the
data, and a group holding only one subject must stay hidden: the threshold is
``max(k, 1 + ⌈b·ln(M/δ)⌉)`` for the gate's noise scale ``b`` and the smallest δ the datasets'
rules allow (``delta_required`` if that is 0); the release is then (ε, δ)-DP. The refusal of a
group costs the same as its release: the whole ε (and δ) is charged either way. The group keys
themselves are ``plaintext`` (published) values.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal, InvalidOperation, localcontext
from functools import cache
from types import MappingProxyType
from typing import Any, Literal, cast

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.errors import ErrorLevel

from exchange.domain import Dataset
from exchange.errors import InvalidInputError
from exchange.node.analysis import (
    NUMERIC_TYPES,
    AnalysisRules,
    Disclosure,
    effective_disclosure,
    requires_dp,
)
from exchange.node.dp import DpMechanisms, Gate, scale_for, split_epsilon, sum_sensitivity
from policy.levels import Level, max_level

__all__ = [
    "K_COLUMN",
    "REASONS",
    "AggregateResult",
    "CheckedQuery",
    "GateInfo",
    "NoiseInfo",
    "OutputColumn",
    "QueryRejected",
    "ResultColumn",
    "TableColumn",
    "TableRules",
    "TableStats",
    "check_query",
    "postprocess",
]

#: the longest query text accepted, in characters
MAX_SQL_LENGTH = 20_000
MAX_TABLES = 4
MAX_OUTPUTS = 64
MAX_PARAMS = 2_000
MAX_IN_LIST = 1_000
MAX_STRING = 1_000
MAX_DEPTH = 64
MAX_LIMIT = 1_000_000
_INT64 = 2**63 - 1
#: prefix of every name the rewrite introduces; a user alias may not use it
HIDDEN_PREFIX = "__zonex"
K_COLUMN = "__zonex_k"
_SRC = "__zonex_src"
_RN = "__zonex_rn"

#: every ``QueryRejected.reason``, with what it means
REASONS: Mapping[str, str] = MappingProxyType(
    {
        "parse_error": "the text is not one SQL statement sqlglot can parse",
        "too_long": f"the query is longer than {MAX_SQL_LENGTH} characters",
        "too_complex": "the query nests too deeply or has too many parts",
        "multiple_statements": "more than one statement",
        "statement_not_allowed": "a statement other than SELECT",
        "set_operation": "UNION, INTERSECT or EXCEPT",
        "cte": "a WITH clause",
        "subquery": "a subquery anywhere",
        "window_function": "a window function (OVER, QUALIFY, WINDOW)",
        "case_not_allowed": "CASE, IF or an aggregate FILTER clause",
        "function_not_allowed": "a function other than the allowed aggregates (UDFs included)",
        "cast_not_allowed": "a cast of anything but a DATE/TIMESTAMP string constant",
        "expression_not_allowed": "arithmetic, operators or expressions beyond the allowed forms",
        "literal_not_allowed": "a constant where none may stand, NULL outside IS NULL, parameters",
        "type_mismatch": "a constant or aggregate that does not fit the column's type",
        "row_level_output": "output that is not aggregated: a plain column not grouped, or *",
        "no_aggregate": "no aggregate in the output",
        "having": "a HAVING clause",
        "distinct_not_allowed": "SELECT DISTINCT or DISTINCT inside SUM/AVG/MIN/MAX",
        "group_by_not_allowed": "GROUP BY something other than column names",
        "order_by_not_allowed": "ORDER BY something other than an output",
        "limit_not_allowed": "LIMIT or OFFSET other than a non-negative integer constant",
        "unknown_table": "a table that is not a dataset of the request",
        "unknown_column": "a column the datasets do not have",
        "ambiguous_column": "an unqualified column more than one dataset has",
        "column_not_allowed": "a column used where its disclosure rule forbids",
        "join_not_allowed": "a join other than INNER JOIN ON column equalities",
        "system_table": "a qualified name or a system catalog table",
        "table_function": "a table function (read_csv, duckdb_tables() ...)",
        "no_bounds": "SUM or AVG of a column without clamping bounds",
        "subject_value": "SUM, AVG, MIN or MAX of an identifier (a subject column, or a column "
        "the query equates with one): identifiers are only counted",
        "min_max_type": "MIN or MAX of a column that is not a number or a date/time",
        "min_max_level": "MIN or MAX of a column above L2",
        "dp_unsupported": "MIN or MAX in a differentially private query",
        "delta_required": "a differentially private GROUP BY on a dataset whose rules allow no "
        "delta for a gate over groups found in the data",
        "alias_not_allowed": "two outputs with the same alias",
        "construct_not_allowed": "any other construct",
    }
)

_SYSTEM_NAMES = frozenset(
    {
        "information_schema",
        "pg_catalog",
        "sqlite_master",
        "sqlite_schema",
        "sqlite_temp_master",
        "sqlite_sequence",
        "system",
        "temp",
        "main",
        "memory",
    }
)
_SYSTEM_PREFIXES = ("duckdb_", "pg_", "sqlite_", "information_schema")
_SIMPLE_ALIAS = re.compile(r"[a-z_][a-z0-9_]{0,62}")


class QueryRejected(InvalidInputError):
    """A query the analysis rules refuse. ``reason`` is a stable code from :data:`REASONS`;
    the detail names the column or construct, never a data value."""

    code = "query_rejected"
    title = "Query rejected by the analysis rules"

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in REASONS, reason
        super().__init__(detail, reason=reason)
        self.reason = reason


PortableType = Literal["integer", "decimal", "text", "boolean", "date", "timestamp"]
OutputKind = Literal["dimension", "count", "count_distinct", "sum", "avg", "min", "max"]
_PrimKind = Literal["dimension", "count", "count_distinct", "sum", "min", "max", "k"]


@dataclass(frozen=True)
class TableColumn:
    """A column as the checker sees it: name, portable type and level."""

    name: str
    type: str
    level: Level


@dataclass(frozen=True)
class TableStats:
    """Facts about one immutable snapshot of a dataset that let the rewrite skip work.

    ``subject_unique``: no two rows share a subject, so a group's distinct-subject count is its
    count of non-null subjects and a differentially private query needs no per-subject row
    bound. ``ranges``: per numeric column, the smallest and largest value present; a column
    whose range lies inside its clamping bounds is summed without clamping (the result is the
    same). Only valid for the exact snapshot they were computed on.
    """

    subject_unique: bool
    ranges: Mapping[str, tuple[Decimal | None, Decimal | None]] = field(default_factory=dict)

    def within(self, column: str, lower: Decimal | None, upper: Decimal | None) -> bool:
        if lower is None or upper is None or column not in self.ranges:
            return False
        low, high = self.ranges[column]
        return (low is None or low >= lower) and (high is None or high <= upper)


@dataclass(frozen=True)
class TableRules:
    """One dataset a query may use: its columns, subject column and analysis rules.

    ``relation`` / ``relation_schema`` name the physical table when it differs from the dataset
    name (an attached provider table); the rewrite addresses it, the consumer never does.
    """

    name: str
    columns: tuple[TableColumn, ...]
    subject_column: str
    rules: AnalysisRules
    zone: str = ""
    relation: str | None = None
    relation_schema: str | None = None
    #: statistics of the snapshot the query will read (None: assume nothing)
    stats: TableStats | None = None

    def __post_init__(self) -> None:
        if not any(c.name == self.subject_column for c in self.columns):
            raise ValueError(f"{self.name}: the subject column is not a column")
        object.__setattr__(
            self,
            "columns",
            tuple(TableColumn(c.name, c.type, Level(c.level)) for c in self.columns),
        )

    @classmethod
    def from_dataset(
        cls,
        dataset: Dataset,
        rules: AnalysisRules,
        *,
        relation: str | None = None,
        relation_schema: str | None = None,
        stats: TableStats | None = None,
    ) -> TableRules:
        return cls(
            dataset.name,
            tuple(TableColumn(c.name, c.type, Level(c.level)) for c in dataset.columns),
            dataset.subject_column,
            rules,
            zone=dataset.zone,
            relation=relation,
            relation_schema=relation_schema,
            stats=stats,
        )

    @property
    def subject(self) -> TableColumn:
        return next(c for c in self.columns if c.name == self.subject_column)

    def disclosure(self, column: TableColumn) -> Disclosure:
        """The column's disclosure, floored by its level (:func:`effective_disclosure`)."""
        return effective_disclosure(self.rules.rule_for(column.name).disclosure, column.level)


@dataclass(frozen=True)
class OutputColumn:
    """One released column. ``dataset``/``column`` are None for ``COUNT(*)``, whose level is
    that of the datasets' subject columns; ``lower``/``upper`` are the clamping bounds."""

    name: str
    kind: OutputKind
    dataset: str | None
    column: str | None
    level: Level
    lower: Decimal | None = None
    upper: Decimal | None = None


@dataclass(frozen=True)
class ResultColumn:
    """One column of the rewritten statement's result (dimensions, primitives, then k)."""

    name: str
    kind: _PrimKind
    label: str
    lower: Decimal | None = None
    upper: Decimal | None = None


@dataclass(frozen=True)
class CheckedQuery:
    """A checked query and its rewrite.

    ``sql`` runs with ``params`` through SQLAlchemy ``text()``; its result columns are
    ``columns``. ``layout[i]`` lists the result columns output ``i`` is computed from (two for
    AVG: the clamped sum and the count). ``canonical`` is the user's query normalized by sqlglot
    (comments dropped, constants kept) and ``digest`` its SHA-256; ``output_level`` the highest
    level of every column the query touches, subject columns included (就高从严).
    """

    sql: str
    params: Mapping[str, object]
    outputs: tuple[OutputColumn, ...]
    datasets: tuple[str, ...]
    output_level: Level
    canonical: str
    digest: str
    k: int
    dp_required: bool
    dp: bool
    contributions: int
    columns: tuple[ResultColumn, ...]
    layout: tuple[tuple[int, ...], ...]
    order: tuple[tuple[int, bool, bool], ...] = ()
    limit: int | None = None
    offset: int = 0
    dialect: str = "duckdb"
    #: the δ a DP release's gate spends: the smallest the read datasets' rules allow, when the
    #: groups come from the data (GROUP BY); None when they are fixed in advance (no GROUP BY,
    #: or cells a requester names) and for exact releases
    delta: Decimal | None = None


@dataclass(frozen=True)
class NoiseInfo:
    """How one primitive was noised: enough for a consumer to read the error bars."""

    label: str
    mechanism: str
    sensitivity: Decimal
    scale: Decimal
    epsilon: Decimal


@dataclass(frozen=True)
class GateInfo:
    """The noisy gate of a differentially private release: groups open when their noisy
    distinct-subject count (discrete Laplace, ``scale``) reaches ``threshold``."""

    k: int
    threshold: int
    epsilon: Decimal
    #: None: groups fixed in advance (threshold k, no δ spent)
    delta: Decimal | None
    sensitivity: int
    scale: Decimal

    @classmethod
    def from_gate(cls, gate: Gate) -> GateInfo:
        return cls(gate.k, gate.threshold, gate.epsilon, gate.delta, gate.sensitivity, gate.scale)

    def to_json(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "threshold": self.threshold,
            "epsilon": _plain(self.epsilon),
            "delta": None if self.delta is None else _plain(self.delta),
            "sensitivity": str(self.sensitivity),
            "scale": _plain(self.scale),
        }


@dataclass(frozen=True)
class AggregateResult:
    """What an aggregate computation releases.

    ``suppressed`` is the exact number of groups under k in an exact release; a differentially
    private release leaves it out (``None``): it is an exact count of groups the data holds
    and would undo the noisy gate (``gate``)."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]
    suppressed: int | None
    k: int
    level: Level
    epsilon: Decimal = Decimal(0)
    delta: Decimal = Decimal(0)
    noise: tuple[NoiseInfo, ...] = field(default=())
    gate: GateInfo | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe and float-free: decimals as strings, dates as ISO 8601."""
        return {
            "columns": list(self.columns),
            "rows": [[_json_value(v) for v in row] for row in self.rows],
            "suppressed": self.suppressed,
            "k": self.k,
            "level": self.level.value,
            "epsilon": _plain(self.epsilon),
            "delta": _plain(self.delta),
            "gate": None if self.gate is None else self.gate.to_json(),
            "noise": [
                {
                    "value": n.label,
                    "mechanism": n.mechanism,
                    "sensitivity": _plain(n.sensitivity),
                    "scale": _plain(n.scale),
                    "epsilon": _plain(n.epsilon),
                }
                for n in self.noise
            ],
        }


def _plain(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _json_value(value: object) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, Decimal):
        return _plain(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    return str(value)


# -- parsing and the forbidden-construct scan ----------------------------------------------------


def _reject(reason: str, detail: str) -> QueryRejected:
    return QueryRejected(reason, detail)


def _name(text: object) -> str:
    """A user-written name for a message: truncated, and only printable characters."""
    raw = str(text)
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in raw[:64])
    return cleaned + ("…" if len(raw) > 64 else "")


def _parse(sql: str, dialect: str) -> exp.Expression:
    if not isinstance(sql, str):
        raise _reject("parse_error", "the query must be text")
    if len(sql) > MAX_SQL_LENGTH:
        raise _reject("too_long", f"the query is longer than {MAX_SQL_LENGTH} characters")
    try:
        parsed = sqlglot.parse(sql, read=dialect, error_level=ErrorLevel.RAISE)
    except RecursionError:
        raise _reject("too_complex", "the query nests too deeply") from None
    except Exception:
        # the parser is foreign code fed hostile text: any failure is a refusal, never a crash
        raise _reject("parse_error", "the query could not be parsed as SQL") from None
    statements = [s for s in parsed if s is not None]
    if not statements:
        raise _reject("parse_error", "the query is empty")
    if len(statements) > 1:
        raise _reject("multiple_statements", "send exactly one statement")
    return cast(exp.Expression, statements[0])


def _is_typed_literal(node: exp.Expression) -> bool:
    """``DATE '2025-01-01'`` / ``TIMESTAMP '…'``: a cast of a string constant to a date type."""
    if not isinstance(node, exp.Cast) or type(node) is not exp.Cast:
        return False
    to = node.args.get("to")
    return (
        isinstance(node.this, exp.Literal)
        and node.this.is_string
        and isinstance(to, exp.DataType)
        and to.this in _DATE_TYPES
        and not to.expressions
    )


_DATE_TYPES = frozenset(
    {exp.DataType.Type.DATE, exp.DataType.Type.TIMESTAMP, exp.DataType.Type.TIMESTAMPNTZ}
)
_AGGREGATES = (exp.Count, exp.Sum, exp.Avg, exp.Min, exp.Max)
#: MIN and MAX release one subject's value as it is: only ordinal public values (numbers and
#: dates at L1/L2), never text (a name, an address, an identifier)
_MIN_MAX_TYPES = NUMERIC_TYPES | frozenset({"date", "timestamp"})
_KINDS: Mapping[type[exp.Expression], OutputKind] = MappingProxyType(
    {exp.Sum: "sum", exp.Avg: "avg", exp.Min: "min", exp.Max: "max"}
)
#: sqlglot models AND and OR as functions; they are the only non-aggregate ones allowed
_ALLOWED_FUNCS = (*_AGGREGATES, exp.And, exp.Or)


def _function_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return _name(node.name)
    try:
        return _name(node.sql_name())
    except Exception:
        return _name(type(node).__name__)


def _scan(root: exp.Expression) -> None:
    """Refuse forbidden constructs anywhere in the tree with a precise reason. The structural
    walk that follows is the allow-list; this pass only makes the reasons specific."""
    if isinstance(root, exp.SetOperation):
        raise _reject("set_operation", "UNION, INTERSECT and EXCEPT are not allowed")
    if not isinstance(root, exp.Select):
        raise _reject("statement_not_allowed", "only a SELECT statement is allowed")
    count = 0
    for node in root.walk():
        count += 1
        if count > 20 * MAX_PARAMS:
            raise _reject("too_complex", "the query has too many parts")
        if isinstance(node, exp.SetOperation):
            raise _reject("set_operation", "UNION, INTERSECT and EXCEPT are not allowed")
        if isinstance(node, (exp.With, exp.CTE)):
            raise _reject("cte", "WITH clauses are not allowed")
        if node is not root and isinstance(node, (exp.Query, exp.Subquery, exp.Exists)):
            raise _reject("subquery", "subqueries are not allowed")
        if isinstance(node, (exp.Window, exp.WindowSpec)):
            raise _reject("window_function", "window functions are not allowed")
        if node.arg_key in ("qualify", "windows") and node.parent is root:
            raise _reject("window_function", "QUALIFY and WINDOW are not allowed")
        if isinstance(node, (exp.Case, exp.If)):
            raise _reject("case_not_allowed", "CASE and IF are not allowed")
        if isinstance(node, exp.Filter):
            raise _reject("case_not_allowed", "aggregate FILTER clauses are not allowed")
        if isinstance(node, exp.Having):
            raise _reject("having", "HAVING is not allowed: groups under k are suppressed")
        if isinstance(node, (exp.Placeholder, exp.Parameter)):
            raise _reject("literal_not_allowed", "parameters are not allowed: write constants")
        if isinstance(node, exp.Cast):
            if not _is_typed_literal(node):
                raise _reject("cast_not_allowed", "casts are not allowed")
            continue
        if isinstance(node, exp.Table):
            _scan_table(node)
        elif isinstance(node, exp.Star) and not (
            isinstance(node.parent, exp.Count) and node.arg_key == "this"
        ):
            raise _reject("row_level_output", "* is not allowed: select aggregates")
        elif isinstance(node, (exp.Unnest, exp.Lateral, exp.Values)):
            raise _reject("table_function", "table functions are not allowed")
        elif isinstance(node, exp.Func) and not isinstance(node, _ALLOWED_FUNCS):
            raise _reject(
                "function_not_allowed", f"function {_function_name(node)}() is not allowed"
            )


def _scan_table(node: exp.Table) -> None:
    if node.args.get("db") or node.args.get("catalog"):
        raise _reject("system_table", "table names may not be qualified by a schema or catalog")
    if not isinstance(node.this, exp.Identifier):
        raise _reject("table_function", "table functions are not allowed")


def _empty(value: object) -> bool:
    return value is None or value is False or value == [] or value == ""


def _only(node: exp.Expression, allowed: frozenset[str], reason: str = "") -> None:
    """The allow-list: refuse any argument of ``node`` outside ``allowed``."""
    for key, value in node.args.items():
        if key not in allowed and not _empty(value):
            raise _reject(
                reason or "construct_not_allowed",
                f"{key.rstrip('_').upper().replace('_', ' ')} in "
                f"{type(node).__name__.upper()} is not allowed",
            )


_K_SELECT = frozenset(
    {"expressions", "from_", "joins", "where", "group", "order", "limit", "offset"}
)
_K_THIS = frozenset({"this"})
_K_BINARY = frozenset({"this", "expression"})
_COMPARISONS: tuple[type[exp.Expression], ...] = (
    exp.EQ,
    exp.NEQ,
    exp.GT,
    exp.GTE,
    exp.LT,
    exp.LTE,
)


# -- resolution ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    """A resolved column: which bound table (by position) and which column."""

    table: int
    column: TableColumn


@dataclass(frozen=True)
class _Agg:
    kind: OutputKind
    ref: _Ref | None


@dataclass(frozen=True)
class _Bound:
    rules: TableRules
    alias: exp.Identifier | None


def _matches(ident: exp.Identifier, name: str) -> bool:
    return ident.name == name if ident.quoted else ident.name.lower() == name.lower()


def _pick(ident: exp.Identifier, names: Sequence[str]) -> list[str]:
    found = [n for n in names if _matches(ident, n)]
    if len(found) > 1:
        exact = [n for n in found if n == ident.name]
        if len(exact) == 1:
            return exact
    return found


class _Checker:
    """The resolution state of one query: the datasets bound so far, the columns touched,
    the join equalities, the rebuilt WHERE and its bind parameters."""

    def __init__(self, tables: Mapping[str, TableRules]) -> None:
        self.tables = tables
        self.bound: list[_Bound] = []
        self.touched: set[_Ref] = set()
        self.params: dict[str, object] = {}
        self.joins: list[list[tuple[_Ref, _Ref]]] = []
        self.where: exp.Expression | None = None

    # tables and columns

    def bind_table(self, node: exp.Expression) -> None:
        if not isinstance(node, exp.Table):
            raise _reject("construct_not_allowed", "FROM takes dataset names only")
        _scan_table(node)
        _only(node, frozenset({"this", "alias"}))
        ident = node.this
        assert isinstance(ident, exp.Identifier)
        names = _pick(ident, list(self.tables))
        if len(names) != 1:
            lowered = ident.name.lower()
            if lowered in _SYSTEM_NAMES or lowered.startswith(_SYSTEM_PREFIXES):
                raise _reject("system_table", f"{_name(ident.name)} is a system table")
            raise _reject("unknown_table", f"unknown dataset {_name(ident.name)!r}")
        rules = self.tables[names[0]]
        if any(b.rules.name == rules.name for b in self.bound):
            raise _reject("join_not_allowed", f"dataset {rules.name!r} may appear only once")
        if self.bound and rules.zone != self.bound[0].rules.zone:
            raise _reject("join_not_allowed", "joined datasets must be in the same zone")
        if len(self.bound) >= MAX_TABLES:
            raise _reject("too_complex", f"at most {MAX_TABLES} datasets per query")
        alias: exp.Identifier | None = None
        table_alias = node.args.get("alias")
        if table_alias is not None:
            if not isinstance(table_alias, exp.TableAlias):
                raise _reject("construct_not_allowed", "table aliases are plain names")
            _only(table_alias, _K_THIS)
            if not isinstance(table_alias.this, exp.Identifier):
                raise _reject("construct_not_allowed", "table aliases are plain names")
            alias = table_alias.this
        label = alias.name if alias is not None else rules.name
        for b in self.bound:
            other = b.alias.name if b.alias is not None else b.rules.name
            if other.lower() == label.lower():
                raise _reject("join_not_allowed", f"table name {_name(label)!r} is used twice")
        self.bound.append(_Bound(rules, alias))

    def resolve(self, node: exp.Expression) -> _Ref:
        if not isinstance(node, exp.Column):
            raise _reject("expression_not_allowed", "expected a column name")
        _only(node, frozenset({"this", "table", "db", "catalog"}))
        if node.args.get("db") or node.args.get("catalog"):
            raise _reject("system_table", "column names may not be qualified by a schema")
        ident = node.this
        if isinstance(ident, exp.Star):
            raise _reject("row_level_output", "* is not allowed: select aggregates")
        if not isinstance(ident, exp.Identifier):
            raise _reject("construct_not_allowed", "expected a column name")
        qualifier = node.args.get("table")
        candidates = range(len(self.bound))
        if qualifier is not None:
            if not isinstance(qualifier, exp.Identifier):
                raise _reject("construct_not_allowed", "expected a table name")
            candidates = range(0)
            for i, b in enumerate(self.bound):
                label = b.alias.name if b.alias is not None else b.rules.name
                if _matches(qualifier, label):
                    candidates = range(i, i + 1)
                    break
            else:
                raise _reject("unknown_table", f"unknown table {_name(qualifier.name)!r}")
        found: list[_Ref] = []
        for i in candidates:
            cols = self.bound[i].rules.columns
            for name in _pick(ident, [c.name for c in cols]):
                found.append(_Ref(i, next(c for c in cols if c.name == name)))
        if not found:
            raise _reject("unknown_column", f"unknown column {_name(ident.name)!r}")
        if len(found) > 1:
            raise _reject(
                "ambiguous_column", f"column {_name(ident.name)!r} is ambiguous: qualify it"
            )
        return found[0]

    def use(self, ref: _Ref, how: str) -> Disclosure:
        """Record that ``ref`` is used as ``how`` and refuse it if its disclosure forbids."""
        rules = self.bound[ref.table].rules
        disclosure = rules.disclosure(ref.column)
        allowed = {
            "group": disclosure.may_group,
            "aggregate": disclosure.may_aggregate,
            "filter": disclosure.may_filter,
            "join": disclosure.may_join,
        }[how]
        if not allowed:
            verb = {
                "group": "selected or grouped by",
                "aggregate": "aggregated",
                "filter": "used in WHERE",
                "join": "joined on",
            }[how]
            raise _reject(
                "column_not_allowed",
                f"column {rules.name}.{ref.column.name} ({disclosure.value}) may not be {verb}",
            )
        self.touched.add(ref)
        return disclosure

    # joins

    def bind_join(self, node: exp.Expression) -> None:
        if not isinstance(node, exp.Join):
            raise _reject("join_not_allowed", "only INNER JOIN ... ON is allowed")
        _only(node, frozenset({"this", "on", "kind"}), "join_not_allowed")
        kind = node.args.get("kind")
        if kind and str(kind).upper() != "INNER":
            raise _reject("join_not_allowed", f"{_name(kind).upper()} JOIN is not allowed")
        on = node.args.get("on")
        if on is None:
            raise _reject("join_not_allowed", "a join needs ON with column equalities")
        self.bind_table(node.this)
        new = len(self.bound) - 1
        pairs: list[tuple[_Ref, _Ref]] = []
        for eq in self._conjuncts(on):
            if not isinstance(eq, exp.EQ):
                raise _reject("join_not_allowed", "JOIN ON takes equalities of columns only")
            _only(eq, _K_BINARY)
            if not (isinstance(eq.this, exp.Column) and isinstance(eq.expression, exp.Column)):
                raise _reject("join_not_allowed", "JOIN ON takes equalities of columns only")
            a, b = self.resolve(eq.this), self.resolve(eq.expression)
            if a.table == b.table:
                raise _reject("join_not_allowed", "a join equality must span two datasets")
            if new not in (a.table, b.table):
                raise _reject("join_not_allowed", "each ON must involve the dataset it joins")
            self.use(a, "join")
            self.use(b, "join")
            pairs.append((a, b))
        self.joins.append(pairs)

    def _conjuncts(self, node: exp.Expression, depth: int = 0) -> list[exp.Expression]:
        if depth > MAX_DEPTH:
            raise _reject("too_complex", "the query nests too deeply")
        if isinstance(node, exp.Paren):
            _only(node, _K_THIS)
            return self._conjuncts(node.this, depth + 1)
        if isinstance(node, exp.And):
            _only(node, _K_BINARY)
            return self._conjuncts(node.this, depth + 1) + self._conjuncts(
                node.expression, depth + 1
            )
        return [node]

    # aggregates

    def aggregate(self, node: exp.Expression) -> _Agg:
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.Count):
            _only(node, frozenset({"this", "big_int"}), "function_not_allowed")
            arg = node.this
            if isinstance(arg, exp.Star):
                _only(arg, frozenset())
                return _Agg("count", None)
            if isinstance(arg, exp.Distinct):
                _only(arg, frozenset({"expressions"}), "distinct_not_allowed")
                if len(arg.expressions) != 1:
                    raise _reject("function_not_allowed", "COUNT(DISTINCT ...) takes one column")
                return _Agg("count_distinct", self._agg_column(arg.expressions[0], "COUNT"))
            if isinstance(arg, exp.Column):
                return _Agg("count", self._agg_column(arg, "COUNT"))
            raise _reject("expression_not_allowed", "COUNT takes *, a column or DISTINCT column")
        if isinstance(node, (exp.Sum, exp.Avg, exp.Min, exp.Max)):
            fn = type(node).__name__.upper()
            _only(node, _K_THIS, "function_not_allowed")
            if isinstance(node.this, exp.Distinct):
                raise _reject("distinct_not_allowed", f"{fn}(DISTINCT ...) is not allowed")
            ref = self._agg_column(node.this, fn, valued=True)
            kind = _KINDS[type(node)]
            label = f"{self.bound[ref.table].rules.name}.{ref.column.name}"
            if kind in ("sum", "avg"):
                if ref.column.type not in NUMERIC_TYPES:
                    raise _reject(
                        "type_mismatch",
                        f"{fn} needs a numeric column; {label} is {ref.column.type}",
                    )
                if not self.bound[ref.table].rules.rules.rule_for(ref.column.name).bounded:
                    raise _reject(
                        "no_bounds", f"{fn}({label}): no clamping bounds declared for the column"
                    )
            elif ref.column.type not in _MIN_MAX_TYPES:
                raise _reject(
                    "min_max_type",
                    f"{fn} is allowed on numbers and dates only; {label} is {ref.column.type}",
                )
            elif ref.column.level > Level.L2:
                raise _reject(
                    "min_max_level",
                    f"{fn} is allowed on L1/L2 columns only; {label} is {ref.column.level}",
                )
            return _Agg(kind, ref)
        raise _reject("expression_not_allowed", "expected an aggregate")

    def _agg_column(self, node: exp.Expression, fn: str, *, valued: bool = False) -> _Ref:
        while isinstance(node, exp.Paren):
            node = node.this
        if not isinstance(node, exp.Column):
            raise _reject("expression_not_allowed", f"{fn} takes a column, not an expression")
        ref = self.resolve(node)
        # identifiers are never values, whatever the column's disclosure says: checked first
        if valued and self.identifier(ref):
            raise _reject(
                "subject_value",
                f"{fn}({self.bound[ref.table].rules.name}.{ref.column.name}): an identifier "
                "may only be counted (COUNT, COUNT DISTINCT)",
            )
        self.use(ref, "aggregate")
        return ref

    def identifier(self, ref: _Ref) -> bool:
        """Whether ``ref`` holds subject ids: a dataset's subject column, or a column the
        query's joins equate with one (directly or through other equalities)."""
        ids = {_Ref(i, b.rules.subject) for i, b in enumerate(self.bound)}
        pairs = [pair for step in self.joins for pair in step]
        grown = True
        while grown:
            grown = False
            for a, b in pairs:
                if (a in ids) != (b in ids):
                    ids |= {a, b}
                    grown = True
        return ref in ids

    # WHERE

    def predicate(self, node: exp.Expression, depth: int = 0) -> exp.Expression:
        """Check a WHERE condition and return its rebuilt form (constants as parameters)."""
        if depth > MAX_DEPTH:
            raise _reject("too_complex", "the condition nests too deeply")
        if isinstance(node, exp.Paren):
            _only(node, _K_THIS)
            return exp.Paren(this=self.predicate(node.this, depth + 1))
        if isinstance(node, (exp.And, exp.Or)):
            _only(node, _K_BINARY)
            cls = type(node)
            return cls(
                this=self.predicate(node.this, depth + 1),
                expression=self.predicate(node.expression, depth + 1),
            )
        if isinstance(node, exp.Not):
            _only(node, _K_THIS)
            return exp.Not(this=self.predicate(node.this, depth + 1))
        if isinstance(node, _COMPARISONS):
            _only(node, _K_BINARY)
            left, right = node.this, node.expression
            if _is_column(left) and _is_column(right):
                raise _reject(
                    "expression_not_allowed", "WHERE compares a column with a constant only"
                )
            if _is_column(left):
                ref = self._filter_column(left)
                return type(node)(this=self._col(ref), expression=self._constant(right, ref))
            if _is_column(right):
                ref = self._filter_column(right)
                return type(node)(this=self._constant(left, ref), expression=self._col(ref))
            raise _reject("expression_not_allowed", "WHERE compares a column with a constant")
        if isinstance(node, exp.In):
            _only(node, frozenset({"this", "expressions"}))
            ref = self._filter_column(node.this)
            items = node.expressions
            if not 1 <= len(items) <= MAX_IN_LIST:
                raise _reject("too_complex", f"IN lists hold 1 to {MAX_IN_LIST} constants")
            return exp.In(this=self._col(ref), expressions=[self._constant(i, ref) for i in items])
        if isinstance(node, exp.Between):
            _only(node, frozenset({"this", "low", "high"}))
            ref = self._filter_column(node.this)
            return exp.Between(
                this=self._col(ref),
                low=self._constant(node.args["low"], ref),
                high=self._constant(node.args["high"], ref),
            )
        if isinstance(node, exp.Is):
            _only(node, frozenset({"this", "expression", "negate"}))
            if not isinstance(node.expression, exp.Null):
                raise _reject("expression_not_allowed", "IS takes NULL only")
            ref = self._filter_column(node.this)
            rebuilt: exp.Expression = exp.Is(this=self._col(ref), expression=exp.Null())
            return exp.Not(this=rebuilt) if node.args.get("negate") else rebuilt
        if isinstance(node, exp.Column):
            raise _reject("expression_not_allowed", "a bare column is not a condition")
        if isinstance(node, (exp.Literal, exp.Boolean, exp.Null)):
            raise _reject("literal_not_allowed", "a constant is not a condition")
        raise _reject(
            "expression_not_allowed", f"{type(node).__name__.upper()} is not allowed in WHERE"
        )

    def _filter_column(self, node: exp.Expression) -> _Ref:
        while isinstance(node, exp.Paren):
            node = node.this
        if not isinstance(node, exp.Column):
            raise _reject("expression_not_allowed", "WHERE compares a column with a constant")
        ref = self.resolve(node)
        self.use(ref, "filter")
        return ref

    def _col(self, ref: _Ref) -> exp.Column:
        return _column(ref.column.name, f"t{ref.table}")

    def _constant(self, node: exp.Expression, ref: _Ref) -> exp.Expression:
        value = _literal_value(node, ref.column)
        if len(self.params) >= MAX_PARAMS:
            raise _reject("too_complex", f"at most {MAX_PARAMS} constants")
        name = f"p{len(self.params)}"
        self.params[name] = value
        return exp.Placeholder(this=name)


def _is_column(node: exp.Expression) -> bool:
    while isinstance(node, exp.Paren):
        node = node.this
    return isinstance(node, exp.Column)


def _column(name: str, table: str) -> exp.Column:
    return exp.Column(
        this=exp.Identifier(this=name, quoted=True), table=exp.Identifier(this=table, quoted=True)
    )


def _mismatch(column: TableColumn) -> QueryRejected:
    return _reject(
        "type_mismatch", f"the constant does not fit column {column.name} ({column.type})"
    )


def _literal_value(node: exp.Expression, column: TableColumn) -> object:
    """A constant's Python value, checked against the column's portable type."""
    while isinstance(node, exp.Paren):
        node = node.this
    negative = False
    if isinstance(node, exp.Neg):
        negative, node = True, node.this
        if not (isinstance(node, exp.Literal) and not node.is_string):
            raise _reject("expression_not_allowed", "only numbers may be negated")
    if isinstance(node, exp.Null):
        raise _reject("literal_not_allowed", "compare with NULL using IS NULL")
    if isinstance(node, exp.Boolean):
        if column.type != "boolean":
            raise _mismatch(column)
        return bool(node.this)
    if _is_typed_literal(node):
        assert isinstance(node, exp.Cast)
        to = node.args["to"].this
        return _temporal(node.this.name, column, date_only=to == exp.DataType.Type.DATE)
    if isinstance(node, exp.Literal):
        _only(node, frozenset({"this", "is_string"}))
        text = node.name
        if node.is_string:
            if len(text) > MAX_STRING:
                raise _reject("too_complex", f"string constants are at most {MAX_STRING} long")
            if column.type == "text":
                return text
            if column.type in ("date", "timestamp"):
                return _temporal(text, column, date_only=column.type == "date")
            raise _mismatch(column)
        if column.type not in NUMERIC_TYPES:
            raise _mismatch(column)
        return _number(text, negative)
    if isinstance(node, exp.Column):
        raise _reject("expression_not_allowed", "WHERE compares a column with a constant")
    raise _reject("literal_not_allowed", f"{type(node).__name__.upper()} is not a constant")


def _number(text: str, negative: bool) -> int | Decimal:
    if len(text) > 64:
        raise _reject("too_complex", "numeric constants are at most 64 characters")
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise _reject("literal_not_allowed", "not a number") from None
    if not value.is_finite():
        raise _reject("literal_not_allowed", "numbers must be finite")
    if negative:
        value = -value
    if re.fullmatch(r"[0-9]+", text):
        if abs(value) > _INT64:
            raise _reject("literal_not_allowed", "integer constants must fit in 64 bits")
        return int(value)
    exponent = value.as_tuple().exponent
    if value.adjusted() > 30 or (isinstance(exponent, int) and exponent < -30):
        raise _reject("literal_not_allowed", "numeric constants are limited to 30 digits")
    return value


def _temporal(text: str, column: TableColumn, *, date_only: bool) -> date | datetime:
    if column.type not in ("date", "timestamp"):
        raise _mismatch(column)
    try:
        if date_only:
            return date.fromisoformat(text)
        return datetime.fromisoformat(text)
    except ValueError:
        raise _reject("type_mismatch", f"not an ISO 8601 value for column {column.name}") from None


# -- the check -----------------------------------------------------------------------------------


def check_query(
    sql: str,
    tables: Mapping[str, TableRules],
    *,
    dialect_in: str = "duckdb",
    dialect_out: str = "duckdb",
    with_dp: bool = False,
    named_groups: bool = False,
) -> CheckedQuery:
    """Check ``sql`` against the rules of ``tables`` (dataset name → rules) and rewrite it.

    ``with_dp`` asks for differential privacy where the rules do not require it.
    ``named_groups`` says the caller releases only groups a requester named in advance (a
    secure sum's cells), so a differentially private gate needs no δ. Raises
    :class:`QueryRejected` for anything the rules do not allow; nothing else escapes for any
    input text.
    """
    root = _parse(sql, dialect_in)
    _scan(root)
    assert isinstance(root, exp.Select)
    if not _empty(root.args.get("distinct")):
        raise _reject("distinct_not_allowed", "SELECT DISTINCT is not allowed")
    _only(root, _K_SELECT)
    checker = _Checker(tables)

    source = root.args.get("from_")
    if not isinstance(source, exp.From):
        raise _reject("construct_not_allowed", "the query needs FROM a dataset")
    _only(source, _K_THIS)
    checker.bind_table(source.this)
    for join in root.args.get("joins") or []:
        checker.bind_join(join)

    dims = _group_by(checker, root.args.get("group"))

    where = root.args.get("where")
    if where is not None:
        _only(where, _K_THIS)
        checker.where = checker.predicate(where.this)

    selects = root.expressions
    if not selects:
        raise _reject("no_aggregate", "select at least one aggregate")
    if len(selects) > MAX_OUTPUTS:
        raise _reject("too_complex", f"at most {MAX_OUTPUTS} outputs")
    items: list[tuple[_Agg | _Ref, exp.Identifier | None]] = []
    for node in selects:
        alias: exp.Identifier | None = None
        if isinstance(node, exp.Alias):
            _only(node, frozenset({"this", "alias"}))
            if not isinstance(node.args.get("alias"), exp.Identifier):
                raise _reject("construct_not_allowed", "aliases are plain names")
            alias = node.args["alias"]
            node = node.this
        while isinstance(node, exp.Paren):
            node = node.this
        if isinstance(node, exp.Column):
            ref = checker.resolve(node)
            if ref not in dims:
                raise _reject(
                    "row_level_output",
                    f"column {ref.column.name} is neither grouped by nor aggregated",
                )
            items.append((ref, alias))
        elif isinstance(node, _AGGREGATES):
            items.append((checker.aggregate(node), alias))
        elif isinstance(node, (exp.Literal, exp.Boolean, exp.Null, exp.Neg)):
            raise _reject("literal_not_allowed", "constant outputs are not allowed")
        elif isinstance(node, (exp.Binary, exp.Unary)):
            raise _reject(
                "expression_not_allowed",
                f"{type(node).__name__.upper()} is not allowed: select columns and aggregates",
            )
        else:
            raise _reject(
                "construct_not_allowed", f"{type(node).__name__.upper()} is not allowed here"
            )
    if not any(isinstance(item, _Agg) for item, _ in items):
        raise _reject("no_aggregate", "select at least one aggregate: rows are never released")

    names = _output_names(checker, items)
    outputs, aggs = _outputs(checker, items, names)

    # the privacy unit and DP (DESIGN, "Privacy defaults"): the output's level counts every
    # column touched, subjects too; a consumer chooses the input set (WHERE, joins), so at L3
    # and above the release is DP unless every dataset read opted out (exact_release)
    for i, b in enumerate(checker.bound):
        checker.touched.add(_Ref(i, b.rules.subject))
    output_level = max_level(r.column.level for r in checker.touched)
    dp_required = any(requires_dp(output_level, b.rules.rules) for b in checker.bound)
    dp = dp_required or with_dp
    if dp:
        for agg in aggs:
            if agg.kind in ("min", "max"):
                raise _reject(
                    "dp_unsupported",
                    "MIN and MAX are not allowed in a differentially private query",
                )
        for pairs in checker.joins:
            if not any(
                a.column.name == checker.bound[a.table].rules.subject_column
                and b.column.name == checker.bound[b.table].rules.subject_column
                for a, b in pairs
            ):
                raise _reject(
                    "join_not_allowed",
                    "a differentially private query joins datasets on their subject columns",
                )
    delta: Decimal | None = None
    if dp and dims and not named_groups:
        # groups found in the data: the gate hides one subject's own group with probability
        # 1 - δ, at the tightest δ any dataset read allows
        delta = min(b.rules.rules.delta for b in checker.bound)
        if delta <= 0:
            raise _reject(
                "delta_required",
                "the rules allow no delta for a gate over groups found in the data: "
                "drop GROUP BY, or ask the provider for a delta",
            )

    order = _order_by(checker, root.args.get("order"), items, names)
    limit = _count_clause(root.args.get("limit"), "LIMIT")
    offset = _count_clause(root.args.get("offset"), "OFFSET") or 0

    k = max(b.rules.rules.min_group_size for b in checker.bound)
    contributions = (
        1
        if _unique_subjects(checker)
        else max(b.rules.rules.max_rows_per_subject for b in checker.bound)
    )
    statement, columns, layout = _rewrite(checker, dims, items, aggs, dp, contributions)
    canonical = root.sql(dialect="duckdb", normalize=True, comments=False)
    return CheckedQuery(
        sql=_generate(statement, dialect_out),
        params=dict(checker.params),
        outputs=outputs,
        datasets=tuple(b.rules.name for b in checker.bound),
        output_level=output_level,
        canonical=canonical,
        digest=hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
        k=k,
        dp_required=dp_required,
        dp=dp,
        contributions=contributions if dp else 0,
        columns=columns,
        layout=layout,
        order=order,
        limit=limit,
        offset=offset,
        dialect=dialect_out,
        delta=delta,
    )


def _group_by(checker: _Checker, group: exp.Expression | None) -> list[_Ref]:
    dims: list[_Ref] = []
    if group is None:
        return dims
    _only(group, frozenset({"expressions"}), "group_by_not_allowed")
    for node in group.expressions:
        while isinstance(node, exp.Paren):
            node = node.this
        if not isinstance(node, exp.Column):
            raise _reject("group_by_not_allowed", "GROUP BY takes column names")
        ref = checker.resolve(node)
        checker.use(ref, "group")
        if ref not in dims:
            dims.append(ref)
    return dims


def _generated_name(item: _Agg | _Ref) -> str:
    if isinstance(item, _Ref):
        return item.column.name
    if item.ref is None:
        return "count_star"
    return f"{item.kind}_{item.ref.column.name}"


def _safe(name: str) -> str:
    """A generated name as a simple identifier (column names of attached tables may be odd)."""
    cleaned = re.sub(r"[^a-z0-9_]", "_", name.lower())[:63]
    if not cleaned or not (cleaned[0].isalpha() or cleaned[0] == "_"):
        cleaned = f"c_{cleaned}"[:63]
    return cleaned.lstrip("_") or "c"


def _output_names(
    checker: _Checker, items: list[tuple[_Agg | _Ref, exp.Identifier | None]]
) -> list[str]:
    chosen: list[str | None] = []
    for _, alias in items:
        name = None
        if alias is not None:
            text = alias.name if alias.quoted else alias.name.lower()
            if _SIMPLE_ALIAS.fullmatch(text) and not text.startswith("__"):
                name = text
        chosen.append(name)
    taken = [n for n in chosen if n is not None]
    if len(taken) != len(set(taken)):
        raise _reject("alias_not_allowed", "two outputs have the same alias")
    used = set(taken)
    names: list[str] = []
    for (item, _), name in zip(items, chosen, strict=True):
        if name is None:
            base = _safe(_generated_name(item))
            name, n = base, 2
            while name in used:
                name, n = f"{base}_{n}", n + 1
            used.add(name)
        names.append(name)
    return names


def _outputs(
    checker: _Checker,
    items: list[tuple[_Agg | _Ref, exp.Identifier | None]],
    names: list[str],
) -> tuple[tuple[OutputColumn, ...], list[_Agg]]:
    outputs: list[OutputColumn] = []
    aggs: list[_Agg] = []
    subject_level = max_level(b.rules.subject.level for b in checker.bound)
    for (item, _), name in zip(items, names, strict=True):
        if isinstance(item, _Ref):
            outputs.append(
                OutputColumn(
                    name,
                    "dimension",
                    checker.bound[item.table].rules.name,
                    item.column.name,
                    item.column.level,
                )
            )
            continue
        aggs.append(item)
        if item.ref is None:
            outputs.append(OutputColumn(name, item.kind, None, None, subject_level))
            continue
        rule = checker.bound[item.ref.table].rules.rules.rule_for(item.ref.column.name)
        bounded = item.kind in ("sum", "avg")
        outputs.append(
            OutputColumn(
                name,
                item.kind,
                checker.bound[item.ref.table].rules.name,
                item.ref.column.name,
                item.ref.column.level,
                rule.lower if bounded else None,
                rule.upper if bounded else None,
            )
        )
    return tuple(outputs), aggs


def _order_by(
    checker: _Checker,
    order: exp.Expression | None,
    items: list[tuple[_Agg | _Ref, exp.Identifier | None]],
    names: list[str],
) -> tuple[tuple[int, bool, bool], ...]:
    if order is None:
        return ()
    _only(order, frozenset({"expressions"}), "order_by_not_allowed")
    keys: list[tuple[int, bool, bool]] = []
    for ordered in order.expressions:
        if not isinstance(ordered, exp.Ordered):
            raise _reject("order_by_not_allowed", "ORDER BY takes output names")
        _only(ordered, frozenset({"this", "desc", "nulls_first"}), "order_by_not_allowed")
        node = ordered.this
        index: int | None = None
        if isinstance(node, exp.Column) and node.args.get("table") is None:
            ident = node.this
            if isinstance(ident, exp.Identifier):
                hits = [i for i, n in enumerate(names) if _matches(ident, n)]
                index = hits[0] if len(hits) == 1 else None
        if index is None and isinstance(node, exp.Column):
            ref = checker.resolve(node)
            hits = [i for i, (item, _) in enumerate(items) if item == ref]
            index = hits[0] if hits else None
        elif index is None and isinstance(node, _AGGREGATES):
            agg = checker.aggregate(node)
            hits = [i for i, (item, _) in enumerate(items) if item == agg]
            index = hits[0] if hits else None
        if index is None:
            raise _reject("order_by_not_allowed", "ORDER BY takes outputs of the query")
        keys.append((index, bool(ordered.args.get("desc")), bool(ordered.args.get("nulls_first"))))
    return tuple(keys)


def _count_clause(node: exp.Expression | None, what: str) -> int | None:
    if node is None:
        return None
    _only(node, frozenset({"expression"}), "limit_not_allowed")
    value = node.args.get("expression")
    if not (
        isinstance(value, exp.Literal)
        and not value.is_string
        and re.fullmatch(r"[0-9]{1,7}", value.name)
        and int(value.name) <= MAX_LIMIT
    ):
        raise _reject("limit_not_allowed", f"{what} takes an integer constant up to {MAX_LIMIT}")
    return int(value.name)


# -- the rewrite ---------------------------------------------------------------------------------


def _rewrite(
    checker: _Checker,
    dims: list[_Ref],
    items: list[tuple[_Agg | _Ref, exp.Identifier | None]],
    aggs: list[_Agg],
    dp: bool,
    contributions: int,
) -> tuple[exp.Select, tuple[ResultColumn, ...], tuple[tuple[int, ...], ...]]:
    """A new statement built from resolved columns only: no user node or text is reused."""
    params = checker.params
    columns: list[ResultColumn] = []
    keys: dict[tuple[str, _Ref | None], int] = {}

    def label(ref: _Ref | None) -> str:
        if ref is None:
            return "*"
        return f"{checker.bound[ref.table].rules.name}.{ref.column.name}"

    def primitive(kind: _PrimKind, ref: _Ref | None) -> int:
        key = (kind, ref)
        if key not in keys:
            lower = upper = None
            if kind == "sum" and ref is not None:
                rule = checker.bound[ref.table].rules.rules.rule_for(ref.column.name)
                lower, upper = rule.lower, rule.upper
            keys[key] = len(columns)
            prefix = "d" if kind == "dimension" else "p"
            text = label(ref) if kind == "dimension" else f"{kind}({label(ref)})"
            columns.append(
                ResultColumn(f"{HIDDEN_PREFIX}_{prefix}{len(columns)}", kind, text, lower, upper)
            )
        return keys[key]

    for ref in dims:
        primitive("dimension", ref)
    layout: list[tuple[int, ...]] = []
    for item, _ in items:
        if isinstance(item, _Ref):
            layout.append((primitive("dimension", item),))
        elif item.kind == "avg":
            layout.append((primitive("sum", item.ref), primitive("count", item.ref)))
        else:
            layout.append((primitive(item.kind, item.ref),))

    tables = [
        exp.Table(
            this=exp.Identifier(this=b.rules.relation or b.rules.name, quoted=True),
            db=(
                exp.Identifier(this=b.rules.relation_schema, quoted=True)
                if b.rules.relation_schema
                else None
            ),
            alias=exp.TableAlias(this=exp.Identifier(this=f"t{i}", quoted=True)),
        )
        for i, b in enumerate(checker.bound)
    ]
    subjects = [_Ref(i, b.rules.subject) for i, b in enumerate(checker.bound)]

    def base_select(expressions: list[exp.Expression]) -> exp.Select:
        select = exp.Select(expressions=expressions, from_=exp.From(this=tables[0]))
        joins = []
        for i, pairs in enumerate(checker.joins, start=1):
            conds = [exp.EQ(this=checker._col(a), expression=checker._col(b)) for a, b in pairs]
            on: exp.Expression = conds[0]
            for cond in conds[1:]:
                on = exp.And(this=on, expression=cond)
            joins.append(exp.Join(this=tables[i], on=on, kind="INNER"))
        if joins:
            select.set("joins", joins)
        if checker.where is not None:
            select.set("where", exp.Where(this=checker.where))
        return select

    # where each referenced column is read from: the tables directly, or the bounded derived table
    inner: dict[_Ref, str] = {}
    unique = _unique_subjects(checker)
    derived_source = dp and not unique
    if derived_source:
        for ref in [r for _, r in keys if r is not None] + subjects:
            inner.setdefault(ref, f"c{len(inner)}")

    def col(ref: _Ref) -> exp.Expression:
        if derived_source:
            return _column(inner[ref], _SRC)
        return checker._col(ref)

    out: list[exp.Expression] = []
    by_index = sorted(keys.items(), key=lambda item: item[1])
    for (kind, pref), index in by_index:
        rc = columns[index]
        expr: exp.Expression
        if pref is None:
            expr = exp.Count(this=exp.Star())
        elif kind == "dimension":
            expr = col(pref)
        elif kind == "count":
            expr = exp.Count(this=col(pref))
        elif kind == "count_distinct":
            expr = exp.Count(this=exp.Distinct(expressions=[col(pref)]))
        elif kind == "sum":
            stats = checker.bound[pref.table].rules.stats
            if stats is not None and stats.within(pref.column.name, rc.lower, rc.upper):
                expr = exp.Sum(this=col(pref))  # every value is inside the bounds already
            else:
                n = sum(1 for c in columns[:index] if c.kind == "sum")
                params[f"lo{n}"], params[f"hi{n}"] = rc.lower, rc.upper
                expr = exp.Sum(this=_clamp(col(pref), f"lo{n}", f"hi{n}"))
        elif kind == "min":
            expr = exp.Min(this=col(pref))
        else:
            expr = exp.Max(this=col(pref))
        out.append(exp.Alias(this=expr, alias=exp.Identifier(this=rc.name, quoted=True)))
    # one table whose subjects are unique: distinct subjects per group = non-null subjects
    k_counts: list[exp.Expression] = [
        exp.Count(this=col(s)) if unique else exp.Count(this=exp.Distinct(expressions=[col(s)]))
        for s in subjects
    ]
    k_expr = (
        k_counts[0]
        if len(k_counts) == 1
        else exp.Least(this=k_counts[0], expressions=k_counts[1:], ignore_nulls=True)
    )
    out.append(exp.Alias(this=k_expr, alias=exp.Identifier(this=K_COLUMN, quoted=True)))
    result_columns = (*columns, ResultColumn(K_COLUMN, "k", "k"))
    group = [col(ref) for ref in dims]

    if not derived_source:
        # without DP, or with unique subjects (one row each), there is nothing to bound
        statement = base_select(out)
    else:
        # bound each subject's contribution: number its rows in a fixed order, keep the first M
        inner_cols: list[exp.Expression] = [
            exp.Alias(this=checker._col(ref), alias=exp.Identifier(this=name, quoted=True))
            for ref, name in inner.items()
        ]
        row_number = exp.Window(
            this=exp.RowNumber(),
            partition_by=[checker._col(subjects[0])],
            order=exp.Order(
                expressions=[
                    exp.Ordered(this=checker._col(ref), nulls_first=False) for ref in inner
                ]
            ),
        )
        inner_cols.append(exp.Alias(this=row_number, alias=exp.Identifier(this=_RN, quoted=True)))
        derived = exp.Subquery(
            this=base_select(inner_cols),
            alias=exp.TableAlias(this=exp.Identifier(this=_SRC, quoted=True)),
        )
        params["max_rows"] = contributions
        statement = exp.Select(
            expressions=out,
            from_=exp.From(this=derived),
            where=exp.Where(
                this=exp.LTE(this=_column(_RN, _SRC), expression=exp.Placeholder(this="max_rows"))
            ),
        )
    if group:
        statement.set("group", exp.Group(expressions=group))
    return statement, result_columns, tuple(layout)


def _unique_subjects(checker: _Checker) -> bool:
    """One dataset whose snapshot has no repeated subject: each subject is one row."""
    if len(checker.bound) != 1:
        return False
    stats = checker.bound[0].rules.stats
    return stats is not None and stats.subject_unique


def _clamp(column: exp.Expression, lower: str, upper: str) -> exp.Expression:
    """``CASE WHEN c IS NULL THEN NULL ELSE LEAST(GREATEST(c, :lo), :hi) END``: NULL stays
    NULL on every engine (PostgreSQL's and DuckDB's GREATEST skip NULLs, SQLite's do not)."""
    clamped = exp.Least(
        this=exp.Greatest(
            this=column.copy(), expressions=[exp.Placeholder(this=lower)], ignore_nulls=True
        ),
        expressions=[exp.Placeholder(this=upper)],
        ignore_nulls=True,
    )
    return exp.Case(
        ifs=[exp.If(this=exp.Is(this=column.copy(), expression=exp.Null()), true=exp.Null())],
        default=clamped,
    )


@cache
def _generator_class(dialect: str) -> tuple[Dialect, type[Any]]:
    """The dialect's generator, writing placeholders as ``:name`` for SQLAlchemy ``text()``."""
    d = Dialect.get_or_raise(dialect)
    base: type[Any] = d.generator_class

    class _Generator(base):  # type: ignore[misc]
        def placeholder_sql(self, expression: exp.Placeholder) -> str:
            return f":{expression.name}"

    return d, _Generator


def _generate(statement: exp.Expression, dialect: str) -> str:
    d, generator = _generator_class(dialect)
    return str(
        generator(
            dialect=d, identify=True, unsupported_level=ErrorLevel.RAISE, comments=False
        ).generate(statement)
    )


# -- post-processing -----------------------------------------------------------------------------


def postprocess(
    checked: CheckedQuery, rows: Sequence[Sequence[Any]], *, dp: DpMechanisms | None = None
) -> AggregateResult:
    """Release the raw ``rows`` of ``checked.sql``: gate the groups on k, add noise when the
    query is differentially private, derive AVG, order and limit.

    Exact releases gate on the exact distinct-subject count (``< k`` is suppressed, and the
    result says how many). A differentially private release gates on a noisy count
    (:class:`exchange.node.dp.Gate`) that spends its own share of ε (and ``checked.delta`` when the
    groups come from the data), and does not say how many groups it suppressed.

    ``dp`` must be given exactly when ``checked.dp`` (the rewrite bounded contributions for it);
    anything else is a caller bug and raises :class:`ValueError` before anything is released.
    """
    if checked.dp and dp is None:
        raise ValueError("this query is differentially private: noise mechanisms are required")
    if dp is not None and not checked.dp:
        raise ValueError("noise was not planned for this query: check it with with_dp=True")
    width = len(checked.columns)
    noisy = [
        i for i, c in enumerate(checked.columns) if c.kind in ("count", "count_distinct", "sum")
    ]
    noise: list[NoiseInfo] = []
    share = Decimal(0)
    gate: Gate | None = None
    if dp is not None:
        # sequential composition: each noisy primitive and the gate spend one equal share
        share = split_epsilon(dp.epsilon, len(noisy) + 1)
        m = checked.contributions
        # one subject moves the distinct count of at most M groups, each by at most 1
        gate = Gate(checked.k, share, sensitivity=m, delta=checked.delta)
        for i in noisy:
            c = checked.columns[i]
            if c.kind == "sum":
                assert c.lower is not None and c.upper is not None
                sensitivity = sum_sensitivity(c.lower, c.upper, m)
                mechanism = "laplace"
            else:
                sensitivity, mechanism = Decimal(m), "discrete_laplace"
            noise.append(
                NoiseInfo(c.label, mechanism, sensitivity, scale_for(share, sensitivity), share)
            )
    given: list[list[Any]] = []
    for raw in rows:
        row = list(raw)
        if len(row) != width:
            raise ValueError(f"expected {width} columns, got {len(row)}")
        given.append(row)
    distinct = [0 if row[-1] is None else int(row[-1]) for row in given]
    # the gate's noisy counts of every group in one draw, then each noisy column's values of
    # every opened group in one draw: each value its own noise at the scale a draw per value
    # would use (exchange.node.dp, "vector twins")
    opens = gate.opens_each(distinct) if gate is not None else [d >= checked.k for d in distinct]
    kept = [row for row, open_ in zip(given, opens, strict=True) if open_]
    suppressed = len(given) - len(kept)
    if dp is not None and kept:
        for i in noisy:
            c = checked.columns[i]
            drawn: list[int] | list[Decimal]
            if c.kind == "sum":
                assert c.lower is not None and c.upper is not None
                drawn = dp.sums(
                    [_exact(row[i]) or 0 for row in kept],
                    c.lower,
                    c.upper,
                    share,
                    contributions=checked.contributions,
                )
            else:
                drawn = dp.counts(
                    [int(row[i]) for row in kept], share, sensitivity=checked.contributions
                )
            for row, value in zip(kept, drawn, strict=True):
                row[i] = value
    released = _sort(checked, [_derive(checked, row, noised=dp is not None) for row in kept])
    start = checked.offset
    stop = None if checked.limit is None else start + checked.limit
    return AggregateResult(
        columns=tuple(o.name for o in checked.outputs),
        rows=tuple(tuple(r) for r in released[start:stop]),
        # an exact count of the groups the data holds: never part of a DP release
        suppressed=None if gate is not None else suppressed,
        k=checked.k,
        level=checked.output_level,
        epsilon=dp.epsilon if dp is not None else Decimal(0),
        delta=(checked.delta or Decimal(0)) if dp is not None else Decimal(0),
        noise=tuple(noise),
        gate=None if gate is None else GateInfo.from_gate(gate),
    )


def _exact(value: Any) -> int | Decimal | None:
    """A database number as an exact Python number (floats by their shortest repr)."""
    if value is None or (isinstance(value, (int, Decimal)) and not isinstance(value, bool)):
        exact: int | Decimal | None = value
        return exact
    if isinstance(value, float):
        return Decimal(repr(value))
    return Decimal(str(value))


def _derive(checked: CheckedQuery, row: list[Any], *, noised: bool) -> list[Any]:
    out: list[Any] = []
    for output, sources in zip(checked.outputs, checked.layout, strict=True):
        if output.kind in ("count", "count_distinct"):
            count = int(row[sources[0]])
            out.append(max(0, count) if noised else count)
        elif output.kind == "sum":
            out.append(_exact(row[sources[0]]))
        elif output.kind == "avg":
            total, n = _exact(row[sources[0]]), int(row[sources[1]])
            if total is None or n < 1:
                out.append(None)
                continue
            with localcontext() as ctx:
                ctx.prec = 28
                average = Decimal(total) / Decimal(n)
            if noised:
                # post-processing: an average outside the bounds can only be noise
                assert output.lower is not None and output.upper is not None
                average = min(max(average, output.lower), output.upper)
            out.append(average)
        else:
            out.append(row[sources[0]])
    return out


def _sort(checked: CheckedQuery, rows: list[list[Any]]) -> list[list[Any]]:
    """Order by the ORDER BY keys, then by every dimension, so a release is deterministic."""
    keys = list(checked.order)
    named = {index for index, _, _ in keys}
    keys += [
        (i, False, False)
        for i, o in enumerate(checked.outputs)
        if o.kind == "dimension" and i not in named
    ]
    # stable sorts from the least significant key up
    for index, desc, nulls_first in reversed(keys):
        rows.sort(key=_sort_key(index, none_high=nulls_first == desc), reverse=desc)
    return rows


def _sort_key(index: int, *, none_high: bool) -> Callable[[list[Any]], tuple[bool, Any]]:
    """A key putting NULL above (``none_high``) or below every value of column ``index``."""

    def key(row: list[Any]) -> tuple[bool, Any]:
        value = row[index]
        flag = (value is None) if none_high else (value is not None)
        return flag, 0 if value is None else value

    return key
