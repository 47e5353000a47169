from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest

from policy import (
    DEFAULT_CEILINGS,
    Decision,
    DecisionPoint,
    DecisionRequest,
    Level,
    Operation,
    Reason,
    grant_rows,
    role_row,
    suspend_principal_row,
    suspend_zone_row,
    tighten,
)

NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)
ALICE = "a1" * 32
BOB = "b2" * 32


def grant(rule: str = "grant:1", subject: str = ALICE, **kw: object) -> tuple:  # type: ignore[type-arg]
    args: dict[str, object] = {
        "subject": subject,
        "zone": "city",
        "datasets": ["loans"],
        "operations": ["aggregate"],
        "purpose": "statistics",
        "expires": NOW + timedelta(days=1),
    }
    args.update(kw)
    return grant_rows(rule, **args)  # type: ignore[arg-type]


def request(subject: str = ALICE, **kw: object) -> DecisionRequest:
    args: dict[str, object] = {
        "subject": subject,
        "zone": "city",
        "dataset": "loans",
        "operation": Operation.AGGREGATE,
        "purpose": "statistics",
        "level": Level.L3,
        "ceilings": DEFAULT_CEILINGS,
        "now": NOW,
    }
    args.update(kw)
    return DecisionRequest(**args)  # type: ignore[arg-type]


def test_deny_by_default() -> None:
    point = DecisionPoint()
    assert point.decide(request()) == Decision(False, None, Reason.NOT_GRANTED, 0)


def test_allowed_names_the_grant_and_version() -> None:
    point = DecisionPoint(grant(), version=12)
    decision = point.decide(request())
    assert decision == Decision(True, "grant:1", "allowed", 12)
    assert decision.to_record() == {
        "allowed": True,
        "rule": "grant:1",
        "reason": "allowed",
        "policy_version": 12,
    }


def test_request_record_for_the_ledger() -> None:
    record = request(now=NOW + timedelta(microseconds=5)).to_record()
    assert record["now"] == "2026-03-01T12:00:00.000005+00:00"
    assert record["ceiling"] == sorted(op.value for op in DEFAULT_CEILINGS[Level.L3])
    assert record["operation"] == "aggregate" and record["level"] == "L3"


def test_level_ceiling_is_checked_first() -> None:
    point = DecisionPoint([*grant(operations=["export"]), suspend_principal_row(ALICE)])
    decision = point.decide(request(operation=Operation.EXPORT, level=Level.L4))
    assert (decision.reason, decision.rule) == ("level_ceiling", "ceiling:L4:export")
    decision = point.decide(request(operation=Operation.EXPORT, level=Level.L1))
    assert (decision.reason, decision.rule) == ("suspended", f"suspend:{ALICE}")


def test_zone_tightening_through_the_request() -> None:
    point = DecisionPoint(grant(operations=["he_score", "aggregate"]))
    ceilings = tighten(DEFAULT_CEILINGS, {Level.L3: [Operation.AGGREGATE]})
    assert point.decide(request(ceilings=ceilings)).allowed
    denied = point.decide(request(ceilings=ceilings, operation=Operation.HE_SCORE))
    assert denied.reason == "level_ceiling"


def test_expiry_boundary() -> None:
    point = DecisionPoint(grant(expires=NOW))
    assert point.decide(request(now=NOW - timedelta(seconds=1))).allowed
    assert point.decide(request(now=NOW - timedelta(microseconds=1))).allowed
    at = point.decide(request(now=NOW))
    assert (at.allowed, at.reason, at.rule) == (False, "expired", "grant:1")


def test_suspended_zone_and_lifting() -> None:
    point = DecisionPoint([*grant(), suspend_zone_row("city")], version=1)
    assert point.decide(request()).reason == "suspended"
    assert point.remove_rule("suspend:zone:city", version=2) == 1
    decision = point.decide(request())
    assert decision.allowed and decision.policy_version == 2


def test_roles_per_zone() -> None:
    point = DecisionPoint(
        [
            *grant("grant:team", subject="analysts"),
            role_row("role:1", member=BOB, role="analysts", zone="city"),
        ]
    )
    assert point.decide(request(BOB)).rule == "grant:team"
    assert point.decide(request(ALICE)).reason == "not_granted"
    assert point.remove_rule("role:1") == 1
    assert point.decide(request(BOB)).reason == "not_granted"
    point.add_rows([role_row("role:2", member=BOB, role="analysts", zone="city")])
    assert point.decide(request(BOB)).allowed


def test_row_management() -> None:
    rows = grant(datasets=["loans", "taxes"])
    point = DecisionPoint(rows)
    assert len(point) == 2
    assert point.add_rows(rows) == 0  # duplicates are ignored
    assert point.rule_rows("grant:1") == list(rows)
    assert point.remove_rows([rows[0]], version=5) == 1
    assert point.version == 5
    assert point.rows() == [rows[1]]
    assert point.remove_rows([rows[0]]) == 0
    assert point.remove_rule("grant:nope") == 0
    point.replace_all(grant("grant:2"), version=9)
    assert [r.rule for r in point.rows()] == ["grant:2"]
    assert point.version == 9


def test_replace_rules_is_atomic_for_concurrent_deciders() -> None:
    """A refresh re-adds a rule's rows; deciders in between never see it missing."""
    point = DecisionPoint(grant())
    stop = threading.Event()
    seen: list[str] = []

    def decide() -> None:
        while not stop.is_set():
            seen.append(point.decide(request()).reason)

    threads = [threading.Thread(target=decide) for _ in range(4)]
    for t in threads:
        t.start()
    for version in range(1, 300):
        point.replace_rules({"grant:1"}, grant(), version=version)
    stop.set()
    for t in threads:
        t.join()
    assert seen and set(seen) == {"allowed"}


def test_concurrent_changes_and_decisions() -> None:
    point = DecisionPoint()
    errors: list[BaseException] = []
    stop = threading.Event()

    def churn() -> None:
        try:
            for i in range(200):
                point.add_rows(grant(f"grant:{i}", subject=f"user{i % 7}"))
                if i % 3 == 0:
                    point.remove_rule(f"grant:{i - 1}")
                if i % 50 == 0:
                    point.add_rows(
                        [role_row(f"role:{i}", member="user1", role="user2", zone="city")]
                    )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    reasons: set[str] = set()

    def decide() -> None:
        while not stop.is_set():
            for n in range(7):
                reasons.add(point.decide(request(f"user{n}")).reason)

    threads = [threading.Thread(target=churn)] + [threading.Thread(target=decide) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert "error" not in reasons
    assert reasons <= {"allowed", "not_granted"}


@pytest.mark.parametrize("level", [Level.CORE, "CORE"])
def test_core_data_never_leaves(level: Level) -> None:
    every = grant(operations=list(Operation))
    point = DecisionPoint(every)
    for op in Operation:
        decision = point.decide(request(operation=op, level=level))
        assert decision.reason == "level_ceiling"
