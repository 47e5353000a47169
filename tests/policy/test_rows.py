from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from policy import (
    InvalidRuleError,
    Operation,
    PolicyRow,
    PurposeVocabulary,
    deny_row,
    grant_rows,
    role_row,
    suspend_principal_row,
    suspend_zone_row,
)
from policy.rows import allow_row, format_time, parse_time, validate_row

EXPIRES = datetime(2026, 6, 1, tzinfo=UTC)
KEY = "ab" * 32


def test_grant_rows_cover_each_dataset_and_operation() -> None:
    rows = grant_rows(
        "grant:7",
        subject=KEY,
        zone="city",
        datasets=["loans", "taxes", "loans"],
        operations=[Operation.AGGREGATE, "psi_members"],
        purpose="credit-assessment",
        expires=EXPIRES,
    )
    assert len(rows) == 4
    assert {r.rule for r in rows} == {"grant:7"}
    assert {r.effect for r in rows} == {"allow"}
    assert rows[0] == PolicyRow(
        "p",
        (
            KEY,
            "city",
            "loans",
            "aggregate",
            "credit-assessment",
            "2026-06-01T00:00:00Z",
            "allow",
            "grant:7",
        ),
    )
    assert all(type(v) is str for r in rows for v in r.values)


def test_grant_needs_datasets_and_operations() -> None:
    with pytest.raises(InvalidRuleError):
        grant_rows(
            "g",
            subject=KEY,
            zone="city",
            datasets=[],
            operations=["export"],
            purpose="statistics",
            expires=EXPIRES,
        )


def test_suspensions_are_wildcard_deny_rows() -> None:
    row = suspend_principal_row(KEY)
    assert row.values == (KEY, "*", "*", "*", "*", "*", "deny", f"suspend:{KEY}")
    zone = suspend_zone_row("city", expires=EXPIRES)
    assert zone.values == (
        "*",
        "city",
        "*",
        "*",
        "*",
        "2026-06-01T00:00:00Z",
        "deny",
        "suspend:zone:city",
    )


def test_role_rows() -> None:
    assert role_row("role:1", member=KEY, role="analysts", zone="city").values == (
        KEY,
        "analysts",
        "city",
        "role:1",
    )
    with pytest.raises(InvalidRuleError):
        role_row("role:1", member="x1", role="x1", zone="city")
    with pytest.raises(InvalidRuleError):
        role_row("role:1", member="x1", role="analysts", zone="*")


@pytest.mark.parametrize("field", ["subject", "zone", "dataset", "operation", "purpose"])
def test_allow_row_refuses_wildcards(field: str) -> None:
    kwargs = {
        "subject": KEY,
        "zone": "city",
        "dataset": "loans",
        "operation": "export",
        "purpose": "statistics",
    }
    kwargs[field] = "*"
    with pytest.raises(InvalidRuleError, match="wildcard"):
        allow_row("grant:1", expires=EXPIRES, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "values",
    [
        ("s", "z", "d", "export", "statistics", "*", "allow", "r"),  # allow without expiry
        ("s", "z", "d", "export", "statistics", "2026-06-01", "allow", "r"),  # bad time
        ("s", "z", "d", "drop", "statistics", "2026-06-01T00:00:00Z", "allow", "r"),  # bad op
        ("s", "z", "d", "export", "statistics", "2026-06-01T00:00:00Z", "permit", "r"),
        ("s,t", "z", "d", "export", "statistics", "2026-06-01T00:00:00Z", "allow", "r"),
        ("s", "z", "d", "export", "statistics", "2026-06-01T00:00:00Z", "allow", "*"),
        ("s", "z", "d", "export", "statistics", "2026-06-01T00:00:00Z", "allow"),
        ("s", " z", "d", "export", "statistics", "2026-06-01T00:00:00Z", "allow", "r"),
        ("s", "z", "", "export", "statistics", "2026-06-01T00:00:00Z", "deny", "r"),
    ],
)
def test_malformed_rows_are_refused(values: tuple[str, ...]) -> None:
    with pytest.raises(InvalidRuleError):
        validate_row(PolicyRow("p", values))


def test_unknown_ptype_and_purpose() -> None:
    with pytest.raises(InvalidRuleError):
        validate_row(PolicyRow("g2", ("a", "b", "c", "r")))
    row = PolicyRow(
        "p", ("s", "z", "d", "export", "marketing", "2026-06-01T00:00:00Z", "allow", "r")
    )
    validate_row(row)  # well-formed
    with pytest.raises(InvalidRuleError, match="unknown purpose"):
        validate_row(row, PurposeVocabulary.load_default())


def test_deny_rows_may_use_wildcards_anywhere_but_the_rule() -> None:
    row = deny_row("deny:all")
    assert row.values == ("*",) * 6 + ("deny", "deny:all")
    with pytest.raises(InvalidRuleError):
        deny_row("*")


def test_times_are_utc_seconds_rounded_down() -> None:
    moment = datetime(2026, 3, 1, 20, 0, 0, 999_999, tzinfo=timezone(timedelta(hours=8)))
    assert format_time(moment) == "2026-03-01T12:00:00Z"
    assert parse_time("2026-03-01T12:00:00Z") == datetime(2026, 3, 1, 12, tzinfo=UTC)
    with pytest.raises(ValueError):
        format_time(datetime(2026, 3, 1))
    with pytest.raises(ValueError):
        parse_time("2026-03-01T12:00:00+00:00")
