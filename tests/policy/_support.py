"""Helpers shared by the policy tests: the golden vectors and a reference enforcer."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import casbin

from policy import DEFAULT_CEILINGS, DecisionRequest, Level, Operation, PolicyRow, PurposeVocabulary
from policy._engine import register_functions

VECTORS = Path(__file__).resolve().parent.parent / "vectors" / "policy"


def load_vectors() -> dict[str, Any]:
    return json.loads((VECTORS / "decisions.json").read_text("utf-8"))


def file_enforcer() -> Any:
    """A plain casbin.Enforcer on the vectors' model and policy files (nothing of ours but the
    registered functions)."""
    doc = load_vectors()
    e = casbin.Enforcer(str(VECTORS / doc["model"]), str(VECTORS / doc["policy"]))
    e.enable_auto_save(False)
    return register_functions(e, PurposeVocabulary.load_default())


def enforcer_rows(e: Any) -> list[PolicyRow]:
    """The rows a Casbin enforcer holds, in its order."""
    rows = [PolicyRow("p", tuple(v)) for v in e.get_policy()]
    rows += [PolicyRow("g", tuple(v)) for v in e.get_grouping_policy()]
    return rows


def request_from(spec: Mapping[str, Any], defaults: Mapping[str, Any]) -> DecisionRequest:
    merged = {**defaults, **spec}
    ceilings = dict(DEFAULT_CEILINGS)
    for level, ops in merged.get("ceilings", {}).items():
        ceilings[Level(level)] = frozenset(Operation(op) for op in ops)
    return DecisionRequest(
        subject=merged["subject"],
        zone=merged["zone"],
        dataset=merged["dataset"],
        operation=Operation(merged["operation"]),
        purpose=merged["purpose"],
        level=Level(merged["level"]),
        ceilings=ceilings,
        now=datetime.fromisoformat(merged["now"]),
    )


def row_from(values: Sequence[str]) -> PolicyRow:
    return PolicyRow(values[0], tuple(values[1:]))
