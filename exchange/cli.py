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
app.add_typer(key_app, name="key")
app.add_typer(principal_app, name="principal")
app.add_typer(zone_app, name="zone")
app.add_typer(dataset_app, name="dataset")
app.add_typer(ledger_app, name="ledger")
app.add_typer(audit_app, name="audit")

out = Console()
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
) -> None:
    """Run the API server (FastAPI under uvicorn)."""
    import uvicorn

    from exchange.settings import Settings

    settings = Settings.from_data_dir(data_dir.resolve(), database_url=database_url)
    from exchange.node import Exchange

    Exchange(settings, with_log_key=True).close()  # fail fast on a bad data dir or key
    os.environ["ZONEX_DATA_DIR"] = str(data_dir.resolve())
    if database_url:
        os.environ["ZONEX_DATABASE_URL"] = database_url
    uvicorn.run(
        "exchange.api.app:app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level="warning",
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
    table = Table("zone", "owner", "dataset", "level", "rows", "columns")
    for z in zones:
        if not z["datasets"]:
            table.add_row(z["name"], z["owner_name"], "-", "-", "-", "-")
        for d in z["datasets"]:
            cols = ", ".join(f"{c['name']}:{c['level']}" for c in d["columns"])
            table.add_row(
                z["name"], z["owner_name"], d["name"], d["level"], d["row_count_band"], cols
            )
    out.print(table)


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


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)


if __name__ == "__main__":
    main()
