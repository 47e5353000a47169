"""Reaching data beyond what a grant and the level ceilings allow: exports above the
ceiling, clean-room SQL that tries to release L3/L4 values row by row (aliases, subqueries,
functions, ``SELECT *``, set operations, comments), expired grants, another purpose, and
suspended zones and principals. Each refusal is exact; nothing is released or charged."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from exchange.client.sdk import ApiError
from tests.exchange.test_aggregate import _rules
from tests.security._support import DAY, PURPOSE, World, entries, state


def _granted(
    world: World, datasets: list[str], operations: list[str], who: str = "consumer", **kw: Any
) -> str:
    with world.server.client(world.key(who)) as c:
        req = c.request_access(
            "tax", datasets, operations, PURPOSE, duration_seconds=DAY, justification="review"
        )
    with world.server.client(world.key("provider")) as p:
        return str(p.approve(req["id"], **kw)["grant_id"])


def _denied(call: Any) -> str:
    with pytest.raises(ApiError) as exc:
        call()
    assert (exc.value.status, exc.value.code) == (403, "denied"), exc.value.body
    return str(exc.value.body["reason"])


def test_export_above_the_level_ceiling_is_refused(world: World) -> None:
    server = world.server
    before = state(server)
    with server.client(world.key("consumer")) as c:
        for dataset in ("companies", "strategic"):  # L3 and IMPORTANT: never exported
            reason = _denied(
                lambda d=dataset: c.request_access(
                    "tax", [d], ["export"], PURPOSE, duration_seconds=DAY, justification="x"
                )
            )
            assert reason == "level_ceiling"
            # the level is checked before any grant is looked for
            assert _denied(lambda d=dataset: c.export("tax", d, PURPOSE)) == "level_ceiling"
    assert state(server) == before
    # a grant on the L2 dataset does not reach the L3 one beside it
    _granted(world, ["open_companies"], ["export", "aggregate"])
    with server.client(world.key("consumer")) as c:
        c.export("tax", "open_companies", PURPOSE)
        assert _denied(lambda: c.export("tax", "companies", PURPOSE)) == "level_ceiling"
        with server.client(world.key("provider")) as p:
            p.set_ceilings("tax", {"L2": ["aggregate"]})
        assert _denied(lambda: c.export("tax", "open_companies", PURPOSE)) == "level_ceiling"
    assert len(entries(server, "computation.export")) == 1
    reasons = [e["attrs"]["reason"] for e in entries(server, "access.denied")]
    assert reasons[-4:] == ["level_ceiling"] * 4


#: queries that would release ``tax_paid_2025`` (L3, after_aggregate) or ``company_id``
#: (L2 subject, join_only) row by row, or escape the allow-list; each with its reason
BYPASSES = [
    ("SELECT tax_paid_2025 AS district FROM companies", "row_level_output"),
    ('SELECT tax_paid_2025 AS "district", COUNT(*) FROM companies GROUP BY 1', None),
    ("SELECT district, COUNT(*) FROM companies GROUP BY tax_paid_2025, district", None),
    ("SELECT * FROM companies", "row_level_output"),
    ("SELECT *, COUNT(*) FROM companies", None),
    ("SELECT companies.* FROM companies", "row_level_output"),
    ("SELECT COUNT(*) FROM (SELECT tax_paid_2025 FROM companies) AS t", "subquery"),
    (
        "SELECT district, COUNT(*) FROM companies WHERE company_id IN "
        "(SELECT company_id FROM companies WHERE tax_paid_2025 > 1000000) GROUP BY district",
        "subquery",
    ),
    ("SELECT COUNT(*), (SELECT MAX(tax_paid_2025) FROM companies) FROM companies", "subquery"),
    ("WITH t AS (SELECT * FROM companies) SELECT COUNT(*) FROM t", "cte"),
    (
        "SELECT district, COUNT(*) FROM companies GROUP BY district "
        "UNION ALL SELECT company_id, tax_paid_2025 FROM companies",
        "set_operation",
    ),
    (
        "SELECT COUNT(*) FROM companies INTERSECT SELECT tax_paid_2025 FROM companies",
        "set_operation",
    ),
    ("SELECT MAX(tax_paid_2025), MIN(tax_paid_2025) FROM companies", "min_max_level"),
    ("SELECT UPPER(company_id), COUNT(*) FROM companies GROUP BY 1", None),
    ("SELECT CAST(tax_paid_2025 AS TEXT) AS d, COUNT(*) FROM companies GROUP BY d", None),
    ("SELECT SUM(tax_paid_2025 * 0 + 1) FROM companies", None),
    ("SELECT SUM(ABS(tax_paid_2025)) FROM companies", "function_not_allowed"),
    ("SELECT COUNT(*) FROM companies WHERE company_id = '91310885617X0AEH7Y'", None),
    (
        "SELECT district, COUNT(*) FROM companies WHERE tax_paid_2025 > 0 "
        "GROUP BY district HAVING MAX(tax_paid_2025) > 5",
        None,
    ),
    ("SELECT district, SUM(tax_paid_2025) OVER () FROM companies", None),
    ("SELECT district, COUNT(*) FROM companies /* GROUP BY district */", "row_level_output"),
    ("SELECT district, COUNT(*) FROM companies GROUP BY district; -- harmless\nSELECT 1", None),
    (
        "SELECT district, COUNT(*) FROM companies GROUP BY district -- ; SELECT * FROM companies",
        "ok",
    ),
    ("SELECT COUNT(*) FROM companies AS c1, companies AS c2", None),
    ("SELECT COUNT(*) FROM read_csv('/etc/passwd')", None),
    ("SELECT COUNT(*) FROM main.companies", "system_table"),
    ("SELECT COUNT(*) FROM strategic", "denied:not_granted"),
    ("SELECT district, COUNT(*) FROM companies GROUP BY district LIMIT -1", None),
]


def test_aggregate_cannot_release_row_level_values(world: World) -> None:
    server = world.server
    with server.client(world.key("provider")) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    _granted(world, ["companies"], ["aggregate"])
    before = state(server)
    accepted = []
    with server.client(world.key("consumer")) as c:
        for sql, reason in BYPASSES:
            if reason == "ok":  # a trailing comment hides nothing: the query runs as written
                accepted.append(c.aggregate("tax", sql, PURPOSE)["result"])
                continue
            with pytest.raises(ApiError) as exc:
                c.aggregate("tax", sql, PURPOSE)
            body = exc.value.body
            if reason and reason.startswith("denied:"):  # a dataset outside the grant
                assert (exc.value.status, body["reason"]) == (403, reason.removeprefix("denied:"))
                continue
            assert (exc.value.status, exc.value.code) == (422, "query_rejected"), (sql, body)
            if reason is not None:
                assert body["reason"] == reason, (sql, body)
            # the refusal names the construct, never a value
            assert "91310885617X0AEH7Y" not in exc.value.detail
    assert [r["columns"] for r in accepted] == [["district", "count_star"]]
    assert state(server) == before
    assert len(entries(server, "computation.aggregate")) == 1


def test_aggregate_beyond_the_ceiling_and_on_important_data(world: World) -> None:
    server = world.server
    with server.client(world.key("provider")) as p:
        p.set_analysis_rules("tax", "companies", _rules())
    _granted(world, ["companies"], ["aggregate"])
    sql = "SELECT district, COUNT(*) FROM companies GROUP BY district"
    with server.client(world.key("consumer")) as c:
        c.aggregate("tax", sql, PURPOSE)
        with server.client(world.key("provider")) as p:
            p.set_ceilings("tax", {"L3": []}, dataset="companies")
        before = state(server)
        assert _denied(lambda: c.aggregate("tax", sql, PURPOSE)) == "level_ceiling"
        # a DP query asking for ε is refused before any budget is charged
        assert _denied(lambda: c.aggregate("tax", sql, PURPOSE, epsilon="0.5")) == "level_ceiling"
    assert state(server) == before
    assert len(entries(server, "computation.aggregate")) == 1


def test_expired_grant_other_purpose_and_suspensions(world: World) -> None:
    server = world.server
    _granted(world, ["open_companies"], ["export"])
    with server.client(world.key("consumer")) as c:
        c.export("tax", "open_companies", PURPOSE)
        before = state(server)
        for purpose in ("public-administration", "marketing"):
            try:
                reason = _denied(lambda p=purpose: c.export("tax", "open_companies", p))
            except AssertionError:  # a purpose outside the vocabulary is bad input
                with pytest.raises(ApiError) as exc:
                    c.export("tax", "open_companies", purpose)
                assert (exc.value.status, exc.value.code) == (422, "invalid_input")
                continue
            assert reason == "purpose_mismatch"
        with server.client(server.operator) as op:
            op.set_zone_status("tax", "suspended")
            assert _denied(lambda: c.export("tax", "open_companies", PURPOSE)) == "suspended"
            op.set_zone_status("tax", "active")
            op.set_principal_status(world.key("consumer").key_id, "suspended")
            with pytest.raises(ApiError) as exc:
                c.export("tax", "open_companies", PURPOSE)
            assert (exc.value.status, exc.value.code) == (401, "verification_failed")
            op.set_principal_status(world.key("consumer").key_id, "active")
    assert state(server) == before
    # another bank's short grant: used once, then refused once it has lapsed
    end = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=5)
    _granted(world, ["open_companies"], ["export"], who="bank2", not_after=end)
    with server.client(world.key("bank2")) as b:
        b.export("tax", "open_companies", PURPOSE)
        time.sleep(max(0.0, (end - datetime.now(UTC)).total_seconds()) + 0.3)
        assert _denied(lambda: b.export("tax", "open_companies", PURPOSE)) == "expired"
    assert len(entries(server, "computation.export")) == 2
    reasons = [e["attrs"]["reason"] for e in entries(server, "access.denied")]
    assert reasons[-1] == "expired" and "suspended" in reasons
