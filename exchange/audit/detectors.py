"""Abuse detectors over the ledger's entries: pure, streaming, bounded. No I/O.

A :class:`Detectors` is fed the log's entries in order (``seq`` and the entry's canonical bytes,
as read from verified entry bundles) and returns :class:`Finding` objects. Each detector is a
small class with its thresholds in a frozen config:

- :class:`EpsilonBurn` (``epsilon_burn``): ε a consumer's computations released within a
  sliding window (``attrs.epsilon`` of ``computation.*`` entries) above ``max_epsilon``.
- :class:`DenialRatio` (``denial_ratio``): policy denials (``access.denied``) and refused
  requests (``request.refused`` and the per-key counts of ``request.refused.summary``) against
  the principal's computations in a window.
- :class:`SignatureFailures` (``signature_failures``): requests that failed authentication for
  a reason naming a forged or broken signature (``request.rejected``, per claimed key id), and
  the anonymous counts of ``request.rejected.summary`` (no principal: alert only).
- :class:`Differencing` (``differencing``): ``query.near_duplicate`` entries, which the
  exchange appends where it sees the SQL when a consumer's aggregate differs from one of its
  recent ones by exactly one filter term or one constant (docs/incidents.md).
- :class:`SmallPsiSessions` (``small_psi_sessions``): PSI sessions a consumer opens with a
  small set (``attrs.x_count`` of ``psi.session_opened``).
- :class:`WitnessConflict` (``witness_conflict``): a ``chain.fork`` (two signed checkpoints
  of a child that do not extend each other) or a ledgered witness failure.

An entry that does not parse as a ledger entry (not canonical JSON of the entry's shape, a
``seq`` other than its position, a time that is not RFC 3339) is reported as an
``unparseable_entry`` finding, never skipped.

Windows are measured in the entries' own ``time`` (the ledger's clock), so a replay of the same
entries gives the same findings. State is bounded: every detector keeps at most
``max_principals`` principals (the least recently seen is forgotten first) and, per principal,
the events of one window, at most ``max_events`` of them. Once a detector fires for a principal
it forgets that principal's window: the next finding needs a fresh window's worth of evidence.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, ClassVar, Protocol

__all__ = [
    "DETECTORS",
    "RESPONSES",
    "ConfigError",
    "DenialRatio",
    "DenialRatioConfig",
    "Detector",
    "Detectors",
    "Differencing",
    "DifferencingConfig",
    "Entry",
    "EntryFormatError",
    "EpsilonBurn",
    "EpsilonBurnConfig",
    "Finding",
    "MonitorConfig",
    "SignatureFailures",
    "SignatureFailuresConfig",
    "SmallPsiSessions",
    "SmallPsiSessionsConfig",
    "WitnessConflict",
    "WitnessConflictConfig",
    "load_config",
    "parse_entry",
]

#: every detector's name, as ``incident.opened`` records it in ``attrs.detector``
DETECTORS = (
    "epsilon_burn",
    "denial_ratio",
    "signature_failures",
    "differencing",
    "small_psi_sessions",
    "witness_conflict",
    "unparseable_entry",
)
#: graduated responses, mildest first
RESPONSES = ("alert", "throttle", "suspend")

#: the kind of the entry the exchange appends for a near-duplicate aggregate query
NEAR_DUPLICATE = "query.near_duplicate"
_KEY_ID = re.compile(r"[0-9a-f]{64}")
_KIND = re.compile(r"[a-z][a-z0-9_.]{0,63}")


class ConfigError(ValueError):
    """A monitor configuration that is not usable; the message names the setting."""


class EntryFormatError(ValueError):
    """Bytes that are not a ledger entry of the expected shape."""


@dataclass(frozen=True)
class Entry:
    """A ledger entry, parsed: what the detectors read."""

    seq: int
    time: datetime
    kind: str
    actor: str
    refs: Mapping[str, str]
    digests: Mapping[str, str]
    attrs: Mapping[str, str | int]


def parse_entry(seq: int, raw: bytes) -> Entry:
    """Parse ``raw`` as the ledger entry at position ``seq``, or raise :class:`EntryFormatError`.

    The bytes were checked against the log's signed root before this is called; this checks
    the shape the detectors rely on."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise EntryFormatError(f"not JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise EntryFormatError("not a JSON object")
    if doc.get("seq") != seq or isinstance(doc.get("seq"), bool):
        raise EntryFormatError(f"seq {doc.get('seq')!r} at position {seq}")
    kind, actor, moment = doc.get("kind"), doc.get("actor"), doc.get("time")
    if not isinstance(kind, str) or not _KIND.fullmatch(kind):
        raise EntryFormatError("no kind")
    if not isinstance(actor, str):
        raise EntryFormatError("no actor")
    if not isinstance(moment, str) or not moment.endswith("Z"):
        raise EntryFormatError("no RFC 3339 UTC time")
    try:
        when = datetime.fromisoformat(moment)
    except ValueError as exc:
        raise EntryFormatError(f"time {moment!r}: {exc}") from exc
    parts: list[dict[str, Any]] = []
    for name in ("refs", "digests", "attrs"):
        value = doc.get(name, {})
        if not isinstance(value, dict):
            raise EntryFormatError(f"{name} is not an object")
        parts.append(value)
    refs, digests, attrs = parts
    if not all(isinstance(v, str) for v in (*refs.values(), *digests.values())):
        raise EntryFormatError("refs and digests hold strings")
    if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in attrs.values()):
        raise EntryFormatError("attrs hold strings and integers")
    return Entry(seq, when, kind, actor, refs, digests, attrs)


