"""``zonex console``: the auditor's and operator's local web console."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from exchange.cli._common import app, err, one_line_errors, verifier_key_text


@app.command()
@one_line_errors
def console(
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="a ledger bundle to explore (the auditor)")
    ] = None,
    log_key: Annotated[
        str | None,
        typer.Option("--log-key", help="the log's verifier key (log.pub), for the bundle"),
    ] = None,
    exchange: Annotated[
        str | None,
        typer.Option("--exchange", help="the live exchange's URL (the operator's pages)"),
    ] = None,
    key: Annotated[
        Path | None,
        typer.Option("--key", help="the operator's private key file (with --exchange)"),
    ] = None,
    host: Annotated[str, typer.Option(help="bind address (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8431,
) -> None:
    """Serve the web console on this machine: over a bundle (--bundle, --log-key: verified
    when it opens; the ledger, entries with their inclusion proofs, receipt checks) and/or
    over the live exchange (--exchange, --key: approvals awaiting the operator, principals,
    zones). The key stays in this process; only loopback is served unless --host says
    otherwise, and never with --exchange. See docs/console.md.

    Examples:
      zonex console --bundle ledger.jsonl --log-key log.pub
      zonex console --exchange http://127.0.0.1:8421 --key D/operator.key
    """
    import uvicorn
    from rich.markup import escape

    from crypto.note import NoteVerifier
    from exchange.audit.console import OperatorDesk, create_console_app, open_bundle
    from exchange.audit.console.security import is_loopback
    from exchange.client.sdk import Client
    from exchange.keyfile import load_private_key

    if bundle is None and exchange is None:
        raise ValueError(
            "give --bundle B --log-key log.pub (the auditor's pages), --exchange URL --key "
            "operator.key (the operator's), or both"
        )
    if bundle is not None and log_key is None:
        raise ValueError("--bundle needs --log-key (the log's verifier key, log.pub)")
    if (exchange is None) != (key is None):
        raise ValueError("--exchange and --key go together (the operator's pages)")
    if exchange is not None and not is_loopback(host):
        raise ValueError(
            f"--host {host}: the console signs with the operator's key and serves only "
            "loopback with --exchange (reach it through an SSH tunnel)"
        )
    log = None
    if log_key is not None:
        log = NoteVerifier.from_verifier_key(verifier_key_text(log_key, "--log-key"))
    opened = None
    if bundle is not None:
        assert log is not None
        if not bundle.is_file():
            raise ValueError(f"--bundle {bundle}: no such file")
        err.print(f"verifying {bundle} ...", highlight=False)
        opened = open_bundle(bundle, log)
        if opened.fault is None:
            err.print(
                f"OK: {opened.report.entries} entries, {opened.report.checkpoints} checkpoints",
                highlight=False,
            )
        else:
            err.print(
                f"[bold red]the bundle does not verify:[/] {escape(str(opened.fault))}",
                highlight=False,
            )
    desk = None
    if exchange is not None:
        assert key is not None
        client = Client(exchange, load_private_key(key))
        desk = OperatorDesk(client)
        desk.principals()  # fail now on a wrong URL or key, not on the first page
    if not is_loopback(host):
        err.print(f"[yellow]note:[/] serving on {host}: anyone who reaches it reads the bundle")
    web = create_console_app(bundle=opened, log=log, desk=desk, bind=host)
    err.print(f"console: http://{host}:{port}/  (Ctrl-C stops it)", highlight=False)
    try:
        uvicorn.run(web, host=host, port=port, log_level="warning")
    finally:
        if desk is not None:
            desk.close()
