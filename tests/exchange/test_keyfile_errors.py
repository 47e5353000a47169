"""Key files and the error tree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.errors import KeyFileError, ZonexError, all_error_classes
from exchange.keyfile import load_private_key, write_private_key


def test_private_key_is_written_0600_and_loads(tmp_path: Path) -> None:
    key = SigningKey.generate()
    path = tmp_path / "k.key"
    write_private_key(path, key)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert load_private_key(path).key_id == key.key_id


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_readable_private_key_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "k.key"
    write_private_key(path, SigningKey.generate())
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(path)


def test_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "k.key"
    write_private_key(path, SigningKey.generate())
    before = path.read_bytes()
    with pytest.raises(KeyFileError):
        write_private_key(path, SigningKey.generate())
    assert path.read_bytes() == before


def test_cli_key_new_and_refusal_are_one_line(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["key", "new", "--out", str(tmp_path / "me")])
    assert result.exit_code == 0, result.output
    assert os.stat(tmp_path / "me.key").st_mode & 0o777 == 0o600
    os.chmod(tmp_path / "me.key", 0o644)
    result = runner.invoke(app, ["key", "id", str(tmp_path / "me.key")])
    assert result.exit_code == 1
    assert "readable by others" in result.output
    assert "Traceback" not in result.output


def test_cli_reports_garbage_key_in_one_line(tmp_path: Path) -> None:
    path = tmp_path / "junk.key"
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n")
    os.chmod(path, 0o600)
    result = CliRunner().invoke(app, ["key", "id", str(path)])
    assert result.exit_code == 1
    assert "Traceback" not in result.output


def test_every_error_class_has_a_status_and_unique_code() -> None:
    classes = all_error_classes()
    assert ZonexError in classes
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes)), codes
    for cls in classes:
        assert 400 <= cls.status <= 599, cls


def test_init_refuses_an_initialized_directory(tmp_path: Path) -> None:
    runner = CliRunner()
    d = tmp_path / "d"
    assert runner.invoke(app, ["init", "--data-dir", str(d)]).exit_code == 0
    assert (d / "log.pub").read_text().startswith("zonex.local/log+")
    again = runner.invoke(app, ["init", "--data-dir", str(d)])
    assert again.exit_code == 1
    assert "already initialized" in again.output