@dataclass(frozen=True)
class Finding:
    """What a detector saw: enough to open an incident, nothing more."""

    detector: str
    severity: str
    #: the key id concerned (None: nobody in particular, e.g. an anonymous count or a fork)
    principal: str | None
    first_seq: int
    last_seq: int
    #: a short statement of the evidence (counts and thresholds only)
    summary: str
    zone: str | None = None


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Common:
    window_seconds: int = 3600
    max_principals: int = 10_000
    max_events: int = 4096


@dataclass(frozen=True)
class EpsilonBurnConfig(_Common):
    #: ε released to one consumer within the window that opens an incident
    max_epsilon: Decimal = Decimal(10)


@dataclass(frozen=True)
class DenialRatioConfig(_Common):
    #: at least this many denials within the window ...
    min_denials: int = 20
    #: ... making up at least this share of the principal's calls (denials + computations)
    min_ratio: Decimal = Decimal("0.8")
    #: denial reasons that are the exchange's own responses, not the principal's probing
    ignore_reasons: tuple[str, ...] = ("throttled", "suspended")


@dataclass(frozen=True)
class SignatureFailuresConfig(_Common):
    window_seconds: int = 600
    #: ``request.rejected`` reasons that count as a failed or forged signature
    reasons: tuple[str, ...] = ("bad_signature", "digest_mismatch", "malformed", "components")
    #: failures claiming one key id within the window
    max_failures: int = 8
    #: failures counted anonymously (summaries) within the window
    max_anonymous: int = 200


@dataclass(frozen=True)
class DifferencingConfig(_Common):
    #: near-duplicate aggregates of one consumer within the window
    max_near_duplicates: int = 3


@dataclass(frozen=True)
class SmallPsiSessionsConfig(_Common):
    #: a session whose consumer set has at most this many ids is small
    max_set_size: int = 10
    #: small sessions one consumer opens within the window
    max_sessions: int = 5


@dataclass(frozen=True)
class WitnessConflictConfig:
    #: entry kinds that are a conflict between witnessed checkpoints
    kinds: tuple[str, ...] = ("chain.fork", "witness.conflict", "witness.cosign_failed")


@dataclass(frozen=True)
class MonitorConfig:
    """Thresholds per detector and the response each detector's findings get.

    A response other than ``alert`` applies only to a finding that names a principal; the
    others are alerts whatever the configuration says."""

    epsilon_burn: EpsilonBurnConfig = field(default_factory=EpsilonBurnConfig)
    denial_ratio: DenialRatioConfig = field(default_factory=DenialRatioConfig)
    signature_failures: SignatureFailuresConfig = field(default_factory=SignatureFailuresConfig)
    differencing: DifferencingConfig = field(default_factory=DifferencingConfig)
    small_psi_sessions: SmallPsiSessionsConfig = field(default_factory=SmallPsiSessionsConfig)
    witness_conflict: WitnessConflictConfig = field(default_factory=WitnessConflictConfig)
    #: detector -> ``alert`` | ``throttle`` | ``suspend`` (default: alert for all)
    responses: Mapping[str, str] = field(default_factory=dict)
    #: how long a throttle lasts
    throttle_seconds: int = 900

    def response_for(self, finding: Finding) -> str:
        response = self.responses.get(finding.detector, "alert")
        return response if finding.principal is not None else "alert"


