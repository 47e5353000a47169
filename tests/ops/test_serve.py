"""``zonex serve`` as a real process: graceful shutdown under load, multi-worker metrics,
JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from crypto.keys import SigningKey
from crypto.note import NoteVerifier
from exchange.audit import check_bundle, read_bundle_lines
from exchange.client.sdk import ApiError, Client
from exchange.keyfile import load_private_key
from exchange.server.ledger import write_export
from exchange.server.runtime import Exchange, init_data_dir
from tests.conftest import free_port, settings_for


@contextmanager
def zonex_serve(data_dir: Path, *extra: str) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    port = free_port()
    log_path = data_dir.parent / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exchange.cli",
                "serve",
                "--data-dir",
                str(data_dir),
                "--port",
                str(port),
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 45
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited early:\n{log_path.read_text()}")
            try:
                if httpx.get(url + "/v1/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"serve did not become ready:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield proc, url, log_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def health_count(metrics_text: str) -> float:
    counted = 0.0
    for line in metrics_text.splitlines():
        if line.startswith("zonex_http_requests_total{") and 'route="/v1/health"' in line:
            counted += float(line.rsplit(" ", 1)[1])
    return counted


def test_two_workers_metrics_then_sigterm_under_load(tmp_path: Path) -> None:
    """One server with two workers: /metrics sums both; SIGTERM mid-load loses nothing
    acknowledged; the ledger verifies offline; the log is JSON lines with request ids."""
    data_dir = tmp_path / "exchange"
    init_data_dir(data_dir, origin="test.zonex/log")
    (data_dir / "metrics").mkdir()
    (data_dir / "metrics" / "counter_999999.db").write_bytes(b"stale from an earlier run")
    operator = load_private_key(data_dir / "operator.key")
    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    with zonex_serve(data_dir, "--workers", "2") as (proc, url, log_path):
        assert not (data_dir / "metrics" / "counter_999999.db").exists()
        sent = 30
        for _ in range(sent):
            # a fresh connection each time, so both workers take requests
            assert httpx.get(url + "/v1/health", timeout=5).status_code == 200
        # a request is counted just after its response is sent: poll briefly
        deadline = time.monotonic() + 5
        while True:
            metrics_text = httpx.get(url + "/metrics", timeout=5).text
            if health_count(metrics_text) >= sent or time.monotonic() > deadline:
                break
            time.sleep(0.05)

        def worker(n: int) -> None:
            with Client(url, operator, timeout=30) as c:
                i = 0
                while not stop.is_set():
                    key = SigningKey.generate()
                    try:
                        c.register_principal(f"load-{n}-{i}", "enterprise", key.public_key)
                    except (httpx.HTTPError, ApiError):
                        return  # refused or cut off by the shutdown: not acknowledged
                    with lock:
                        acknowledged.append(key.key_id)
                    i += 1

        threads = [threading.Thread(target=worker, args=(n,)) for n in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)  # mid-load: requests are in flight
        returncode = proc.wait(timeout=30)
        stop.set()
        for t in threads:
            t.join(timeout=30)
        log_text = log_path.read_text()
    assert returncode in (0, -signal.SIGTERM), log_text
    assert len(acknowledged) >= 60

    assert health_count(metrics_text) == sent, metrics_text

    # offline: every acknowledged registration is on the ledger, which verifies, and the
    # last checkpoint signed at shutdown covers every entry
    ex = Exchange(settings_for(data_dir))
    try:
        latest = ex.ledger.latest_checkpoint()
        size = ex.ledger.size()
        assert latest is not None and latest.size == size
        bundle = tmp_path / "ledger.jsonl"
        write_export(ex.ledger, bundle)
    finally:
        ex.close()
    verifier = NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())
    report = check_bundle(read_bundle_lines(bundle), verifier)
    assert report.ok, report.fault
    registered = set()
    for line in bundle.read_bytes().splitlines():
        obj = json.loads(line)
        if obj.get("kind") == "principal.registered":
            registered.add(obj["refs"]["principal"])
    missing = set(acknowledged) - registered
    assert not missing, f"{len(missing)} acknowledged registrations lost"

    # the server's log is one JSON object per line; access lines carry ids and the signer
    lines = [line for line in log_text.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]
    access = [r for r in records if r.get("logger") == "zonex.access"]
    assert len(access) >= sent + len(acknowledged)
    assert all(len(str(r["request_id"])) == 32 for r in access)
    assert any(r.get("key_id") == operator.key_id for r in access)
    assert any(r.get("msg") == "Application shutdown complete." for r in records)
    assert not any("color_message" in r for r in records)
