"""The ``zonex`` command line. The only place that prints or exits."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import httpx
import typer
from rich.console import Console
from rich.table import Table

from crypto.errors import CryptoError
from crypto.keys import SigningKey
from exchange.errors import ZonexError
from exchange.keyfile import load_private_key, load_public_key, write_private_key, write_public_key
from exchange.sdk import ApiError, Client

app = typer.Typer(help="zonex: privacy-preserving data exchange", no_args_is_help=True)
key_app = typer.Typer(help="Ed25519 key pairs", no_args_is_help=True)
principal_app = typer.Typer(help="principals (operator)", no_args_is_help=True)
zone_app = typer.Typer(help="zones", no_args_is_help=True)
dataset_app = typer.Typer(help="datasets", no_args_is_help=True)
ledger_app = typer.Typer(help="the ledger, offline (no server needed)", no_args_is_help=True)
audit_app = typer.Typer(help="offline verification", no_args_is_help=True)
receipt_app = typer.Typer(help="computation receipts, offline", no_args_is_help=True)
consent_app = typer.Typer(help="data-subject consents (zone provider)", no_args_is_help=True)
app.add_typer(key_app, name="key")
app.add_typer(principal_app, name="principal")
app.add_typer(zone_app, name="zone")
app.add_typer(dataset_app, name="dataset")
app.add_typer(ledger_app, name="ledger")
app.add_typer(audit_app, name="audit")
app.add_typer(consent_app, name="consent")
app.add_typer(receipt_app, name="receipt")

out = Console(soft_wrap=True)
err = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", help="exchange data directory")]
Url = Annotated[str, typer.Option("--url", envvar="ZONEX_URL", help="exchange base URL")]
KeyPath = Annotated[Path, typer.Option("--key", envvar="ZONEX_KEY", help="your private key file")]


def fail(message: str, code: int = 1) -> None:
    err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def one_line_errors(func: F) -> F:
    """Every expected failure becomes one readable line and a non-zero exit; no tracebacks."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ApiError as exc:
            fail(f"{exc.status} {exc.code}: {exc.detail}")
        except ZonexError as exc:
            fail(exc.detail)
        except CryptoError as exc:
            fail(str(exc))
        except httpx.HTTPError as exc:
            fail(f"cannot reach the exchange: {exc}")
        except OSError as exc:
            fail(f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": "))
        except ValueError as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def client(url: str, key: Path) -> Client:
    return Client(url, load_private_key(key))


# -- operator --------------------------------------------------------------------------------


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
    """Create the control-plane database, operator identity and log key in DATA_DIR."""
    from exchange.node import init_data_dir

    info = init_data_dir(data_dir, origin=origin, database_url=database_url)
    out.print(f"initialized {data_dir}")
    out.print(f"operator key id: {info['operator']}  (key: {data_dir / 'operator.key'})")
    out.print(f"log verifier key: {data_dir / 'log.pub'}")


