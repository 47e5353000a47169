"""Compliance rules checked offline over a verified bundle's entries (``zonex audit verify
--rules``). No database, no server: every fact comes from the ledger.

One pass in ``seq`` order. For every ``computation.*`` entry: each grant it names was created
earlier, covers its consumer, zone, dataset, operation and purpose, was not revoked before it
and had not expired at its ``time``; a private-join release follows the opening of its session
(once), and a node-computed release its ``task.authorized``; the ε it charged adds up, per
consumer, dataset and budget window, to the window's total it records and stays within the
budget in force; a consent-gated score cites only consents recorded earlier for that consumer,
zone and purpose, not withdrawn and not expired. Suspended principals and zones do nothing while
suspended. The exact list, and what is not checked, is in ``docs/wire-formats-ledger.md``
("Compliance rules").

Memory grows with what is live (grants, pending requests, consents, open sessions and tasks,
budget windows, suspensions), not with the number of entries; what ended (revoked grants,
withdrawn consents, finished sessions) is remembered in bounded tables, so a citation of one
that fell out of them is reported as unknown rather than as ended.

Run it on a bundle that :func:`exchange.audit.check_bundle` verified: it trusts the entries'
schema and order.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any

from policy.errors import UnknownPurposeError
from policy.purposes import PurposeVocabulary
from policy.xborder import Outcome, documents_for

__all__ = [
    "DEFAULT_EPSILON_BUDGET",
    "DEFAULT_REFRESH_SECONDS",
    "RuleFault",
    "RuleFaultKind",
    "RulesChecker",
    "RulesReport",
    "check_rules",
]

#: the budget of a dataset whose provider set no analysis rules (``exchange.node.analysis``)
DEFAULT_EPSILON_BUDGET = Decimal(1)
#: the refresh window of such a dataset: 30 days
DEFAULT_REFRESH_SECONDS = 30 * 24 * 3600
#: faults listed in a report; the rest are counted
MAX_FAULTS = 1000
#: ended grants, withdrawn consents and finished sessions and tasks remembered, per table
ENDED_CAP = 1 << 16
#: entries between sweeps of expired grants and consents out of the live tables
_SWEEP_EVERY = 4096
#: an approval is read at decision time, a moment before the entry's time is stamped
_APPROVAL_SLACK_SECONDS = 5

#: kinds that are acts of their actor, refused to a suspended principal
_ACTS = frozenset(
    {
        "access.requested",
        "access.approved_by_provider",
        "grant.created",
        "consent.recorded",
        "psi.session_opened",
        "task.authorized",
    }
)
#: kinds that act on the zone named in their refs, refused on a suspended zone
_ZONE_ACTS = frozenset({"access.requested", "grant.created", "psi.session_opened"})
_PSI_END = frozenset({"psi.session_failed", "psi.session_expired", "psi.session_done"})
_TASK_END = frozenset({"task.refused", "task.terminated"})


class RuleFaultKind(StrEnum):
    """Stable codes for a broken compliance rule."""

    COMPUTATION_WITHOUT_GRANT = "computation_without_grant"
    GRANT_MISMATCH = "grant_mismatch"
    GRANT_REVOKED = "grant_revoked"
    GRANT_EXPIRED = "grant_expired"
    RELEASE_WITHOUT_OPENING = "release_without_opening"
    RELEASE_WITHOUT_TASK = "release_without_task"
    BUDGET_EXCEEDED = "budget_exceeded"
    BUDGET_MISMATCH = "budget_mismatch"
    CONSENT_NOT_LIVE = "consent_not_live"
    ACTION_WHILE_SUSPENDED = "action_while_suspended"
    XBORDER_WITHOUT_DECISION = "xborder_without_decision"
    XBORDER_REFUSED_RELEASED = "xborder_refused_released"
    XBORDER_WITHOUT_APPROVAL = "xborder_without_approval"


@dataclass(frozen=True)
class RuleFault:
    """One broken rule: the entry's line (1-based, as for integrity faults), a code, why."""

    line: int
    kind: RuleFaultKind
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class RulesReport:
    """``entries`` checked; ``faults`` in line order (at most ``MAX_FAULTS``), ``omitted`` the
    count of further faults not listed."""

    entries: int
    faults: tuple[RuleFault, ...]
    omitted: int = 0

    @property
    def ok(self) -> bool:
        return not self.faults


