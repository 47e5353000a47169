"""The cross-border rules (policy.xborder): a golden table at, below and above every 2024
threshold, the fail-closed cases, the counting year and approval periods."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from policy.xborder import (
    CST,
    Basis,
    Document,
    Outcome,
    Thresholds,
    XborderCase,
    check_approval_period,
    counting_year,
    decide,
    documents_for,
    is_jurisdiction,
    strictest,
)

E, C, A, R = Outcome.EXEMPT, Outcome.CONTRACT, Outcome.ASSESSMENT, Outcome.REFUSE


def case(
    operation: str = "export",
    pi: str = "personal",
    level: str = "L2",
    count: int = 1,
    *,
    consumer: str = "US",
    zone: str = "CN",
    dp: bool = False,
    ciio: bool = False,
    before: int | None = None,
    negative: frozenset[tuple[str, str]] = frozenset(),
) -> XborderCase:
    return XborderCase(
        operation=operation,
        pi=pi,
        level=level,
        consumer_jurisdiction=consumer,
        zone_jurisdiction=zone,
        dp=dp,
        provider_ciio=ciio,
        count_before=count - 1 if before is None else before,
        count_after=count,
        negative=negative,
    )


def test_the_2024_values_are_the_defaults() -> None:
    # 2024 Provisions Art. 7(2), 8 and 5(4); the 2022 measures had an assessment from 100,000
    t = Thresholds()
    assert (t.personal_contract, t.personal_assessment, t.sensitive_assessment) == (
        100_000,
        1_000_000,
        10_000,
    )
    assert t.warn_percent == 80


GOLDEN: list[tuple[str, XborderCase, Outcome, Basis, int | None]] = [
    # ordinary personal information: 100,000 and 1,000,000 at -1, exact, +1
    ("pi_99999", case(count=99_999), E, Basis.PERSONAL_UNDER_THRESHOLD, 100_000),
    ("pi_100000", case(count=100_000), C, Basis.PERSONAL_OVER_CONTRACT, 100_000),
    ("pi_100001", case(count=100_001), C, Basis.PERSONAL_OVER_CONTRACT, 100_000),
    ("pi_999999", case(count=999_999), C, Basis.PERSONAL_OVER_CONTRACT, 100_000),
    ("pi_1000000", case(count=1_000_000), A, Basis.PERSONAL_OVER_ASSESSMENT, 1_000_000),
    ("pi_1000001", case(count=1_000_001), A, Basis.PERSONAL_OVER_ASSESSMENT, 1_000_000),
    # sensitive: any is a contract, 10,000 an assessment
    ("sensitive_1", case(pi="sensitive", count=1), C, Basis.SENSITIVE_UNDER_THRESHOLD, 10_000),
    (
        "sensitive_9999",
        case(pi="sensitive", count=9_999),
        C,
        Basis.SENSITIVE_UNDER_THRESHOLD,
        10_000,
    ),
    (
        "sensitive_10000",
        case(pi="sensitive", count=10_000),
        A,
        Basis.SENSITIVE_OVER_THRESHOLD,
        10_000,
    ),
    (
        "sensitive_10001",
        case(pi="sensitive", count=10_001),
        A,
        Basis.SENSITIVE_OVER_THRESHOLD,
        10_000,
    ),
    # the same count, ordinary vs sensitive
    (
        "ordinary_10000",
        case(pi="personal", count=10_000),
        E,
        Basis.PERSONAL_UNDER_THRESHOLD,
        100_000,
    ),
    # no personal information
    ("no_pi_export", case(pi="none", count=0, before=0), E, Basis.NO_PERSONAL_INFORMATION, None),
    # important and core data, whatever the operation
    ("important_export", case(level="IMPORTANT", pi="none"), A, Basis.IMPORTANT_DATA, None),
    (
        "important_dp_aggregate",
        case("aggregate", level="IMPORTANT", dp=True),
        A,
        Basis.IMPORTANT_DATA,
        None,
    ),
    ("core", case("aggregate", level="CORE", dp=True, pi="none"), R, Basis.CORE_DATA, None),
    # CIIO providers: any PI (even one person) or important data needs an assessment
    ("ciio_provider_pi", case(count=1, ciio=True), A, Basis.CIIO_PROVIDER, None),
    (
        "ciio_provider_sensitive",
        case(pi="sensitive", count=1, ciio=True),
        A,
        Basis.CIIO_PROVIDER,
        None,
    ),
    ("ciio_provider_no_pi", case(pi="none", ciio=True), E, Basis.NO_PERSONAL_INFORMATION, None),
    (
        "ciio_provider_dp_aggregate",
        case("aggregate", ciio=True, dp=True),
        E,
        Basis.ANONYMIZED,
        None,
    ),
    # DP aggregates are anonymized output; exact ones are personal information
    (
        "dp_aggregate",
        case("aggregate", pi="sensitive", level="L4", dp=True),
        E,
        Basis.ANONYMIZED,
        None,
    ),
    ("dp_psi_cardinality", case("psi_cardinality", dp=True, level="L3"), E, Basis.ANONYMIZED, None),
    ("dp_psi_aggregate", case("psi_aggregate", pi="sensitive", dp=True), E, Basis.ANONYMIZED, None),
    ("dp_secure_sum", case("secure_sum", dp=True), E, Basis.ANONYMIZED, None),
    (
        "exact_aggregate_l3_opt_out",
        case("aggregate", level="L3", count=100_000),
        C,
        Basis.PERSONAL_OVER_CONTRACT,
        100_000,
    ),
    (
        "exact_psi_cardinality",
        case("psi_cardinality", pi="sensitive"),
        C,
        Basis.SENSITIVE_UNDER_THRESHOLD,
        10_000,
    ),
    # membership and scores are never anonymized, DP flag or not
    (
        "psi_members",
        case("psi_members", level="L3", count=100_000),
        C,
        Basis.PERSONAL_OVER_CONTRACT,
        100_000,
    ),
    (
        "psi_members_dp_flag",
        case("psi_members", dp=True, count=100_000),
        C,
        Basis.PERSONAL_OVER_CONTRACT,
        100_000,
    ),
    (
        "he_score",
        case("he_score", pi="sensitive", level="L4"),
        C,
        Basis.SENSITIVE_UNDER_THRESHOLD,
        10_000,
    ),
    # jurisdictions
    ("domestic", case(consumer="CN", count=2_000_000), E, Basis.DOMESTIC, None),
    (
        "hong_kong_is_abroad",
        case(consumer="HK", pi="sensitive"),
        C,
        Basis.SENSITIVE_UNDER_THRESHOLD,
        10_000,
    ),
    ("unknown_consumer", case(consumer="XX"), R, Basis.UNKNOWN_JURISDICTION, None),
    ("lowercase_consumer", case(consumer="us"), R, Basis.UNKNOWN_JURISDICTION, None),
    ("unknown_zone", case(zone="EU"), R, Basis.UNKNOWN_JURISDICTION, None),
    (
        "foreign_origin",
        case(zone="US", consumer="CN", pi="none"),
        R,
        Basis.ORIGIN_RULES_UNKNOWN,
        None,
    ),
    # unknown vocabulary fails closed
    ("unknown_pi", case(pi="biometric"), R, Basis.UNKNOWN_PI_CLASS, None),
    ("unknown_operation", case("download", pi="none"), R, Basis.UNKNOWN_OPERATION, None),
    ("unknown_level", case(level="L5", pi="none"), R, Basis.UNKNOWN_LEVEL, None),
    ("negative_count", case(count=-1, before=-2), R, Basis.BAD_COUNT, None),
    ("count_went_down", case(count=5, before=6), R, Basis.BAD_COUNT, None),
    # negative lists: by operation and category (a level, a PI class, or any)
    (
        "negative_pi",
        case(pi="personal", negative=frozenset({("export", "personal")})),
        R,
        Basis.NEGATIVE_LIST,
        None,
    ),
    (
        "negative_level_any_op",
        case("aggregate", dp=True, level="L3", negative=frozenset({("*", "L3")})),
        R,
        Basis.NEGATIVE_LIST,
        None,
    ),
    (
        "negative_other_op",
        case(negative=frozenset({("psi_members", "*")})),
        E,
        Basis.PERSONAL_UNDER_THRESHOLD,
        100_000,
    ),
    (
        "negative_not_domestic",
        case(consumer="CN", negative=frozenset({("*", "*")})),
        E,
        Basis.DOMESTIC,
        None,
    ),
]


@pytest.mark.parametrize(
    ("name", "given", "outcome", "basis", "threshold"), GOLDEN, ids=[g[0] for g in GOLDEN]
)
def test_golden(
    name: str, given: XborderCase, outcome: Outcome, basis: Basis, threshold: int | None
) -> None:
    got = decide(given)
    assert (got.decision, got.basis, got.threshold) == (outcome, basis, threshold), name
    assert (got.count_before, got.count_after) == (given.count_before, given.count_after)
    assert got.provision  # every basis names its provision


def test_uncounted_personal_information_needs_an_assessment() -> None:
    uncounted = XborderCase("psi_members", "personal", "L3", "US", "CN", count_known=False)
    got = decide(uncounted)
    assert (got.decision, got.basis) == (A, Basis.COUNT_UNAVAILABLE)
    # an anonymized or non-personal output needs no count
    assert (
        decide(
            XborderCase("aggregate", "personal", "L3", "US", "CN", dp=True, count_known=False)
        ).decision
        is E
    )
    assert decide(XborderCase("export", "none", "L2", "US", "CN", count_known=False)).decision is E


def test_names_are_unique() -> None:
    assert len({g[0] for g in GOLDEN}) == len(GOLDEN)


@pytest.mark.parametrize(
    ("count", "warned"),
    [(79_999, False), (80_000, True), (99_999, True), (100_000, False), (800_000, True)],
)
def test_warnings_at_80_percent(count: int, warned: bool) -> None:
    got = decide(case(count=count))
    assert bool(got.warnings) is warned, got.warnings
    if warned:
        assert f"{count} of " in got.warnings[0]


def test_warnings_at_80_percent_sensitive() -> None:
    assert decide(case(pi="sensitive", count=7_999)).warnings == ()
    (warning,) = decide(case(pi="sensitive", count=8_000)).warnings
    assert "8000 of 10000" in warning and "80%" in warning


def test_lowered_thresholds_apply() -> None:
    small = Thresholds(personal_contract=3, personal_assessment=6, sensitive_assessment=2)
    got = [
        decide(
            XborderCase("export", "personal", "L2", "US", "CN", count_after=n, thresholds=small)
        ).decision
        for n in range(0, 8)
    ]
    assert got == [E, E, E, C, C, C, A, A]
    with pytest.raises(ValueError):
        Thresholds(personal_contract=0)
    with pytest.raises(ValueError):
        Thresholds(personal_contract=10, personal_assessment=10)


def test_strictest_of_classes() -> None:
    ordinary = decide(case(count=10))
    sensitive = decide(case(pi="sensitive", count=10))
    assert strictest([ordinary, sensitive]) is sensitive
    assert strictest([sensitive, ordinary]) is sensitive
    with pytest.raises(ValueError):
        strictest([])


def test_documents() -> None:
    assert documents_for(Outcome.CONTRACT) == {
        Document.CONTRACT,
        Document.CERTIFICATION,
        Document.ASSESSMENT,
    }
    assert documents_for(Outcome.ASSESSMENT) == {Document.ASSESSMENT}
    assert documents_for(Outcome.REFUSE) == frozenset()
    assert documents_for(Outcome.EXEMPT) == frozenset()


def test_jurisdiction_list() -> None:
    assert all(is_jurisdiction(c) for c in ("CN", "US", "HK", "MO", "TW", "DE", "SG"))
    assert not any(is_jurisdiction(c) for c in ("XX", "EU", "UK", "cn", "CHN", "", None))


@pytest.mark.parametrize(
    ("moment", "year"),
    [
        (datetime(2026, 12, 31, 15, 59, 59, 999999, tzinfo=UTC), 2026),
        (datetime(2026, 12, 31, 16, 0, 0, tzinfo=UTC), 2027),  # 1 January 00:00 CST
        (datetime(2027, 1, 1, 0, 0, tzinfo=CST), 2027),
        (datetime(2027, 1, 1, 0, 0, tzinfo=CST) - timedelta(microseconds=1), 2026),
    ],
)
def test_year_rolls_over_at_midnight_china_standard_time(moment: datetime, year: int) -> None:
    assert counting_year(moment) == year


def test_counting_year_needs_an_aware_time() -> None:
    with pytest.raises(ValueError):
        counting_year(datetime(2026, 1, 1))


def test_approval_periods() -> None:
    start = datetime(2026, 3, 1, tzinfo=UTC)
    three = datetime(2029, 3, 1, tzinfo=UTC)
    assert check_approval_period("assessment", start, three) is Document.ASSESSMENT
    with pytest.raises(ValueError, match="three years"):
        check_approval_period("assessment", start, three + timedelta(seconds=1))
    # contracts and certifications carry their own terms
    assert check_approval_period("contract", start, three + timedelta(days=400))
    with pytest.raises(ValueError, match="after it starts"):
        check_approval_period("contract", start, start)
    with pytest.raises(ValueError, match="unknown document"):
        check_approval_period("memo", start, three)
    leap = datetime(2028, 2, 29, tzinfo=UTC)
    assert check_approval_period("assessment", leap, datetime(2031, 3, 1, tzinfo=UTC))
    with pytest.raises(ValueError):
        check_approval_period("assessment", leap, datetime(2031, 3, 1, 0, 0, 1, tzinfo=UTC))
