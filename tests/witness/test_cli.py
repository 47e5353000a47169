"""``zonex witness init|trust|list|serve`` from the command line: files and modes, the printed
key, idempotent trust, and one readable line for every bad input."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

from crypto.note import ALG_COSIGNATURE_V1, NoteVerifier
from exchange.keyfile import load_private_key
from tests.conftest import free_port
from tests.witness._support import FakeLog, cli


def one_error_line(done: subprocess.CompletedProcess[str], expected: str) -> None:
    assert done.returncode == 1, done.stdout
    assert expected in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, (
        done.stderr
    )


def test_init_writes_a_private_key_and_prints_the_cosignature_vkey(tmp_path: Path) -> None:
    path = tmp_path / "W"
    done = cli("witness", "init", "--data-dir", str(path), "--name", "witness.district.test")
    assert done.returncode == 0, done.stderr
    key_file = path / "witness.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    vkey = done.stdout.strip().splitlines()[-1]
    verifier = NoteVerifier.from_verifier_key(vkey)
    assert verifier.name == "witness.district.test"
    assert verifier.signature_type == ALG_COSIGNATURE_V1
    assert verifier.key == load_private_key(key_file).public_key
    assert (path / "witness.pub").read_text().strip() == vkey
    assert json.loads((path / "witness.json").read_text()) == {"name": "witness.district.test"}
    # never over an existing witness
    again = cli("witness", "init", "--data-dir", str(path), "--name", "other.test")
    one_error_line(again, "already holds a witness")
    assert (path / "witness.pub").read_text().strip() == vkey


def test_init_refuses_a_bad_name(tmp_path: Path) -> None:
    for name in ("has space", "a+b", ""):
        done = cli("witness", "init", "--data-dir", str(tmp_path / "W"), "--name", name)
        one_error_line(done, "--name")
    assert not (tmp_path / "W" / "witness.key").exists()


def test_trust_is_repeatable_and_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "W"
    assert cli("witness", "init", "--data-dir", str(path), "--name", "w.test").returncode == 0
    city, district = FakeLog("city.test/log"), FakeLog("district.test/log")
    log_pub = tmp_path / "log.pub"
    log_pub.write_text(city.verifier.to_verifier_key() + "\n")
    done = cli(
        "witness", "trust", "--data-dir", str(path),
        "--log-key", str(log_pub), "--log-key", district.verifier.to_verifier_key(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("now trusted") == 2
    again = cli("witness", "trust", "--data-dir", str(path), "--log-key", str(log_pub))
    assert again.returncode == 0 and "already trusted" in again.stdout
    listed = cli("witness", "list", "--data-dir", str(path), "--json")
    assert [(log["origin"], log["size"]) for log in json.loads(listed.stdout)] == [
        ("city.test/log", None),
        ("district.test/log", None),
    ]


def test_trust_refuses_bad_keys_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "W"
    assert cli("witness", "init", "--data-dir", str(path), "--name", "w.test").returncode == 0
    cases = {
        str(tmp_path / "missing.pub"): "no such file",
        "a+b+c": "not a log verifier key",
        str(path / "witness.pub"): "not a log key",  # a witness's own cosignature key
        str(path / "witness.key"): "not a log verifier key",
    }
    for given, expected in cases.items():
        done = cli("witness", "trust", "--data-dir", str(path), "--log-key", given)
        one_error_line(done, expected)
    not_a_witness = cli(
        "witness", "trust", "--data-dir", str(tmp_path / "nowhere"), "--log-key", "a+b+c"
    )
    one_error_line(not_a_witness, "zonex witness init")


def test_serve_refuses_a_directory_that_is_not_a_witness(tmp_path: Path) -> None:
    done = cli("witness", "serve", "--data-dir", str(tmp_path), "--port", str(free_port()))
    one_error_line(done, "not a witness directory")
    path = tmp_path / "W"
    assert cli("witness", "init", "--data-dir", str(path), "--name", "w.test").returncode == 0
    (path / "witness.key").chmod(0o644)
    one_error_line(
        cli("witness", "serve", "--data-dir", str(path), "--port", str(free_port())),
        "chmod 600",
    )