@dataclass(frozen=True)
class _Grant:
    line: int
    consumer: str
    zone: str | None
    datasets: frozenset[str]
    operations: frozenset[str]
    purpose: str
    expires: datetime | None


@dataclass(frozen=True)
class _Consent:
    line: int
    zone: str
    consumer: str
    purpose: str
    expires: datetime | None


@dataclass
class _Window:
    start: str
    spent: Decimal


def _time(text: object) -> datetime | None:
    """An RFC 3339 time as an aware datetime; None if it is not one."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _decimal(value: object) -> Decimal | None:
    if not isinstance(value, str | int):
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _plain(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def _split(value: object) -> list[str]:
    return [v for v in value.split(",") if v] if isinstance(value, str) else []


def _format_window(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass
class _Abroad:
    """A release to a consumer abroad: ``missing`` the zones whose decision has not followed."""

    line: int
    kind: str
    actor: str
    missing: set[str]


@dataclass(frozen=True)
class _Approval:
    line: int
    provider: str
    document: str
    valid_from: datetime | None
    valid_until: datetime | None

    def live(self, when: datetime | None) -> bool:
        if when is None or self.valid_from is None or self.valid_until is None:
            return False
        slack = timedelta(seconds=_APPROVAL_SLACK_SECONDS)
        return self.valid_from <= when < self.valid_until + slack


class _Ended(OrderedDict[str, tuple[int, str]]):
    """What ended (id -> the line and how), the newest :data:`ENDED_CAP` only."""

    def add(self, key: str, line: int, how: str) -> None:
        self[key] = (line, how)
        self.move_to_end(key)
        if len(self) > ENDED_CAP:
            self.popitem(last=False)


class RulesChecker:
    """The compliance rules over entries fed in ``seq`` order (:meth:`feed`), then
    :meth:`report`. ``vocabulary``: the exchange's purpose hierarchy (default: the shipped
    one), for whether a grant's or consent's purpose covers the purpose of a use."""

    def __init__(
        self, vocabulary: PurposeVocabulary | None = None, *, max_faults: int = MAX_FAULTS
    ) -> None:
        self.vocabulary = vocabulary or PurposeVocabulary.load_default()
        self.max_faults = max_faults
        self.faults: list[RuleFault] = []
        self.omitted = 0
        self.entries = 0
        self.suspended_principals: dict[str, int] = {}
        self.suspended_zones: dict[str, int] = {}
        self.requests: dict[str, str] = {}  # pending request -> its zone
        self.grants: dict[str, _Grant] = {}
        self.ended_grants = _Ended()
        self.consents: dict[str, _Consent] = {}
        self.ended_consents = _Ended()
        self.live_consents: dict[tuple[str, str], int] = {}  # (zone, consumer) -> count
        self.sessions: dict[str, tuple[int, str, str, str]] = {}  # line, actor, zone, dataset
        self.ended_sessions = _Ended()
        self.tasks: dict[str, tuple[int, str, str]] = {}  # line, actor, zone
        self.ended_tasks = _Ended()
        self.budgets: dict[tuple[str, str], tuple[Decimal | None, int | None, int]] = {}
        self.windows: dict[tuple[str, str, str], _Window] = {}
        # cross-border: who is where, whose zone, the operator's approvals, and the release
        # whose decisions must follow it (in the same transaction, so on the next lines)
        self.jurisdictions: dict[str, str] = {}
        self.zone_owners: dict[str, str] = {}
        self.approvals: dict[str, _Approval] = {}
        self.abroad: _Abroad | None = None

    # -- the pass -----------------------------------------------------------------------

    def fault(self, line: int, kind: RuleFaultKind, message: str) -> None:
        if len(self.faults) < self.max_faults:
            self.faults.append(RuleFault(line, kind, message))
        else:
            self.omitted += 1

    def report(self) -> RulesReport:
        self._close_abroad()
        return RulesReport(self.entries, tuple(self.faults), self.omitted)

    def feed(self, entry: Mapping[str, Any], line: int) -> None:
        """Check one entry (a verified ledger entry, parsed) at ``line`` and take in what it
        records."""
        self.entries += 1
        kind = str(entry["kind"])
        actor = str(entry["actor"])
        refs: Mapping[str, str] = entry["refs"]
        attrs: Mapping[str, str | int] = entry["attrs"]
        when = _time(entry["time"])
        if self.entries % _SWEEP_EVERY == 0 and when is not None:
            self._sweep(when)
        if self.abroad is not None and kind != "xborder.decision":
            self._close_abroad()
        if kind.startswith("computation."):
            self._suspension(line, kind, actor, refs, attrs)
            self._computation(line, kind, actor, refs, attrs, when)
            self._release_abroad(line, kind, actor, refs)
            return
        if kind == "xborder.decision":
            self._xborder_decision(line, actor, refs, attrs, when)
            return
        if kind in _ACTS:
            self._suspension(line, kind, actor, refs, attrs)
        handler = _HANDLERS.get(kind)
        if handler is not None:
            handler(self, line, actor, refs, attrs)
        elif kind in _PSI_END:
            session = refs.get("session", "")
            if self.sessions.pop(session, None) is not None:
                self.ended_sessions.add(session, line, kind.rsplit("_", 1)[1])
        elif kind in _TASK_END:
            task = refs.get("task", "")
            if self.tasks.pop(task, None) is not None:
                self.ended_tasks.add(task, line, kind.split(".", 1)[1])

    def _sweep(self, now: datetime) -> None:
        for gid in [g for g, v in self.grants.items() if v.expires is not None and v.expires < now]:
            self.ended_grants.add(gid, self.grants.pop(gid).line, "expired")
        for cid in [
            c for c, v in self.consents.items() if v.expires is not None and v.expires < now
        ]:
            self._drop_consent(cid, self.consents[cid].line, "expired")

    # -- suspensions ----------------------------------------------------------------------

    def _suspension(
        self,
        line: int,
        kind: str,
        actor: str,
        refs: Mapping[str, str],
        attrs: Mapping[str, str | int],
    ) -> None:
        since = self.suspended_principals.get(actor)
        if since is not None:
            self.fault(
                line,
                RuleFaultKind.ACTION_WHILE_SUSPENDED,
                f"{kind} by principal {actor[:16]}… suspended on line {since}",
            )
        if kind == "grant.created":
            consumer = refs.get("consumer", "")
            since = self.suspended_principals.get(consumer)
            if since is not None:
                self.fault(
                    line,
                    RuleFaultKind.ACTION_WHILE_SUSPENDED,
                    f"grant for principal {consumer[:16]}… suspended on line {since}",
                )
        zones: list[str] = []
        if kind.startswith("computation."):
            zones = _split(refs.get("zone"))
        elif kind in _ZONE_ACTS:
            zone = refs.get("zone") or self.requests.get(refs.get("request", ""))
            zones = [zone] if zone else []
        elif kind == "access.approved_by_provider":
            zone = self.requests.get(refs.get("request", ""))
            zones = [zone] if zone else []
        for zone in zones:
            since = self.suspended_zones.get(zone)
            if since is not None:
                self.fault(
                    line,
                    RuleFaultKind.ACTION_WHILE_SUSPENDED,
                    f"{kind} on zone {zone} suspended on line {since}",
                )

    def _principal_suspended(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        self.suspended_principals.setdefault(refs.get("principal", ""), line)

    def _principal_reinstated(
        self, line: int, actor: str, refs: Mapping[str, str], _a: Any
    ) -> None:
        self.suspended_principals.pop(refs.get("principal", ""), None)

    def _zone_suspended(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        self.suspended_zones.setdefault(refs.get("zone", ""), line)

    def _zone_reinstated(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        self.suspended_zones.pop(refs.get("zone", ""), None)

    # -- requests, grants, consents, sessions, tasks, rules ------------------------------

    def _requested(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        if "request" in refs and "zone" in refs:
            self.requests[refs["request"]] = refs["zone"]

    def _decided(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        self.requests.pop(refs.get("request", ""), None)

    def _grant_created(
        self, line: int, actor: str, refs: Mapping[str, str], attrs: Mapping[str, str | int]
    ) -> None:
        request_zone = self.requests.pop(refs.get("request", ""), None)
        grant = refs.get("grant")
        if not grant:
            return
        self.grants[grant] = _Grant(
            line=line,
            consumer=refs.get("consumer", ""),
            zone=refs.get("zone") or request_zone,
            datasets=frozenset(_split(attrs.get("datasets"))),
            operations=frozenset(_split(attrs.get("operations"))),
            purpose=str(attrs.get("purpose", "")),
            expires=_time(attrs.get("expires")),
        )

    def _grant_revoked(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        grant = refs.get("grant", "")
        if self.grants.pop(grant, None) is not None:
            self.ended_grants.add(grant, line, "revoked")

    def _consent_recorded(
        self, line: int, actor: str, refs: Mapping[str, str], attrs: Mapping[str, str | int]
    ) -> None:
        consent = refs.get("consent")
        if not consent:
            return
        c = _Consent(
            line=line,
            zone=refs.get("zone", ""),
            consumer=refs.get("consumer", ""),
            purpose=str(attrs.get("purpose", "")),
            expires=_time(attrs.get("expires")),
        )
        self.consents[consent] = c
        key = (c.zone, c.consumer)
        self.live_consents[key] = self.live_consents.get(key, 0) + 1

    def _drop_consent(self, consent: str, line: int, how: str) -> None:
        c = self.consents.pop(consent, None)
        if c is None:
            return
        self.ended_consents.add(consent, line, how)
        key = (c.zone, c.consumer)
        left = self.live_consents.get(key, 1) - 1
        if left > 0:
            self.live_consents[key] = left
        else:
            self.live_consents.pop(key, None)

    def _consent_withdrawn(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        self._drop_consent(refs.get("consent", ""), line, "withdrawn")

    def _session_opened(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        if "session" in refs:
            self.sessions[refs["session"]] = (
                line,
                actor,
                refs.get("zone", ""),
                refs.get("dataset", ""),
            )

    def _task_authorized(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        if "task" in refs:
            self.tasks[refs["task"]] = (line, actor, refs.get("zone", ""))

    def _rules_set(
        self, line: int, actor: str, refs: Mapping[str, str], attrs: Mapping[str, str | int]
    ) -> None:
        key = (refs.get("zone", ""), refs.get("dataset", ""))
        refresh = attrs.get("refresh_seconds")
        self.budgets[key] = (
            _decimal(attrs.get("epsilon_budget")),
            refresh if isinstance(refresh, int) and refresh > 0 else None,
            line,
        )

    # -- computations ---------------------------------------------------------------------

    def _covered(self, requested: str, granted: str) -> bool:
        try:
            return self.vocabulary.is_within(requested, granted)
        except UnknownPurposeError:
            return requested == granted

    def _check_grant(
        self,
        line: int,
        kind: str,
        actor: str,
        zone: str,
        dataset: str,
        grant_id: str,
        attrs: Mapping[str, str | int],
        when: datetime | None,
    ) -> None:
        what = f"{kind} on {zone}/{dataset}"
        grant = self.grants.get(grant_id)
        if grant is None:
            ended = self.ended_grants.get(grant_id)
            if ended is not None and ended[1] == "revoked":
                self.fault(
                    line,
                    RuleFaultKind.GRANT_REVOKED,
                    f"{what} under grant {grant_id} revoked on line {ended[0]}",
                )
            elif ended is not None:
                self.fault(
                    line,
                    RuleFaultKind.GRANT_EXPIRED,
                    f"{what} under grant {grant_id} (line {ended[0]}), expired before",
                )
            else:
                named = f"grant {grant_id!r}" if grant_id else "no grant"
                self.fault(
                    line,
                    RuleFaultKind.COMPUTATION_WITHOUT_GRANT,
                    f"{what} names {named}, not created on an earlier line",
                )
            return
        operation = str(attrs.get("operation", ""))
        purpose = str(attrs.get("purpose", ""))
        wrong = []
        if grant.consumer != actor:
            wrong.append(f"consumer {actor[:16]}…")
        if grant.zone is not None and grant.zone != zone:
            wrong.append(f"zone {zone}")
        if dataset not in grant.datasets:
            wrong.append(f"dataset {dataset}")
        if operation not in grant.operations:
            wrong.append(f"operation {operation or '(none)'}")
        if not self._covered(purpose, grant.purpose):
            wrong.append(f"purpose {purpose or '(none)'}")
        if wrong:
            self.fault(
                line,
                RuleFaultKind.GRANT_MISMATCH,
                f"{what}: grant {grant_id} (line {grant.line}) does not cover " + ", ".join(wrong),
            )
        if grant.expires is not None and when is not None and when >= grant.expires:
            self.fault(
                line,
                RuleFaultKind.GRANT_EXPIRED,
                f"{what} under grant {grant_id} (line {grant.line}), expired at "
                f"{grant.expires.isoformat()}",
            )

    def _granted_pairs(
        self, refs: Mapping[str, str], attrs: Mapping[str, str | int]
    ) -> list[tuple[str, str, str]]:
        """(zone, dataset, grant) for every dataset the computation read."""
        pairs = []
        for key, value in attrs.items():
            if key.startswith("rule.") and key.count(".") == 2:
                _, zone, dataset = key.split(".")
                pairs.append((zone, dataset, str(value)))
        if pairs:
            return sorted(pairs)
        zones = _split(refs.get("zone"))
        datasets = _split(refs.get("dataset"))
        zone = zones[0] if len(zones) == 1 else ",".join(zones)
        rule = str(attrs.get("rule", ""))
        return [(zone, d, rule) for d in datasets] or [(zone, "-", rule)]

    def _computation(
        self,
        line: int,
        kind: str,
        actor: str,
        refs: Mapping[str, str],
        attrs: Mapping[str, str | int],
        when: datetime | None,
    ) -> None:
        pairs = self._granted_pairs(refs, attrs)
        for zone, dataset, grant in pairs:
            self._check_grant(line, kind, actor, zone, dataset, grant, attrs, when)
        if kind.startswith("computation.psi_"):
            self._psi_release(line, kind, actor, refs)
        for key, value in attrs.items():
            if key == "node_task" or key.startswith("node_task."):
                zone = key[len("node_task.") :] if "." in key else refs.get("zone", "")
                self._task_release(line, kind, actor, zone, str(value))
        self._budget(line, kind, actor, attrs, pairs, when)
        if "consent_ids" in attrs or "consent_count" in attrs:
            self._consents(line, kind, actor, refs, attrs, when)

    def _psi_release(self, line: int, kind: str, actor: str, refs: Mapping[str, str]) -> None:
        session = refs.get("session", "")
        opened = self.sessions.pop(session, None)
        if opened is None:
            ended = self.ended_sessions.get(session)
            why = (
                "opened on no earlier line"
                if ended is None
                else f"already {ended[1]} on line {ended[0]}"
            )
            self.fault(
                line,
                RuleFaultKind.RELEASE_WITHOUT_OPENING,
                f"{kind} releases session {session or '(none)'}, {why}",
            )
            return
        self.ended_sessions.add(session, line, "released")
        at, opener, zone, dataset = opened
        if (opener, zone, dataset) != (actor, refs.get("zone", ""), refs.get("dataset", "")):
            self.fault(
                line,
                RuleFaultKind.RELEASE_WITHOUT_OPENING,
                f"{kind} releases session {session}, opened on line {at} by another consumer "
                "or on another dataset",
            )

    def _task_release(self, line: int, kind: str, actor: str, zone: str, task: str) -> None:
        authorized = self.tasks.pop(task, None)
        if authorized is None:
            ended = self.ended_tasks.get(task)
            why = (
                "authorized on no earlier line"
                if ended is None
                else f"{ended[1]} on line {ended[0]}"
            )
            self.fault(
                line, RuleFaultKind.RELEASE_WITHOUT_TASK, f"{kind} cites node task {task}, {why}"
            )
            return
        self.ended_tasks.add(task, line, "released")
        at, consumer, task_zone = authorized
        if (consumer, task_zone) != (actor, zone):
            self.fault(
                line,
                RuleFaultKind.RELEASE_WITHOUT_TASK,
                f"{kind} cites node task {task}, authorized on line {at} for another consumer "
                "or zone",
            )

    def _budget(
        self,
        line: int,
        kind: str,
        actor: str,
        attrs: Mapping[str, str | int],
        pairs: list[tuple[str, str, str]],
        when: datetime | None,
    ) -> None:
        recorded = {
            key[len("spent.") :]: value for key, value in attrs.items() if key.startswith("spent.")
        }
        raw = attrs.get("epsilon")
        epsilon = Decimal(0) if raw is None else _decimal(raw)
        if epsilon is None or epsilon < 0:
            self.fault(line, RuleFaultKind.BUDGET_MISMATCH, f"{kind}: ε {raw!r} is not a charge")
            return
        if recorded:
            charged = sorted(recorded)
        elif epsilon > 0:
            charged = sorted({f"{z}/{d}" for z, d, _ in pairs if "," not in z and d != "-"})
        else:
            return
        for name in charged:
            zone, _, dataset = name.partition("/")
            budget, refresh, _at = self.budgets.get(
                (zone, dataset), (DEFAULT_EPSILON_BUDGET, DEFAULT_REFRESH_SECONDS, 0)
            )
            start = attrs.get(f"window.{name}")
            if not isinstance(start, str):
                if refresh is None or when is None:
                    continue  # a window the ledger does not say and rules that do not either
                ts = int(when.timestamp())
                start = _format_window(datetime.fromtimestamp(ts - ts % refresh, UTC))
            key = (actor, zone, dataset)
            window = self.windows.get(key)
            if window is None or window.start != start:
                window = self.windows[key] = _Window(start, Decimal(0))
            window.spent += epsilon
            where = f"{kind}: {name} for consumer {actor[:16]}…, window from {start}"
            if name in recorded:
                says = _decimal(recorded[name])
                if says != window.spent:
                    self.fault(
                        line,
                        RuleFaultKind.BUDGET_MISMATCH,
                        f"{where}: the entry records {recorded[name]} spent, the releases "
                        f"add up to {_plain(window.spent)}",
                    )
                    if says is not None:
                        window.spent = says  # go on from what the exchange recorded
            if budget is not None and window.spent > budget:
                self.fault(
                    line,
                    RuleFaultKind.BUDGET_EXCEEDED,
                    f"{where}: {_plain(window.spent)} spent, over the budget {_plain(budget)}",
                )

    def _consents(
        self,
        line: int,
        kind: str,
        actor: str,
        refs: Mapping[str, str],
        attrs: Mapping[str, str | int],
        when: datetime | None,
    ) -> None:
        zone = refs.get("zone", "")
        purpose = str(attrs.get("purpose", ""))
        cited = _split(attrs.get("consent_ids"))
        if "consent_ids" not in attrs:
            count = attrs.get("consent_count")
            live = self.live_consents.get((zone, actor), 0)
            if isinstance(count, int) and count > live:
                self.fault(
                    line,
                    RuleFaultKind.CONSENT_NOT_LIVE,
                    f"{kind} used {count} consents on zone {zone}; the consumer has {live} live",
                )
            return
        for consent in cited:
            c = self.consents.get(consent)
            if c is None:
                ended = self.ended_consents.get(consent)
                why = (
                    "recorded on no earlier line"
                    if ended is None
                    else f"{ended[1]} on line {ended[0]}"
                )
                self.fault(
                    line, RuleFaultKind.CONSENT_NOT_LIVE, f"{kind} cites consent {consent}, {why}"
                )
                continue
            wrong = []
            if c.zone != zone:
                wrong.append(f"zone {zone}")
            if c.consumer != actor:
                wrong.append(f"consumer {actor[:16]}…")
            if not self._covered(purpose, c.purpose):
                wrong.append(f"purpose {purpose or '(none)'}")
            if c.expires is not None and when is not None and when >= c.expires:
                wrong.append(f"time (it expired at {c.expires.isoformat()})")
            if wrong:
                self.fault(
                    line,
                    RuleFaultKind.CONSENT_NOT_LIVE,
                    f"{kind} cites consent {consent} (line {c.line}), which does not cover "
                    + ", ".join(wrong),
                )

    # -- cross-border flows ---------------------------------------------------------------

    def _registered(
        self, line: int, actor: str, refs: Mapping[str, str], attrs: Mapping[str, str | int]
    ) -> None:
        where = attrs.get("jurisdiction")
        if isinstance(where, str) and "principal" in refs:
            self.jurisdictions[refs["principal"]] = where

    def _zone_created(self, line: int, actor: str, refs: Mapping[str, str], _a: Any) -> None:
        if "zone" in refs:
            self.zone_owners[refs["zone"]] = actor

    def _approval_recorded(
        self, line: int, actor: str, refs: Mapping[str, str], attrs: Mapping[str, str | int]
    ) -> None:
        if "approval" in refs:
            self.approvals[refs["approval"]] = _Approval(
                line,
                refs.get("provider", ""),
                str(attrs.get("document", "")),
                _time(attrs.get("valid_from")),
                _time(attrs.get("valid_until")),
            )

    def _release_abroad(self, line: int, kind: str, actor: str, refs: Mapping[str, str]) -> None:
        """A computation for a consumer in another jurisdiction than a zone it read: that
        zone's ``xborder.decision`` must follow it. Principals registered before jurisdictions
        were ledgered have none on the ledger: their releases are not checked."""
        there = self.jurisdictions.get(actor)
        if there is None:
            return
        zones = []
        for zone in _split(refs.get("zone")):
            here = self.jurisdictions.get(self.zone_owners.get(zone, ""))
            if here is not None and here != there:
                zones.append(zone)
        if zones:
            self.abroad = _Abroad(line, kind, actor, set(zones))

    def _close_abroad(self) -> None:
        pending, self.abroad = self.abroad, None
        if pending is not None and pending.missing:
            self.fault(
                pending.line,
                RuleFaultKind.XBORDER_WITHOUT_DECISION,
                f"{pending.kind} releases to a consumer abroad with no cross-border decision "
                f"for zone {', '.join(sorted(pending.missing))}",
            )

    def _xborder_decision(
        self,
        line: int,
        actor: str,
        refs: Mapping[str, str],
        attrs: Mapping[str, str | int],
        when: datetime | None,
    ) -> None:
        pending, zone = self.abroad, refs.get("zone", "")
        if pending is None or pending.actor != actor or zone not in pending.missing:
            return  # a refusal ledgered alone: nothing was released
        pending.missing.discard(zone)
        decision = str(attrs.get("decision", ""))
        try:
            outcome = Outcome(decision)
        except ValueError:
            outcome = Outcome.REFUSE
        if outcome is Outcome.REFUSE:
            self.fault(
                line,
                RuleFaultKind.XBORDER_REFUSED_RELEASED,
                f"{pending.kind} on line {pending.line} was released although its cross-border "
                f"decision for zone {zone} is {decision or '(none)'}",
            )
            return
        if outcome is Outcome.EXEMPT:
            return
        needed = {d.value for d in documents_for(outcome)}
        cited = refs.get("approval")
        approval = None if cited is None else self.approvals.get(cited)
        why = None
        if approval is None:
            why = (
                "cites no approval"
                if cited is None
                else f"cites approval {cited}, recorded on no earlier line"
            )
        elif approval.provider != refs.get("provider", ""):
            why = f"cites approval {cited} (line {approval.line}) for another provider"
        elif approval.document not in needed:
            wanted = " or ".join(sorted(needed))
            why = f"cites a {approval.document} (line {approval.line}); it needs {wanted}"
        elif not approval.live(when):
            at = "an unknown time" if when is None else _format_window(when)
            why = f"cites approval {cited} (line {approval.line}), not valid at {at}"
        if why is not None:
            self.fault(
                line,
                RuleFaultKind.XBORDER_WITHOUT_APPROVAL,
                f"{pending.kind} on line {pending.line} needs a {decision} abroad and {why}",
            )


_HANDLERS: dict[str, Any] = {
    "principal.suspended": RulesChecker._principal_suspended,
    "principal.reinstated": RulesChecker._principal_reinstated,
    "zone.suspended": RulesChecker._zone_suspended,
    "zone.reinstated": RulesChecker._zone_reinstated,
    "access.requested": RulesChecker._requested,
    "access.rejected": RulesChecker._decided,
    "access.withdrawn": RulesChecker._decided,
    "grant.created": RulesChecker._grant_created,
    "grant.revoked": RulesChecker._grant_revoked,
    "consent.recorded": RulesChecker._consent_recorded,
    "consent.withdrawn": RulesChecker._consent_withdrawn,
    "psi.session_opened": RulesChecker._session_opened,
    "task.authorized": RulesChecker._task_authorized,
    "analysis.rules_set": RulesChecker._rules_set,
    "principal.registered": RulesChecker._registered,
    "zone.created": RulesChecker._zone_created,
    "xborder.approval_recorded": RulesChecker._approval_recorded,
}


def check_rules(
    lines: Iterable[bytes],
    *,
    vocabulary: PurposeVocabulary | None = None,
    max_faults: int = MAX_FAULTS,
) -> RulesReport:
    """Check the compliance rules over a verified bundle's lines (entries first; the
    checkpoint lines that follow end the pass). Lists up to ``max_faults`` faults in line
    order and counts the rest."""
    checker = RulesChecker(vocabulary, max_faults=max_faults)
    for number, raw in enumerate(lines, start=1):
        entry = json.loads(raw)
        if not isinstance(entry, dict) or "checkpoint" in entry:
            break
        checker.feed(entry, number)
    return checker.report()
