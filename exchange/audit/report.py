"""Monthly and quarterly reports (月报季评): measures of a period, computed from ledger entries.

A report is a pure function of the entries of a verified bundle and a period: the same entries
and period give the same :class:`Report`, whose canonical JSON (RFC 8785,
:meth:`Report.canonical`) and CSV (:meth:`Report.to_csv`) are byte-identical on every run.
Anyone who holds the bundle can recompute it (``zonex report verify``).

:func:`compute_report` reads entries once, in ledger order, keeping only what later entries
refer back to (each access request's zone and time, each grant's terms, each incident's
detector), so memory grows with the number of requests, grants and incidents, not entries.
Entries before the period are read for those references; entries after it only to see whether
a grant that expires in the period was revoked first. :func:`report_from_bundle` verifies a
bundle file first and computes over its first ``size`` entries, recording their Merkle root.

Every measure is a row of :class:`Measure`: the measure's name, the month (``YYYY-MM``), the
dimensions that apply to it (zone, level, purpose, consumer: empty where they do not), a key
(the computation kind, the denial reason, ...) and a value (a decimal string). What each
measure counts, and what the ledger does and does not evidence, is in ``docs/reports.md``.
Kinds that a ledger may not hold (incidents, cross-border decisions, published reports) are
counted when present and simply absent otherwise.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import os
import re
import statistics
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from hashlib import sha256
from typing import Any

from crypto.canonical import canonicalize
from crypto.merkle import CompactRange
from crypto.note import NoteVerifier
from exchange.audit import AuditError, check_bundle, read_bundle_lines
from exchange.audit.rules import DEFAULT_EPSILON_BUDGET

__all__ = [
    "CSV_COLUMNS",
    "MEASURES",
    "NOTES",
    "REPORT_TYPE",
    "Measure",
    "Period",
    "PeriodError",
    "Report",
    "compute_report",
    "first_difference",
    "parse_period",
    "report_from_bundle",
]

REPORT_TYPE = "zonex.report.v1"
CSV_COLUMNS = (
    "period",
    "measure",
    "zone",
    "level",
    "purpose",
    "consumer",
    "kind_or_reason",
    "value",
)

#: every measure, in the order rows are sorted and shown: name -> what its key holds
MEASURES: dict[str, str] = {
    "computations": "kind",
    "epsilon.spent": "",
    "epsilon.left": "dataset",
    "denials.policy": "reason",
    "denials.authentication": "reason",
    "denials.refused": "code/reason",
    "psi.sessions": "mode",
    "psi.ids_sent": "mode",
    "psi.ids_sent.max": "mode",
    "psi.provider_ids.max": "kind",
    "psi.sessions_ended": "state",
    "scorings": "outcome",
    "scorings.entities": "",
    "grants.opened": "",
    "grants.revoked": "",
    "grants.expired": "",
    "approval.latency.count": "",
    "approval.latency.median_ms": "",
    "approval.latency.max_ms": "",
    "suspensions": "subject",
    "reinstatements": "subject",
    "throttles": "",
    "incidents.opened": "detector/response",
    "incidents.labelled": "detector/label",
    "xborder.decisions": "decision/basis",
    "xborder.approvals": "document",
    "reports.published": "period",
}
_ORDER = {name: i for i, name in enumerate(MEASURES)}

#: notes a report carries about what its ledger does not evidence
NOTES: dict[str, str] = {
    "epsilon_budget_not_on_ledger": (
        "some releases carry no window total (spent.<zone>/<dataset>) or charge a dataset "
        "whose analysis rules on the ledger state no epsilon_budget (entries written before "
        "these were recorded): for them epsilon is reported as spent only, not as left"
    ),
    "psi_epsilon_not_on_ledger": (
        "PSI computation entries carry no epsilon attribute: epsilon.spent counts the "
        "computations whose entries do"
    ),
}

_MAX_SAFE = 2**53 - 1


class PeriodError(ValueError):
    """A period that is neither a month ``YYYY-MM`` nor a quarter ``YYYYQn``."""


@dataclass(frozen=True)
class Period:
    """A calendar month or quarter in UTC: entries with ``start <= time < end``."""

    label: str
    kind: str  # "month" or "quarter"
    start: datetime.datetime
    end: datetime.datetime

    @property
    def months(self) -> tuple[str, ...]:
        """The period's months as ``YYYY-MM``."""
        first = self.start.year * 12 + self.start.month - 1
        last = self.end.year * 12 + self.end.month - 1
        return tuple(f"{m // 12:04d}-{m % 12 + 1:02d}" for m in range(first, last))

    @property
    def start_time(self) -> str:
        """``start`` as an entry's time string (entries compare as strings)."""
        return _entry_time(self.start)

    @property
    def end_time(self) -> str:
        return _entry_time(self.end)


