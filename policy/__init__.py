"""zonex policy: classification levels and ceilings, the purpose vocabulary, policy rows, and the
decision point that answers ``decide(request) -> Decision(allowed, rule, reason)`` for every call.

Knows nothing about HTTP or storage: the exchange loads rows into a :class:`DecisionPoint`,
builds a :class:`DecisionRequest` from its registry and clock, and records the :class:`Decision`.
The Casbin model ships as ``model.conf`` and the vocabulary as ``purposes.json`` (package data).
"""

from policy._engine import create_enforcer
from policy.errors import (
    CeilingError,
    InvalidRuleError,
    PolicyError,
    UnknownPurposeError,
    UnknownRuleError,
)
from policy.levels import (
    DEFAULT_CEILINGS,
    Level,
    Obligation,
    Operation,
    allowed,
    max_level,
    obligations,
    tighten,
)
from policy.pdp import Decision, DecisionPoint, DecisionRequest, Reason
from policy.purposes import PurposeVocabulary
from policy.rows import (
    PolicyRow,
    deny_row,
    grant_rows,
    role_row,
    suspend_principal_row,
    suspend_zone_row,
    throttle_principal_row,
)

__all__ = [
    "DEFAULT_CEILINGS",
    "CeilingError",
    "Decision",
    "DecisionPoint",
    "DecisionRequest",
    "InvalidRuleError",
    "Level",
    "Obligation",
    "Operation",
    "PolicyError",
    "PolicyRow",
    "PurposeVocabulary",
    "Reason",
    "UnknownPurposeError",
    "UnknownRuleError",
    "allowed",
    "create_enforcer",
    "deny_row",
    "grant_rows",
    "max_level",
    "obligations",
    "role_row",
    "suspend_principal_row",
    "suspend_zone_row",
    "throttle_principal_row",
    "tighten",
]
