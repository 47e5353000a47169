"""The release step every host of a zone runs: snapshot check, local veto, query, noise.

:func:`release_aggregate` is the one code path from a checked query to a released result; the
exchange calls it in-process for zones without a node, and a zone node calls it for the tasks it
receives (:mod:`exchange.node.agent`). Noise is drawn here, on the zone's host, so a node never
lets a pre-noise value leave its machine.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, TableClause, distinct, func, select, text

from exchange.analysis import NUMERIC_TYPES
from exchange.dp import DpMechanisms
from exchange.sqlcheck import CheckedQuery, TableStats, postprocess
from exchange.tasks import TaskRefused

__all__ = ["Veto", "load_veto", "plain", "release_aggregate", "table_stats"]

#: task kinds a veto file may name
TASK_KINDS = ("aggregate", "secure_sum", "psi_zone")


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
