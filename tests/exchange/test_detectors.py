"""The monitor's detectors on synthetic entry streams: each fires on its abuse and stays quiet
on a scripted normal stream whose rates are below every default threshold by construction
(so a false positive there is impossible, not merely unlikely)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from crypto.canonical import canonicalize
from exchange.audit.detectors import (
    ConfigError,
    Detectors,
    EntryFormatError,
    Finding,
    MonitorConfig,
    load_config,
    parse_entry,
)

START = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
BANK, FIRM, PROBER = "b" * 64, "f" * 64, "e" * 64


class Stream:
    """Entries in ledger form, numbered from 0, at times the test sets."""

    def __init__(self) -> None:
        self.entries: list[tuple[int, bytes]] = []

    def add(self, at: timedelta, kind: str, actor: str = "-", **parts: Any) -> int:
        seq = len(self.entries)
        moment = START + at
        entry = {
            "seq": seq,
            "time": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
            "kind": kind,
            "actor": actor,
            "prev": "0" * 64,
            "refs": parts.get("refs", {}),
            "digests": parts.get("digests", {}),
            "attrs": parts.get("attrs", {}),
        }
        self.entries.append((seq, canonicalize(entry)))
        return seq

    def findings(self, config: MonitorConfig | None = None) -> list[Finding]:
        return Detectors(config).feed_all(self.entries)


def minutes(n: float) -> timedelta:
    return timedelta(minutes=n)


def normal_stream(hours: int = 6) -> Stream:
    """Ordinary traffic of two consumers, per hour at most: ε 3 (threshold 10), 1 denial and
    1 refusal against 6 computations (threshold 20 denials), 2 signature failures per key
    (threshold 8 per 10 minutes), 1 near-duplicate query (threshold 3), 1 small PSI session
    (threshold 5), large PSI sessions, and an anonymous summary of 3 failures (threshold 200)."""
    s = Stream()
    for hour in range(hours):
        base = timedelta(hours=hour)
        for i in range(6):
            for who in (BANK, FIRM):
                s.add(
                    base + minutes(10 * i),
                    "computation.aggregate",
                    who,
                    refs={"zone": "tax", "dataset": "companies"},
                    attrs={"epsilon": "0.5", "operation": "aggregate"},
                )
        s.add(base + minutes(5), "access.denied", BANK, attrs={"reason": "not_granted"})
        s.add(base + minutes(7), "request.refused", FIRM, attrs={"reason": "invalid_input"})
        s.add(base + minutes(15), "request.rejected", BANK, attrs={"reason": "stale"})
        s.add(base + minutes(16), "request.rejected", BANK, attrs={"reason": "bad_signature"})
        s.add(base + minutes(45), "request.rejected", FIRM, attrs={"reason": "bad_signature"})
        s.add(base + minutes(20), "query.near_duplicate", BANK, attrs={"difference": "constant"})
        s.add(base + minutes(25), "psi.session_opened", FIRM, attrs={"x_count": 3})
        s.add(base + minutes(26), "psi.session_opened", BANK, attrs={"x_count": 5000})
        s.add(base + minutes(30), "request.rejected.summary", attrs={"count.bad_signature": 3})
        s.add(base + minutes(50), "chain.checkpoint", refs={"child": "district"})
    return s


def test_the_normal_stream_raises_nothing() -> None:
    s = normal_stream()
    assert len(s.entries) > 100
    assert s.findings() == []


def test_epsilon_burn_fires_once_per_window_of_evidence() -> None:
    s = normal_stream(1)
    first = None
    for i in range(25):  # ε 0.5 every 30 s: 12.5 in 12.5 minutes, threshold 10
        seq = s.add(
            timedelta(hours=2) + minutes(i / 2),
            "computation.aggregate",
            PROBER,
            refs={"zone": "tax"},
            attrs={"epsilon": "0.5"},
        )
        first = seq if first is None else first
    found = s.findings()
    assert [f.detector for f in found] == ["epsilon_burn"]
    (f,) = found
    assert f.principal == PROBER and f.zone == "tax" and f.severity == "high"
    assert f.first_seq == first and f.last_seq == first + 20  # the 21st release passes 10
    # a lower threshold from the configuration fires more often on the same stream
    config = load_config({"epsilon_burn": {"max_epsilon": "2"}})
    prober = [f for f in s.findings(config) if f.principal == PROBER]
    assert [f.detector for f in prober] == ["epsilon_burn"] * 5  # 2.5 > 2 every 5 releases


def test_epsilon_spread_over_more_than_the_window_is_not_a_burn() -> None:
    s = Stream()
    for i in range(40):  # ε 20 in total, but 0.5 every 10 minutes: 3 per hour
        s.add(minutes(10 * i), "computation.aggregate", PROBER, attrs={"epsilon": "0.5"})
    assert s.findings() == []


def test_a_denial_storm_fires_but_denials_among_many_computations_do_not() -> None:
    storm = normal_stream(1)
    for i in range(12):
        storm.add(minutes(i), "access.denied", PROBER, attrs={"reason": "not_granted"})
        storm.add(
            minutes(i) + timedelta(seconds=30),
            "request.refused",
            PROBER,
            attrs={"reason": "forbidden"},
        )
    found = storm.findings()
    assert [(f.detector, f.principal) for f in found] == [("denial_ratio", PROBER)]

    busy = Stream()
    for i in range(25):
        busy.add(minutes(i), "access.denied", PROBER, attrs={"reason": "not_granted"})
        for _ in range(2):
            busy.add(minutes(i), "computation.aggregate", PROBER, attrs={"epsilon": "0"})
    assert busy.findings() == []  # 25 denials, but a third of 75 calls: under the 0.8 ratio

    # denials counted in a refusal summary count, per key; the exchange's own throttling
    # answers do not
    summary = Stream()
    summary.add(minutes(1), "request.refused.summary", attrs={f"actor.{PROBER}": 25, "since": "x"})
    assert [f.detector for f in summary.findings()] == ["denial_ratio"]
    throttled = Stream()
    for i in range(30):
        throttled.add(minutes(i), "access.denied", PROBER, attrs={"reason": "throttled"})
    assert throttled.findings() == []


def test_a_forged_signature_burst_fires_per_claimed_key_and_anonymously() -> None:
    s = normal_stream(1)
    for i in range(8):
        s.add(minutes(i / 10), "request.rejected", PROBER, attrs={"reason": "bad_signature"})
    s.add(
        minutes(2),
        "request.rejected.summary",
        attrs={"count.bad_signature": 150, "count.digest_mismatch": 60, "count.stale": 900},
    )
    found = s.findings()
    assert [(f.detector, f.principal, f.severity) for f in found] == [
        ("signature_failures", PROBER, "high"),
        ("signature_failures", None, "medium"),
    ]
    # stale clocks and replays are not forged signatures
    quiet = Stream()
    for i in range(30):
        quiet.add(minutes(i / 10), "request.rejected", PROBER, attrs={"reason": "stale"})
    assert quiet.findings() == []


def test_differencing_and_small_psi_streams_fire() -> None:
    s = normal_stream(1)
    for i in range(3):
        s.add(
            minutes(2 + i),
            "query.near_duplicate",
            PROBER,
            refs={"zone": "tax"},
            attrs={"difference": "term"},
        )
    for i in range(5):
        s.add(minutes(3 + i), "psi.session_opened", PROBER, attrs={"x_count": 1 + i % 2})
    found = s.findings()
    assert [(f.detector, f.principal, f.zone) for f in found] == [
        ("differencing", PROBER, "tax"),
        ("small_psi_sessions", PROBER, None),
    ]


def test_a_fork_is_a_witness_conflict() -> None:
    s = normal_stream(1)
    seq = s.add(minutes(59), "chain.fork", refs={"child": "district"})
    (f,) = s.findings()
    assert (f.detector, f.principal, f.first_seq, f.last_seq) == (
        "witness_conflict",
        None,
        seq,
        seq,
    )
    assert f.severity == "critical" and "district" in f.summary


@pytest.mark.parametrize(
    "raw",
    [
        b"\xff\xfe not json",
        b"[1, 2]",
        b'{"seq": 7, "kind": "x", "actor": "-", "time": "2026-11-02T08:00:00.000Z"}',
        b'{"seq": 0, "actor": "-", "time": "2026-11-02T08:00:00.000Z"}',
        b'{"seq": 0, "kind": "x", "actor": "-", "time": "yesterday"}',
        b'{"seq": 0, "kind": "x", "actor": "-", "time": "2026-11-02T08:00:00.000Z", "attrs": []}',
        b'{"seq": 0, "kind": "x", "actor": "-", "time": "2026-11-02T08:00:00.000Z", '
        b'"attrs": {"a": 1.5}}',
    ],
)
def test_an_entry_that_does_not_parse_is_reported_not_skipped(raw: bytes) -> None:
    with pytest.raises(EntryFormatError):
        parse_entry(0, raw)
    (f,) = Detectors().feed(0, raw)
    assert (f.detector, f.first_seq, f.principal) == ("unparseable_entry", 0, None)


def test_state_stays_bounded_by_principals_and_window() -> None:
    config = load_config({"denial_ratio": {"max_principals": 50, "max_events": 10}})
    detectors = Detectors(config)
    s = Stream()
    for i in range(500):
        s.add(timedelta(seconds=i), "access.denied", f"{i:064x}", attrs={"reason": "not_granted"})
    for i in range(30):
        s.add(timedelta(seconds=600 + i), "access.denied", PROBER, attrs={"reason": "x"})
    detectors.feed_all(s.entries)
    ratio = detectors.detectors[1]
    assert len(ratio.denials) == 50  # type: ignore[attr-defined]
    assert len(ratio.denials.current(PROBER, START + timedelta(seconds=700))) == 10  # type: ignore[attr-defined]


def test_configuration_is_checked() -> None:
    config = load_config(
        {
            "responses": {"epsilon_burn": "throttle", "signature_failures": "suspend"},
            "throttle_seconds": 60,
            "small_psi_sessions": {"max_set_size": 3, "window_seconds": 120},
            "epsilon_burn": {"max_epsilon": "2.5"},
        }
    )
    assert config.epsilon_burn.max_epsilon == Decimal("2.5")
    assert config.small_psi_sessions.window_seconds == 120 and config.throttle_seconds == 60
    burn = Finding("epsilon_burn", "high", PROBER, 1, 2, "")
    assert config.response_for(burn) == "throttle"
    # a finding that names nobody is only ever an alert
    anonymous = Finding("signature_failures", "medium", None, 1, 2, "")
    assert config.response_for(anonymous) == "alert"
    assert MonitorConfig().response_for(burn) == "alert"  # the default
    for bad, message in [
        ({"responses": {"epsilon_burn": "ban"}}, "not one of"),
        ({"responses": {"nosuch": "alert"}}, "unknown detector"),
        ({"epsilon_burn": {"max_epsilon": "lots"}}, "not a decimal"),
        ({"epsilon_burn": {"window": 3}}, "unknown setting"),
        ({"denial_ratio": {"min_denials": 0}}, ">= 1"),
        ({"witness": {}}, "unknown section"),
        ({"throttle_seconds": 10**9}, "at most"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(bad)
