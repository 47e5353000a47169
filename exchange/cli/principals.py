"""``zonex principal`` (operator) and ``zonex whoami``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from exchange.cli._common import KeyPath, Url, app, client, one_line_errors, out
from exchange.keyfile import load_public_key

principal_app = typer.Typer(help="principals (operator)", no_args_is_help=True)
app.add_typer(principal_app, name="principal")


@principal_app.command("add")
@one_line_errors
def principal_add(
    name: str,
    kind: Annotated[str, typer.Option(help="agency | enterprise | auditor")],
    public_key: Annotated[Path, typer.Option("--public-key", help="PEM public key file")],
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """Register a principal (operator only)."""
    with client(url, key) as c:
        p = c.register_principal(name, kind, load_public_key(public_key))
    out.print(f"registered {p['name']} ({p['kind']}) key id {p['key_id']}")


@principal_app.command("list")
@one_line_errors
def principal_list(url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")) -> None:
    """List principals (operator and auditors)."""
    with client(url, key) as c:
        rows = c.list_principals()
    table = Table("name", "kind", "status", "key id")
    for p in rows:
        table.add_row(p["name"], p["kind"], p["status"], p["key_id"][:16] + "…")
    out.print(table)


def _status(key_id: str, status: str, url: str, key: Path) -> None:
    with client(url, key) as c:
        p = c.set_principal_status(key_id, status)
    out.print(f"{p['name']}: {p['status']}")


@principal_app.command("suspend")
@one_line_errors
def principal_suspend(
    key_id: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Suspend a principal at once (operator only)."""
    _status(key_id, "suspended", url, key)


@principal_app.command("reinstate")
@one_line_errors
def principal_reinstate(
    key_id: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Reinstate a suspended principal (operator only)."""
    _status(key_id, "active", url, key)


@app.command()
@one_line_errors
def whoami(url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")) -> None:
    """Show the principal your key belongs to."""
    with client(url, key) as c:
        p = c.whoami()
    out.print(f"{p['name']} ({p['kind']}, {p['status']}) {p['key_id']}")
