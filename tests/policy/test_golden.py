"""The golden decision table (tests/vectors/policy) through the decision point and through a
plain casbin.Enforcer loaded from the same model and policy files."""

from __future__ import annotations

from typing import Any

import pytest

from policy import DecisionPoint
from policy._engine import model_text
from policy.rows import G_RULE, P_RULE
from tests.policy._support import (
    VECTORS,
    enforcer_rows,
    file_enforcer,
    load_vectors,
    request_from,
    row_from,
)

DOC = load_vectors()
CASES = DOC["cases"]


def test_vectors_use_the_shipped_model() -> None:
    assert (VECTORS / DOC["model"]).read_text("utf-8") == model_text()


def test_table_covers_the_required_cases() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) == len(set(names)) >= 40
    levels = {"L1", "L2", "L3", "L4", "IMPORTANT", "CORE"}
    ops = {
        "export",
        "aggregate",
        "psi_cardinality",
        "psi_members",
        "psi_aggregate",
        "he_score",
        "secure_sum",
    }
    assert {f"ceiling_{lv}_{op}" for lv in levels for op in ops} <= set(names)
    for required in (
        "expiry_exactly_at",
        "expiry_one_second_before",
        "purpose_parent_grant_covers_child",
        "purpose_child_grant_does_not_cover_parent",
        "deny_beats_allow",
        "wildcard_deny_beats_grant",
        "suspended_principal",
        "suspended_zone",
        "wrong_zone",
        "revoked_grant",
    ):
        assert required in names
    reasons = {c["expect"]["reason"] for c in CASES}
    assert reasons == {
        "allowed",
        "not_granted",
        "expired",
        "purpose_mismatch",
        "level_ceiling",
        "suspended",
        "denied",
    }


def _apply_edits(case: dict[str, Any]) -> tuple[DecisionPoint, Any]:
    plain = file_enforcer()
    point = DecisionPoint(enforcer_rows(plain))
    for rule in case.get("remove", []):
        assert point.remove_rule(rule) > 0
        removed_p = plain.remove_filtered_named_policy("p", P_RULE, rule)
        removed_g = plain.remove_filtered_named_grouping_policy("g", G_RULE, rule)
        assert removed_p or removed_g
    for values in case.get("add", []):
        row = row_from(values)
        assert point.add_rows([row]) == 1
        assert plain.add_named_policy(row.ptype, *row.values)
    return point, plain


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_decision(case: dict[str, Any]) -> None:
    request = request_from(case["request"], DOC["defaults"])
    expect = case["expect"]
    point, plain = _apply_edits(case)

    decision = point.decide(request)
    assert (decision.allowed, decision.reason, decision.rule) == (
        expect["allowed"],
        expect["reason"],
        expect["rule"],
    )

    allowed, explain = plain.enforce_ex(*request.to_casbin_request())
    assert allowed is expect["allowed"]
    if expect["reason"] in ("allowed", "denied", "suspended"):
        # the row Casbin itself explains the answer with is the rule the decision names
        assert explain[P_RULE] == expect["rule"]
