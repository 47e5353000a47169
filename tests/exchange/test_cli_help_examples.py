"""Every ``zonex`` command's ``--help`` shows at least one example invocation of itself."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from exchange.cli import app


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """The name path of every leaf command under ``command`` (groups are walked, not listed)."""
    subcommands = getattr(command, "commands", None)
    if subcommands is None:
        yield path
        return
    for name, sub in sorted(subcommands.items()):
        yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(app)))


def test_the_walk_finds_groups_and_their_commands() -> None:
    assert ("catalog",) in COMMANDS
    assert ("dataset", "register") in COMMANDS
    assert ("psi", "aggregate") in COMMANDS
    assert len(COMMANDS) > 30


@pytest.mark.parametrize("path", COMMANDS, ids=[" ".join(p) for p in COMMANDS])
def test_help_shows_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    expected = "zonex " + " ".join(path)
    # a line of its own that starts with the command (so `zonex request` is not `zonex requests`)
    example = re.compile(rf"^\s*{re.escape(expected)}(\s|$)", re.MULTILINE)
    assert example.search(result.output), f"`{expected} --help` shows no example of itself"
