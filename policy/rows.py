"""Policy rows: what a grant, a suspension, a deny or a role membership writes into the policy.

A row is a Casbin policy line, ``ptype`` plus string values, in the layout of ``model.conf``::

    p, <subject>, <zone>, <dataset>, <operation>, <purpose>, <expires>, <allow|deny>, <rule id>
    g, <member>, <role>, <zone>, <rule id>

Every row carries a rule id so a decision names the rule that matched and a revocation removes
exactly the rows of one rule. Allow rows name everything explicitly and expire; the wildcard
``*`` is accepted only in deny rows. Values never contain commas or spaces (a Casbin policy line
is comma separated, and Casbin keys rows by their comma-joined values).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from itertools import product
from typing import NamedTuple

from policy.errors import InvalidRuleError
from policy.levels import Operation
from policy.purposes import PURPOSE_RE, PurposeVocabulary

__all__ = [
    "ALLOW",
    "DENY",
    "SUSPEND_PREFIX",
    "WILDCARD",
    "PolicyRow",
    "allow_row",
    "deny_row",
    "format_time",
    "grant_rows",
    "parse_time",
    "role_row",
    "suspend_principal_row",
    "suspend_zone_row",
    "throttle_principal_row",
    "validate_row",
]

ALLOW = "allow"
DENY = "deny"
WILDCARD = "*"
#: rule ids of suspensions start with this; a denial by such a row has reason ``suspended``
SUSPEND_PREFIX = "suspend:"
#: rule ids of throttles start with this; a denial by such a row has reason ``throttled``
THROTTLE_PREFIX = "throttle:"

TOKEN_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/+=-]{0,199}")
TIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")

# positions in a "p" row and a "g" row (see model.conf)
P_SUB, P_DOM, P_OBJ, P_ACT, P_PURPOSE, P_EXP, P_EFT, P_RULE = range(8)
P_SIZE = 8
G_MEMBER, G_ROLE, G_ZONE, G_RULE = range(4)
G_SIZE = 4

_OPERATIONS = frozenset(op.value for op in Operation)


class PolicyRow(NamedTuple):
    """One policy line: ``ptype`` (``"p"`` or ``"g"``) and its values, all strings."""

    ptype: str
    values: tuple[str, ...]

    @property
    def rule(self) -> str:
        """The rule id the row belongs to (a grant id, ``suspend:<key id>``...)."""
        return self.values[P_RULE if self.ptype == "p" else G_RULE]

    @property
    def effect(self) -> str | None:
        """``"allow"`` or ``"deny"`` for a ``p`` row, ``None`` for a role membership."""
        return self.values[P_EFT] if self.ptype == "p" else None

    @classmethod
    def from_values(cls, ptype: str, values: Sequence[str]) -> PolicyRow:
        return cls(ptype, tuple(values))


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with second precision, as stored in rows. Sub-second parts are dropped
    (rounding an expiry down never extends a grant)."""
    if moment.tzinfo is None:
        raise ValueError("naive datetime: policy times must be timezone-aware")
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """The inverse of :func:`format_time`."""
    if not TIME_RE.fullmatch(text):
        raise ValueError(f"not an RFC 3339 UTC time with seconds precision: {text!r}")
    return datetime.fromisoformat(text)


def _token(value: str, what: str, *, wildcard: bool) -> None:
    if value == WILDCARD:
        if not wildcard:
            raise InvalidRuleError(f"{what}: wildcards are allowed only in deny rows")
        return
    if not TOKEN_RE.fullmatch(value):
        raise InvalidRuleError(
            f"{what} {value!r}: use 1-200 of A-Z a-z 0-9 . _ : @ / + = -, starting with a letter "
            "or digit"
        )