def _coerce(name: str, current: object, value: object) -> object:
    if isinstance(current, bool) or isinstance(value, bool):
        raise ConfigError(f"{name}: booleans are not thresholds")
    if isinstance(current, Decimal):
        if not isinstance(value, (str, int)):
            raise ConfigError(f"{name}: give a decimal string or an integer")
        try:
            number = Decimal(str(value))
        except InvalidOperation as exc:
            raise ConfigError(f"{name}: {value!r} is not a decimal") from exc
        if not number.is_finite() or number < 0:
            raise ConfigError(f"{name}: must be a finite number >= 0")
        return number
    if isinstance(current, int):
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name}: must be an integer >= 1")
        return value
    if isinstance(current, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{name}: give a list of strings")
        return tuple(value)
    raise ConfigError(f"{name}: not settable")  # pragma: no cover - every field is one above


def load_config(doc: Mapping[str, Any]) -> MonitorConfig:
    """A :class:`MonitorConfig` from a parsed JSON or TOML document::

        {"responses": {"epsilon_burn": "throttle", "signature_failures": "suspend"},
         "throttle_seconds": 900,
         "epsilon_burn": {"window_seconds": 3600, "max_epsilon": "10"}}

    Unknown sections, settings, detectors or responses raise :class:`ConfigError`."""
    if not isinstance(doc, Mapping):
        raise ConfigError("the configuration is a JSON object or a TOML table")
    config = MonitorConfig()
    changes: dict[str, Any] = {}
    for section, value in doc.items():
        if section == "responses":
            if not isinstance(value, Mapping):
                raise ConfigError("responses: a table of detector = response")
            for detector, response in value.items():
                if detector not in DETECTORS:
                    raise ConfigError(f"responses: unknown detector {detector!r}")
                if response not in RESPONSES:
                    raise ConfigError(
                        f"responses.{detector}: {response!r} is not one of {', '.join(RESPONSES)}"
                    )
            changes["responses"] = dict(value)
        elif section == "throttle_seconds":
            seconds = _coerce("throttle_seconds", 1, value)
            assert isinstance(seconds, int)
            if seconds > 30 * 86400:
                raise ConfigError("throttle_seconds: at most 30 days")
            changes["throttle_seconds"] = seconds
        elif section in {f.name for f in fields(MonitorConfig)}:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{section}: a table of settings")
            current = getattr(config, section)
            known = {f.name for f in fields(current)}
            updates = {}
            for name, given in value.items():
                if name not in known:
                    raise ConfigError(f"{section}: unknown setting {name!r}")
                updates[name] = _coerce(f"{section}.{name}", getattr(current, name), given)
            changes[section] = replace(current, **updates)
        else:
            raise ConfigError(f"unknown section {section!r}")
    return replace(config, **changes)


# -- bounded windows ----------------------------------------------------------------------------


class _Windows:
    """Per-principal sliding windows of ``(time, seq, amount)`` events, bounded in principals
    and events per principal."""

    def __init__(self, config: _Common) -> None:
        self._span = timedelta(seconds=config.window_seconds)
        self._max_principals = config.max_principals
        self._max_events = config.max_events
        self._events: OrderedDict[str, deque[tuple[datetime, int, Decimal]]] = OrderedDict()

    def add(self, key: str, when: datetime, seq: int, amount: Decimal) -> None:
        events = self._events.get(key)
        if events is None:
            if len(self._events) >= self._max_principals:
                self._events.popitem(last=False)
            events = self._events[key] = deque(maxlen=self._max_events)
        else:
            self._events.move_to_end(key)
        events.append((when, seq, amount))

    def current(self, key: str, now: datetime) -> deque[tuple[datetime, int, Decimal]]:
        """The events of ``key`` within the window ending at ``now`` (older ones dropped)."""
        events = self._events.get(key)
        if events is None:
            return deque()
        while events and events[0][0] <= now - self._span:
            events.popleft()
        return events

    def total(self, key: str, now: datetime) -> Decimal:
        return sum((amount for _, _, amount in self.current(key, now)), Decimal(0))

    def first_seq(self, key: str, now: datetime, default: int) -> int:
        events = self.current(key, now)
        return events[0][1] if events else default

    def forget(self, key: str) -> None:
        self._events.pop(key, None)

    def __len__(self) -> int:
        return len(self._events)


class Detector(Protocol):
    name: ClassVar[str]

    def observe(self, entry: Entry) -> list[Finding]: ...


class EpsilonBurn:
    name: ClassVar[str] = "epsilon_burn"

    def __init__(self, config: EpsilonBurnConfig) -> None:
        self.config = config
        self.windows = _Windows(config)

    def observe(self, entry: Entry) -> list[Finding]:
        if not entry.kind.startswith("computation."):
            return []
        try:
            epsilon = Decimal(str(entry.attrs.get("epsilon", "0")))
        except InvalidOperation:
            epsilon = Decimal(0)
        if not epsilon.is_finite() or epsilon <= 0:
            return []
        key = entry.actor
        self.windows.add(key, entry.time, entry.seq, epsilon)
        spent = self.windows.total(key, entry.time)
        if spent <= self.config.max_epsilon:
            return []
        first = self.windows.first_seq(key, entry.time, entry.seq)
        self.windows.forget(key)
        return [
            Finding(
                self.name,
                "high",
                key,
                first,
                entry.seq,
                f"epsilon {spent} released within {self.config.window_seconds} s "
                f"(threshold {self.config.max_epsilon})",
                entry.refs.get("zone"),
            )
        ]


class DenialRatio:
    name: ClassVar[str] = "denial_ratio"

    def __init__(self, config: DenialRatioConfig) -> None:
        self.config = config
        self.denials = _Windows(config)
        self.computations = _Windows(config)

    def _denied(self, entry: Entry) -> list[tuple[str, int]]:
        if entry.kind in ("access.denied", "request.refused"):
            if str(entry.attrs.get("reason", "")) in self.config.ignore_reasons:
                return []
            return [(entry.actor, 1)]
        if entry.kind == "request.refused.summary":
            return [
                (name[len("actor.") :], value)
                for name, value in entry.attrs.items()
                if name.startswith("actor.") and isinstance(value, int) and value > 0
            ]
        return []

    def observe(self, entry: Entry) -> list[Finding]:
        if entry.kind.startswith("computation."):
            self.computations.add(entry.actor, entry.time, entry.seq, Decimal(1))
            return []
        found = []
        for key, count in self._denied(entry):
            if not _KEY_ID.fullmatch(key):
                continue
            self.denials.add(key, entry.time, entry.seq, Decimal(count))
            denied = self.denials.total(key, entry.time)
            done = self.computations.total(key, entry.time)
            if denied < self.config.min_denials:
                continue
            if denied < self.config.min_ratio * (denied + done):
                continue
            first = self.denials.first_seq(key, entry.time, entry.seq)
            self.denials.forget(key)
            self.computations.forget(key)
            found.append(
                Finding(
                    self.name,
                    "medium",
                    key,
                    first,
                    entry.seq,
                    f"{denied} denials against {done} computations within "
                    f"{self.config.window_seconds} s (thresholds {self.config.min_denials}, "
                    f"ratio {self.config.min_ratio})",
                )
            )
        return found


class SignatureFailures:
    name: ClassVar[str] = "signature_failures"
    #: the windows' key for failures that name no principal
    ANONYMOUS: ClassVar[str] = "-"

    def __init__(self, config: SignatureFailuresConfig) -> None:
        self.config = config
        self.windows = _Windows(config)

    def observe(self, entry: Entry) -> list[Finding]:
        reasons = self.config.reasons
        if entry.kind == "request.rejected":
            if entry.attrs.get("reason") not in reasons or not _KEY_ID.fullmatch(entry.actor):
                return []
            key, count, limit = entry.actor, 1, self.config.max_failures
        elif entry.kind == "request.rejected.summary":
            count = sum(
                v
                for k, v in entry.attrs.items()
                if k.startswith("count.") and k[len("count.") :] in reasons and isinstance(v, int)
            )
            if count <= 0:
                return []
            key, limit = self.ANONYMOUS, self.config.max_anonymous
        else:
            return []
        self.windows.add(key, entry.time, entry.seq, Decimal(count))
        failures = self.windows.total(key, entry.time)
        if failures < limit:
            return []
        first = self.windows.first_seq(key, entry.time, entry.seq)
        self.windows.forget(key)
        principal = None if key == self.ANONYMOUS else key
        return [
            Finding(
                self.name,
                "medium" if principal is None else "high",
                principal,
                first,
                entry.seq,
                f"{failures} requests with a failed signature within "
                f"{self.config.window_seconds} s (threshold {limit})",
            )
        ]


class _Counting:
    """A detector that counts one kind of entry per actor and fires at a threshold."""

    name: ClassVar[str] = ""
    severity: ClassVar[str] = "medium"

    def __init__(self, config: _Common, limit: int, what: str) -> None:
        self.config = config
        self.limit = limit
        self.what = what
        self.windows = _Windows(config)

    def counts(self, entry: Entry) -> bool:
        raise NotImplementedError

    def observe(self, entry: Entry) -> list[Finding]:
        if not self.counts(entry) or not _KEY_ID.fullmatch(entry.actor):
            return []
        key = entry.actor
        self.windows.add(key, entry.time, entry.seq, Decimal(1))
        seen = self.windows.total(key, entry.time)
        if seen < self.limit:
            return []
        first = self.windows.first_seq(key, entry.time, entry.seq)
        self.windows.forget(key)
        return [
            Finding(
                self.name,
                self.severity,
                key,
                first,
                entry.seq,
                f"{seen} {self.what} within {self.config.window_seconds} s "
                f"(threshold {self.limit})",
                entry.refs.get("zone"),
            )
        ]


class Differencing(_Counting):
    name: ClassVar[str] = "differencing"
    severity: ClassVar[str] = "high"

    def __init__(self, config: DifferencingConfig) -> None:
        super().__init__(config, config.max_near_duplicates, "near-duplicate aggregate queries")

    def counts(self, entry: Entry) -> bool:
        return entry.kind == NEAR_DUPLICATE


class SmallPsiSessions(_Counting):
    name: ClassVar[str] = "small_psi_sessions"

    def __init__(self, config: SmallPsiSessionsConfig) -> None:
        super().__init__(config, config.max_sessions, "small PSI sessions")
        self.max_set_size = config.max_set_size

    def counts(self, entry: Entry) -> bool:
        if entry.kind != "psi.session_opened":
            return False
        size = entry.attrs.get("x_count")
        return isinstance(size, int) and size <= self.max_set_size


class WitnessConflict:
    name: ClassVar[str] = "witness_conflict"

    def __init__(self, config: WitnessConflictConfig) -> None:
        self.config = config

    def observe(self, entry: Entry) -> list[Finding]:
        if entry.kind not in self.config.kinds:
            return []
        child = entry.refs.get("child") or entry.refs.get("witness") or "?"
        return [
            Finding(
                self.name,
                "critical",
                None,
                entry.seq,
                entry.seq,
                f"{entry.kind} ({child})",
            )
        ]


class Detectors:
    """Every detector over one stream of entries, fed in ``seq`` order."""

    def __init__(self, config: MonitorConfig | None = None) -> None:
        self.config = config or MonitorConfig()
        c = self.config
        self.detectors: tuple[Detector, ...] = (
            EpsilonBurn(c.epsilon_burn),
            DenialRatio(c.denial_ratio),
            SignatureFailures(c.signature_failures),
            Differencing(c.differencing),
            SmallPsiSessions(c.small_psi_sessions),
            WitnessConflict(c.witness_conflict),
        )

    def feed(self, seq: int, raw: bytes) -> list[Finding]:
        """The findings the entry at ``seq`` (its canonical bytes) completes."""
        try:
            entry = parse_entry(seq, raw)
        except EntryFormatError as exc:
            return [Finding("unparseable_entry", "high", None, seq, seq, str(exc)[:200])]
        found: list[Finding] = []
        for detector in self.detectors:
            found.extend(detector.observe(entry))
        return found

    def feed_all(self, entries: Iterable[tuple[int, bytes]]) -> list[Finding]:
        return [f for seq, raw in entries for f in self.feed(seq, raw)]
