"""The policy store (exchange.server.policystore): tables, Casbin adapter and the per-process
cache."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.orm import Session

from exchange.server import policystore
from exchange.server.db import Base
from exchange.server.policystore import (
    PolicyAdapter,
    PolicyCache,
    PolicyChangeRow,
    PolicyRuleRow,
    PolicyStateRow,
    add_rules,
    current_version,
    load_rules,
    remove_rules,
)
from exchange.server.storage import WRITE, create_control_engine
from policy import (
    DEFAULT_CEILINGS,
    DecisionPoint,
    DecisionRequest,
    InvalidRuleError,
    Level,
    Operation,
    PolicyRow,
    UnknownRuleError,
    create_enforcer,
    grant_rows,
    role_row,
    suspend_principal_row,
)

TABLES = [PolicyRuleRow.__table__, PolicyStateRow.__table__, PolicyChangeRow.__table__]
CONSUMER = "c0" * 32


def now() -> datetime:
    return datetime.now(UTC)


def grant(rule: str = "grant:1", subject: str = CONSUMER) -> tuple[PolicyRow, ...]:
    return grant_rows(
        rule,
        subject=subject,
        zone="city",
        datasets=["loans", "taxes"],
        operations=["aggregate", "psi_aggregate"],
        purpose="financial-services",
        expires=now() + timedelta(hours=1),
    )


def request(subject: str = CONSUMER) -> DecisionRequest:
    return DecisionRequest(
        subject,
        "city",
        "loans",
        Operation.AGGREGATE,
        "credit-assessment",
        Level.L3,
        DEFAULT_CEILINGS,
        now(),
    )


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "control.db"


@pytest.fixture
def engine(db_path: Path) -> Iterator[Engine]:
    eng = create_control_engine(f"sqlite:///{db_path}")
    Base.metadata.create_all(eng, tables=TABLES)
    yield eng
    eng.dispose()


@pytest.fixture
def other_engine(db_path: Path, engine: Engine) -> Iterator[Engine]:
    """A second engine on the same file: another worker process of the same exchange."""
    eng = create_control_engine(f"sqlite:///{db_path}")
    yield eng
    eng.dispose()


def write(engine: Engine) -> Session:
    return Session(engine.execution_options(**WRITE))


def test_reload_keeps_every_field(engine: Engine) -> None:
    rows = [*grant(), role_row("role:1", member=CONSUMER, role="analysts", zone="city")]
    with write(engine) as session, session.begin():
        assert add_rules(session, rows) == 1
    with Session(engine) as session:
        loaded, version = load_rules(session)
        stored = session.scalars(select(PolicyRuleRow).where(PolicyRuleRow.ptype == "p")).first()
    assert loaded == rows and version == 1
    # the 7th and 8th values (effect and rule id) are where a six-column table would cut
    assert stored is not None and (stored.v6, stored.v7, stored.v8) == ("allow", "grant:1", None)
    plain = create_enforcer(adapter=PolicyAdapter(engine))
    assert [len(p) for p in plain.get_policy()] == [8] * 4
    assert plain.get_policy()[0][6:] == ["allow", "grant:1"]
    assert plain.get_grouping_policy() == [[CONSUMER, "analysts", "city", "role:1"]]


def test_version_is_bumped_in_the_callers_transaction(engine: Engine) -> None:
    with write(engine) as session:
        session.begin()
        assert add_rules(session, grant()) == 1
        session.rollback()
    with Session(engine) as session:
        assert current_version(session) == 0
        assert load_rules(session) == ([], 0)
    with write(engine) as session, session.begin():
        add_rules(session, grant())
        assert add_rules(session, grant("grant:2")) == 2
    with write(engine) as session, session.begin():
        assert add_rules(session, grant()) == 2  # nothing new, nothing bumped
        assert remove_rules(session, "grant:1") == 3
    with Session(engine) as session:
        rows, version = load_rules(session)
        assert version == 3 and {r.rule for r in rows} == {"grant:2"}
        changes = session.execute(
            select(PolicyChangeRow.version, PolicyChangeRow.action, PolicyChangeRow.rule).order_by(
                PolicyChangeRow.id
            )
        ).all()
    assert [tuple(c) for c in changes] == [
        (1, "add", "grant:1"),
        (2, "add", "grant:2"),
        (3, "remove", "grant:1"),
    ]


def test_unknown_rule_and_invalid_rows(engine: Engine) -> None:
    with write(engine) as session, session.begin():
        with pytest.raises(UnknownRuleError):
            remove_rules(session, "grant:none")
        wildcard = PolicyRow(
            "p",
            ("*", "city", "loans", "aggregate", "statistics", "2030-01-01T00:00:00Z", "allow", "g"),
        )
        with pytest.raises(InvalidRuleError):
            add_rules(session, [*grant(), wildcard])
    with Session(engine) as session:
        assert load_rules(session) == ([], 0)


def test_plain_enforcer_through_the_adapter(engine: Engine) -> None:
    adapter = PolicyAdapter(engine)
    plain = create_enforcer(adapter=adapter)
    assert plain.enforce(*request().to_casbin_request()) is False

    rows = grant()
    assert plain.add_policies([list(r.values) for r in rows])
    assert plain.enforce(*request().to_casbin_request()) is True
    with pytest.raises(InvalidRuleError):
        plain.add_policy(
            "*", "city", "loans", "export", "statistics", "2030-01-01T00:00:00Z", "allow", "x"
        )
    with Session(engine) as session:
        loaded, version = load_rules(session)
    assert loaded == list(rows) and version == 1

    # the database and a fresh enforcer agree with the one that made the changes
    assert plain.remove_filtered_policy(7, "grant:1")
    with Session(engine) as session:
        assert load_rules(session) == ([], 2)
    assert plain.add_policy(*suspend_principal_row(CONSUMER).values)
    assert plain.add_named_grouping_policy("g", CONSUMER, "analysts", "city", "role:1")
    assert plain.remove_policy(*suspend_principal_row(CONSUMER).values)
    fresh = create_enforcer(adapter=adapter)
    assert fresh.get_policy() == [] and fresh.get_grouping_policy() == plain.get_grouping_policy()
    with Session(engine) as session:
        assert current_version(session) == 5

    plain.add_policies([list(r.values) for r in grant("grant:9")])
    plain.save_policy()
    with Session(engine) as session:
        loaded, _ = load_rules(session)
    assert sorted(loaded) == sorted(
        [*grant("grant:9"), PolicyRow("g", (CONSUMER, "analysts", "city", "role:1"))]
    )


def test_decision_point_and_plain_enforcer_loaded_from_the_database_agree(engine: Engine) -> None:
    rows = [*grant(), *grant("grant:2", subject="d1" * 32), suspend_principal_row("d1" * 32)]
    with write(engine) as session, session.begin():
        add_rules(session, rows)
    with Session(engine) as session:
        stored, version = load_rules(session)
    point = DecisionPoint(stored, version=version)
    plain = create_enforcer(adapter=PolicyAdapter(engine))
    for subject in (CONSUMER, "d1" * 32, "e1" * 32):
        req = request(subject)
        assert point.decide(req).allowed == plain.enforce(*req.to_casbin_request())


def _until(predicate: Any, timeout: float) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)
    return time.monotonic() - start


def test_revocation_by_another_process_is_enforced_within_one_second(
    engine: Engine, other_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    with write(engine) as session, session.begin():
        add_rules(session, [*grant(), *grant("grant:other", subject="f1" * 32)])
    cache = PolicyCache(other_engine)
    decision = cache.decide(request())
    assert (decision.allowed, decision.rule, decision.policy_version) == (True, "grant:1", 1)

    full_loads: list[int] = []
    real_load = policystore.load_rules

    def counting_load(session: Session) -> tuple[list[PolicyRow], int]:
        full_loads.append(1)
        return real_load(session)

    monkeypatch.setattr(policystore, "load_rules", counting_load)

    with write(engine) as session, session.begin():
        remove_rules(session, "grant:1")
    elapsed = _until(lambda: not cache.decide(request()).allowed, timeout=1.0)
    assert elapsed < 1.0
    assert cache.decide(request()).reason == "not_granted"
    assert cache.version == 2
    assert cache.decide(request("f1" * 32)).allowed  # other grants untouched
    assert full_loads == []  # caught up by reloading the changed rule only

    with write(engine) as session, session.begin():
        add_rules(session, grant("grant:3"))
    _until(lambda: cache.decide(request()).allowed, timeout=1.0)
    with write(engine) as session, session.begin():
        add_rules(session, [suspend_principal_row(CONSUMER)])
    elapsed = _until(lambda: cache.decide(request()).reason == "suspended", timeout=1.0)
    assert elapsed < 1.0


def test_missing_history_falls_back_to_a_full_reload(engine: Engine, other_engine: Engine) -> None:
    with write(engine) as session, session.begin():
        add_rules(session, grant())
    cache = PolicyCache(other_engine, refresh_interval=0)
    assert cache.decide(request()).allowed
    with write(engine) as session, session.begin():
        remove_rules(session, "grant:1")
        add_rules(session, grant("grant:2"))
        session.execute(delete(PolicyChangeRow))  # history pruned
    assert cache.decide(request()).rule == "grant:2"
    assert cache.version == 3
    assert len(cache.point) == 4


def test_cache_fails_closed_when_the_database_is_unreadable(
    engine: Engine, other_engine: Engine
) -> None:
    with write(engine) as session, session.begin():
        add_rules(session, grant())
    cache = PolicyCache(other_engine, refresh_interval=0.01, max_staleness=0.2)
    assert cache.decide(request()).allowed
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE policy_state"))
    time.sleep(0.3)
    decision = cache.decide(request())
    assert (decision.allowed, decision.reason) == (False, "error")


def test_state_row_is_created_if_missing(engine: Engine) -> None:
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(PolicyStateRow)) == 0
    with write(engine) as session, session.begin():
        session.add(PolicyStateRow(id=1, version=41))
    with write(engine) as session, session.begin():
        assert add_rules(session, grant()) == 42


def test_cache_waits_for_a_slow_refresh_instead_of_failing_closed(
    engine: Engine, other_engine: Engine
) -> None:
    """Under load the request that refreshes can take longer than ``max_staleness``; the others
    must wait for it (or check themselves), not deny while the database is readable."""
    with write(engine) as session, session.begin():
        add_rules(session, grant())
    cache = PolicyCache(other_engine, refresh_interval=0.01, max_staleness=0.2)
    assert cache.decide(request()).allowed
    held = threading.Event()

    def slow_refresher() -> None:
        with cache._refresh_lock:
            held.set()
            time.sleep(0.4)

    thread = threading.Thread(target=slow_refresher)
    thread.start()
    held.wait()
    time.sleep(0.25)  # stale now, with a refresh in flight
    decision = cache.decide(request())
    thread.join()
    assert decision.allowed, decision.reason