def validate_row(row: PolicyRow, vocabulary: PurposeVocabulary | None = None) -> PolicyRow:
    """Check ``row`` against the model's layout and the rules for wildcards, and return it with
    plain ``str`` values. With a ``vocabulary``, purposes must be in it.

    Raises :class:`InvalidRuleError`: a wildcard in an allow row, a missing expiry on an allow row,
    an unknown operation, a malformed time, a wrong number of values, an unknown ``ptype``.
    """
    ptype, values = row
    if not all(isinstance(v, str) for v in values):
        raise InvalidRuleError("policy values must be strings")
    values = tuple(str(v) for v in values)
    if ptype == "p":
        if len(values) != P_SIZE:
            raise InvalidRuleError(f"a p row has {P_SIZE} values, got {len(values)}")
        sub, dom, obj, act, purpose, exp, eft, rule = values
        if eft not in (ALLOW, DENY):
            raise InvalidRuleError(f"effect must be 'allow' or 'deny', got {eft!r}")
        wild = eft == DENY
        _token(rule, "rule id", wildcard=False)
        _token(sub, "subject", wildcard=wild)
        _token(dom, "zone", wildcard=wild)
        _token(obj, "dataset", wildcard=wild)
        if act not in _OPERATIONS and not (wild and act == WILDCARD):
            if act == WILDCARD:
                raise InvalidRuleError("operation: wildcards are allowed only in deny rows")
            raise InvalidRuleError(f"unknown operation {act!r}")
        if purpose == WILDCARD:
            if not wild:
                raise InvalidRuleError("purpose: wildcards are allowed only in deny rows")
        elif vocabulary is not None:
            try:
                vocabulary.check(purpose)
            except LookupError as exc:
                raise InvalidRuleError(str(exc)) from exc
        elif not PURPOSE_RE.fullmatch(purpose):
            raise InvalidRuleError(f"malformed purpose {purpose!r}")
        if exp == WILDCARD:
            if not wild:
                raise InvalidRuleError("expires: allow rows must expire (no wildcard)")
        else:
            try:
                parse_time(exp)
            except ValueError as exc:
                raise InvalidRuleError(f"expires: {exc}") from exc
    elif ptype == "g":
        if len(values) != G_SIZE:
            raise InvalidRuleError(f"a g row has {G_SIZE} values, got {len(values)}")
        member, role, zone, rule = values
        for value, what in ((member, "member"), (role, "role"), (zone, "zone"), (rule, "rule id")):
            _token(value, what, wildcard=False)
        if member == role:
            raise InvalidRuleError("a role membership links two different names")
    else:
        raise InvalidRuleError(f"unknown policy type {ptype!r} (expected 'p' or 'g')")
    return PolicyRow(ptype, values)


def allow_row(
    rule: str,
    *,
    subject: str,
    zone: str,
    dataset: str,
    operation: Operation | str,
    purpose: str,
    expires: datetime,
) -> PolicyRow:
    """One allow row. Everything is explicit; ``expires`` is exclusive (see :mod:`policy.pdp`)."""
    return validate_row(
        PolicyRow(
            "p",
            (subject, zone, dataset, str(operation), purpose, format_time(expires), ALLOW, rule),
        )
    )


def deny_row(
    rule: str,
    *,
    subject: str = WILDCARD,
    zone: str = WILDCARD,
    dataset: str = WILDCARD,
    operation: Operation | str = WILDCARD,
    purpose: str = WILDCARD,
    expires: datetime | None = None,
) -> PolicyRow:
    """One deny row; every field left out is the wildcard. Without ``expires`` it never lapses."""
    exp = WILDCARD if expires is None else format_time(expires)
    return validate_row(
        PolicyRow("p", (subject, zone, dataset, str(operation), purpose, exp, DENY, rule))
    )


def role_row(rule: str, *, member: str, role: str, zone: str) -> PolicyRow:
    """``member`` holds ``role`` within ``zone`` (roles never expire: put expiry on grants)."""
    return validate_row(PolicyRow("g", (member, role, zone, rule)))


def grant_rows(
    rule: str,
    *,
    subject: str,
    zone: str,
    datasets: Iterable[str],
    operations: Iterable[Operation | str],
    purpose: str,
    expires: datetime,
) -> tuple[PolicyRow, ...]:
    """The allow rows of one grant: one per (dataset, operation), all sharing ``rule``."""
    ds = sorted(set(datasets))
    ops = sorted({str(Operation(op)) for op in operations})
    if not ds or not ops:
        raise InvalidRuleError("a grant names at least one dataset and one operation")
    return tuple(
        allow_row(
            rule,
            subject=subject,
            zone=zone,
            dataset=d,
            operation=op,
            purpose=purpose,
            expires=expires,
        )
        for d, op in product(ds, ops)
    )


def suspend_principal_row(key_id: str, *, expires: datetime | None = None) -> PolicyRow:
    """Deny everything to ``key_id`` in every zone. Rule id ``suspend:<key id>``."""
    return deny_row(SUSPEND_PREFIX + key_id, subject=key_id, expires=expires)


def throttle_principal_row(key_id: str, *, expires: datetime) -> PolicyRow:
    """Deny every computation to ``key_id`` until ``expires`` (an incident's throttle). Rule id
    ``throttle:<key id>``."""
    return deny_row(THROTTLE_PREFIX + key_id, subject=key_id, expires=expires)


def suspend_zone_row(zone: str, *, expires: datetime | None = None) -> PolicyRow:
    """Deny everything to everyone in ``zone``. Rule id ``suspend:zone:<zone>``."""
    return deny_row(f"{SUSPEND_PREFIX}zone:{zone}", zone=zone, expires=expires)
