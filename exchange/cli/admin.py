"""Operator commands that run on the exchange's machine: init, serve, backup, restore."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from exchange.cli._common import STDOUT, DataDir, app, err, fail, one_line_errors, out


@app.command()
@one_line_errors
def init(
    data_dir: DataDir,
    origin: Annotated[str, typer.Option(help="log origin (checkpoint first line)")] = (
        "zonex.local/log"
    ),
    database_url: Annotated[
        str | None, typer.Option(envvar="ZONEX_DATABASE_URL", help="SQLAlchemy URL")
    ] = None,
) -> None:
    """Create the control-plane database, operator identity and log key in DATA_DIR.

    Example:
      zonex init --data-dir D
    """
    from exchange.server.runtime import init_data_dir

    info = init_data_dir(data_dir, origin=origin, database_url=database_url)
    out.print(f"initialized {data_dir}")
    out.print(f"operator key id: {info['operator']}  (key: {data_dir / 'operator.key'})")
    out.print(f"log verifier key: {data_dir / 'log.pub'}")


@app.command()
@one_line_errors
def serve(
    data_dir: DataDir,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8421,
    database_url: Annotated[
        str | None, typer.Option(envvar="ZONEX_DATABASE_URL", help="SQLAlchemy URL")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="worker processes")] = 1,
    log_format: Annotated[
        str, typer.Option("--log-format", help="json (one object per line) or text")
    ] = "json",
) -> None:
    """Run the API server (FastAPI under uvicorn). SIGTERM or SIGINT: stop accepting, finish
    in-flight requests, flush the ledger, exit. See docs/operations.md.

    Example:
      zonex serve --data-dir D --port 8421
    """
    import uvicorn

    from exchange.server.observability import logging_config, prepare_multiprocess_metrics
    from exchange.settings import Settings

    if log_format not in ("json", "text"):
        fail("--log-format must be json or text")

    settings = Settings.from_data_dir(data_dir.resolve(), database_url=database_url)
    from exchange.server.runtime import Exchange

    Exchange(settings, with_log_key=True).close()  # fail fast on a bad data dir or key
    os.environ["ZONEX_DATA_DIR"] = str(data_dir.resolve())
    if database_url:
        os.environ["ZONEX_DATABASE_URL"] = database_url
    if workers > 1:
        # every worker writes its samples under the data dir; /metrics in any worker sums them
        prepare_multiprocess_metrics(data_dir.resolve() / "metrics")
    uvicorn.run(
        "exchange.server.api.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="info",
        log_config=logging_config(log_format),
        access_log=False,
    )


@app.command()
@one_line_errors
def backup(
    data_dir: DataDir,
    out_path: Annotated[Path, typer.Option("--out", help="archive to write (.tar.gz, mode 0600)")],
    database_url: Annotated[
        str | None, typer.Option(envvar="ZONEX_DATABASE_URL", help="SQLAlchemy URL")
    ] = None,
) -> None:
    """Back up the control plane, zone stores, keys and configuration (works while serving).

    Example:
      zonex backup --data-dir D --out backup.tar.gz
    """
    if out_path == STDOUT:
        raise ValueError(
            "--out -: a backup holds the exchange's private keys and salts; write it to a file "
            "(created with mode 0600), not to standard output"
        )
    from exchange.server.backup import create_backup
    from exchange.settings import Settings

    settings = Settings.from_data_dir(data_dir.resolve(), database_url=database_url)
    with err.status("backing up…"):
        info = create_backup(settings, out_path)
    out.print(f"wrote {info.path} ({info.members} files), sha256 {info.sha256}")
    out.print(f"ledger size {info.ledger_size}, checkpoint size {info.checkpoint_size}")
    err.print(
        "[yellow]warning:[/] the archive contains the exchange's private keys and salts; "
        "store it like the keys themselves",
        highlight=False,
    )


@app.command()
@one_line_errors
def restore(
    archive: Annotated[Path, typer.Argument(help="archive written by zonex backup")],
    data_dir: DataDir,
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar="ZONEX_DATABASE_URL",
            help="empty database to restore into (default: the backed-up one's URL, or SQLite)",
        ),
    ] = None,
    checkpoint_out: Annotated[
        Path | None,
        typer.Option("--checkpoint-out", help="save the backup's signed checkpoint here"),
    ] = None,
) -> None:
    """Restore a backup into a new or empty data directory; verifies the ledger first.

    Example:
      zonex restore backup.tar.gz --data-dir D2
    """
    from exchange.server.backup import restore_backup

    with err.status("restoring…"):
        info = restore_backup(archive, data_dir, database_url=database_url)
    if checkpoint_out is not None:
        checkpoint_out.write_text(info.checkpoint, "utf-8")
    out.print(f"restored {info.data_dir} (database: {info.database})")
    out.print(
        f"ledger verified: {info.ledger_size} entries, consistent with the backup's "
        f"checkpoint of size {info.checkpoint_size}"
    )
