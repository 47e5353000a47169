"""Cross-border data flows (数据跨境流动): ``decide(case) -> XborderDecision``.

The rules are those of the CAC's *Provisions on Promoting and Regulating Cross-Border Data
Flows* (促进和规范数据跨境流动规定, 22 March 2024), for data leaving China (the zone's
jurisdiction ``CN``) to a consumer in any other jurisdiction (Hong Kong, Macao and Taiwan
included: they are outside the mainland for these rules). Counts are of distinct natural persons
(data subjects) whose information the provider has sent abroad cumulatively since 1 January of
the current year (China Standard Time, :func:`counting_year`), including this release:

============================================================  ====================  =========
what leaves                                                   needs                 provision
============================================================  ====================  =========
core data (核心数据)                                           refused               DSL 21
important data (重要数据), from anyone                          security assessment   Art. 7(2)
personal information or important data from a CIIO            security assessment   Art. 7(1)
personal information of >= 1,000,000 people (not sensitive)   security assessment   Art. 7(2)
sensitive personal information of >= 10,000 people            security assessment   Art. 7(2)
personal information of 100,000 to < 1,000,000 people          contract or cert.     Art. 8
sensitive personal information of < 10,000 people              contract or cert.     Art. 8
personal information (not sensitive) of < 100,000 people       exempt                Art. 5(4)
no personal information, no important data                    exempt                Art. 3
============================================================  ====================  =========

Many sources still carry the 2022 values (the 2022 assessment measures and the 2023 standard
contract measures: an assessment from 100,000 people, counted since 1 January of the *previous*
year; a contract for any personal information below that); the values above are the 2024 ones
and the defaults of :class:`Thresholds`. A deployment (or a test) may lower them, never below 1.

Anonymized output: a differentially private release (``aggregate``, ``psi_cardinality``,
``psi_aggregate``, ``secure_sum`` with DP noise) is treated as anonymized information, which
is not personal information (PIPL Art. 4), so it is exempt unless the data is important or core
(their aggregates may be important data themselves). An exact release of the same operations is
not: a consumer that chooses the filter or the id list can difference two exact answers into one
person's value or membership, so it is personal information and counts (docs/cross-border.md).

Anything the rules do not know fails closed: an unknown operation, PI class, level or
jurisdiction, or an origin other than ``CN`` (no other jurisdiction's rules are implemented), is
``refuse``. So is a pair on the zone's negative list (a free-trade zone's list, Art. 6).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from enum import StrEnum
from functools import lru_cache
from importlib import resources

from policy.levels import Level, Operation

__all__ = [
    "APPROVAL_TYPE",
    "APPROVAL_VERSION",
    "CST",
    "ORIGINS",
    "Basis",
    "Document",
    "Outcome",
    "PiClass",
    "Thresholds",
    "XborderCase",
    "XborderDecision",
    "anonymized",
    "approval_payload",
    "check_approval_period",
    "counting_year",
    "decide",
    "documents_for",
    "is_jurisdiction",
    "jurisdictions",
    "strictest",
]

#: China Standard Time (UTC+8, no daylight saving since 1991): the calendar of the yearly count
CST = timezone(timedelta(hours=8), "CST")
#: origins whose outbound rules are implemented here
ORIGINS = frozenset({"CN"})
#: a security assessment's result is valid for three years (Art. 9)
ASSESSMENT_YEARS = 3


class PiClass(StrEnum):
    """A column's personal-information class (PIPL Art. 4 and 28)."""

    NONE = "none"
    PERSONAL = "personal"
    SENSITIVE = "sensitive"


class Outcome(StrEnum):
    """What a flow abroad needs, weakest first."""

    EXEMPT = "exempt"
    CONTRACT = "contract"
    ASSESSMENT = "assessment"
    REFUSE = "refuse"


class Document(StrEnum):
    """A compliance document the operator records for a provider."""

    #: a standard contract filed with the provincial CAC (Art. 8)
    CONTRACT = "contract"
    #: a personal-information protection certification (Art. 8)
    CERTIFICATION = "certification"
    #: a passed CAC security assessment (Art. 7), valid three years (Art. 9)
    ASSESSMENT = "assessment"


