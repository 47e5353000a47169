"""The release step every host of a zone runs: snapshot check, local veto, query, noise.

:func:`release_aggregate` is the one code path from a checked query to a released result; the
exchange calls it in-process for zones without a node, and a zone node calls it for the tasks it
receives (:mod:`exchange.node.agent`). Noise is drawn here, on the zone's host, so a node never
lets a pre-noise value leave its machine.

A secure sum's zone part is shared the same way: :func:`sum_layout` and :func:`cell_vector`
turn a checked query's rows into the gated cell vector, and :func:`contribution_payload` is what
the zone signs, whether the exchange runs it in-process
(:func:`exchange.server.compute.secure_sum.contribute`) or the zone's node does
(:mod:`exchange.node.secure_sum`).
"""

from __future__ import annotations

import hashlib
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, TableClause, distinct, func, select, text

from crypto.canonical import canonicalize
from exchange.domain import CONTRIBUTION_TYPE, CONTRIBUTION_VERSION
from exchange.errors import InvalidInputError
from exchange.node.analysis import NUMERIC_TYPES
from exchange.node.dp import DpMechanisms, Gate
from exchange.node.sqlcheck import CheckedQuery, TableStats, postprocess
from exchange.tasks import TaskRefused

__all__ = [
    "CONTRIBUTION_TYPE",
    "CONTRIBUTION_VERSION",
    "CellVector",
    "SumLayout",
    "Veto",
    "cell_vector",
    "cells_digest",
    "check_cells",
    "contribution_payload",
    "load_veto",
    "parse_cells",
    "plain",
    "release_aggregate",
    "sum_layout",
    "table_stats",
]

#: task kinds a veto file may name
TASK_KINDS = (
    "aggregate",
    "secure_sum",
    "psi_zone",
    "psi_epoch_prepare",
    "psi_epoch_answer",
    "he_score",
    "export",
)


def plain(value: Decimal) -> str:
    """A decimal as the wire writes it: positional, no trailing zeros, ``0`` never ``-0``."""
    out = format(value.normalize(), "f")
    return "0" if out in ("-0", "0") else out


@dataclass(frozen=True)
class Veto:
    """Rules a provider keeps on its own node, applied on top of the exchange's (only ever
    stricter): a larger k, a smaller ε per release, task kinds never run."""

    min_k: int = 0
    max_epsilon: Decimal | None = None
    refuse: frozenset[str] = field(default_factory=frozenset)

    def check(self, kind: str, epsilon: Decimal | None) -> None:
        if kind in self.refuse:
            raise TaskRefused("vetoed", f"this node does not run {kind} tasks")
        if epsilon is not None and self.max_epsilon is not None and epsilon > self.max_epsilon:
            raise TaskRefused(
                "vetoed", f"this node releases at most epsilon {plain(self.max_epsilon)} per task"
            )

    def k(self, k: int) -> int:
        return max(k, self.min_k)