_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])").fullmatch
_QUARTER = re.compile(r"([0-9]{4})Q([1-4])").fullmatch


def _month_start(year: int, month: int) -> datetime.datetime:
    year, month = year + (month - 1) // 12, (month - 1) % 12 + 1
    return datetime.datetime(year, month, 1, tzinfo=datetime.UTC)


def parse_period(text: str) -> Period:
    """``2026-11`` (a month) or ``2026Q4`` (a quarter); :class:`PeriodError` otherwise."""
    text = text.strip()
    month, quarter = _MONTH(text), _QUARTER(text)
    if month is not None and int(month[1]) >= 1:
        year, m = int(month[1]), int(month[2])
        return Period(text, "month", _month_start(year, m), _month_start(year, m + 1))
    if quarter is not None and int(quarter[1]) >= 1:
        year, q = int(quarter[1]), int(quarter[2])
        first = 3 * (q - 1) + 1
        return Period(text, "quarter", _month_start(year, first), _month_start(year, first + 3))
    raise PeriodError(
        f"period {text!r}: give a month as YYYY-MM (e.g. 2026-11) or a quarter as YYYYQn "
        "(e.g. 2026Q4)"
    )


def _entry_time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@dataclass(frozen=True, order=True)
class Measure:
    """One row of a report: a measure's value for one month and one set of dimensions."""

    period: str
    measure: str
    zone: str
    level: str
    purpose: str
    consumer: str
    key: str
    value: str

    def to_json(self) -> dict[str, str]:
        return {
            "period": self.period,
            "measure": self.measure,
            "zone": self.zone,
            "level": self.level,
            "purpose": self.purpose,
            "consumer": self.consumer,
            "key": self.key,
            "value": self.value,
        }


def _sort_key(m: Measure) -> tuple[str, int, str, str, str, str, str]:
    return (m.period, _ORDER[m.measure], m.zone, m.level, m.purpose, m.consumer, m.key)


@dataclass(frozen=True)
class Report:
    """The measures of one period over one sequence of entries."""

    period: Period
    rows: tuple[Measure, ...]
    #: entries read (the bundle's size when computed from a whole bundle)
    entries: int
    #: entries whose time falls in the period, and the first and last of their ``seq``
    entries_in_period: int
    first_seq: int | None
    last_seq: int | None
    notes: tuple[str, ...] = ()
    #: hex Merkle root of the entries read, when computed from a bundle (report_from_bundle)
    bundle_root: str | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        """The canonical measures: what ``report.json`` holds and a publication signs."""
        doc: dict[str, Any] = {
            "type": REPORT_TYPE,
            "period": self.period.label,
            "start": self.period.start_time,
            "end": self.period.end_time,
            "bundle_size": self.entries,
            "entries_in_period": self.entries_in_period,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "notes": list(self.notes),
            "measures": [m.to_json() for m in self.rows],
        }
        if self.bundle_root is not None:
            doc["bundle_root"] = self.bundle_root
        return doc

    def canonical(self) -> bytes:
        """RFC 8785 bytes of :meth:`to_json` (``report.json``)."""
        return canonicalize(self.to_json())

    def digest(self) -> str:
        """Lowercase hex SHA-256 of :meth:`canonical`: what ``report.published`` records."""
        return sha256(self.canonical()).hexdigest()

    def to_csv(self) -> str:
        """One row per measure, in the order of :attr:`rows` (``report.csv``)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        for m in self.rows:
            writer.writerow(
                (m.period, m.measure, m.zone, m.level, m.purpose, m.consumer, m.key, m.value)
            )
        return buffer.getvalue()

    def select(self, measure: str, **where: str) -> list[Measure]:
        """The rows of ``measure`` whose fields equal ``where`` (e.g. ``zone="tax"``)."""
        return [
            m
            for m in self.rows
            if m.measure == measure and all(getattr(m, k) == v for k, v in where.items())
        ]

    def total(self, measure: str, **where: str) -> Decimal:
        """The sum of the values of :meth:`select` (for counts and sums, not medians)."""
        return sum((Decimal(m.value) for m in self.select(measure, **where)), Decimal(0))


# -- computing -------------------------------------------------------------------------------


#: measure, month, zone, level, purpose, consumer, key
_Key = tuple[str, str, str, str, str, str, str]


def _s(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _int(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value <= _MAX_SAFE else None


def _decimal(value: Any) -> Decimal | None:
    if not isinstance(value, str):
        return None
    try:
        number = Decimal(value)
    except InvalidOperation:
        return None
    return number if number.is_finite() and number >= 0 else None


def _moment(value: Any) -> datetime.datetime | None:
    """An RFC 3339 time from an attribute; None if it is not one (or has no time zone)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        return None
    return None if moment.tzinfo is None else moment.astimezone(datetime.UTC)


