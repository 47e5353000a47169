"""The witness's state store and service: compare-and-swap, durability, races, evidence."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from crypto.keys import SigningKey
from crypto.note import NoteSigner, check_cosignatures
from exchange.server.witness.decision import LogState, Refusal, RefusalKind
from exchange.server.witness.protocol import origin_hash, parse_add_checkpoint
from exchange.server.witness.service import Cosigned, Witness
from exchange.server.witness.settings import WitnessSettings
from exchange.server.witness.store import WitnessStore
from tests.witness._support import FakeLog

NAME = "witness.test/w1"


@pytest.fixture
def store(tmp_path: Path) -> WitnessStore:
    return WitnessStore(tmp_path / "witness.db")


def make_witness(store: WitnessStore, tmp_path: Path, **limits: int) -> Witness:
    settings = WitnessSettings(data_dir=tmp_path, name=NAME, **limits)
    signer = NoteSigner(NAME, SigningKey(b"\x05" * 32))
    return Witness(signer, store, settings, clock=lambda: 1_800_000_000.0)


def test_trust_is_idempotent_and_per_origin(store: WitnessStore) -> None:
    city, district = FakeLog("city.test/log"), FakeLog("district.test/log")
    assert store.trust(city.verifier, 1) is True
    assert store.trust(city.verifier, 2) is False
    rotated = FakeLog("city.test/log")
    assert store.trust(rotated.verifier, 3) is True
    assert store.trust(district.verifier, 4) is True
    assert set(store.trusted("city.test/log")) == {city.verifier, rotated.verifier}
    assert store.trusted("unknown.test/log") == []
    assert [(log.origin, len(log.verifier_keys), log.size) for log in store.logs()] == [
        ("city.test/log", 2, None),
        ("district.test/log", 1, None),
    ]


def test_swap_is_compare_and_swap(store: WitnessStore) -> None:
    a, b = LogState(5, b"a" * 32), LogState(9, b"b" * 32)
    assert store.swap("log", None, a, "note a", 1) is True
    assert store.swap("log", None, b, "note b", 2) is False  # someone stored first
    assert store.swap("log", LogState(5, b"x" * 32), b, "note b", 2) is False  # other root
    assert store.swap("log", LogState(4, b"a" * 32), b, "note b", 2) is False  # other size
    assert store.swap("log", a, b, "note b", 3) is True
    head = store.head("log")
    assert head is not None and head.state == b and head.note == "note b"
    with pytest.raises(ValueError, match="never rolls a log back"):
        store.swap("log", b, a, "note a", 4)


def test_sizes_up_to_2_to_the_64_minus_1_are_exact(store: WitnessStore) -> None:
    big = LogState(2**64 - 1, b"r" * 32)
    assert store.swap("log", None, big, "n", 1)
    head = store.head("log")
    assert head is not None and head.state == big


def test_the_state_survives_reopening(tmp_path: Path) -> None:
    log = FakeLog("city.test/log")
    first = WitnessStore(tmp_path / "witness.db")
    first.trust(log.verifier, 1)
    first.swap("city.test/log", None, LogState(3, b"r" * 32), "note", 1)
    again = WitnessStore(tmp_path / "witness.db")
    assert again.trusted("city.test/log") == [log.verifier]
    head = again.head("city.test/log")
    assert head is not None and head.state == LogState(3, b"r" * 32)


def test_of_many_racing_swaps_from_one_state_exactly_one_wins(store: WitnessStore) -> None:
    start = LogState(10, b"s" * 32)
    store.swap("log", None, start, "start", 1)
    barrier = threading.Barrier(8)
    wins: list[int] = []

    def racer(i: int) -> None:
        barrier.wait()
        if store.swap("log", start, LogState(11 + i, bytes([i]) * 32), f"note {i}", 2):
            wins.append(i)

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    head = store.head("log")
    assert head is not None and head.state.size == 11 + wins[0]


# -- the service -------------------------------------------------------------------------------


def test_the_service_cosigns_and_stores_the_log_and_witness_signatures(
    store: WitnessStore, tmp_path: Path
) -> None:
    log = FakeLog("city.test/log").grow(6)
    store.trust(log.verifier, 1)
    witness = make_witness(store, tmp_path)
    outcome = witness.add_checkpoint(parse_add_checkpoint(log.body(0)))
    assert isinstance(outcome, Cosigned) and outcome.size == 6
    assert len(outcome.lines) == 1 and outcome.lines[0].startswith(f"— {NAME} ")
    report = check_cosignatures(
        log.note() + outcome.lines[0] + "\n",
        log.verifier,
        [witness.signer.cosignature_verifier()],
        1,
    )
    assert report.ok and report.verified[0].timestamp == 1_800_000_000
    head = store.head("city.test/log")
    assert head is not None and head.note == outcome.note
    assert witness.checkpoint(origin_hash("city.test/log")) == outcome.note


def test_a_resubmitted_note_that_carries_the_witness_cosignature_is_cosigned_again(
    store: WitnessStore, tmp_path: Path
) -> None:
    log = FakeLog("city.test/log").grow(6)
    store.trust(log.verifier, 1)
    witness = make_witness(store, tmp_path)
    first = witness.add_checkpoint(parse_add_checkpoint(log.body(0)))
    assert isinstance(first, Cosigned)
    again = parse_add_checkpoint(b"old 6\n\n" + first.note.encode())
    second = witness.add_checkpoint(again)
    assert isinstance(second, Cosigned) and second.note.count(f"— {NAME} ") == 1


def test_a_fork_is_refused_kept_as_evidence_and_changes_nothing(
    store: WitnessStore, tmp_path: Path
) -> None:
    log = FakeLog("city.test/log").grow(10)
    store.trust(log.verifier, 1)
    witness = make_witness(store, tmp_path, max_evidence_per_log=3)
    assert isinstance(witness.add_checkpoint(parse_add_checkpoint(log.body(0))), Cosigned)
    before = store.head("city.test/log")
    for n in range(5):
        fork = log.fork(b"fork %d" % n, 4).grow(12)
        outcome = witness.add_checkpoint(parse_add_checkpoint(fork.body(10)))
        assert isinstance(outcome, Refusal) and outcome.kind is RefusalKind.INCONSISTENT
    assert store.head("city.test/log") == before
    evidence = store.evidence("city.test/log")
    assert len(evidence) == 3  # the newest three
    assert all("12\n" in note for _, _, note in evidence)


def test_a_malformed_note_is_400(store: WitnessStore, tmp_path: Path) -> None:
    witness = make_witness(store, tmp_path)
    outcome = witness.add_checkpoint(parse_add_checkpoint(b"old 0\n\nnot a note\n"))
    assert isinstance(outcome, Refusal) and outcome.kind is RefusalKind.BAD_REQUEST


def test_racing_requests_from_one_old_size_only_one_is_cosigned(
    store: WitnessStore, tmp_path: Path
) -> None:
    """Eight requests from the same old size, each with another (consistent or forked)
    checkpoint, decided concurrently: one is cosigned, the others get 409."""
    log = FakeLog("city.test/log").grow(10)
    store.trust(log.verifier, 1)
    witness = make_witness(store, tmp_path)
    assert isinstance(witness.add_checkpoint(parse_add_checkpoint(log.body(0))), Cosigned)
    bodies = [log.fork(b"branch %d" % i, 10).grow(11 + i).body(10) for i in range(8)]
    barrier = threading.Barrier(len(bodies))
    outcomes: list[Cosigned | Refusal] = []

    def submit(body: bytes) -> None:
        request = parse_add_checkpoint(body)
        barrier.wait()
        outcomes.append(witness.add_checkpoint(request))

    threads = [threading.Thread(target=submit, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cosigned = [o for o in outcomes if isinstance(o, Cosigned)]
    assert len(cosigned) == 1
    assert all(
        isinstance(o, Refusal) and o.kind is RefusalKind.OLD_SIZE_MISMATCH
        for o in outcomes
        if not isinstance(o, Cosigned)
    )
    head = store.head("city.test/log")
    assert head is not None and head.state.size == cosigned[0].size
