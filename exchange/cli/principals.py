"""``zonex principal`` (operator) and ``zonex whoami``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from exchange.cli._common import Json, KeyPath, Url, app, client, one_line_errors, out, print_json

#: the kinds an operator registers (exchange.domain.PrincipalKind, less the operator itself)
KINDS = ("agency", "enterprise", "auditor", "monitor")

principal_app = typer.Typer(help="principals (operator)", no_args_is_help=True)
app.add_typer(principal_app, name="principal")


@principal_app.command("add")
@one_line_errors
def principal_add(
    name: str,
    kind: Annotated[str, typer.Option(help="agency | enterprise | auditor | monitor")],
    public_key: Annotated[Path, typer.Option("--public-key", help="PEM public key file")],
    jurisdiction: Annotated[
        str | None,
        typer.Option(help="ISO 3166-1 alpha-2 code (CN, US, HK ...); default: the operator's"),
    ] = None,
    ciio: Annotated[
        bool, typer.Option("--ciio", help="a critical information infrastructure operator")
    ] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """Register a principal (operator only). Its jurisdiction and CIIO flag decide flows
    abroad (docs/cross-border.md).

    Example:
      zonex principal add "City Bank" --kind enterprise --public-key bank.pub --key D/operator.key
      zonex principal add "HK Fund" --kind enterprise --public-key fund.pub --jurisdiction HK
    """
    from exchange.keyfile import load_public_key
    from policy.xborder import is_jurisdiction

    if kind not in KINDS:
        raise ValueError(f"--kind {kind!r} is not a principal kind; use one of: {', '.join(KINDS)}")
    if jurisdiction is not None and not is_jurisdiction(jurisdiction):
        raise ValueError(
            f"--jurisdiction {jurisdiction!r} is not an ISO 3166-1 alpha-2 code (e.g. CN, US, HK)"
        )
    with client(url, key) as c:
        p = c.register_principal(
            name, kind, load_public_key(public_key), jurisdiction=jurisdiction, ciio=ciio
        )
    where = p.get("jurisdiction") or "-"
    out.print(
        f"registered {p['name']} ({p['kind']}, {where}{', CIIO' if p.get('ciio') else ''}) "
        f"key id {p['key_id']}"
    )


@principal_app.command("list")
@one_line_errors
def principal_list(
    as_json: Json = False, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """List principals: all of them (operator, auditors); a zone's provider sees itself and
    those with requests, grants or consents on its zones.

    Example:
      zonex principal list --key D/operator.key
    """
    from exchange.cli.access import print_wide

    with client(url, key) as c:
        rows = c.list_principals()
    if as_json:
        print_json(rows)
        return
    table = Table("name", "kind", "status", "jurisdiction", "key id")
    for p in rows:
        where = (p.get("jurisdiction") or "operator's") + (" CIIO" if p.get("ciio") else "")
        table.add_row(p["name"], p["kind"], p["status"], where, p["key_id"])
    print_wide(table)


def _status(key_id: str, status: str, url: str, key: Path) -> None:
    with client(url, key) as c:
        if len(key_id) != 64:  # a name or a unique key id prefix (6+), like git
            key_id = _principal_key_id(c.list_principals(), key_id)
        p = c.set_principal_status(key_id, status)
    out.print(f"{p['name']}: {p['status']}")


def _principal_key_id(principals: list[Any], given: str) -> str:
    """The key id of the principal named ``given`` or whose key id starts with it (6+)."""
    named = [p["key_id"] for p in principals if p["name"] == given]
    if named:
        return str(named[0])
    if len(given) < 6:
        raise ValueError(f"{given!r}: give a principal's name, key id or 6+ characters of it")
    found = [p["key_id"] for p in principals if p["key_id"].startswith(given)]
    if len(found) > 1:
        raise ValueError(f"the key id prefix {given!r} matches {len(found)} principals")
    if not found:
        raise ValueError(f"no principal named {given!r} or with a key id starting with it")
    return str(found[0])


@principal_app.command("suspend")
@one_line_errors
def principal_suspend(
    key_id: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Suspend a principal at once (operator only); KEY_ID may be a name or a unique prefix.

    Example:
      zonex principal suspend "City Bank" --key D/operator.key
    """
    _status(key_id, "suspended", url, key)


@principal_app.command("reinstate")
@one_line_errors
def principal_reinstate(
    key_id: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Reinstate a suspended principal (operator only); KEY_ID may be a name or a prefix.

    Example:
      zonex principal reinstate "City Bank" --key D/operator.key
    """
    _status(key_id, "active", url, key)


@principal_app.command("approve-reinstatement")
@one_line_errors
def principal_approve_reinstatement(
    key_id: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("auditor.key")
) -> None:
    """Approve, as the second person, reinstating a principal the monitor suspended (an
    auditor); the operator then reinstates it. KEY_ID may be a name or a unique prefix.

    Example:
      zonex principal approve-reinstatement "City Bank" --key auditor.key
    """
    with client(url, key) as c:
        if len(key_id) != 64:
            key_id = _principal_key_id(c.list_principals(), key_id)
        approval = c.approve_reinstatement(key_id)
    out.print(f"approved reinstating {key_id[:12]}: {approval['id']}")


@app.command()
@one_line_errors
def whoami(
    as_json: Json = False, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Show the principal your key belongs to.

    Example:
      zonex whoami --key bank.key
    """
    with client(url, key) as c:
        p = c.whoami()
    if as_json:
        print_json(p)
        return
    out.print(f"{p['name']} ({p['kind']}, {p['status']}) {p['key_id']}")
