"""``zonex psi cardinality|members|aggregate``: private joins, run from the consumer's machine."""

from __future__ import annotations

import typer

from exchange.cli import app

psi_app = typer.Typer(help="private joins (PSI) with a zone's dataset", no_args_is_help=True)
app.add_typer(psi_app, name="psi")
