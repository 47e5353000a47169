"""``zonex chain add-child|list``: the child exchanges whose checkpoints this exchange records
(the catalog chain, :mod:`exchange.server.chain`).

Both run on the exchange's machine, from its data directory; the running exchange starts
polling a child added here within ``chain_interval_seconds``.
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from exchange.cli._common import (
    DataDir,
    Json,
    app,
    offline_exchange,
    one_line_errors,
    out,
    print_json,
    verifier_key_text,
)

chain_app = typer.Typer(
    help="the catalog chain: child exchanges whose checkpoints this exchange records",
    no_args_is_help=True,
)
app.add_typer(chain_app, name="chain")


@chain_app.command("add-child")
@one_line_errors
def chain_add_child(
    data_dir: DataDir,
    name: Annotated[str, typer.Option(help="this exchange's name for the child, e.g. district-1")],
    url: Annotated[str, typer.Option(help="the child exchange's base URL")],
    log_key: Annotated[
        str,
        typer.Option("--log-key", help="the child's log verifier key, or its log.pub file"),
    ],
) -> None:
    """Record a child exchange (a district under a city, a street under a district): this
    exchange then polls its checkpoint, checks that each one extends the last recorded (from
    the child's hash tiles), records it on the ledger (chain.checkpoint) with the catalog the
    child publishes, and records a fork (chain.fork) if it does not. Recorded on the ledger.

    Example:
      zonex chain add-child --data-dir D --name district-1 --url https://d1.example --log-key d1.pub
    """
    from exchange.server.children import add_child

    text = verifier_key_text(log_key, "--log-key")
    ex = offline_exchange(data_dir)
    try:
        # this process only records the child; the server polls it (and submits to witnesses)
        ex.chain.close()
        if ex.cosigner is not None:
            ex.cosigner.close()
        own = ex.log_signer.verifier() if ex.log_signer is not None else None
        ex.ledger.start()
        try:
            info = add_child(
                ex.engine, ex.ledger, ex.operator_key_id(), name, url, text, own_log=own
            )
        finally:
            ex.ledger.close()
    finally:
        ex.close()
    out.print(f"child {info.name} at {info.url} added (log {info.origin})", highlight=False)


@chain_app.command("list")
@one_line_errors
def chain_list(data_dir: DataDir, as_json: Json = False) -> None:
    """The child exchanges, the latest checkpoint recorded for each, what each publishes, and
    any fork seen.

    Example:
      zonex chain list --data-dir D
    """
    from crypto.encoding import b64_encode
    from exchange.server.children import list_children

    ex = offline_exchange(data_dir)
    try:
        children = list_children(ex.engine)
    finally:
        ex.close()
    if as_json:
        print_json(
            [
                {
                    "name": c.name,
                    "url": c.url,
                    "log_key": c.log_key,
                    "size": None if c.checkpoint is None else c.checkpoint.size,
                    "root": None if c.checkpoint is None else b64_encode(c.checkpoint.root),
                    "note": None if c.checkpoint is None else c.checkpoint.note,
                    "recorded_seq": None if c.checkpoint is None else c.checkpoint.seq,
                    "published_digest": c.published_digest,
                    "fork_size": None if c.fork is None else c.fork.size,
                    "fork_note": None if c.fork is None else c.fork.note,
                    "fork_seq": None if c.fork is None else c.fork.seq,
                    "failures": c.failures,
                    "last_error": c.last_error,
                }
                for c in children
            ]
        )
        return
    if not children:
        out.print(
            "no children: zonex chain add-child --data-dir D --name NAME --url URL "
            "--log-key CHILD-log.pub"
        )
        return
    table = Table()
    table.add_column("name", no_wrap=True)
    for column in ("url", "recorded size", "published", "fork", "failures", "last error"):
        table.add_column(column)
    for c in children:
        table.add_row(
            c.name,
            c.url,
            "-" if c.checkpoint is None else str(c.checkpoint.size),
            "-" if c.published_digest is None else c.published_digest[:12] + "…",
            "-" if c.fork is None else f"size {c.fork.size} (entry {c.fork.seq})",
            str(c.failures),
            c.last_error or "-",
        )
    out.print(table)