def _from_entry_time(time: str) -> datetime.datetime:
    return datetime.datetime.strptime(time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)


def _key(measure: str, month: str, dims: Mapping[str, str]) -> _Key:
    return (
        measure,
        month,
        dims.get("zone", ""),
        dims.get("level", ""),
        dims.get("purpose", ""),
        dims.get("consumer", ""),
        dims.get("key", ""),
    )


@dataclass
class _Grant:
    zone: str
    purpose: str
    consumer: str
    expires: datetime.datetime | None
    revoked: str | None = None  # the time of its grant.revoked entry


class _Tally:
    """The running state of :func:`compute_report`."""

    def __init__(self, period: Period) -> None:
        self.period = period
        self.start, self.end = period.start_time, period.end_time
        self.sums: dict[_Key, Decimal] = {}
        self.maxima: dict[_Key, int] = {}
        self.latencies: dict[tuple[str, str, str], list[int]] = {}
        self.requests: dict[str, tuple[str, str]] = {}  # request id -> (zone, time)
        self.grants: dict[str, _Grant] = {}
        self.incidents: dict[str, str] = {}  # incident id -> detector
        #: (zone, dataset) -> the epsilon budget its latest analysis rules state (None: unstated)
        self.budgets: dict[tuple[str, str], Decimal | None] = {}
        #: (month, zone, consumer, dataset) -> epsilon left after the month's last charge
        self.left: dict[tuple[str, str, str, str], Decimal] = {}
        self.entries = 0
        self.in_period = 0
        self.first_seq: int | None = None
        self.last_seq: int | None = None
        self.last_time = ""
        self.notes: set[str] = set()

    def add(self, measure: str, month: str, amount: Decimal | int = 1, /, **dims: str) -> None:
        """Add ``amount`` to the row of ``measure``, ``month`` and ``dims`` (zone, level,
        purpose, consumer, key; empty where not given)."""
        k = _key(measure, month, dims)
        self.sums[k] = self.sums.get(k, Decimal(0)) + amount

    def high(self, measure: str, month: str, value: int, /, **dims: str) -> None:
        """Keep the largest ``value`` seen for the row of ``measure``, ``month`` and ``dims``."""
        k = _key(measure, month, dims)
        if value > self.maxima.get(k, -1):
            self.maxima[k] = value

    # every entry, in ledger order
    def read(self, entry: Mapping[str, Any]) -> None:
        self.entries += 1
        time = _s(entry.get("time"))
        kind = _s(entry.get("kind"))
        refs = entry.get("refs") or {}
        attrs = entry.get("attrs") or {}
        self.last_time = max(self.last_time, time)
        self._remember(kind, time, refs, attrs)
        if not self.start <= time < self.end:
            return
        self.in_period += 1
        seq = _int(entry.get("seq"))
        if seq is not None:
            self.first_seq = seq if self.first_seq is None else self.first_seq
            self.last_seq = seq
        self._count(kind, time[:7], _s(entry.get("actor")), refs, attrs, time)

    def _remember(self, kind: str, time: str, refs: Any, attrs: Any) -> None:
        """What later entries refer back to, whenever it happened."""
        if kind == "access.requested":
            request = _s(refs.get("request"))
            if request:
                self.requests[request] = (_s(refs.get("zone")), time)
        elif kind == "grant.created":
            grant = _s(refs.get("grant"))
            if grant:
                asked = self.requests.get(_s(refs.get("request")), ("", ""))
                zone = _s(refs.get("zone")) or asked[0]
                self.grants[grant] = _Grant(
                    zone,
                    _s(attrs.get("purpose")),
                    _s(refs.get("consumer")),
                    _moment(attrs.get("expires")),
                )
        elif kind == "grant.revoked":
            found = self.grants.get(_s(refs.get("grant")))
            if found is not None and found.revoked is None:
                found.revoked = time
        elif kind == "analysis.rules_set":
            budget_key = (_s(refs.get("zone")), _s(refs.get("dataset")))
            self.budgets[budget_key] = _decimal(attrs.get("epsilon_budget"))
        elif kind == "incident.opened":
            incident = _s(refs.get("incident"))
            if incident:
                self.incidents[incident] = _s(attrs.get("detector")) or "unknown"

    def _count(self, kind: str, month: str, actor: str, refs: Any, attrs: Any, time: str) -> None:
        zone, level = _s(refs.get("zone")), _s(attrs.get("level"))
        purpose = _s(attrs.get("purpose"))
        dims = {"zone": zone, "level": level, "purpose": purpose, "consumer": actor}
        if kind.startswith("computation."):
            computation = kind.removeprefix("computation.")
            self.add("computations", month, key=computation, **dims)
            epsilon = _decimal(attrs.get("epsilon"))
            if epsilon:
                self.add("epsilon.spent", month, epsilon, **dims)
                self._left(month, actor, attrs)
            elif computation.startswith("psi_"):
                self.notes.add("psi_epsilon_not_on_ledger")
            if computation.startswith("psi_"):
                y_count = _int(attrs.get("y_count"))
                if y_count is not None:
                    self.high("psi.provider_ids.max", month, y_count, key=computation, **dims)
            if computation == "he_score":
                self.add("scorings", month, key="released", **dims)
                entities = _int(attrs.get("entities"))
                if entities is not None:
                    self.add("scorings.entities", month, entities, **dims)
        elif kind == "access.denied":
            self.add("denials.policy", month, key=_s(attrs.get("reason")) or "other", **dims)
        elif kind == "request.rejected":
            self.add(
                "denials.authentication",
                month,
                key=_s(attrs.get("reason")) or "other",
                consumer=actor,
            )
        elif kind == "request.rejected.summary":
            for name, count in _counts(attrs):
                self.add("denials.authentication", month, count, key=name)
        elif kind == "request.refused":
            code, reason = _s(attrs.get("code")) or "other", _s(attrs.get("reason")) or "other"
            self.add("denials.refused", month, key=f"{code}/{reason}", consumer=actor)
        elif kind == "request.refused.summary":
            for name, count in _counts(attrs):
                code, _, reason = name.partition(".")
                self.add("denials.refused", month, count, key=f"{code}/{reason or 'other'}")
        elif kind == "psi.session_opened":
            mode = _s(attrs.get("mode")) or "other"
            self.add("psi.sessions", month, key=mode, **dims)
            x_count = _int(attrs.get("x_count"))
            if x_count is not None:
                self.add("psi.ids_sent", month, x_count, key=mode, **dims)
                self.high("psi.ids_sent.max", month, x_count, key=mode, **dims)
        elif kind.startswith("psi.session_"):
            state = kind.removeprefix("psi.session_")
            self.add("psi.sessions_ended", month, zone=zone, consumer=actor, key=state)
        elif kind == "he.score_refused":
            self.add("scorings", month, key="refused", **dims)
        elif kind == "grant.created":
            self._grant_created(month, refs, attrs, time)
        elif kind == "grant.revoked":
            grant = self.grants.get(_s(refs.get("grant")))
            self.add(
                "grants.revoked",
                month,
                zone=zone or ("" if grant is None else grant.zone),
                purpose="" if grant is None else grant.purpose,
                consumer=_s(refs.get("consumer")) or ("" if grant is None else grant.consumer),
            )
        elif kind in ("principal.suspended", "principal.reinstated"):
            by_monitor = kind == "principal.suspended" and bool(_s(refs.get("incident")))
            measure = "suspensions" if kind == "principal.suspended" else "reinstatements"
            subject = "principal/monitor" if by_monitor else "principal"
            self.add(measure, month, consumer=_s(refs.get("principal")), key=subject)
        elif kind in ("zone.suspended", "zone.reinstated"):
            measure = "suspensions" if kind == "zone.suspended" else "reinstatements"
            self.add(measure, month, zone=zone, key="zone")
        elif kind == "principal.throttled":
            self.add("throttles", month, consumer=_s(refs.get("principal")))
        elif kind == "incident.opened":
            detector = _s(attrs.get("detector")) or "unknown"
            response = _s(attrs.get("response")) or "unknown"
            self.add(
                "incidents.opened",
                month,
                zone=zone,
                consumer=_s(refs.get("principal")),
                key=f"{detector}/{response}",
            )
        elif kind == "incident.labelled":
            detector = self.incidents.get(_s(refs.get("incident")), "unknown")
            label = _s(attrs.get("label")) or "unknown"
            self.add("incidents.labelled", month, key=f"{detector}/{label}")
        elif kind == "xborder.decision":
            decision = _s(attrs.get("decision")) or "unknown"
            basis = _s(attrs.get("basis")) or "unknown"
            key = f"{decision}/{basis}"
            self.add("xborder.decisions", month, zone=zone, consumer=actor, key=key)
        elif kind == "xborder.approval_recorded":
            self.add("xborder.approvals", month, key=_s(attrs.get("document")) or "unknown")
        elif kind == "report.published":
            self.add("reports.published", month, key=_s(attrs.get("period")) or "unknown")

    def _left(self, month: str, consumer: str, attrs: Any) -> None:
        """What a charge leaves of each dataset's budget in its window: the budget in force
        (the latest analysis rules', or the default rules' if none were set) less the window's
        total the entry records."""
        charged = False
        for name, value in attrs.items():
            if not name.startswith("spent."):
                continue
            zone, _, dataset = name.removeprefix("spent.").partition("/")
            spent = _decimal(value)
            budget = self.budgets.get((zone, dataset), DEFAULT_EPSILON_BUDGET)
            if spent is None or budget is None:
                self.notes.add("epsilon_budget_not_on_ledger")
                continue
            charged = True
            self.left[(month, zone, consumer, dataset)] = max(Decimal(0), budget - spent)
        if not charged:
            self.notes.add("epsilon_budget_not_on_ledger")

    def _grant_created(self, month: str, refs: Any, attrs: Any, time: str) -> None:
        request = self.requests.get(_s(refs.get("request")))
        zone = _s(refs.get("zone")) or ("" if request is None else request[0])
        purpose, consumer = _s(attrs.get("purpose")), _s(refs.get("consumer"))
        self.add("grants.opened", month, zone=zone, purpose=purpose, consumer=consumer)
        if request is not None and request[1]:
            waited = _from_entry_time(time) - _from_entry_time(request[1])
            ms = waited.days * 86_400_000 + waited.seconds * 1000 + waited.microseconds // 1000
            self.latencies.setdefault((month, zone, purpose), []).append(ms)

    def finish(self) -> Report:
        self._expired()
        rows = [
            Measure(month, measure, zone, level, purpose, consumer, key, _text(value))
            for (measure, month, zone, level, purpose, consumer, key), value in self.sums.items()
        ]
        rows += [
            Measure(month, measure, zone, level, purpose, consumer, key, str(value))
            for (measure, month, zone, level, purpose, consumer, key), value in self.maxima.items()
        ]
        rows += [
            Measure(month, "epsilon.left", zone, "", "", consumer, dataset, _text(value))
            for (month, zone, consumer, dataset), value in self.left.items()
        ]
        for (month, zone, purpose), waits in self.latencies.items():
            dims = (month, zone, "", purpose, "", "")
            median = Decimal(statistics.median_low(waits) + statistics.median_high(waits)) / 2
            for measure, value in (
                ("approval.latency.count", str(len(waits))),
                ("approval.latency.median_ms", _text(median)),
                ("approval.latency.max_ms", str(max(waits))),
            ):
                rows.append(Measure(dims[0], measure, *dims[1:], value))
        rows.sort(key=_sort_key)
        return Report(
            self.period,
            tuple(rows),
            self.entries,
            self.in_period,
            self.first_seq,
            self.last_seq,
            tuple(sorted(self.notes)),
        )

    def _expired(self) -> None:
        """Grants whose ``expires`` falls in the period, up to the last entry's time (a later
        expiry has not happened yet as far as the ledger shows), unless revoked before."""
        if not self.last_time:
            return
        horizon = min(self.period.end, _from_entry_time(self.last_time))
        for grant in self.grants.values():
            expires = grant.expires
            if expires is None or not self.period.start <= expires < self.period.end:
                continue
            if expires > horizon:
                continue
            if grant.revoked is not None and _from_entry_time(grant.revoked) < expires:
                continue
            self.add(
                "grants.expired",
                _entry_time(expires)[:7],
                zone=grant.zone,
                purpose=grant.purpose,
                consumer=grant.consumer,
            )


