"""An exchange gets its checkpoints cosigned by a witness running as its own process; the
export bundle carries the cosignatures and still verifies; a witness that is down, hangs or
answers with a bad cosignature delays nothing and is never believed."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from crypto.encoding import b64_decode, b64_encode
from crypto.keys import SigningKey
from crypto.note import (
    NoteSigner,
    NoteVerifier,
    check_cosignatures,
    cosign_checkpoint,
    verify_checkpoint,
)
from exchange.audit import check_bundle, read_bundle_lines
from exchange.server.cosigning import WITNESS_ADDED, Cosigner, add_witness, list_witnesses
from exchange.server.ledger import write_export
from exchange.server.runtime import Exchange
from exchange.server.witness.client import WitnessConflictError, WitnessRefusedError
from exchange.server.witness.decision import RefusalKind
from exchange.server.witness.home import open_witness
from exchange.server.witness.protocol import format_add_checkpoint, parse_add_checkpoint
from exchange.server.witness.service import Cosigned
from tests.conftest import LiveServer, free_port, serving, settings_for
from tests.witness._support import (
    cli,
    init_witness,
    poll,
    serving_witness,
    start_witness,
    stop,
    trust,
    zonex,
)


def cosigned_size(ex: Exchange, name: str) -> int | None:
    return next(w.cosigned_size for w in list_witnesses(ex.engine) if w.name == name)


def grow(server: LiveServer, count: int) -> None:
    """Some ledger entries: principals registered by the operator."""
    with server.client(server.operator) as op:
        for _ in range(count):
            key = SigningKey.generate().public_key
            op.register_principal(f"firm-{key.key_id[:16]}", "enterprise", key)


def wait_cosigned_latest(ex: Exchange, name: str, at_least: int) -> int:
    """Poll until the witness cosigned the latest stored checkpoint, of at least a size."""

    def done() -> bool:
        latest = ex.ledger.latest_checkpoint()
        size = cosigned_size(ex, name)
        return latest is not None and size is not None and size >= at_least and size == latest.size

    poll(done, timeout=30, what=f"witness {name} to cosign a checkpoint of size >= {at_least}")
    size = cosigned_size(ex, name)
    assert size is not None
    return size


def test_the_exported_bundle_carries_verified_cosignatures(
    server: LiveServer, tmp_path: Path
) -> None:
    ex = server.exchange
    witness_dir = tmp_path / "W"
    vkey = init_witness(witness_dir, "witness.district.test")
    witness_key = NoteVerifier.from_verifier_key(vkey)
    log_key = server.log_verifier()
    trust(witness_dir, str(server.data_dir / "log.pub"))
    with serving_witness(witness_dir) as witness:
        done = zonex(
            "ledger", "witness", "add", "--data-dir", str(server.data_dir),
            "--url", witness.url, "--key", str(witness_dir / "witness.pub"),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "witness.district.test" in done.stdout
        grow(server, 3)
        first = wait_cosigned_latest(ex, "witness.district.test", ex.ledger.size())
        grow(server, 5)  # the next submission carries a consistency proof from `first`
        second = wait_cosigned_latest(ex, "witness.district.test", first + 5)
        # the witness's own record agrees
        assert f"\n{second}\n" in witness.latest(log_key.name).text

    with server.client(server.operator) as op:
        listed = op.request("GET", "/v1/log/witnesses")
    assert listed == [
        {
            "name": "witness.district.test",
            "verifier_key": vkey,
            "cosigned_size": second,
            "cosigned_at": listed[0]["cosigned_at"],
        }
    ]
    bundle = tmp_path / "ledger.jsonl"
    write_export(ex.ledger, bundle)
    report = check_bundle(read_bundle_lines(bundle), log_key)
    assert report.ok, report.fault
    sizes_cosigned = []
    for line in bundle.read_text("utf-8").splitlines():
        item = json.loads(line)
        if "checkpoint" not in item:
            if item["kind"] == WITNESS_ADDED:
                assert item["attrs"]["verifier_key"] == vkey
            continue
        cosignatures = check_cosignatures(item["checkpoint"], log_key, [witness_key], 0)
        assert cosignatures.invalid == ()
        if cosignatures.verified:
            sizes_cosigned.append(cosignatures.checkpoint.size)
    assert {first, second} <= set(sizes_cosigned)
    # the auditor's CLI checks the cosigned bundle like any other
    done = zonex("audit", "verify", str(bundle), "--log-key", str(server.data_dir / "log.pub"))
    assert done.returncode == 0, done.stderr
    assert "OK" in done.stdout


@pytest.fixture
def quick_exchange(data_dir: Path) -> Iterator[Exchange]:
    """An exchange that offers checkpoints and retries witnesses quickly."""
    settings = settings_for(
        data_dir,
        checkpoint_interval_seconds=0.1,
        witness_interval_seconds=0.1,
        witness_timeout_seconds=2.0,
        witness_backoff_max_seconds=0.5,
    )
    ex = Exchange(settings).start()
    try:
        yield ex
    finally:
        ex.close()


def test_a_witness_down_or_hanging_blocks_nothing_and_is_retried(
    quick_exchange: Exchange, data_dir: Path, tmp_path: Path
) -> None:
    ex = quick_exchange
    witness_dir = tmp_path / "W"
    vkey = init_witness(witness_dir)
    trust(witness_dir, str(data_dir / "log.pub"))
    # a port that accepts connections and never answers: every submission times out
    hanging = socket.socket()
    hanging.bind(("127.0.0.1", 0))
    hanging.listen(16)
    port = int(hanging.getsockname()[1])
    with serving(ex, data_dir) as server:
        add_witness(ex.engine, ex.ledger, ex.operator_key_id(), f"http://127.0.0.1:{port}", vkey)
        poll(
            lambda: list_witnesses(ex.engine)[0].failures >= 1,
            what="a failed submission to the hanging witness",
        )
        # meanwhile the ledger takes entries and signs checkpoints as always
        started = time.monotonic()
        grow(server, 5)
        target = ex.ledger.size()
        poll(
            lambda: (ex.ledger.latest_checkpoint() or ex.ledger.checkpoint()).size >= target,
            timeout=5,
            what="a periodic checkpoint while the witness hangs",
        )
        assert time.monotonic() - started < 5
        hanging.close()
        # nothing listens now: refused at once, retried with backoff, logged on the row
        poll(
            lambda: list_witnesses(ex.engine)[0].failures >= 3,
            what="retries of a witness that is down",
        )
        state = list_witnesses(ex.engine)[0]
        assert state.cosigned_size is None and state.last_error
        # the witness comes up on that port: the next attempt succeeds
        with serving_witness(witness_dir, port):
            size = wait_cosigned_latest(ex, "witness.test/w1", 1)
        state = list_witnesses(ex.engine)[0]
        assert state.failures == 0 and state.last_error is None and state.cosigned_size == size


def test_a_bad_cosignature_is_not_stored(exchange: Exchange, tmp_path: Path) -> None:
    """A hostile witness: its answers are refused unless they verify under its key."""
    witness_dir = tmp_path / "W"
    init_witness(witness_dir)
    real, _ = open_witness(witness_dir)
    assert exchange.log_signer is not None
    log_key = exchange.log_signer.verifier()
    real.store.trust(log_key, 1)
    vkey = real.signer.cosignature_verifier_key()
    add_witness(exchange.engine, exchange.ledger, exchange.operator_key_id(), "http://w.test", vkey)
    exchange.ledger.checkpoint()

    def honest(url: str, note: str, old: int, proof: Any, **_: Any) -> tuple[str, ...]:
        """submit_checkpoint against the real witness service, without HTTP."""
        for _ in range(2):
            body = format_add_checkpoint(old, list(proof(old)) if old else [], note)
            outcome = real.add_checkpoint(parse_add_checkpoint(body))
            if isinstance(outcome, Cosigned):
                return outcome.lines
            if outcome.kind is not RefusalKind.OLD_SIZE_MISMATCH:
                raise WitnessRefusedError(outcome.kind.status, outcome.detail)
            assert outcome.stored_size is not None
            old = outcome.stored_size
        raise WitnessConflictError(old)

    def forged(*a: Any, **k: Any) -> tuple[str, ...]:
        """Its name and key ID, a well-formed line, a signature that does not verify."""
        lines = []
        for line in honest(*a, **k):
            prefix, encoded = line.rsplit(" ", 1)
            blob = bytearray(b64_decode(encoded))
            blob[-1] ^= 1
            lines.append(f"{prefix} {b64_encode(bytes(blob))}")
        return tuple(lines)

    def other_key(url: str, note: str, *a: Any, **k: Any) -> tuple[str, ...]:
        """A valid cosignature, from a key that is not the configured witness's."""
        stranger = NoteSigner("witness.test/w1", SigningKey.generate())
        return (cosign_checkpoint(note, stranger, 1_800_000_000).rstrip("\n").rsplit("\n", 1)[1],)

    answers = {"forged": forged, "other key": other_key}
    for label, answer in answers.items():
        cosigner = Cosigner(
            exchange.engine, exchange.ledger, log_key, exchange.settings, submit=answer
        )
        before = exchange.ledger.latest_checkpoint()
        assert before is not None
        _clear_retry(exchange)
        assert cosigner.run_once() == {"witness.test/w1": False}, label
        cosigner.close()
        after = exchange.ledger.latest_checkpoint()
        assert after == before, label  # the note is unchanged
        state = list_witnesses(exchange.engine)[0]
        assert state.cosigned_size is None and state.last_error, label

    # the honest witness's answer, with an extra line from an unknown key: only its own is kept
    def with_noise(*a: Any, **k: Any) -> tuple[str, ...]:
        stranger = NoteSigner("noise.test/w", SigningKey.generate())
        noise = cosign_checkpoint(a[1], stranger, 1).rstrip("\n").rsplit("\n", 1)[1]
        return (*honest(*a, **k), noise, "— noise.test/w QUJD", "not a signature line")

    cosigner = Cosigner(
        exchange.engine, exchange.ledger, log_key, exchange.settings, submit=with_noise
    )
    _clear_retry(exchange)
    assert cosigner.run_once() == {"witness.test/w1": True}
    latest = exchange.ledger.latest_checkpoint()
    assert latest is not None
    assert "noise.test" not in latest.note
    witness_key = real.signer.cosignature_verifier()
    assert check_cosignatures(latest.note, log_key, [witness_key], 1).ok
    verify_checkpoint(latest.note, log_key)  # the log's signature is still what verifies
    # cosigned already: nothing is due until the next checkpoint
    assert cosigner.run_once() == {}
    cosigner.close()


