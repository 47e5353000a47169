"""Test logs and a witness run as its own process (``zonex witness serve``)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from crypto.keys import SigningKey
from crypto.merkle import MerkleTree, leaf_hash
from crypto.note import Checkpoint, NoteSigner, NoteVerifier, sign_checkpoint
from exchange.server.witness.protocol import format_add_checkpoint, origin_hash
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class FakeLog:
    """A log under the test's control: its key, its leaves, checkpoints and proofs."""

    origin: str
    key: SigningKey = field(default_factory=SigningKey.generate)
    tree: MerkleTree = field(default_factory=MerkleTree)
    #: a tag mixed into leaves: two logs with the same key and different tags fork
    tag: bytes = b""

    @property
    def signer(self) -> NoteSigner:
        return NoteSigner(self.origin, self.key)

    @property
    def verifier(self) -> NoteVerifier:
        return self.signer.verifier()

    def grow(self, to: int) -> FakeLog:
        while self.tree.size < to:
            self.tree.append(leaf_hash(b"%s entry %d" % (self.tag, self.tree.size)))
        return self

    def checkpoint(self, size: int | None = None) -> Checkpoint:
        size = self.tree.size if size is None else size
        return Checkpoint(self.origin, size, self.tree.root(size))

    def note(self, size: int | None = None) -> str:
        return sign_checkpoint(self.checkpoint(size), self.signer)

    def proof(self, old: int, size: int | None = None) -> list[bytes]:
        size = self.tree.size if size is None else size
        return self.tree.consistency_proof(old, size) if old else []

    def body(self, old: int, size: int | None = None) -> bytes:
        """A well-formed add-checkpoint body from ``old`` to ``size`` (default: the whole tree)."""
        return format_add_checkpoint(old, self.proof(old, size), self.note(size))

    def fork(self, tag: bytes, common: int) -> FakeLog:
        """The same key and origin over a tree that shares only the first ``common`` leaves."""
        other = FakeLog(self.origin, self.key, MerkleTree(), tag)
        for index in range(common):
            other.tree.append(self.tree.leaf_hash(index))
        return other


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``zonex ARGS`` in this process (typer's runner), answered like :func:`zonex`."""
    from typer.testing import CliRunner

    from exchange.cli import app

    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def zonex(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``zonex ARGS`` in a new process."""
    return subprocess.run(
        [sys.executable, "-m", "exchange.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def init_witness(path: Path, name: str = "witness.test/w1") -> str:
    """``zonex witness init``; the witness's cosignature verifier key."""
    done = cli("witness", "init", "--data-dir", str(path), "--name", name)
    assert done.returncode == 0, done.stderr
    return (path / "witness.pub").read_text("utf-8").strip()


def trust(path: Path, *logs: FakeLog | str) -> None:
    """``zonex witness trust`` each log (a FakeLog or a verifier key / log.pub path)."""
    args: list[str] = []
    for log in logs:
        key = log.verifier.to_verifier_key() if isinstance(log, FakeLog) else log
        args += ["--log-key", key]
    done = cli("witness", "trust", "--data-dir", str(path), *args)
    assert done.returncode == 0, done.stderr


@dataclass
class WitnessProcess:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def add(self, body: bytes) -> httpx.Response:
        return httpx.post(self.url + "/add-checkpoint", content=body, timeout=30)

    def latest(self, origin: str) -> httpx.Response:
        return httpx.get(f"{self.url}/{origin_hash(origin)}/checkpoint", timeout=30)

    def log_text(self) -> str:
        return self.log_path.read_text("utf-8", "replace")


def wait_until_listening(url: str, process: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll until the server answers HTTP (any status), or fail with its log."""
    deadline = time.monotonic() + 45
    while True:
        if process.poll() is not None:
            raise AssertionError(f"the server exited early:\n{log_path.read_text()}")
        try:
            httpx.get(url + "/add-checkpoint", timeout=1)  # 405: it listens
            return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"the server did not start:\n{log_path.read_text()}")
        time.sleep(0.05)


def start_witness(path: Path, port: int | None = None) -> WitnessProcess:
    port = port or free_port()
    log_path = path.parent / f"{path.name}-serve.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "exchange.cli", "witness", "serve",
                "--data-dir", str(path), "--port", str(port), "--log-format", "text",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_listening(url, process, log_path)
    except BaseException:
        stop(process)
        raise
    return WitnessProcess(url, process, log_path)


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@contextmanager
def serving_witness(path: Path, port: int | None = None) -> Iterator[WitnessProcess]:
    """``zonex witness serve`` on a free loopback port until the block ends."""
    witness = start_witness(path, port)
    try:
        yield witness
    finally:
        stop(witness.process)


def poll(predicate: Callable[[], object], timeout: float = 30, what: str = "condition") -> None:
    """Wait until ``predicate()`` is true (polling, never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