def _counts(attrs: Any) -> Iterator[tuple[str, int]]:
    """``count.<name>`` attributes of a summary entry, as (name, count)."""
    for name, value in sorted(attrs.items()):
        count = _int(value)
        if name.startswith("count.") and count is not None:
            yield name.removeprefix("count."), count


def _text(value: Decimal) -> str:
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "0") else text


def compute_report(entries: Iterable[Mapping[str, Any]], period: Period) -> Report:
    """The measures of ``period`` over ``entries`` (parsed ledger entries, in ledger order,
    from a bundle that verified). Reads them once."""
    tally = _Tally(period)
    for entry in entries:
        tally.read(entry)
    return tally.finish()


def report_from_bundle(
    path: str | os.PathLike[str],
    log: NoteVerifier,
    period: Period,
    *,
    size: int | None = None,
    trusted: str | None = None,
    jobs: int | None = None,
) -> Report:
    """Verify the bundle file (:class:`~exchange.audit.AuditError` if it does not), then
    compute the report of ``period`` over its first ``size`` entries (default: all), with
    their Merkle root as :attr:`Report.bundle_root`."""
    audit = check_bundle(read_bundle_lines(path), log, trusted, jobs=jobs)
    if audit.fault is not None:
        raise AuditError(audit.fault)
    if size is None:
        size = audit.entries
    if not 0 <= size <= audit.entries:
        raise ValueError(f"the bundle holds {audit.entries} entries, not {size}")
    tree = CompactRange()

    def entries() -> Iterator[dict[str, Any]]:
        for n, line in enumerate(read_bundle_lines(path)):
            if n >= size:
                return
            tree.append(sha256(b"\x00" + line).digest())
            yield json.loads(line)

    report = compute_report(entries(), period)
    return replace(report, bundle_root=tree.root().hex())