class Basis(StrEnum):
    """Why: a short stable code, recorded on the ledger."""

    DOMESTIC = "domestic"
    UNKNOWN_OPERATION = "unknown_operation"
    UNKNOWN_PI_CLASS = "unknown_pi_class"
    UNKNOWN_LEVEL = "unknown_level"
    UNKNOWN_JURISDICTION = "unknown_jurisdiction"
    BAD_COUNT = "bad_count"
    COUNT_UNAVAILABLE = "count_unavailable"
    ORIGIN_RULES_UNKNOWN = "origin_rules_unknown"
    NEGATIVE_LIST = "negative_list"
    CORE_DATA = "core_data"
    IMPORTANT_DATA = "important_data"
    CIIO_PROVIDER = "ciio_provider"
    ANONYMIZED = "anonymized"
    NO_PERSONAL_INFORMATION = "no_personal_information"
    SENSITIVE_OVER_THRESHOLD = "sensitive_over_threshold"
    SENSITIVE_UNDER_THRESHOLD = "sensitive_under_threshold"
    PERSONAL_OVER_ASSESSMENT = "personal_over_assessment"
    PERSONAL_OVER_CONTRACT = "personal_over_contract"
    PERSONAL_UNDER_THRESHOLD = "personal_under_threshold"


#: the provision each basis rests on (shown with the decision)
PROVISIONS: Mapping[Basis, str] = {
    Basis.DOMESTIC: "not a cross-border flow",
    Basis.UNKNOWN_OPERATION: "unknown operation: fail closed",
    Basis.UNKNOWN_PI_CLASS: "unknown personal-information class: fail closed",
    Basis.UNKNOWN_LEVEL: "unknown classification level: fail closed",
    Basis.UNKNOWN_JURISDICTION: "not an ISO 3166-1 alpha-2 code: fail closed",
    Basis.BAD_COUNT: "subject counts must be whole numbers, after >= before >= 0: fail closed",
    Basis.ORIGIN_RULES_UNKNOWN: "no outbound rules known for the zone's jurisdiction: fail closed",
    Basis.NEGATIVE_LIST: "on the zone's negative list (2024 Provisions Art. 6)",
    Basis.CORE_DATA: "core data does not leave (Data Security Law Art. 21)",
    Basis.IMPORTANT_DATA: "important data (2024 Provisions Art. 7(2))",
    Basis.CIIO_PROVIDER: "a CIIO providing personal information or important data (Art. 7(1))",
    Basis.COUNT_UNAVAILABLE: "personal information of people the exchange cannot count: "
    "only an assessment covers any count (Art. 7(2)), fail closed",
    Basis.ANONYMIZED: "differentially private output is anonymized information (PIPL Art. 4)",
    Basis.NO_PERSONAL_INFORMATION: "no personal information or important data (Art. 3)",
    Basis.SENSITIVE_OVER_THRESHOLD: "sensitive PI of 10,000 people or more this year (Art. 7(2))",
    Basis.SENSITIVE_UNDER_THRESHOLD: "sensitive PI of fewer than 10,000 people (Art. 8)",
    Basis.PERSONAL_OVER_ASSESSMENT: "PI of 1,000,000 people or more this year (Art. 7(2))",
    Basis.PERSONAL_OVER_CONTRACT: "PI of 100,000 to under 1,000,000 people this year (Art. 8)",
    Basis.PERSONAL_UNDER_THRESHOLD: "PI (not sensitive) of fewer than 100,000 people (Art. 5(4))",
}

_SEVERITY = {o: i for i, o in enumerate(Outcome)}
#: operations whose output is anonymized when (and only when) it is differentially private
_AGGREGATES = frozenset(
    {Operation.AGGREGATE, Operation.PSI_CARDINALITY, Operation.PSI_AGGREGATE, Operation.SECURE_SUM}
)


@dataclass(frozen=True)
class Thresholds:
    """Distinct-subject counts per calendar year (2024 Provisions; defaults are the law's)."""

    #: personal information (not sensitive) of this many people needs a contract (Art. 8)
    personal_contract: int = 100_000
    #: ... and of this many a security assessment (Art. 7(2))
    personal_assessment: int = 1_000_000
    #: sensitive personal information of this many people needs an assessment (Art. 7(2))
    sensitive_assessment: int = 10_000
    #: a warning once a count reaches this percentage of a threshold it has not crossed
    warn_percent: int = 80

    def __post_init__(self) -> None:
        if min(self.personal_contract, self.sensitive_assessment) < 1:
            raise ValueError("cross-border thresholds are at least 1")
        if self.personal_assessment <= self.personal_contract:
            raise ValueError("the assessment threshold is above the contract threshold")
        if not 1 <= self.warn_percent <= 100:
            raise ValueError("the warning percentage is 1-100")


