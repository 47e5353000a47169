"""An aggregate reads its zone's registry state (the zone, its datasets, their analysis rules)
once per registry version: a release at an unchanged version reads none of it, every change
that moves the version is applied by the next release in every worker, and budgets are still
read and charged on every release."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select
from sqlalchemy.orm import Session

from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.client.sdk import ApiError
from exchange.server.models import BudgetRow
from exchange.server.registry import registry_version
from exchange.server.runtime import Exchange
from tests.conftest import EXAMPLES, L3_LEVELS, LiveServer, serving, settings_for
from tests.exchange.test_access import PURPOSE, granted

SQL = "SELECT district, COUNT(*) AS n, SUM(tax_paid_2025) AS tax FROM companies GROUP BY district"
#: a statement that reads the zone's registry state
REGISTRY_READ = re.compile(r"\bFROM\s+\"?(zones|datasets|analysis_rules)\b", re.IGNORECASE)


def _rules(**overrides: Any) -> dict[str, Any]:
    rules: dict[str, Any] = {
        "min_group_size": 2,
        "epsilon_budget": "1",
        "columns": {
            "company_id": {"disclosure": "join_only"},
            "district": {"disclosure": "plaintext"},
            "industry": {"disclosure": "plaintext"},
            "founded_year": {"disclosure": "plaintext"},
            "employees": {"disclosure": "plaintext", "lower": "0", "upper": "5000"},
            "registered_capital": {"disclosure": "after_aggregate"},
            "tax_paid_2025": {"disclosure": "after_aggregate", "lower": "0", "upper": "2000000"},
        },
    }
    rules.update(overrides)
    return rules


@pytest.fixture
def parties(server: LiveServer) -> dict[str, SigningKey]:
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
        p.register_dataset(
            "tax",
            "companies",
            levels=L3_LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
        p.set_analysis_rules("tax", "companies", _rules())
    granted(server, keys, ["companies"], ["aggregate"])
    return keys


@contextmanager
def statements(engine: Engine) -> Iterator[list[str]]:
    """Every statement sent on ``engine`` (by any thread) while the block runs."""
    seen: list[str] = []

    def record(*args: Any) -> None:
        seen.append(" ".join(str(args[2]).split()))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _spent(ex: Exchange) -> Decimal:
    with Session(ex.engine) as session:
        rows = session.execute(select(BudgetRow)).scalars().all()
        return sum((Decimal(r.spent) for r in rows), Decimal(0))


def test_a_release_at_an_unchanged_registry_version_reads_no_registry_state(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    ex = server.exchange
    with server.client(parties["consumer"]) as c:
        c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
        with statements(ex.engine) as seen:
            second = c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
    assert second["result"]["epsilon"] == "0.1"
    assert [s for s in seen if REGISTRY_READ.search(s)] == []
    # what still happens on every release: the budget is read before the query runs, and
    # charged in the ledger transaction that records the release
    budget = [s for s in seen if "privacy_budgets" in s]
    assert any(s.startswith("SELECT") for s in budget)
    assert any(s.startswith(("UPDATE", "INSERT")) for s in budget)
    assert _spent(ex) == Decimal("0.2")


def test_new_rules_apply_to_the_next_release(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c:
        first = c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
    assert first["result"]["k"] == 2
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules(min_group_size=7))
    with server.client(parties["consumer"]) as c:
        after = c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
    assert after["result"]["k"] == 7
    statement, _ = verify_receipt(after["receipt"], after["result"], server.log_verifier())
    assert statement["rules_version"] == {"companies": 2}


def test_a_suspended_zone_refuses_the_next_release(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["consumer"]) as c:
        c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
    with server.client(server.operator) as op:
        op.set_zone_status("tax", "suspended")
    with server.client(parties["consumer"]) as c, pytest.raises(ApiError) as refused:
        c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
    assert refused.value.status == 403


def test_budgets_are_still_checked_on_every_release_from_the_cache(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules(epsilon_budget="0.25"))
    with server.client(parties["consumer"]) as c:
        c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
        c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
        with pytest.raises(ApiError) as exhausted:
            c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")
    assert exhausted.value.status == 429
    assert _spent(server.exchange) == Decimal("0.2")


@pytest.fixture
def second(server: LiveServer, data_dir: Path) -> Iterator[LiveServer]:
    """Another worker: its own exchange (and registry cache) on the same database."""
    with (
        Exchange(settings_for(data_dir, checkpoint_interval_seconds=0.2)) as ex,
        serving(ex, data_dir) as live,
    ):
        yield live


def test_rules_set_through_one_worker_apply_to_the_next_release_in_another(
    server: LiveServer, second: LiveServer, parties: dict[str, SigningKey]
) -> None:
    with second.client(parties["consumer"]) as c:
        assert c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")["result"]["k"] == 2
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules(min_group_size=9))
    with second.client(parties["consumer"]) as c:
        # at once: the request's nonce read the new registry version, the cached view is older
        assert c.aggregate("tax", SQL, PURPOSE, epsilon="0.1")["result"]["k"] == 9


def test_a_library_call_without_a_version_reads_the_current_one(
    server: LiveServer, parties: dict[str, SigningKey]
) -> None:
    """``run_aggregate`` called in-process (no authenticated request) reads the registry version
    itself: a change committed before the call is seen, at the cost of that one read."""
    from exchange.server.compute import aggregate

    ex = server.exchange
    consumer = ex.registry.load_key(parties["consumer"].key_id)
    assert consumer is not None
    aggregate.run_aggregate(ex, consumer.principal, "tax", SQL, PURPOSE, epsilon="0.1")
    with statements(ex.engine) as seen:
        aggregate.run_aggregate(ex, consumer.principal, "tax", SQL, PURPOSE, epsilon="0.1")
    assert [s for s in seen if REGISTRY_READ.search(s)] == []
    assert any("registry_state" in s for s in seen)
    with server.client(parties["provider"]) as p:
        p.set_analysis_rules("tax", "companies", _rules(min_group_size=5))
    with ex.engine.connect() as conn:
        version = registry_version(conn)
    out = aggregate.run_aggregate(ex, consumer.principal, "tax", SQL, PURPOSE, epsilon="0.1")
    assert out["result"]["k"] == 5
    # and a caller that names the version it was authorized at is served from the cache
    with statements(ex.engine) as seen:
        aggregate.run_aggregate(
            ex, consumer.principal, "tax", SQL, PURPOSE, epsilon="0.1", registry_version=version
        )
    assert [s for s in seen if REGISTRY_READ.search(s) or "registry_state" in s] == []
