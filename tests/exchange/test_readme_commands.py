"""Every command in README.md's "Use it" block, run as written where nothing it names exists (no
server at the URL, no key files but those the block itself creates, no input files): each ends
with a readable answer, never a Python traceback, and a failure is one ``error:`` line."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from exchange.cli import app
from tests.conftest import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
#: commands that run until stopped
_LONG_RUNNING = {"serve"}


def readme_commands() -> list[list[str]]:
    """The ``zonex`` command lines of the "Use it" block, continuations joined, comments and
    ``...`` placeholders dropped, ``a ; b`` split."""
    text = README.read_text("utf-8")
    block = text.split("## Use it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    lines: list[str] = []
    pending = ""
    for raw in block.splitlines():
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        line = pending + " " + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].strip()
            continue
        pending = ""
        lines.append(line)
    commands = []
    for line in lines:
        for part in re.split(r"\s;\s", line):
            # a comment starts at " #" outside quotes
            words = shlex.split(part, comments=True)
            words = [w for w in words if w != "..."]
            if "|" in words:
                words = words[: words.index("|")]
            if words and words[0] == "zonex" and len(words) > 1:
                commands.append(words[1:])
    return commands


COMMANDS = readme_commands()


def test_the_readme_block_is_read_whole() -> None:
    names = {" ".join(c[:2]) if c[0] in _GROUPS else c[0] for c in COMMANDS}
    assert len(COMMANDS) >= 35
    assert {"init", "catalog", "aggregate", "psi aggregate", "ledger export", "restore"} <= names


_GROUPS = {"key", "principal", "zone", "dataset", "consent", "ledger", "audit", "receipt", "log",
           "psi", "model", "profile"}  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.mark.parametrize("args", COMMANDS, ids=[" ".join(c)[:60] for c in COMMANDS])
def test_a_readme_command_never_ends_in_a_traceback(
    args: list[str], workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if args[0] in _LONG_RUNNING:
        pytest.skip("runs until stopped; started by the serve tests")
    monkeypatch.chdir(workdir)  # commands run in order: init and key new make what later ones use
    monkeypatch.setenv("ZONEX_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens
    result = CliRunner().invoke(app, args, catch_exceptions=True)
    output = result.stdout + result.stderr
    assert "Traceback" not in output, output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    if result.exit_code == 1:
        lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
