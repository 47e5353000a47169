"""A client command of the CLI starts without the server stack (issue 14, fast start)."""

from __future__ import annotations

import json
import subprocess
import sys

#: what only the exchange, a zone node or an HE/DP computation needs
SERVER_STACK = (
    "fastapi",
    "uvicorn",
    "starlette",
    "sqlalchemy",
    "alembic",
    "duckdb",
    "tenseal",
    "opendp",
    "casbin",
)


def _loaded_after(argv: list[str]) -> list[str]:
    """Run ``zonex ARGV`` in a fresh interpreter and list the server modules it imported."""
    code = (
        "import json, sys\n"
        f"sys.argv = ['zonex', *{argv!r}]\n"
        "import exchange.cli\n"
        "try:\n"
        "    exchange.cli.main()\n"
        "except SystemExit:\n"
        "    pass\n"
        f"print(json.dumps(sorted(m for m in {SERVER_STACK!r} if m in sys.modules)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return list(json.loads(done.stdout.strip().splitlines()[-1]))


def test_client_commands_import_no_server_module() -> None:
    for argv in (
        ["catalog", "--help"],
        ["--help"],
        ["--version"],
        ["psi", "aggregate", "--help"],
        ["score", "--help"],
        ["receipt", "verify", "--help"],
    ):
        assert _loaded_after(argv) == [], argv


def test_a_client_command_that_fails_to_connect_still_imports_no_server_module() -> None:
    # the whole path of a real call: key loading, the SDK, the signed request, the error line
    argv = ["catalog", "--url", "http://127.0.0.1:9", "--key", "/nonexistent/consumer.key"]
    assert _loaded_after(argv) == []


def test_the_check_sees_a_server_import() -> None:
    # the test above could fail: a server command does import the stack
    argv = ["ledger", "export", "--data-dir", "/nonexistent", "--out", "/nonexistent/bundle"]
    assert "sqlalchemy" in _loaded_after(argv)


def test_the_psi_batch_default_matches_the_client() -> None:
    from exchange.cli import psi
    from exchange.client.psi import DEFAULT_BATCH_POINTS

    assert psi.DEFAULT_BATCH == DEFAULT_BATCH_POINTS