@app.command()
@one_line_errors
def serve(
    data_dir: DataDir,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8421,
    database_url: Annotated[
        str | None, typer.Option(envvar="ZONEX_DATABASE_URL", help="SQLAlchemy URL")
    ] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="worker processes")] = 1,
    log_format: Annotated[
        str, typer.Option("--log-format", help="json (one object per line) or text")
    ] = "json",
) -> None:
    """Run the API server (FastAPI under uvicorn). SIGTERM or SIGINT: stop accepting, finish
    in-flight requests, flush the ledger, exit. See docs/operations.md."""
    import uvicorn

    from exchange.observability import logging_config, prepare_multiprocess_metrics
    from exchange.settings import Settings

    if log_format not in ("json", "text"):
        fail("--log-format must be json or text")

    settings = Settings.from_data_dir(data_dir.resolve(), database_url=database_url)
    from exchange.node import Exchange

    Exchange(settings, with_log_key=True).close()  # fail fast on a bad data dir or key
    os.environ["ZONEX_DATA_DIR"] = str(data_dir.resolve())
    if database_url:
        os.environ["ZONEX_DATABASE_URL"] = database_url
    if workers > 1:
        # every worker writes its samples under the data dir; /metrics in any worker sums them
        prepare_multiprocess_metrics(data_dir.resolve() / "metrics")
    uvicorn.run(
        "exchange.api.app:app_from_env",
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
    """Back up the control plane, zone stores, keys and configuration (works while serving)."""
    from exchange.backup import create_backup
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
    """Restore a backup into a new or empty data directory; verifies the ledger first."""
    from exchange.backup import restore_backup

    with err.status("restoring…"):
        info = restore_backup(archive, data_dir, database_url=database_url)
    if checkpoint_out is not None:
        checkpoint_out.write_text(info.checkpoint, "utf-8")
    out.print(f"restored {info.data_dir} (database: {info.database})")
    out.print(
        f"ledger verified: {info.ledger_size} entries, consistent with the backup's "
        f"checkpoint of size {info.checkpoint_size}"
    )


# -- keys -------------------------------------------------------------------------------------


@key_app.command("new")
@one_line_errors
def key_new(
    out_prefix: Annotated[Path, typer.Option("--out", help="writes OUT.key (0600) and OUT.pub")],
) -> None:
    """Make an Ed25519 key pair."""
    key = SigningKey.generate()
    priv = out_prefix.with_name(out_prefix.name + ".key")
    pub = out_prefix.with_name(out_prefix.name + ".pub")
    write_private_key(priv, key)
    write_public_key(pub, key.public_key)
    out.print(f"key id {key.key_id}")
    out.print(f"private key {priv} (mode 0600), public key {pub}")


@key_app.command("id")
@one_line_errors
def key_id_cmd(path: Path) -> None:
    """Print the key id of a public or private key file."""
    text = path.read_bytes()
    if b"PRIVATE" in text:
        out.print(load_private_key(path).key_id)
    else:
        out.print(load_public_key(path).key_id)


# -- principals -------------------------------------------------------------------------------


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


# -- zones, datasets, catalog -----------------------------------------------------------------


@zone_app.command("create")
@one_line_errors
def zone_create(
    name: str,
    description: Annotated[str, typer.Option(help="what the zone holds")] = "",
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Create a zone you own."""
    with client(url, key) as c:
        z = c.create_zone(name, description)
    out.print(f"zone {z['name']} created")


def _parse_levels(pairs: list[str], levels_file: Path | None) -> dict[str, str]:
    levels: dict[str, str] = {}
    if levels_file is not None:
        data = json.loads(levels_file.read_text("utf-8"))
        if not isinstance(data, dict):
            raise ValueError(f"{levels_file}: expected a JSON object of column -> level")
        levels.update({str(k): str(v) for k, v in data.items()})
    for pair in pairs:
        column, sep, level = pair.partition("=")
        if not sep or not column or not level:
            raise ValueError(f"--level takes COLUMN=LEVEL, got {pair!r}")
        levels[column] = level
    return levels


@dataset_app.command("register")
@one_line_errors
def dataset_register(
    zone: str,
    name: str,
    subject_column: Annotated[str, typer.Option(help="the subject/key column")],
    level: Annotated[
        list[str] | None, typer.Option(help="COLUMN=LEVEL (L1 L2 L3 L4 IMPORTANT CORE), repeat")
    ] = None,
    levels_file: Annotated[Path | None, typer.Option(help="JSON object column -> level")] = None,
    file: Annotated[Path | None, typer.Option(help="CSV or Parquet file to import")] = None,
    attach_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL to attach")] = None,
    attach_table: Annotated[str | None, typer.Option(help="table to attach")] = None,
    description: Annotated[str, typer.Option(help="what the dataset holds")] = "",
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Register a dataset in a zone you own."""
    levels = _parse_levels(level or [], levels_file)
    if (file is None) == (attach_url is None):
        raise ValueError("give exactly one of --file or --attach-url")
    with client(url, key) as c:
        d = c.register_dataset(
            zone,
            name,
            levels=levels,
            subject_column=subject_column,
            description=description,
            file=file,
            attach_url=attach_url,
            attach_table=attach_table,
        )
    out.print(f"dataset {d['zone']}/{d['name']} level {d['level']} digest {d['digest'][:16]}…")


@app.command()
@one_line_errors
def catalog(
    zone: Annotated[str | None, typer.Option(help="only this zone")] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """Browse zones, datasets, columns and levels (never rows)."""
    with client(url, key) as c:
        zones = [c.zone(zone)] if zone else c.catalog()["zones"]
    table = Table("zone", "owner", "dataset", "level", "rows", "release", "columns")
    for z in zones:
        if not z["datasets"]:
            table.add_row(z["name"], z["owner_name"], "-", "-", "-", "-", "-")
        for d in z["datasets"]:
            cols = ", ".join(f"{c['name']}:{c['level']}" for c in d["columns"])
            # the provider's opt-out from DP by default at L3 is shown wherever datasets are
            release = d.get("release_note") or ""
            table.add_row(
                z["name"],
                z["owner_name"],
                d["name"],
                d["level"],
                d["row_count_band"],
                release,
                cols,
            )
    out.print(table)


# -- access workflow --------------------------------------------------------------------------


def _when(value: Any) -> str:
    return "-" if not value else str(value).replace("T", " ")[:19]


@app.command("request")
@one_line_errors
def request_cmd(
    zone: str,
    dataset: Annotated[list[str], typer.Option(help="dataset to use (repeat)")],
    operation: Annotated[list[str], typer.Option(help="operation, e.g. aggregate (repeat)")],
    purpose: Annotated[str, typer.Option(help="purpose from the vocabulary")],
    justification: Annotated[str, typer.Option(help="why you need it")],
    days: Annotated[float, typer.Option(help="how long the grant should last")] = 30,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """File an access request (consumer)."""
    with client(url, key) as c:
        r = c.request_access(
            zone,
            dataset,
            operation,
            purpose,
            duration_seconds=int(days * 86400),
            justification=justification,
        )
    out.print(f"request {r['id']} filed ({r['status']})")


@app.command("requests")
@one_line_errors
def requests_cmd(
    zone: Annotated[str | None, typer.Option(help="only this zone")] = None,
    status: Annotated[str | None, typer.Option(help="pending, approved, rejected...")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """List the access requests you filed or that concern your zones."""
    with client(url, key) as c:
        found = c.requests(zone=zone, status=status)
    if as_json:
        out.print_json(data=found)
        return
    table = Table("id", "zone", "consumer", "datasets", "operations", "purpose", "days", "status")
    for r in found:
        table.add_row(
            r["id"],
            r["zone"],
            r["consumer"][:16],
            ", ".join(r["datasets"]),
            ", ".join(r["operations"]),
            r["purpose"],
            f"{r['duration_seconds'] / 86400:g}",
            r["status"],
        )
    out.print(table)


@app.command()
@one_line_errors
def approve(
    request_id: str,
    days: Annotated[float | None, typer.Option(help="shorter than requested")] = None,
    dataset: Annotated[list[str] | None, typer.Option(help="narrow to these datasets")] = None,
    operation: Annotated[list[str] | None, typer.Option(help="narrow to these ops")] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Sign and approve an access request (provider; operator too for important data)."""
    from datetime import UTC, datetime, timedelta

    not_after = datetime.now(UTC) + timedelta(days=days) if days is not None else None
    with client(url, key) as c:
        r = c.approve(request_id, not_after=not_after, datasets=dataset, operations=operation)
    if r["grant_id"]:
        out.print(f"request {r['id']} approved: grant {r['grant_id']}")
    else:
        out.print(f"request {r['id']} is {r['status']}")


@app.command()
@one_line_errors
def reject(
    request_id: str,
    reason: Annotated[str, typer.Option(help="why (shown to the consumer)")],
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Reject a request (provider, operator) or withdraw your own (consumer)."""
    with client(url, key) as c:
        r = c.reject(request_id, reason)
    out.print(f"request {r['id']} {r['status']}")


@app.command()
@one_line_errors
def grants(
    zone: Annotated[str | None, typer.Option(help="only this zone")] = None,
    all_: Annotated[bool, typer.Option("--all", help="include revoked grants")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """List grants you hold or that concern your zones."""
    with client(url, key) as c:
        found = c.grants(zone, include_inactive=all_)
    if as_json:
        out.print_json(data=found)
        return
    table = Table(
        "grant", "zone", "consumer", "datasets", "operations", "purpose", "expires", "status"
    )
    for g in found:
        table.add_row(
            g["id"],
            g["zone"],
            g["consumer"][:16],
            ", ".join(g["datasets"]),
            ", ".join(g["operations"]),
            g["purpose"],
            _when(g["expires_at"]),
            g["status"],
        )
    out.print(table)


@app.command()
@one_line_errors
def revoke(
    grant_id: str,
    reason: Annotated[str, typer.Option(help="why")],
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Revoke a grant now."""
    with client(url, key) as c:
        g = c.revoke(grant_id, reason)
    out.print(f"grant {g['id']} {g['status']}")


@zone_app.command("suspend")
@one_line_errors
def zone_suspend(
    zone: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Suspend a whole zone (operator); effective on the next call."""
    with client(url, key) as c:
        c.set_zone_status(zone, "suspended")
    out.print(f"zone {zone} suspended")


@zone_app.command("reinstate")
@one_line_errors
def zone_reinstate(
    zone: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("operator.key")
) -> None:
    """Reinstate a suspended zone (operator)."""
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
    """Tighten the operation ceilings of a zone or dataset (never beyond the defaults)."""
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


@app.command()
@one_line_errors
def consents(
    zone: str,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """List a zone's consents (by consent id; subjects are never shown, not even digested)."""
    with client(url, key) as c:
        found = c.consents(zone)
    if as_json:
        out.print_json(data=found)
        return
    table = Table("consent", "consumer", "purpose", "expires", "status")
    for x in found:
        table.add_row(
            x["id"],
            x["consumer"][:16],
            x["purpose"],
            _when(x["expires_at"]),
            x["status"],
        )
    out.print(table)


@consent_app.command("add")
@one_line_errors
def consent_add(
    zone: str,
    subject: Annotated[str, typer.Option(help="the data subject's id (digested on arrival)")],
    consumer: Annotated[str, typer.Option(help="consumer key id")],
    purpose: Annotated[str, typer.Option(help="purpose from the vocabulary")],
    days: Annotated[float, typer.Option(help="valid for this many days")] = 365,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Record a data subject's consent for a consumer and purpose (zone provider)."""
    from datetime import UTC, datetime, timedelta

    until = datetime.now(UTC) + timedelta(days=days)
    with client(url, key) as c:
        x = c.record_consent(zone, subject, consumer, purpose, until)
    out.print(f"consent {x['id']} recorded (keep the id: it is how the consent is named)")


@consent_app.command("withdraw")
@one_line_errors
def consent_withdraw(
    consent_id: str, url: Url = "http://127.0.0.1:8421", key: KeyPath = Path("provider.key")
) -> None:
    """Withdraw a consent."""
    with client(url, key) as c:
        x = c.withdraw_consent(consent_id)
    out.print(f"consent {x['id']} {x['status']}")


@app.command("export")
@one_line_errors
def export_cmd(
    zone: str,
    dataset: str,
    purpose: Annotated[str, typer.Option(help="purpose of use")],
    out_file: Annotated[Path | None, typer.Option("--out", help="write the result here")] = None,
    receipt_file: Annotated[
        Path | None, typer.Option("--receipt", help="write the receipt here (default OUT.receipt)")
    ] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """Export rows where the level allows it (masked subject column at L2)."""
    with client(url, key) as c:
        response = c.export(zone, dataset, purpose)
    save_result(response, out_file, receipt_file)
    if out_file is not None:
        out.print(f"{len(response['result']['rows'])} rows written to {out_file}")


@app.command("aggregate")
@one_line_errors
def aggregate_cmd(
    zone: str,
    sql: Annotated[str, typer.Option(help="one SELECT over the zone's datasets")],
    purpose: Annotated[str, typer.Option(help="purpose of use")],
    epsilon: Annotated[
        str | None, typer.Option(help="ε to spend: asks for DP, or sets it where DP is required")
    ] = None,
    out_file: Annotated[Path | None, typer.Option("--out", help="write the result here")] = None,
    receipt_file: Annotated[
        Path | None, typer.Option("--receipt", help="write the receipt here (default OUT.receipt)")
    ] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """Run a clean-room SQL aggregate under the zone's analysis rules."""
    with client(url, key) as c:
        response = c.aggregate(zone, sql, purpose, epsilon=epsilon)
    result = response["result"]
    if out_file is not None:
        table = Table(*result["columns"])
        for row in result["rows"]:
            table.add_row(*("-" if v is None else str(v) for v in row))
        out.print(table)
    save_result(response, out_file, receipt_file)
    note = f"{len(result['rows'])} groups released"
    if result.get("suppressed") is not None:
        note += f", {result['suppressed']} suppressed (k = {result['k']})"
    else:
        # a DP release does not say how many groups its noisy gate kept shut
        note += f" (noisy gate at k = {result['k']})"
    if result["epsilon"] != "0":
        note += f"; differentially private, ε = {result['epsilon']} charged"
    out.print(note)


@app.command("budget")
@one_line_errors
def budget_cmd(
    zone: Annotated[str | None, typer.Option(help="only this zone")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON, not a table")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """Show the privacy budget (ε) left on each dataset you hold a grant for."""
    with client(url, key) as c:
        found = c.budgets(zone)
    if as_json:
        out.print_json(data=found)
        return
    table = Table("zone", "dataset", "budget ε", "spent", "remaining", "refreshes", "DP required")
    for b in found:
        table.add_row(
            b["zone"],
            b["dataset"],
            b["budget"],
            b["spent"],
            b["remaining"],
            _when(b["window_end"]),
            "yes" if b["dp_required"] else "no",
        )
    out.print(table)


@dataset_app.command("rules")
@one_line_errors
def dataset_rules(
    zone: str,
    dataset: str,
    set_file: Annotated[
        Path | None, typer.Option("--set", help="JSON analysis rules to set (provider)")
    ] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Show a dataset's analysis rules, or set new ones (docs/analysis-rules.md)."""
    document: Any = None
    if set_file is not None:
        try:
            document = json.loads(set_file.read_text("utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{set_file}: not a readable JSON file ({exc})") from None
    with client(url, key) as c:
        if document is not None:
            found = c.set_analysis_rules(zone, dataset, document)
        else:
            found = c.analysis_rules(zone, dataset)
    rules = found["rules"]
    origin = "defaults from the column levels" if found["default"] else f"v{found['version']}"
    out.print(
        f"{zone}/{dataset} analysis rules ({origin}): k = {rules['min_group_size']}, "
        f"DP {'required' if rules['dp_required'] else 'optional'}, ε budget "
        f"{rules['epsilon_budget']} per {rules['refresh_seconds']} s"
    )
    table = Table("column", "disclosure", "lower", "upper")
    for name, rule in rules["columns"].items():
        table.add_row(name, rule["disclosure"], rule.get("lower") or "", rule.get("upper") or "")
    out.print(table)
    if document is not None and rules.get("exact_release"):
        out.print(
            "[yellow]warning:[/] exact_release is set: L3 releases of this dataset are exact, "
            "not differentially private, and two queries that differ by one subject can reveal "
            "that subject's value (differencing possible); the catalog says so"
        )


def save_result(response: dict[str, Any], out_file: Path | None, receipt_file: Path | None) -> None:
    """Write a computation's result and receipt as two files (or print the result)."""
    text = json.dumps(response["result"], ensure_ascii=False, indent=2)
    if out_file is None:
        out.print_json(text)
        if receipt_file is None:
            return
    else:
        out_file.write_text(text + "\n", "utf-8")
        receipt_file = receipt_file or out_file.with_name(out_file.name + ".receipt")
    receipt_file.write_text(json.dumps(response["receipt"], indent=2) + "\n", "utf-8")
    out.print(
        f"receipt: {receipt_file} (check: zonex receipt verify {receipt_file} "
        f"--result {out_file or 'RESULT'} --log-key LOG.pub)"
    )


# -- ledger and audit (offline) ---------------------------------------------------------------


def _offline_exchange(data_dir: Path) -> Any:
    from exchange.node import Exchange
    from exchange.settings import Settings

    return Exchange(Settings.from_data_dir(data_dir))


@ledger_app.command("checkpoint")
@one_line_errors
def ledger_checkpoint(
    data_dir: DataDir,
    out_path: Annotated[Path, typer.Option("--out", help="where to write the checkpoint note")],
) -> None:
    """Write the latest signed checkpoint (signing one if entries are not yet covered)."""
    ex = _offline_exchange(data_dir)
    try:
        cp = ex.ledger.checkpoint()
    finally:
        ex.close()
    out_path.write_text(cp.note, "utf-8")
    out.print(f"checkpoint size {cp.size} written to {out_path}")


@ledger_app.command("export")
@one_line_errors
def ledger_export(
    data_dir: DataDir,
    out_path: Annotated[Path, typer.Option("--out", help="JSON Lines bundle to write")],
) -> None:
    """Export entries and checkpoints as a self-contained JSON Lines bundle."""
    from exchange.ledger import write_export

    ex = _offline_exchange(data_dir)
    try:
        final = write_export(ex.ledger, out_path)
    finally:
        ex.close()
    out.print(f"exported {final.size} entries to {out_path}")


@audit_app.command("verify")
@one_line_errors
def audit_verify(
    bundle: Path,
    log_key: Annotated[Path, typer.Option("--log-key", help="the log's verifier key (log.pub)")],
    trusted: Annotated[
        Path | None, typer.Option(help="a checkpoint saved earlier (rollback/fork check)")
    ] = None,
) -> None:
    """Verify an exported ledger bundle offline. Exit 0 only if everything holds."""
    from crypto.note import NoteVerifier
    from exchange.audit import check_bundle, read_bundle_lines

    verifier = NoteVerifier.from_verifier_key(log_key.read_text("utf-8").strip())
    trusted_note = trusted.read_text("utf-8") if trusted is not None else None
    report = check_bundle(read_bundle_lines(bundle), verifier, trusted_note)
    if not report.ok:
        assert report.fault is not None
        f = report.fault
        fail(f"{bundle}:{f.line}: {f.kind}: {f.message}")
    out.print(
        f"OK: {report.entries} entries, {report.checkpoints} checkpoints verified"
        + (" against the trusted checkpoint" if trusted else "")
    )


@receipt_app.command("verify")
@one_line_errors
def receipt_verify(
    receipt: Path,
    result: Annotated[Path, typer.Option(help="the result file (JSON) the receipt is about")],
    log_key: Annotated[Path, typer.Option("--log-key", help="the log's verifier key (log.pub)")],
) -> None:
    """Verify a computation receipt and its result offline. Exit 0 only if everything holds."""
    from crypto.note import NoteVerifier
    from crypto.receipt import verify_receipt

    verifier = NoteVerifier.from_verifier_key(log_key.read_text("utf-8").strip())
    try:
        bundle = json.loads(receipt.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{receipt}: not a JSON receipt") from None
    try:
        result_doc = json.loads(result.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{result}: not a JSON result") from None
    if isinstance(result_doc, dict) and set(result_doc) == {"result", "receipt"}:
        result_doc = result_doc["result"]  # a whole API response saved as one file
    statement, cp = verify_receipt(bundle, result_doc, verifier)
    out.print(
        f"OK: {statement['kind']} by {statement['consumer'][:16]}… on "
        f"{', '.join(d['zone'] + '/' + d['name'] for d in statement['datasets'])}; "
        f"ledger entry {statement['ledger_index']} included in checkpoint {cp.size}"
    )


# the computation commands live in their own modules and register on ``app``
from exchange import cli_he, cli_psi  # noqa: E402, F401


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":
    main()