@dataclass(frozen=True)
class XborderCase:
    """One release to decide. Counts are of the class ``pi`` (sensitive subjects for
    ``sensitive``, ordinary ones for ``personal``): before this release and after it."""

    operation: str
    pi: str
    level: str
    consumer_jurisdiction: str
    zone_jurisdiction: str
    #: the output carries differential-privacy noise
    dp: bool = False
    #: the zone's provider is a critical information infrastructure operator
    provider_ciio: bool = False
    count_before: int = 0
    count_after: int = 0
    #: the zone's negative list: ``(operation, category)``; category is a level, a PI class
    #: or ``*``, operation an operation or ``*``
    negative: frozenset[tuple[str, str]] = frozenset()
    thresholds: Thresholds = field(default_factory=Thresholds)
    #: False when the release's subjects cannot be counted (e.g. PSI membership on a node):
    #: personal information then needs an assessment, which covers any count
    count_known: bool = True


@dataclass(frozen=True)
class XborderDecision:
    decision: Outcome
    basis: Basis
    #: the threshold the decision was taken against (None where no count mattered)
    threshold: int | None
    count_before: int
    count_after: int
    warnings: tuple[str, ...] = ()

    @property
    def allowed_without_approval(self) -> bool:
        return self.decision is Outcome.EXEMPT

    @property
    def provision(self) -> str:
        return PROVISIONS[self.basis]

    def to_dict(self) -> dict[str, object]:
        return {
            "decision": self.decision.value,
            "basis": self.basis.value,
            "provision": self.provision,
            "threshold": self.threshold,
            "count_before": self.count_before,
            "count_after": self.count_after,
            "warnings": list(self.warnings),
        }


@lru_cache(maxsize=1)
def jurisdictions() -> Mapping[str, str]:
    """The shipped ISO 3166-1 alpha-2 codes and their English names (``jurisdictions.json``)."""
    doc = json.loads(resources.files("policy").joinpath("jurisdictions.json").read_text("utf-8"))
    codes: dict[str, str] = doc["codes"]
    return codes


def is_jurisdiction(code: object) -> bool:
    return isinstance(code, str) and code in jurisdictions()


def counting_year(moment: datetime) -> int:
    """The calendar year a release at ``moment`` counts in: China Standard Time, so counts
    restart at 1 January 00:00 CST (31 December 16:00 UTC)."""
    if moment.tzinfo is None:
        raise ValueError("counting_year needs a timezone-aware time")
    return moment.astimezone(CST).year


def anonymized(operation: str, dp: bool) -> bool:
    """Whether the output of ``operation`` is anonymized information: only differentially
    private aggregates are. Row export, PSI membership and scores of named entities are not."""
    return dp and operation in _AGGREGATES


def _decision(
    outcome: Outcome,
    basis: Basis,
    case: XborderCase,
    threshold: int | None = None,
    warnings: Iterable[str] = (),
) -> XborderDecision:
    return XborderDecision(
        outcome, basis, threshold, case.count_before, case.count_after, tuple(warnings)
    )


def _warnings(case: XborderCase, limits: Iterable[tuple[int, str]]) -> list[str]:
    out = []
    for limit, what in limits:
        after = case.count_after
        if after < limit and after * 100 >= case.thresholds.warn_percent * limit:
            out.append(
                f"{after} of {limit} {what} this year ({after * 100 // limit}% of the threshold)"
            )
    return out


