"""The policy decision point: ``decide(request) -> Decision`` for every call the exchange serves.

Semantics are those of a plain ``casbin.Enforcer`` on ``model.conf`` loaded with every row: deny
by default, an explicit deny beats any allow, wildcards only in deny rows. The decision point
gets the same answers fast by handing Casbin only the rows that could match the request (see
:mod:`policy._index`), and it says why a call was denied with a stable reason code.

Time convention: a row is live while ``now < expires``. At the expiry instant it is expired; one
second (or one microsecond) before, it is live. ``now`` is the server's clock, never the client's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from policy._engine import MAX_ROLE_HOPS, Evaluator, matcher_functions
from policy._index import PolicyIndex
from policy.levels import Level, Operation, allowed
from policy.purposes import PurposeVocabulary
from policy.rows import (
    ALLOW,
    DENY,
    P_EFT,
    P_EXP,
    P_PURPOSE,
    P_RULE,
    SUSPEND_PREFIX,
    THROTTLE_PREFIX,
    TOKEN_RE,
    PolicyRow,
    validate_row,
)

__all__ = ["Decision", "DecisionPoint", "DecisionRequest", "Reason"]

log = logging.getLogger(__name__)

# operation (enum or its plain string) -> plain string
_OPERATIONS: dict[str, str] = {op.value: op.value for op in Operation}


class Reason(StrEnum):
    """Why a decision came out as it did. Stable codes: safe to show the caller and to ledger."""

    ALLOWED = "allowed"
    #: no grant covers this subject, zone, dataset and operation
    NOT_GRANTED = "not_granted"
    #: a grant covers the call but it has expired
    EXPIRED = "expired"
    #: a grant covers the subject, zone, dataset and operation, but not the purpose
    PURPOSE_MISMATCH = "purpose_mismatch"
    #: the operation is above the dataset level's (tightened) ceiling
    LEVEL_CEILING = "level_ceiling"
    #: the principal or the zone is suspended
    SUSPENDED = "suspended"
    #: the principal's computations are throttled after an incident, until the row expires
    THROTTLED = "throttled"
    #: an explicit deny row matched
    DENIED = "denied"
    #: enforcement failed; failing closed
    ERROR = "error"


@dataclass(frozen=True)
class DecisionRequest:
    """One call to authorize, built by the exchange from the authenticated key id, its registry
    (zone, dataset, level, ceilings) and its own clock. Nothing here may come from the client
    except the dataset, operation and purpose it asks for.
    """

    subject: str
    zone: str
    dataset: str
    operation: Operation
    purpose: str
    level: Level
    #: the effective ceiling table (``policy.tighten(DEFAULT_CEILINGS, zone's, dataset's)``)
    ceilings: Mapping[Level, frozenset[Operation]]
    #: the server's clock, timezone-aware
    now: datetime

    def ceiling(self) -> frozenset[Operation]:
        """The operations allowed at the dataset's level under ``ceilings``."""
        return frozenset(Operation(op) for op in self.ceilings.get(Level(self.level), ()))

    def to_casbin_request(self) -> tuple[str, ...]:
        """The request values in ``model.conf``'s order, as handed to Casbin's ``enforce``.

        Raises :class:`ValueError` for an unknown level or operation, a naive ``now``, or a
        ceiling entry that is not an operation.
        """
        if self.now.tzinfo is None:
            raise ValueError("naive datetime: the decision time must be timezone-aware")
        level = Level(self.level)
        ceiling: set[str] = set()
        for op in self.ceilings.get(level, ()):
            if op not in _OPERATIONS:
                raise ValueError(f"not an operation in the ceiling table: {op!r}")
            ceiling.add(_OPERATIONS[op])
        return (
            str.__str__(self.subject),
            str.__str__(self.zone),
            str.__str__(self.dataset),
            _OPERATIONS[Operation(self.operation)],
            str.__str__(self.purpose),
            level.value,
            " ".join(sorted(ceiling)),
            self.now.astimezone(UTC).isoformat(timespec="microseconds"),
        )

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready view for the ledger (no floats)."""
        return {
            "subject": self.subject,
            "zone": self.zone,
            "dataset": self.dataset,
            "operation": str(self.operation),
            "purpose": self.purpose,
            "level": str(self.level),
            "ceiling": sorted(str(op) for op in self.ceiling()),
            "now": self.now.astimezone(UTC).isoformat(timespec="microseconds"),
        }


@dataclass(frozen=True)
class Decision:
    """The answer: ``rule`` names the row's rule id that decided (a grant id, a suspension,
    ``ceiling:<level>:<operation>``), or ``None`` when nothing matched or enforcement failed."""

    allowed: bool
    rule: str | None
    reason: str
    policy_version: int

    def to_record(self) -> dict[str, Any]:
        return {
            "allowed": self.allowed,
            "rule": self.rule,
            "reason": str(self.reason),
            "policy_version": self.policy_version,
        }


class DecisionPoint:
    """Holds the policy rows and decides requests against them. Thread-safe.

    ``version`` is the policy version the rows correspond to (the store's counter); every
    decision carries the version it was made under.
    """

    def __init__(
        self,
        rows: Iterable[PolicyRow] = (),
        *,
        version: int = 0,
        vocabulary: PurposeVocabulary | None = None,
    ) -> None:
        self._vocabulary = vocabulary or PurposeVocabulary.load_default()
        self._functions = matcher_functions(self._vocabulary)
        self._lock = threading.Lock()
        self._index = PolicyIndex(MAX_ROLE_HOPS)
        self._evaluator = Evaluator(self._vocabulary)
        self._version = version
        self.add_rows(rows)

    # -- reading -----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    @property
    def vocabulary(self) -> PurposeVocabulary:
        return self._vocabulary

    def __len__(self) -> int:
        return len(self._index)

    def rows(self) -> list[PolicyRow]:
        """Every row, in the order added."""
        with self._lock:
            return list(self._index.rows)

    def rule_rows(self, rule: str) -> list[PolicyRow]:
        """The rows carrying rule id ``rule``."""
        with self._lock:
            return self._index.rows_of([rule])

    # -- changing ----------------------------------------------------------------------------

    def _validated(self, rows: Iterable[PolicyRow]) -> list[PolicyRow]:
        return [validate_row(PolicyRow(*row), self._vocabulary) for row in rows]

    def _apply(
        self, remove: Iterable[PolicyRow], add: Iterable[PolicyRow], version: int | None
    ) -> tuple[int, int]:
        # caller holds the lock; rows are validated
        remove, add = list(remove), list(add)
        removed = sum(1 for row in remove if self._index.remove(row))
        added = sum(1 for row in add if self._index.add(row))
        if any(row.ptype == "g" for row in (*remove, *add)):
            self._evaluator.set_roles(r.values for r in self._index.role_rows)
        if version is not None:
            self._version = version
        return removed, added

    def add_rows(self, rows: Iterable[PolicyRow], version: int | None = None) -> int:
        """Add rows (all or none: every row is validated first). Returns how many were new.

        Raises :class:`policy.errors.InvalidRuleError` for a malformed row, a wildcard in an
        allow row, an allow row without expiry or a purpose outside the vocabulary.
        """
        new = self._validated(rows)
        with self._lock:
            return self._apply((), new, version)[1]

    def remove_rows(self, rows: Iterable[PolicyRow], version: int | None = None) -> int:
        """Remove exactly these rows. Returns how many were present."""
        gone = [PolicyRow(*row) for row in rows]
        with self._lock:
            return self._apply(gone, (), version)[0]

    def remove_rule(self, rule: str, version: int | None = None) -> int:
        """Remove every row of rule id ``rule`` (a revocation). Returns how many were present."""
        with self._lock:
            return self._apply(self._index.rows_of([rule]), (), version)[0]

    def replace_rules(
        self, rules: Iterable[str], rows: Iterable[PolicyRow], version: int | None = None
    ) -> None:
        """Atomically drop every row of ``rules`` and add ``rows``: no decision sees half."""
        new = self._validated(rows)
        with self._lock:
            self._apply(self._index.rows_of(set(rules)), new, version)

    def replace_all(self, rows: Iterable[PolicyRow], version: int | None = None) -> None:
        """Replace the whole policy. The new index is built aside, then swapped in."""
        new = self._validated(rows)
        index = PolicyIndex(MAX_ROLE_HOPS)
        for row in new:
            index.add(row)
        evaluator = Evaluator(self._vocabulary)
        evaluator.set_roles(r.values for r in index.role_rows)
        with self._lock:
            self._index, self._evaluator = index, evaluator
            if version is not None:
                self._version = version

    # -- deciding ----------------------------------------------------------------------------

    def decide(self, request: DecisionRequest) -> Decision:
        """Decide one request. Never raises: any failure is ``Decision(False, None, "error")``."""
        try:
            return self._decide(request)
        except Exception:
            log.exception("policy enforcement failed; denying")
            return Decision(False, None, Reason.ERROR, self._version)

    def _decide(self, request: DecisionRequest) -> Decision:
        for value in (request.subject, request.zone, request.dataset):
            if not isinstance(value, str) or not TOKEN_RE.fullmatch(value):
                raise ValueError(f"malformed request value {value!r}")
        values = request.to_casbin_request()
        operation, level, ceiling = values[3], values[5], values[6]
        if not allowed(level, operation, {Level(level): _split_ceiling(ceiling)}):
            return Decision(
                False, f"ceiling:{level}:{operation}", Reason.LEVEL_CEILING, self._version
            )
        with self._lock:
            version = self._version
            subjects = self._index.subjects(request.zone, request.subject)
            deny, allow = self._index.candidates(request.zone, subjects, request.dataset, operation)
            if not deny and not allow:
                return Decision(False, None, Reason.NOT_GRANTED, version)
            ok, explain = self._evaluator.evaluate(deny + allow, values)
        if ok is True:
            return Decision(True, explain[P_RULE], Reason.ALLOWED, version)
        if ok is not False:
            raise TypeError(f"enforcer returned {ok!r}")
        if explain and explain[P_EFT] == DENY:
            rule = explain[P_RULE]
            reason = Reason.SUSPENDED if rule.startswith(SUSPEND_PREFIX) else Reason.DENIED
            if rule.startswith(THROTTLE_PREFIX):
                reason = Reason.THROTTLED
            return Decision(False, rule, reason, version)
        return self._explain_miss(values, allow, version)

    def _explain_miss(
        self, values: tuple[str, ...], allow: list[tuple[str, ...]], version: int
    ) -> Decision:
        """No row matched. If a grant covers subject, zone, dataset and operation, say which of
        purpose and time it missed on. A grant for the requested purpose that has expired is
        reported as ``expired``; otherwise a grant for another purpose as ``purpose_mismatch``."""
        purpose_within = self._functions["purposeWithin"]
        before_expiry = self._functions["beforeExpiry"]
        purpose, now = values[4], values[7]
        expired: str | None = None
        mismatch: str | None = None
        for row in allow:
            if not purpose_within(purpose, row[P_PURPOSE], ALLOW):
                mismatch = mismatch or row[P_RULE]
            elif not before_expiry(now, row[P_EXP], ALLOW):
                expired = expired or row[P_RULE]
        if expired is not None:
            return Decision(False, expired, Reason.EXPIRED, version)
        if mismatch is not None:
            return Decision(False, mismatch, Reason.PURPOSE_MISMATCH, version)
        return Decision(False, None, Reason.NOT_GRANTED, version)


def _split_ceiling(ceiling: str) -> frozenset[Operation]:
    return frozenset(Operation(op) for op in ceiling.split(" ") if op)