def _clear_retry(ex: Exchange) -> None:
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from exchange.server.models import WitnessRow

    with Session(ex.engine) as session, session.begin():
        session.execute(update(WitnessRow).values(retry_at=None, lease_until=None))


def test_the_exchange_cli_refuses_bad_witness_configuration_in_one_line(data_dir: Path) -> None:
    good = "witness.test/w1+" + _vkey_tail()
    cases = {
        ("--url", "ftp://x", "--key", good): "http:// or https://",
        ("--url", "http://127.0.0.1:1", "--key", "nope"): "no such file",
        ("--url", "http://127.0.0.1:1", "--key", "a+b+c"): "not a witness verifier key",
    }
    for args, expected in cases.items():
        done = cli("ledger", "witness", "add", "--data-dir", str(data_dir), *args)
        assert done.returncode == 1, (args, done.stdout)
        assert expected in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    ok = cli("ledger", "witness", "add", "--data-dir", str(data_dir),
               "--url", "http://127.0.0.1:1", "--key", good)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    again = cli("ledger", "witness", "add", "--data-dir", str(data_dir),
                  "--url", "http://127.0.0.1:2", "--key", good, "--name", "other")  # fmt: skip
    assert again.returncode == 1 and "already configured" in again.stderr
    listed = cli("ledger", "witness", "list", "--data-dir", str(data_dir), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [w["name"] for w in json.loads(listed.stdout)] == ["witness.test/w1"]


def _vkey_tail() -> str:
    signer = NoteSigner("witness.test/w1", SigningKey(b"\x09" * 32))
    return signer.cosignature_verifier_key().split("+", 1)[1]


def test_a_restarted_exchange_goes_on_from_the_size_the_witness_cosigned(
    data_dir: Path, tmp_path: Path
) -> None:
    witness_dir = tmp_path / "W"
    vkey = init_witness(witness_dir)
    trust(witness_dir, str(data_dir / "log.pub"))
    port = free_port()
    witness = start_witness(witness_dir, port)
    try:
        settings = settings_for(data_dir, witness_interval_seconds=0.1)
        with Exchange(settings) as ex:
            add_witness(ex.engine, ex.ledger, ex.operator_key_id(), witness.url, vkey)
            first = wait_cosigned_latest(ex, "witness.test/w1", 1)
        with Exchange(settings) as ex, serving(ex, data_dir) as server:
            grow(server, 2)
            second = wait_cosigned_latest(ex, "witness.test/w1", first + 2)
        # the first submission after the restart came from the size kept in the database
        assert f"(old size {first})" in witness.log_text() and second > first
        assert "refused" not in witness.log_text()
    finally:
        stop(witness.process)


def test_cosign_now_then_export_ends_with_a_cosigned_checkpoint(
    data_dir: Path, tmp_path: Path
) -> None:
    """A quiet exchange, offline: `zonex ledger witness cosign` then `zonex ledger export`."""
    witness_dir = tmp_path / "W"
    vkey = init_witness(witness_dir)
    witness_key = NoteVerifier.from_verifier_key(vkey)
    log_pub = data_dir / "log.pub"
    trust(witness_dir, str(log_pub))
    with serving_witness(witness_dir) as witness:
        added = cli("ledger", "witness", "add", "--data-dir", str(data_dir),
                    "--url", witness.url, "--key", vkey)  # fmt: skip
        assert added.returncode == 0, added.stderr
        done = cli("ledger", "witness", "cosign", "--data-dir", str(data_dir))
        assert done.returncode == 0, done.stderr
        assert "witness.test/w1: cosigned checkpoint 2" in done.stdout
    bundle = tmp_path / "b.jsonl"
    exported = cli("ledger", "export", "--data-dir", str(data_dir), "--out", str(bundle))
    assert exported.returncode == 0, exported.stderr
    final = json.loads(bundle.read_text("utf-8").splitlines()[-1])["checkpoint"]
    report = check_cosignatures(
        final, NoteVerifier.from_verifier_key(log_pub.read_text().strip()), [witness_key], 1
    )
    assert report.ok and report.checkpoint.size == 2
    # the witness is gone now: the command says so in one line, within its timeout
    down = cli("ledger", "witness", "cosign", "--data-dir", str(data_dir), "--timeout", "0")
    assert down.returncode == 0, down.stderr  # nothing new to cosign: still cosigned
    add_more = cli("ledger", "witness", "add", "--data-dir", str(data_dir),
                   "--url", "http://127.0.0.1:1", "--key", _other_vkey())  # fmt: skip
    assert add_more.returncode == 0, add_more.stderr
    started = time.monotonic()
    down = cli("ledger", "witness", "cosign", "--data-dir", str(data_dir), "--timeout", "1")
    assert time.monotonic() - started < 10
    assert down.returncode == 1
    assert "did not cosign checkpoint 3 within 1 s" in down.stderr, down.stderr
    assert len(down.stderr.strip().splitlines()) == 1, down.stderr


def _other_vkey() -> str:
    return NoteSigner("other.test/w", SigningKey(b"\x0a" * 32)).cosignature_verifier_key()


def test_an_export_over_the_api_ends_with_a_cosigned_checkpoint_a_policy_accepts(
    server: LiveServer, tmp_path: Path
) -> None:
    witness_dir = tmp_path / "W"
    vkey = init_witness(witness_dir, "witness.city.test")
    trust(witness_dir, str(server.data_dir / "log.pub"))
    auditor = SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Audit Office", "auditor", auditor.public_key)
    policy = tmp_path / "policy.txt"
    policy.write_text(f"witness city {vkey}\nquorum city\n", "utf-8")
    with serving_witness(witness_dir) as witness:
        done = zonex(
            "ledger", "witness", "add", "--data-dir", str(server.data_dir),
            "--url", witness.url, "--key", vkey,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        grow(server, 2)
        bundle = tmp_path / "ledger.jsonl"
        with server.client(auditor) as a, bundle.open("wb") as f:
            size = a.export_ledger(f)  # signs a fresh checkpoint: the witness cosigns it now
    last = json.loads(bundle.read_text("utf-8").splitlines()[-1])
    report = check_cosignatures(
        last["checkpoint"], server.log_verifier(), [NoteVerifier.from_verifier_key(vkey)], 1
    )
    assert report.ok and report.checkpoint.size == size
    done = zonex(
        "audit", "verify", str(bundle), "--log-key", str(server.data_dir / "log.pub"),
        "--policy", str(policy),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quorum" in done.stdout
