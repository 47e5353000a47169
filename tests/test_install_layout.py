"""Who installs what: a consumer and an auditor need neither the server nor the node stack.

`pip install zonex` installs only the base dependencies (pyproject.toml); the server and node
libraries come with the `server` and `node` extras. These tests run the consumer's and the
auditor's code in a fresh interpreter in which every server- and node-only library refuses to
import, so an import that crept in (at module level or on the path a command takes) fails here.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from tests.conftest import L3_LEVELS, LiveServer, tax_bureau_and_bank
from tests.exchange.test_access import granted

ROOT = Path(__file__).resolve().parents[1]

#: importable only with the `node` or `server` extra
SERVER_AND_NODE = (
    "alembic",
    "duckdb",
    "duckdb_engine",
    "fastapi",
    "opendp",
    "prometheus_client",
    "psycopg",
    "pyarrow",
    "sqlalchemy",
    "sqlglot",
    "starlette",
    "uvicorn",
)

BLOCKER = textwrap.dedent(
    f"""
    import importlib.abc, sys
    BLOCKED = {SERVER_AND_NODE!r}
    class Blocker(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{{name}} is not installed with the base package")
            return None
    sys.meta_path.insert(0, Blocker())
    """
)

#: the consumer's and the auditor's modules
CLIENT_AND_AUDIT = (
    "exchange.client.sdk",
    "exchange.client.results",
    "exchange.client.he",
    "exchange.client.psi",
    "exchange.audit",
    "exchange.cli",
    "exchange.tasks",
    "crypto.receipt",
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", BLOCKER + textwrap.dedent(code)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_blocks() -> None:
    """The harness would notice: importing the server under it fails."""
    done = _run("import exchange.server.api.app")
    assert done.returncode != 0 and "not installed with the base package" in done.stderr


@pytest.mark.parametrize("module", CLIENT_AND_AUDIT)
def test_client_and_audit_modules_import_without_server_or_node(module: str) -> None:
    done = _run(f"import {module}")
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_base_dependencies_leave_out_the_server_and_node_stacks() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]

    def names(requirements: list[str]) -> set[str]:
        return {
            r.split(">")[0].split("[")[0].split(";")[0].strip().replace("-", "_")
            for r in requirements
        }

    base = names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert not base & set(SERVER_AND_NODE)
    assert {"duckdb", "sqlglot", "opendp", "sqlalchemy"} <= names(extras["node"])
    assert {"fastapi", "uvicorn", "alembic"} <= names(extras["server"])
    assert "zonex[node]" in extras["server"]


def test_a_consumer_and_an_auditor_verify_offline_without_server_or_node(
    server: LiveServer, tmp_path: Path
) -> None:
    """A receipt and an exported ledger, made by a real exchange, verified by the CLI in an
    interpreter that cannot import the server or the node."""
    provider, consumer = tax_bureau_and_bank(server, L3_LEVELS)
    keys = {"provider": provider, "consumer": consumer}
    granted(server, keys, ["companies"], ["aggregate"])
    with server.client(consumer) as c:
        out = c.aggregate(
            "tax",
            "SELECT district, COUNT(*) AS n FROM companies GROUP BY district",
            "credit-assessment",
            epsilon="1",
        )
        (tmp_path / "receipt.json").write_text(json.dumps(out.receipt))
        (tmp_path / "result.json").write_text(json.dumps(out.result))
    with server.client(server.operator) as op, (tmp_path / "ledger.jsonl").open("wb") as f:
        op.export_ledger(f)
    log_pub = server.data_dir / "log.pub"
    for args in (
        ["--help"],
        ["psi", "--help"],
        [
            "receipt", "verify", str(tmp_path / "receipt.json"),
            "--result", str(tmp_path / "result.json"), "--log-key", str(log_pub),
        ],
        ["audit", "verify", str(tmp_path / "ledger.jsonl"), "--log-key", str(log_pub)],
    ):  # fmt: skip
        done = _run(
            f"import sys\nfrom exchange.cli import main\nsys.argv = ['zonex', *{args!r}]\nmain()"
        )
        assert done.returncode == 0, (args, done.stdout[-1000:], done.stderr[-2000:])
    assert "OK" in done.stdout


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function."""
    import ast

    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("client", ("exchange.server", "exchange.node")),
        ("audit", ("exchange.server", "exchange.node")),
        ("node", ("exchange.server",)),
    ],
)
def test_imports_point_one_way(package: str, forbidden: tuple[str, ...]) -> None:
    """client and audit import neither server nor node; node never imports server (not even
    inside a function). The shared modules at exchange/ import none of the three."""
    files = sorted((ROOT / "exchange" / package).rglob("*.py"))
    assert files
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in files
        for name in sorted(_imports(path))
        if name.startswith(forbidden)
    ]
    assert not bad, "\n".join(bad)


def test_shared_modules_import_no_deployment_package() -> None:
    shared = sorted((ROOT / "exchange").glob("*.py"))
    bad = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in shared
        for name in sorted(_imports(path))
        if name.startswith(
            ("exchange.server", "exchange.node", "exchange.client", "exchange.audit")
        )
    ]
    assert not bad, "\n".join(bad)