def load_veto(path: Path) -> Veto:
    """Read ``veto.toml``; an unknown key or a bad value fails closed (ValueError, one line)."""
    if not path.exists():
        return Veto()
    try:
        data = tomllib.loads(path.read_text("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    unknown = set(data) - {"min_k", "max_epsilon", "refuse"}
    if unknown:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(sorted(unknown))}")
    min_k = data.get("min_k", 0)
    if not isinstance(min_k, int) or isinstance(min_k, bool) or not 0 <= min_k <= 1_000_000:
        raise ValueError(f"{path}: min_k is a whole number 0..1000000")
    max_eps: Decimal | None = None
    if "max_epsilon" in data:
        raw = data["max_epsilon"]
        if not isinstance(raw, str):
            raise ValueError(f'{path}: max_epsilon is a decimal string, e.g. "0.5"')
        try:
            max_eps = Decimal(raw)
        except InvalidOperation as exc:
            raise ValueError(f"{path}: max_epsilon {raw!r} is not a decimal") from exc
        if not max_eps.is_finite() or max_eps <= 0:
            raise ValueError(f"{path}: max_epsilon must be positive")
    refuse = data.get("refuse", [])
    if not isinstance(refuse, list) or any(r not in TASK_KINDS for r in refuse):
        raise ValueError(f"{path}: refuse lists task kinds among {', '.join(TASK_KINDS)}")
    return Veto(min_k=min_k, max_epsilon=max_eps, refuse=frozenset(refuse))


def _decimal(value: object) -> Decimal | None:
    if value is None:
        return None
    return value if isinstance(value, Decimal) else Decimal(str(value))


def table_stats(
    engine: Engine, relation: TableClause, subject: str, columns: Sequence[Mapping[str, str]]
) -> TableStats:
    """Subject uniqueness and numeric ranges of one snapshot (read where the rows are)."""
    numeric = [c["name"] for c in columns if c["type"] in NUMERIC_TYPES]
    with engine.connect() as conn:
        values = conn.execute(
            select(
                func.count(distinct(relation.c[subject])) == func.count(),
                *(func.min(relation.c[n]) for n in numeric),
                *(func.max(relation.c[n]) for n in numeric),
            )
        ).one()
    ranges = {
        n: (_decimal(values[1 + i]), _decimal(values[1 + len(numeric) + i]))
        for i, n in enumerate(numeric)
    }
    return TableStats(subject_unique=bool(values[0]), ranges=ranges)


def release_aggregate(
    checked: CheckedQuery, engine: Engine, epsilon: Decimal | None
) -> dict[str, Any]:
    """Run a checked query on the zone's engine and release it: gate on k (noisy under DP) and
    add noise. Returns the released result and the parameters it was released under."""
    if checked.dp and epsilon is None:
        raise TaskRefused("malformed", "a differentially private task names no epsilon")
    with engine.connect() as conn:
        raw = [tuple(r) for r in conn.execute(text(checked.sql), dict(checked.params))]
    dp = DpMechanisms(epsilon) if checked.dp and epsilon is not None else None
    released = postprocess(checked, raw, dp=dp)
    body: dict[str, Any] = {
        "result": released.to_json(),
        "sql": checked.canonical,
        "k": checked.k,
        "epsilon": plain(epsilon) if checked.dp and epsilon is not None else "0",
        "delta": plain(checked.delta or Decimal(0)) if checked.dp else "0",
    }
    if released.suppressed is not None:
        body["suppressed"] = released.suppressed
    return body


# -- a secure sum's zone part (the exchange in-process, or the zone's node) --------------------


#: the outputs that add up across zones
_ADDITIVE = ("count", "sum")


def parse_cells(raw: object, slots: int) -> tuple[tuple[str, ...], ...]:
    """The cells a requester names: distinct group keys of one width, at most ``slots``."""
    if not isinstance(raw, list) or not raw:
        raise InvalidInputError("cells is a non-empty list of group keys")
    cells: list[tuple[str, ...]] = []
    for cell in raw:
        if not isinstance(cell, list) or any(not isinstance(v, str) or len(v) > 200 for v in cell):
            raise InvalidInputError("each cell is a list of group values (strings)")
        cells.append(tuple(cell))
    if len(set(cells)) != len(cells):
        raise InvalidInputError("each cell may be named once")
    if len({len(c) for c in cells}) != 1:
        raise InvalidInputError("every cell names one value per GROUP BY column")
    if len(cells) > slots:
        raise InvalidInputError(f"at most {slots} cells fit one ciphertext")
    return tuple(cells)


def cells_digest(cells: Sequence[Sequence[str]]) -> str:
    return hashlib.sha256(canonicalize([list(c) for c in cells])).hexdigest()


def _key(value: object) -> str | None:
    """A group value as the text a requester names it by."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Decimal):
        text = format(value.normalize(), "f")
        return "0" if text in ("-0", "0") else text
    return str(value)


def _value(value: object, scheme: str, what: str) -> int | float:
    if value is None:
        return 0
    if scheme == "ckks":
        return float(value)  # type: ignore[arg-type]
    exact = value if isinstance(value, int) else Decimal(str(value))
    if isinstance(exact, Decimal):
        if exact != exact.to_integral_value():
            raise InvalidInputError(
                f"{what} is fractional: a BFV context sums integers exactly; use a CKKS context"
            )
        return int(exact)
    return exact


@dataclass(frozen=True)
class SumLayout:
    """Result-column indexes of the dimensions and of the additive values, the values' names."""

    dims: tuple[int, ...]
    values: tuple[int, ...]
    names: tuple[str, ...]


def sum_layout(checked: CheckedQuery) -> SumLayout:
    """Where a checked secure-sum query's dimensions and additive values are (COUNT and SUM
    only: the outputs that add up across zones)."""
    dims: list[int] = []
    values: list[int] = []
    names: list[str] = []
    for output, sources in zip(checked.outputs, checked.layout, strict=True):
        if output.kind == "dimension":
            dims.append(sources[0])
        elif output.kind in _ADDITIVE:
            values.append(sources[0])
            names.append(output.name)
        else:
            raise InvalidInputError(
                f"{output.kind.upper()} does not add up across zones; use COUNT and SUM",
                reason="not_additive",
            )
    if not values:
        raise InvalidInputError("select at least one COUNT or SUM")
    return SumLayout(tuple(dims), tuple(values), tuple(names))


def check_cells(layout: SumLayout, cells: Sequence[Sequence[str]], slots: int) -> int:
    """The vector's length (cells × values) once the cells fit the query and one ciphertext."""
    if len(layout.dims) != len(cells[0]):
        raise InvalidInputError(
            f"the query groups by {len(layout.dims)} columns; cells name {len(cells[0])} values"
        )
    width = len(layout.values)
    length = len(cells) * width
    if length > slots:
        raise InvalidInputError(f"{len(cells)} cells × {width} values exceed {slots} slots")
    return length


@dataclass(frozen=True)
class CellVector:
    """A zone's cell-major vector and, for exact sums, which cells it filled or zeroed."""

    values: list[int | float]
    filled: list[bool]
    suppressed: int

    @property
    def missing(self) -> int:
        """Named cells the zone has no group for."""
        return self.filled.count(False) - self.suppressed


def cell_vector(
    checked: CheckedQuery,
    rows: Iterable[Sequence[Any]],
    cells: Sequence[tuple[str, ...]],
    scheme: str,
    slots: int,
    gate: Gate | None,
) -> CellVector:
    """The zone's vector from the checked query's raw rows: each named cell whose group passes
    the gate (``gate`` for a differentially private sum, on the group's noisy distinct-subject
    count; else the exact k gate) holds its values; every other cell, and every group the
    requester did not name, is zeros."""
    layout = sum_layout(checked)
    length = check_cells(layout, cells, slots)
    width = len(layout.values)
    index = {cell: i for i, cell in enumerate(cells)}
    vector: list[int | float] = [0] * length
    filled = [False] * len(cells)
    suppressed = 0
    for row in rows:
        key = tuple(_key(row[d]) for d in layout.dims)
        cell = index.get(key)  # type: ignore[arg-type]
        if cell is None:
            continue  # a group the requester did not name is never released
        distinct = 0 if row[-1] is None else int(row[-1])
        if not (gate.opens(distinct) if gate is not None else distinct >= checked.k):
            suppressed += 1
            continue
        filled[cell] = True
        for v, column in enumerate(layout.values):
            vector[cell * width + v] = _value(row[column], scheme, layout.names[v])
    return CellVector(vector, filled, suppressed)


def contribution_payload(
    *,
    computation: str,
    consumer: str,
    zone: str,
    context: str,
    checked: CheckedQuery,
    cells: str,
    length: int,
    ciphertext: bytes,
    snapshots: Mapping[str, str],
    exact: CellVector | None,
) -> dict[str, Any]:
    """What a zone signs for its part of a secure sum (DSSE, :data:`CONTRIBUTION_TYPE`):
    ``cells`` is the cells' digest, ``snapshots`` each read dataset's snapshot; ``exact`` (exact
    sums only) adds how many named cells were zeroed and how many it had no group for."""
    payload: dict[str, Any] = {
        "type": CONTRIBUTION_VERSION,
        "computation": computation,
        "consumer": consumer,
        "zone": zone,
        "context": context,
        "query": checked.digest,
        "cells": cells,
        "length": length,
        "ciphertext": hashlib.sha256(ciphertext).hexdigest(),
        "datasets": [{"name": name, "snapshot": snapshots[name]} for name in checked.datasets],
        "k": checked.k,
    }
    if exact is not None:
        payload |= {"suppressed": exact.suppressed, "missing": exact.missing}
    return payload
