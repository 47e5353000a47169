"""Property tests: the decision point decides exactly as a plain casbin.Enforcer holding every
row; wildcard allow rows are refused; any failure during enforcement is a deny."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from policy import (
    DEFAULT_CEILINGS,
    DecisionPoint,
    DecisionRequest,
    InvalidRuleError,
    Level,
    Operation,
    PolicyRow,
    PurposeVocabulary,
    create_enforcer,
)
from policy._engine import Evaluator
from policy.rows import format_time

BASE = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
SUBJECTS = ["s1", "s2", "s3"]
ROLES = ["r1", "r2"]
ZONES = ["z1", "z2"]
DATASETS = ["d1", "d2"]
OPS = ["export", "aggregate", "he_score"]
PURPOSES = ["financial-services", "credit-assessment", "anti-fraud", "statistics", "research"]
EXPIRIES = [format_time(BASE + timedelta(seconds=s)) for s in (-2, -1, 0, 1, 2)]

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _wild(values: list[str]) -> st.SearchStrategy[str]:
    return st.sampled_from([*values, "*"])


allow_rows = st.builds(
    lambda sub, dom, obj, act, purpose, exp, rule: PolicyRow(
        "p", (sub, dom, obj, act, purpose, exp, "allow", rule)
    ),
    st.sampled_from(SUBJECTS + ROLES),
    st.sampled_from(ZONES),
    st.sampled_from(DATASETS),
    st.sampled_from(OPS),
    st.sampled_from(PURPOSES),
    st.sampled_from(EXPIRIES),
    st.sampled_from(["a1", "a2", "a3", "a4"]),
)
deny_rows = st.builds(
    lambda sub, dom, obj, act, purpose, exp, rule: PolicyRow(
        "p", (sub, dom, obj, act, purpose, exp, "deny", rule)
    ),
    _wild(SUBJECTS + ROLES),
    _wild(ZONES),
    _wild(DATASETS),
    _wild(OPS),
    _wild(PURPOSES),
    _wild(EXPIRIES),
    st.sampled_from(["d1", "d2", "suspend:s1", "suspend:zone:z1"]),
)
role_rows = st.builds(
    lambda member, role, zone, rule: PolicyRow("g", (member, role, zone, rule)),
    st.sampled_from(SUBJECTS + ROLES),
    st.sampled_from(ROLES),
    st.sampled_from(ZONES),
    st.sampled_from(["g1", "g2", "g3"]),
).filter(lambda r: r.values[0] != r.values[1])
rows_strategy = st.lists(
    st.one_of(allow_rows, allow_rows, deny_rows, role_rows), max_size=25, unique=True
)


LEVELS = [Level.L1] * 4 + [Level.L2, Level.L3, Level.L4, Level.IMPORTANT, Level.CORE]


@st.composite
def requests(draw: Any, rows: list[PolicyRow] | None = None) -> DecisionRequest:
    """A request; often aimed at one of ``rows`` so that grants and denies actually match."""
    sub = draw(st.sampled_from(SUBJECTS + ROLES))
    zone = draw(st.sampled_from(ZONES))
    dataset = draw(st.sampled_from(DATASETS))
    op = draw(st.sampled_from(OPS))
    purpose = draw(st.sampled_from([*PURPOSES, "unknown-purpose"]))
    targets = [r for r in rows or [] if r.ptype == "p"]
    if targets and draw(st.integers(0, 3)) < 3:
        values = draw(st.sampled_from(targets)).values
        drawn = (sub, zone, dataset, op, purpose)
        pick = [v if v != "*" else alt for v, alt in zip(values[:5], drawn, strict=True)]
        sub, zone, dataset, op = pick[:4]
        if draw(st.integers(0, 3)) < 3:
            purpose = pick[4]
        if purpose == "financial-services" and draw(st.booleans()):
            purpose = "credit-assessment"
    level = draw(st.sampled_from(LEVELS))
    ceiling = DEFAULT_CEILINGS[level]
    if draw(st.integers(0, 3)) == 3:
        ceiling = draw(st.frozensets(st.sampled_from(list(Operation))))
    return DecisionRequest(
        subject=sub,
        zone=zone,
        dataset=dataset,
        operation=Operation(op),
        purpose=purpose,
        level=level,
        ceilings={**DEFAULT_CEILINGS, level: ceiling},
        now=BASE + timedelta(microseconds=draw(st.integers(-2_500_000, 2_500_000))),
    )


@st.composite
def scenarios(draw: Any, max_requests: int = 8) -> tuple[list[PolicyRow], list[DecisionRequest]]:
    rows = draw(rows_strategy)
    reqs = draw(st.lists(requests(rows), min_size=1, max_size=max_requests))
    return rows, reqs


def _agree(point: DecisionPoint, rows: list[PolicyRow], reqs: list[DecisionRequest]) -> None:
    plain = create_enforcer(rows)
    for req in reqs:
        decision = point.decide(req)
        assert decision.reason != "error"
        assert decision.allowed == plain.enforce(*req.to_casbin_request()), (req, decision)
        assert decision.allowed == (decision.reason == "allowed")


@PROPERTY
@given(scenario=scenarios())
def test_decision_point_agrees_with_plain_enforcer(
    scenario: tuple[list[PolicyRow], list[DecisionRequest]],
) -> None:
    rows, reqs = scenario
    _agree(DecisionPoint(rows), rows, reqs)


@PROPERTY
@given(
    scenario=scenarios(),
    revoked=st.sets(st.sampled_from(["a1", "a2", "d1", "suspend:s1", "g1", "g2"])),
)
def test_agreement_survives_revocations(
    scenario: tuple[list[PolicyRow], list[DecisionRequest]], revoked: set[str]
) -> None:
    rows, reqs = scenario
    point = DecisionPoint()
    point.add_rows(rows)
    for rule in sorted(revoked):
        point.remove_rule(rule)
    remaining = [r for r in rows if r.rule not in revoked]
    assert point.rows() == remaining
    _agree(point, remaining, reqs)


@PROPERTY
@given(first=rows_strategy, scenario=scenarios(max_requests=6))
def test_agreement_after_replacing_rules(
    first: list[PolicyRow], scenario: tuple[list[PolicyRow], list[DecisionRequest]]
) -> None:
    second, reqs = scenario
    point = DecisionPoint(first)
    touched = {r.rule for r in second} | {"a1"}
    point.replace_rules(touched, second, version=7)
    expected = [r for r in first if r.rule not in touched]
    expected += [r for r in second if r not in expected]
    assert point.version == 7
    assert sorted(point.rows()) == sorted(expected)
    _agree(point, expected, reqs)


@pytest.mark.parametrize("hops", range(0, 13))
def test_role_depth_matches_casbin(hops: int) -> None:
    """Casbin follows role links to a fixed depth; the index expands roles to the same depth."""
    names = ["s1"] + [f"role{i}" for i in range(hops)]
    rows = [PolicyRow("g", (names[i], names[i + 1], "z1", f"g{i}")) for i in range(len(names) - 1)]
    rows.append(
        PolicyRow(
            "p",
            (names[-1], "z1", "d1", "aggregate", "statistics", EXPIRIES[-1], "allow", "a1"),
        )
    )
    req = DecisionRequest(
        "s1", "z1", "d1", Operation.AGGREGATE, "statistics", Level.L3, DEFAULT_CEILINGS, BASE
    )
    expected = create_enforcer(rows).enforce(*req.to_casbin_request())
    assert DecisionPoint(rows).decide(req).allowed == expected
    assert expected == (hops <= 9)


@pytest.mark.parametrize("field", range(6))
def test_wildcard_allow_rows_are_refused(field: int) -> None:
    values = ["s1", "z1", "d1", "aggregate", "statistics", EXPIRIES[-1], "allow", "a1"]
    values[field] = "*"
    row = PolicyRow("p", tuple(values))
    point = DecisionPoint()
    with pytest.raises(InvalidRuleError, match=r"wildcard|expire"):
        point.add_rows([row])
    assert len(point) == 0
    with pytest.raises(InvalidRuleError):
        create_enforcer([row])
    plain = create_enforcer()
    with pytest.raises(InvalidRuleError):
        plain.add_policy(*values)
    assert plain.get_policy() == []


def test_wildcard_allow_row_in_a_batch_refuses_the_batch() -> None:
    good = PolicyRow(
        "p", ("s1", "z1", "d1", "aggregate", "statistics", EXPIRIES[-1], "allow", "a1")
    )
    bad = PolicyRow("p", ("*", "z1", "d1", "aggregate", "statistics", EXPIRIES[-1], "allow", "a2"))
    point = DecisionPoint()
    with pytest.raises(InvalidRuleError):
        point.add_rows([good, bad])
    assert len(point) == 0


def test_matcher_refuses_a_wildcard_allow_row_that_slipped_in() -> None:
    """Defence in depth: even a wildcard allow row loaded around validation never matches."""
    plain = create_enforcer()
    plain.get_model()["p"]["p"].policy.append(["*", "*", "*", "*", "*", "*", "allow", "sneaky"])
    req = DecisionRequest(
        "s1", "z1", "d1", Operation.AGGREGATE, "statistics", Level.L1, DEFAULT_CEILINGS, BASE
    )
    assert plain.enforce(*req.to_casbin_request()) is False


class _Boom(Exception):
    pass


class _FailingVocabulary(PurposeVocabulary):
    """Validates rows like the default vocabulary, then fails every check made while deciding."""

    failing = False

    def __contains__(self, name: object) -> bool:
        if self.failing:
            raise _Boom("vocabulary failed")
        return super().__contains__(name)

    def is_within(self, requested: str, granted: str) -> bool:
        raise _Boom("vocabulary failed")


@PROPERTY
@given(scenario=scenarios(max_requests=5))
def test_any_failure_in_a_matcher_function_is_a_deny(
    scenario: tuple[list[PolicyRow], list[DecisionRequest]],
) -> None:
    rows, reqs = scenario
    vocab = _FailingVocabulary(PurposeVocabulary.load_default())
    point = DecisionPoint(rows, vocabulary=vocab)
    vocab.failing = True
    for req in reqs:
        decision = point.decide(req)
        if decision.allowed:
            pytest.fail(f"allowed although every purpose check raises: {decision}")
        assert decision.reason in {"error", "not_granted", "level_ceiling", "suspended", "denied"}


def test_enforcer_failure_is_an_error_deny(monkeypatch: pytest.MonkeyPatch) -> None:
    row = PolicyRow("p", ("s1", "z1", "d1", "aggregate", "statistics", EXPIRIES[-1], "allow", "a1"))
    point = DecisionPoint([row], version=4)
    req = DecisionRequest(
        "s1", "z1", "d1", Operation.AGGREGATE, "statistics", Level.L3, DEFAULT_CEILINGS, BASE
    )
    assert point.decide(req).allowed

    def explode(self: Evaluator, *args: object) -> None:
        raise RuntimeError("engine failure")

    monkeypatch.setattr(Evaluator, "evaluate", explode)
    decision = point.decide(req)
    assert (decision.allowed, decision.rule, decision.reason, decision.policy_version) == (
        False,
        None,
        "error",
        4,
    )


class _ExplodingCeilings(dict[Level, frozenset[Operation]]):
    def get(self, *args: object, **kwargs: object) -> Any:
        raise _Boom("registry failure")


@pytest.mark.parametrize(
    "change",
    [
        {"now": datetime(2026, 3, 1, 12, 0, 0)},  # naive clock
        {"ceilings": _ExplodingCeilings()},
        {"ceilings": {Level.L3: frozenset({"aggregate", "export aggregate"})}},
        {"subject": "s1,z1"},
        {"zone": "*"},
        {"level": "L9"},
        {"operation": "drop_table"},
        {"subject": None},
    ],
    ids=[
        "naive-now",
        "ceilings-raise",
        "ceiling-injection",
        "comma",
        "wildcard-zone",
        "bad-level",
        "bad-op",
        "none",
    ],
)
def test_malformed_requests_are_error_denies(change: dict[str, Any]) -> None:
    row = PolicyRow("p", ("s1", "z1", "d1", "aggregate", "statistics", EXPIRIES[-1], "allow", "a1"))
    point = DecisionPoint([row])
    fields: dict[str, Any] = {
        "subject": "s1",
        "zone": "z1",
        "dataset": "d1",
        "operation": Operation.AGGREGATE,
        "purpose": "statistics",
        "level": Level.L3,
        "ceilings": DEFAULT_CEILINGS,
        "now": BASE,
    }
    fields.update(change)
    decision = point.decide(DecisionRequest(**fields))
    assert (decision.allowed, decision.reason) == (False, "error")
