"""``zonex monitor`` and ``zonex incident``: following the log, detecting abuse, responding."""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from exchange.cli._common import (
    Json,
    KeyPath,
    app,
    client,
    err,
    one_line_errors,
    out,
    print_json,
    verifier_key_text,
)

if TYPE_CHECKING:
    from exchange.audit.detectors import MonitorConfig
    from exchange.audit.monitor import Response

incident_app = typer.Typer(
    help="incidents the monitor opened (operator, auditors)", no_args_is_help=True
)
app.add_typer(incident_app, name="incident")

Exchange = Annotated[
    str,
    typer.Option("--exchange", "--url", envvar="ZONEX_URL", help="the exchange's base URL"),
]


def load_monitor_config(path: Path | None) -> MonitorConfig:
    """The monitor's configuration from a JSON or TOML file (``.toml``); defaults: alert only."""
    from exchange.audit.detectors import MonitorConfig, load_config

    if path is None:
        return MonitorConfig()
    text = path.read_text("utf-8")
    try:
        doc: Any = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(
            f"{path}: not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {exc}"
        ) from exc
    try:
        return load_config(doc)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def _print_response(response: Response) -> None:
    f = response.finding
    who = f.principal[:12] if f.principal else "-"
    out.print(
        f"{f.detector} {f.severity} principal={who} entries {f.first_seq}-{f.last_seq}: "
        f"{response.response} -> {response.outcome} {response.incident or ''}".rstrip(),
        highlight=False,
    )


@app.command()
@one_line_errors
def monitor(
    exchange: Exchange = "http://127.0.0.1:8421",
    key: KeyPath = Path("monitor.key"),
    log_key: Annotated[
        str, typer.Option("--log-key", help="the log's verifier key, or the file holding it")
    ] = "log.pub",
    config: Annotated[
        Path | None,
        typer.Option("--config", help="detectors' thresholds and responses (JSON or TOML)"),
    ] = None,
    from_seq: Annotated[int, typer.Option("--from", min=0, help="first entry to read")] = 0,
    once: Annotated[
        bool, typer.Option("--once", help="read up to the latest checkpoint, stop")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="seconds between rounds")
    ] = 5.0,
) -> None:
    """Follow the exchange's log, run the abuse detectors, respond (the monitor's key).

    Every checkpoint is checked with the log key and every entry against its root before any
    detector sees it. Responses per detector come from --config (default: alert only).

    Example:
      zonex monitor --exchange https://exchange.example --key monitor.key --log-key log.pub \\
        --config monitor.toml --once
    """
    from crypto.note import NoteVerifier
    from exchange.audit.monitor import Monitor

    settings = load_monitor_config(config)
    verifier = NoteVerifier.from_verifier_key(verifier_key_text(log_key, "--log-key"))
    with client(exchange, key) as c:
        watcher = Monitor(c, verifier, settings, from_seq=from_seq)
        while True:
            report = watcher.round(_print_response)
            err.print(
                f"read {report.entries} entries, verified up to {report.size}; "
                f"{len(report.responses)} finding(s)",
                highlight=False,
            )
            if once:
                return
            time.sleep(interval)


def _incident_rows(rows: list[dict[str, Any]]) -> Table:
    table = Table(
        "id", "detector", "severity", "response", "principal", "entries", "status", "label"
    )
    for i in rows:
        table.add_row(
            i["id"],
            i["detector"],
            i["severity"],
            i["response"],
            (i["principal"] or "-")[:12],
            f"{i['first_seq']}-{i['last_seq']}",
            i["status"],
            i["label"] or "-",
        )
    return table


@incident_app.command("list")
@one_line_errors
def incident_list(
    status: Annotated[str | None, typer.Option(help="open | resolved")] = None,
    as_json: Json = False,
    url: Exchange = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """List incidents with their responses, status and labels (operator, auditors, monitor).

    Example:
      zonex incident list --key auditor.key
    """
    with client(url, key) as c:
        rows = c.incidents(status)
    if as_json:
        print_json(rows)
        return
    from exchange.cli.access import print_wide

    print_wide(_incident_rows(rows))


@incident_app.command("label")
@one_line_errors
def incident_label(
    incident_id: str,
    label: Annotated[str, typer.Argument(metavar="true|false", help="true or false positive")],
    url: Exchange = "http://127.0.0.1:8421",
    key: KeyPath = Path("operator.key"),
) -> None:
    """Label an incident a true or a false positive (operator, auditors).

    Example:
      zonex incident label inc_5f1c... false --key auditor.key
    """
    if label not in ("true", "false"):
        raise ValueError(f"label {label!r}: give true or false")
    with client(url, key) as c:
        found = c.label_incident(incident_id, label == "true")
    out.print(f"{found['id']}: labelled {found['label']}")