def first_difference(given: Mapping[str, Any], recomputed: Mapping[str, Any]) -> str | None:
    """The first place where a report document (``report.json`` as parsed) differs from the
    recomputed one (:meth:`Report.to_json`), in words; None if they are equal."""
    for name in recomputed:
        if name != "measures" and given.get(name) != recomputed[name]:
            return f"{name}: {given.get(name)!r} in the file, {recomputed[name]!r} recomputed"
    extra = sorted(set(given) - set(recomputed))
    if extra:
        return f"{extra[0]}: in the file, not in the recomputed report"
    mine = given.get("measures")
    theirs = recomputed["measures"]
    if not isinstance(mine, list):
        return "measures: not a list in the file"
    for i, (a, b) in enumerate(zip(mine, theirs, strict=False)):
        if a != b:
            where = " ".join(v for k, v in b.items() if k != "value" and v)
            got = a.get("value") if isinstance(a, dict) else a
            if isinstance(a, dict) and {k: v for k, v in a.items() if k != "value"} == {
                k: v for k, v in b.items() if k != "value"
            }:
                return f"measures[{i}] ({where}): {got} in the file, {b['value']} recomputed"
            return f"measures[{i}]: {a!r} in the file, ({where}) = {b['value']} recomputed"
    if len(mine) != len(theirs):
        return f"measures: {len(mine)} rows in the file, {len(theirs)} recomputed"
    return None
