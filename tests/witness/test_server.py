"""``zonex witness serve`` as a real process, over HTTP: every answer of tlog-witness
"add-checkpoint", the state after refusals, racing submissions, a restart, and the client."""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crypto.note import NoteVerifier, add_signatures, check_cosignatures
from exchange.server.witness.client import (
    WitnessConflictError,
    WitnessRefusedError,
    WitnessUnreachableError,
    submit_checkpoint,
)
from exchange.server.witness.home import DATABASE
from exchange.server.witness.protocol import SIZE_MEDIA_TYPE, format_add_checkpoint
from exchange.server.witness.store import WitnessStore
from tests.conftest import free_port
from tests.witness._support import (
    FakeLog,
    WitnessProcess,
    init_witness,
    serving_witness,
    start_witness,
    stop,
)

_origins = itertools.count()


@pytest.fixture(scope="module")
def witness_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("witness") / "W"
    init_witness(path)
    return path


@pytest.fixture(scope="module")
def witness(witness_dir: Path) -> Iterator[WitnessProcess]:
    with serving_witness(witness_dir) as running:
        yield running


@pytest.fixture(scope="module")
def witness_key(witness_dir: Path) -> NoteVerifier:
    return NoteVerifier.from_verifier_key((witness_dir / "witness.pub").read_text().strip())


def trusted_log(witness_dir: Path, size: int = 10) -> FakeLog:
    """A fresh log (its own origin) the running witness trusts, grown to ``size``."""
    log = FakeLog(f"log{next(_origins)}.test/log").grow(size)
    WitnessStore(witness_dir / DATABASE).trust(log.verifier, 1)
    return log


def stored(witness: WitnessProcess, log: FakeLog) -> str | None:
    response = witness.latest(log.origin)
    return None if response.status_code == 404 else response.text


def test_a_checkpoint_is_cosigned_and_served_to_monitors(
    witness: WitnessProcess, witness_dir: Path, witness_key: NoteVerifier
) -> None:
    log = trusted_log(witness_dir)
    assert witness.latest(log.origin).status_code == 404
    response = witness.add(log.body(0))
    assert response.status_code == 200, response.text
    assert response.text.startswith("— witness.test/w1 ") and response.text.endswith("\n")
    cosigned = log.note() + response.text
    report = check_cosignatures(cosigned, log.verifier, [witness_key], 1)
    assert report.ok
    # the monitoring endpoint: the log's signature and the cosignature just returned
    assert stored(witness, log) == cosigned
    # the next checkpoint, with a consistency proof from the stored size
    log.grow(25)
    response = witness.add(log.body(10))
    assert response.status_code == 200, response.text
    assert check_cosignatures(log.note() + response.text, log.verifier, [witness_key], 1).ok


def test_a_forked_checkpoint_is_422_and_leaves_the_state_unchanged(
    witness: WitnessProcess, witness_dir: Path
) -> None:
    log = trusted_log(witness_dir, 10)
    assert witness.add(log.body(0)).status_code == 200
    before = stored(witness, log)
    fork = log.fork(b"fork", 6).grow(16)
    response = witness.add(fork.body(10))
    assert response.status_code == 422, response.text
    # the same size, another root
    same_size = log.fork(b"other", 6).grow(10)
    assert witness.add(same_size.body(10)).status_code == 422
    assert stored(witness, log) == before
    # the honest log goes on from the size it had
    assert witness.add(log.grow(16).body(10)).status_code == 200
    # the witness kept the forks, signed by the log, as evidence
    evidence = WitnessStore(witness_dir / DATABASE).evidence(log.origin)
    assert [note for _, _, note in evidence] == [fork.note(), same_size.note()]


def test_a_replayed_older_checkpoint_is_409_with_the_stored_size(
    witness: WitnessProcess, witness_dir: Path
) -> None:
    log = trusted_log(witness_dir, 20)
    assert witness.add(log.body(0)).status_code == 200
    for body in (log.body(0, 12), log.body(12, 12), log.body(0)):
        response = witness.add(body)
        assert response.status_code == 409
        assert response.headers["content-type"] == SIZE_MEDIA_TYPE
        assert response.content == b"20\n"


def test_an_unknown_log_is_404(witness: WitnessProcess) -> None:
    stranger = FakeLog("unknown.test/log").grow(3)
    response = witness.add(stranger.body(0))
    assert response.status_code == 404


def test_a_bad_log_signature_is_403(witness: WitnessProcess, witness_dir: Path) -> None:
    log = trusted_log(witness_dir, 5)
    impostor = FakeLog(log.origin, tree=log.tree)  # same origin, another key
    assert witness.add(impostor.body(0)).status_code == 403
    # the trusted key's name and key ID, another signature
    note = log.note()
    text, _, line = note.rpartition("\n\n")
    prefix, encoded = line.rstrip("\n").rsplit(" ", 1)
    flipped = encoded[:10] + ("A" if encoded[10] != "A" else "B") + encoded[11:]
    tampered = f"{text}\n\n{prefix} {flipped}\n"
    assert witness.add(format_add_checkpoint(0, [], tampered)).status_code == 403
    assert stored(witness, log) is None


