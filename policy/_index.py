"""An index over policy rows that finds, for one request, every row that could match it.

The matcher in ``model.conf`` requires each of zone, dataset, operation and subject to be equal
to the row's value or, in a deny row, the row's value to be ``*``; the subject may also be a role
the requester holds in the zone. So a row outside the buckets looked up here fails an equality
the matcher checks, and Casbin over the candidates decides exactly as Casbin over all rows.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable

from policy.rows import (
    ALLOW,
    G_MEMBER,
    G_ROLE,
    G_ZONE,
    P_ACT,
    P_DOM,
    P_EFT,
    P_OBJ,
    P_SUB,
    SUSPEND_PREFIX,
    WILDCARD,
    PolicyRow,
)

Key = tuple[str, str, str, str]  # zone, subject, dataset, operation
Values = tuple[str, ...]


def _key(values: Values) -> Key:
    return (values[P_DOM], values[P_SUB], values[P_OBJ], values[P_ACT])


class PolicyIndex:
    """Rows bucketed by (zone, subject, dataset, operation). Not thread-safe on its own."""

    def __init__(self, max_role_hops: int) -> None:
        self._max_role_hops = max_role_hops
        self.rows: dict[PolicyRow, None] = {}  # an ordered set
        self.by_rule: dict[str, dict[PolicyRow, None]] = {}
        self._allow: dict[Key, list[Values]] = {}
        self._deny: dict[Key, list[Values]] = {}
        # zone -> member -> role -> number of g rows stating the link
        self._roles: dict[str, dict[str, Counter[str]]] = {}
        self.role_rows: dict[PolicyRow, None] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: PolicyRow) -> bool:
        """Index ``row`` (already validated). False if it was already there."""
        if row in self.rows:
            return False
        self.rows[row] = None
        self.by_rule.setdefault(row.rule, {})[row] = None
        values = row.values
        if row.ptype == "g":
            self.role_rows[row] = None
            members = self._roles.setdefault(values[G_ZONE], {})
            members.setdefault(values[G_MEMBER], Counter())[values[G_ROLE]] += 1
        elif values[P_EFT] == ALLOW:
            self._allow.setdefault(_key(values), []).append(values)
        else:
            bucket = self._deny.setdefault(_key(values), [])
            bucket.append(values)
            # suspensions first: when several deny rows match, the decision names the suspension
            bucket.sort(key=lambda v: not v[-1].startswith(SUSPEND_PREFIX))
        return True

    def remove(self, row: PolicyRow) -> bool:
        """Drop ``row``. False if it was not there."""
        if row not in self.rows:
            return False
        del self.rows[row]
        same_rule = self.by_rule[row.rule]
        del same_rule[row]
        if not same_rule:
            del self.by_rule[row.rule]
        values = row.values
        if row.ptype == "g":
            del self.role_rows[row]
            members = self._roles[values[G_ZONE]]
            counts = members[values[G_MEMBER]]
            counts[values[G_ROLE]] -= 1
            if counts[values[G_ROLE]] <= 0:
                del counts[values[G_ROLE]]
            if not counts:
                del members[values[G_MEMBER]]
            if not members:
                del self._roles[values[G_ZONE]]
        else:
            table = self._allow if values[P_EFT] == ALLOW else self._deny
            key = _key(values)
            bucket = table[key]
            bucket.remove(values)
            if not bucket:
                del table[key]
        return True

    def rows_of(self, rules: Iterable[str]) -> list[PolicyRow]:
        out: list[PolicyRow] = []
        for rule in rules:
            out.extend(self.by_rule.get(rule, ()))
        return out

    def subjects(self, zone: str, subject: str) -> list[str]:
        """``subject`` and every role it reaches in ``zone`` within the role manager's depth."""
        members = self._roles.get(zone)
        if not members or subject not in members:
            return [subject]
        seen = {subject: 0}
        queue = deque([subject])
        while queue:
            name = queue.popleft()
            depth = seen[name]
            if depth == self._max_role_hops:
                continue
            for role in members.get(name, ()):
                if role not in seen:
                    seen[role] = depth + 1
                    queue.append(role)
        return list(seen)

    def candidates(
        self, zone: str, subjects: list[str], dataset: str, operation: str
    ) -> tuple[list[Values], list[Values]]:
        """(deny rows, allow rows) that could match; deny rows come first, suspensions leading."""
        allow: list[Values] = []
        for sub in subjects:
            found = self._allow.get((zone, sub, dataset, operation))
            if found:
                allow.extend(found)
        deny: list[Values] = []
        if self._deny:
            for dom in (zone, WILDCARD):
                for sub in (*subjects, WILDCARD):
                    for obj in (dataset, WILDCARD):
                        for act in (operation, WILDCARD):
                            found = self._deny.get((dom, sub, obj, act))
                            if found:
                                deny.extend(found)
            if len(deny) > 1:
                deny.sort(key=lambda v: not v[-1].startswith(SUSPEND_PREFIX))
        return deny, allow