def decide(case: XborderCase) -> XborderDecision:
    """What the release ``case`` needs (module docstring). Pure: no clock, no storage."""
    try:
        operation = Operation(case.operation)
    except ValueError:
        return _decision(Outcome.REFUSE, Basis.UNKNOWN_OPERATION, case)
    try:
        pi = PiClass(case.pi)
    except ValueError:
        return _decision(Outcome.REFUSE, Basis.UNKNOWN_PI_CLASS, case)
    try:
        level = Level(case.level)
    except ValueError:
        return _decision(Outcome.REFUSE, Basis.UNKNOWN_LEVEL, case)
    if not (
        is_jurisdiction(case.consumer_jurisdiction) and is_jurisdiction(case.zone_jurisdiction)
    ):
        return _decision(Outcome.REFUSE, Basis.UNKNOWN_JURISDICTION, case)
    counts = (case.count_before, case.count_after)
    if not all(type(c) is int for c in counts) or not 0 <= case.count_before <= case.count_after:
        return _decision(Outcome.REFUSE, Basis.BAD_COUNT, case)
    if case.consumer_jurisdiction == case.zone_jurisdiction:
        return _decision(Outcome.EXEMPT, Basis.DOMESTIC, case)
    if case.zone_jurisdiction not in ORIGINS:
        return _decision(Outcome.REFUSE, Basis.ORIGIN_RULES_UNKNOWN, case)
    for op, category in case.negative:
        if op in (operation.value, "*") and category in (level.value, pi.value, "*"):
            return _decision(Outcome.REFUSE, Basis.NEGATIVE_LIST, case)
    if level is Level.CORE:
        return _decision(Outcome.REFUSE, Basis.CORE_DATA, case)
    if level is Level.IMPORTANT:
        return _decision(Outcome.ASSESSMENT, Basis.IMPORTANT_DATA, case)
    if anonymized(operation, case.dp):
        return _decision(Outcome.EXEMPT, Basis.ANONYMIZED, case)
    if pi is PiClass.NONE:
        return _decision(Outcome.EXEMPT, Basis.NO_PERSONAL_INFORMATION, case)
    if case.provider_ciio:
        return _decision(Outcome.ASSESSMENT, Basis.CIIO_PROVIDER, case)
    if not case.count_known:
        return _decision(Outcome.ASSESSMENT, Basis.COUNT_UNAVAILABLE, case)
    t = case.thresholds
    if pi is PiClass.SENSITIVE:
        limit = t.sensitive_assessment
        if case.count_after >= limit:
            return _decision(Outcome.ASSESSMENT, Basis.SENSITIVE_OVER_THRESHOLD, case, limit)
        warn = _warnings(case, [(limit, "people's sensitive personal information")])
        return _decision(Outcome.CONTRACT, Basis.SENSITIVE_UNDER_THRESHOLD, case, limit, warn)
    warn = _warnings(
        case,
        [
            (t.personal_contract, "people's personal information"),
            (t.personal_assessment, "people's personal information"),
        ],
    )
    if case.count_after >= t.personal_assessment:
        return _decision(
            Outcome.ASSESSMENT, Basis.PERSONAL_OVER_ASSESSMENT, case, t.personal_assessment
        )
    if case.count_after >= t.personal_contract:
        return _decision(
            Outcome.CONTRACT, Basis.PERSONAL_OVER_CONTRACT, case, t.personal_contract, warn
        )
    return _decision(
        Outcome.EXEMPT, Basis.PERSONAL_UNDER_THRESHOLD, case, t.personal_contract, warn
    )


def strictest(decisions: Iterable[XborderDecision]) -> XborderDecision:
    """The decision needing most of several (a release with ordinary and sensitive PI is
    decided once per class); the first of equals."""
    found = list(decisions)
    if not found:
        raise ValueError("strictest() of no decisions")
    return max(found, key=lambda d: _SEVERITY[d.decision])


def documents_for(outcome: Outcome) -> frozenset[Document]:
    """The documents any one of which lets a release needing ``outcome`` go ahead (an assessment
    covers what a contract would; nothing lets a refusal go)."""
    if outcome is Outcome.CONTRACT:
        return frozenset(Document)
    if outcome is Outcome.ASSESSMENT:
        return frozenset({Document.ASSESSMENT})
    return frozenset()


def check_approval_period(document: str, valid_from: datetime, valid_until: datetime) -> Document:
    """The document kind if an approval for it may run from ``valid_from`` to ``valid_until``;
    else :class:`ValueError` saying why. An assessment is valid three years at most (Art. 9)."""
    try:
        kind = Document(document)
    except ValueError:
        raise ValueError(
            f"unknown document {document!r}; use one of {', '.join(d.value for d in Document)}"
        ) from None
    if valid_from.tzinfo is None or valid_until.tzinfo is None:
        raise ValueError("approval times must be timezone-aware")
    if valid_until <= valid_from:
        raise ValueError("an approval must end after it starts")
    if kind is Document.ASSESSMENT:
        start = valid_from.astimezone(UTC)
        try:
            limit = start.replace(year=start.year + ASSESSMENT_YEARS)
        except ValueError:  # 29 February
            limit = datetime.combine(date(start.year + ASSESSMENT_YEARS, 3, 1), start.timetz())
        if valid_until > limit:
            raise ValueError(
                "a security assessment is valid for three years at most (2024 Provisions Art. 9)"
            )
    return kind


#: DSSE payload type of the operator's signed record of a compliance approval
APPROVAL_TYPE = "application/vnd.zonex.xborder-approval+json"
APPROVAL_VERSION = "zonex.xborder-approval.v1"


def approval_payload(
    *,
    provider: str,
    document: str,
    document_sha256: str,
    valid_from: datetime,
    valid_until: datetime,
    approver: str,
) -> dict[str, str]:
    """The terms the operator signs when it records a compliance approval for a provider: which
    document (by its SHA-256, the document itself stays with the operator) and for how long."""
    kind = check_approval_period(document, valid_from, valid_until)
    return {
        "type": APPROVAL_VERSION,
        "provider": provider,
        "document": kind.value,
        "document_sha256": document_sha256,
        "valid_from": valid_from.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "valid_until": valid_until.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "approver": approver,
    }
