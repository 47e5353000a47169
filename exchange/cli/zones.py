"""``zonex zone``: create, suspend, reinstate and tighten the ceilings of zones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from exchange.cli._common import KeyPath, Url, app, client, one_line_errors, out

zone_app = typer.Typer(help="zones", no_args_is_help=True)
app.add_typer(zone_app, name="zone")


@zone_app.command("create")
@one_line_errors
def zone_create(
    name: str,
    description: Annotated[str, typer.Option(help="what the zone holds")] = "",
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Create a zone you own.

    Example:
      zonex zone create tax --key bureau.key
    """
    with client(url, key) as c:
        z = c.create_zone(name, description)
    out.print(f"zone {z['name']} created")


@zone_app.command("suspend")
@one_line_errors
def zone_suspend(
    zone: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Suspend a whole zone (operator); effective on the next call.

    Example:
      zonex zone suspend tax --key D/operator.key
    """
    with client(url, key) as c:
        c.set_zone_status(zone, "suspended")
    out.print(f"zone {zone} suspended")


@zone_app.command("reinstate")
@one_line_errors
def zone_reinstate(
    zone: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Reinstate a suspended zone (operator).

    Example:
      zonex zone reinstate tax --key D/operator.key
    """
    with client(url, key) as c:
        c.set_zone_status(zone, "active")
    out.print(f"zone {zone} active")


@zone_app.command("ceilings")
@one_line_errors
def zone_ceilings(
    zone: str,
    allow: Annotated[list[str], typer.Option(help="LEVEL=op,op: the most a level allows (repeat)")],
    dataset: Annotated[str | None, typer.Option(help="only this dataset")] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Tighten the operation ceilings of a zone or dataset (never beyond the defaults).

    Example:
      zonex zone ceilings tax --allow L2=aggregate --key bureau.key
    """
    table_in: dict[str, list[str]] = {}
    for item in allow:
        level, sep, ops = item.partition("=")
        if not sep or not level:
            raise ValueError(f"--allow takes LEVEL=op,op, got {item!r}")
        table_in[level] = [op for op in ops.split(",") if op]
    with client(url, key) as c:
        eff = c.set_ceilings(zone, table_in, dataset=dataset)
    table = Table("level", "operations allowed")
    for name, allowed in eff.items():
        table.add_row(name, ", ".join(allowed) or "-")
    out.print(table)