def test_a_bad_proof_is_422(witness: WitnessProcess, witness_dir: Path) -> None:
    log = trusted_log(witness_dir, 8)
    assert witness.add(log.body(0)).status_code == 200
    log.grow(13)
    proof = log.proof(8)
    proof[-1] = bytes(32)
    response = witness.add(format_add_checkpoint(8, proof, log.note()))
    assert response.status_code == 422
    assert witness.add(format_add_checkpoint(8, proof[:-1], log.note())).status_code == 422
    assert "\n8\n" in (stored(witness, log) or "")


def test_malformed_requests_are_400_and_a_huge_body_413(witness: WitnessProcess) -> None:
    for body in (b"", b"old x\n\n", b"old 1\nnot base64\n\nnote\n", b"old 0\n\nnot a note\n"):
        assert witness.add(body).status_code == 400, body
    assert witness.add(b"old 0\n\n" + b"x" * (200 * 1024)).status_code == 413
    assert httpx.get(witness.url + "/add-checkpoint").status_code == 405
    assert httpx.get(witness.url + "/not-a-hash/checkpoint").status_code == 404


def test_an_old_size_above_the_checkpoint_size_is_400(
    witness: WitnessProcess, witness_dir: Path
) -> None:
    log = trusted_log(witness_dir, 4)
    assert witness.add(format_add_checkpoint(6, [], log.note())).status_code == 400


def test_racing_submissions_from_one_old_size_only_one_wins(
    witness: WitnessProcess, witness_dir: Path
) -> None:
    log = trusted_log(witness_dir, 10)
    assert witness.add(log.body(0)).status_code == 200
    forks = [log.fork(b"race %d" % i, 10).grow(12 + i) for i in range(12)]
    bodies = [fork.body(10) for fork in forks]
    barrier = threading.Barrier(len(bodies))
    statuses: list[int] = []
    lock = threading.Lock()

    def submit(body: bytes) -> None:
        with httpx.Client(timeout=30) as http:
            barrier.wait()
            status = http.post(witness.url + "/add-checkpoint", content=body).status_code
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=submit, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] + [409] * (len(bodies) - 1)
    winner = stored(witness, log)
    assert winner is not None
    assert winner.split("\n\n")[0] + "\n" in {f.checkpoint().body().decode() for f in forks}


def test_a_restarted_witness_keeps_its_state(tmp_path: Path) -> None:
    path = tmp_path / "W"
    init_witness(path)
    log = FakeLog("restart.test/log").grow(7)
    WitnessStore(path / DATABASE).trust(log.verifier, 1)
    port = free_port()
    first = start_witness(path, port)
    try:
        assert first.add(log.body(0)).status_code == 200
        before = first.latest(log.origin).text
    finally:
        stop(first.process)
    second = start_witness(path, port)
    try:
        assert second.latest(log.origin).text == before
        response = second.add(log.body(0))  # no rollback to "nothing cosigned"
        assert response.status_code == 409 and response.content == b"7\n"
        assert second.add(log.grow(9).body(7)).status_code == 200
    finally:
        stop(second.process)


# -- the client ------------------------------------------------------------------------------


def test_the_client_retries_once_from_the_size_a_409_reports(
    witness: WitnessProcess, witness_dir: Path, witness_key: NoteVerifier
) -> None:
    log = trusted_log(witness_dir, 10)
    assert witness.add(log.body(0)).status_code == 200
    log.grow(30)
    asked: list[int] = []

    def proof(old: int) -> list[bytes]:
        asked.append(old)
        return log.proof(old)

    # the log thinks the witness never cosigned it: old size 0
    lines = submit_checkpoint(witness.url, log.note(), 0, proof)
    assert asked == [10]  # size 0 needs no proof; the retry asked for one from 10
    report = check_cosignatures(add_signatures(log.note(), lines), log.verifier, [witness_key], 1)
    assert report.ok


def test_the_client_reports_conflicts_refusals_and_silence(
    witness: WitnessProcess, witness_dir: Path
) -> None:
    log = trusted_log(witness_dir, 10)
    assert witness.add(log.body(0)).status_code == 200
    # a checkpoint older than the witness's: no proof can help
    with pytest.raises(WitnessConflictError) as conflict:
        submit_checkpoint(witness.url, log.note(5), 0, log.proof)
    assert conflict.value.size == 10
    fork = log.fork(b"client fork", 3).grow(12)
    with pytest.raises(WitnessRefusedError) as refused:
        submit_checkpoint(witness.url, fork.note(), 10, fork.proof)
    assert refused.value.status == 422
    with pytest.raises(WitnessRefusedError) as unknown:
        submit_checkpoint(witness.url, FakeLog("nobody.test/log").grow(1).note(), 0, log.proof)
    assert unknown.value.status == 404
    with pytest.raises(WitnessUnreachableError):
        submit_checkpoint(f"http://127.0.0.1:{free_port()}", log.note(), 10, log.proof, timeout=2)
