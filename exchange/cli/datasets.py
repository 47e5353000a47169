"""``zonex dataset register|publish|retire`` and ``zonex catalog``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from exchange.cli._common import (
    Json,
    KeyPath,
    Url,
    app,
    client,
    one_line_errors,
    out,
    print_json,
)

dataset_app = typer.Typer(help="datasets", no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


#: the CSV options ``dataset register`` and ``dataset publish`` share
Delimiter = Annotated[
    str | None, typer.Option(help="CSV field separator, one character (\\t for tab)")
]
Encoding = Annotated[
    str | None,
    typer.Option(help="CSV encoding: utf-8 (default), utf-8-sig, gb18030, gbk, big5, latin-1"),
]
Rename = Annotated[
    list[str] | None,
    typer.Option(help="SRC=DST: import the CSV header SRC as column DST (repeat)"),
]


def _csv_options(
    file: Path | None, delimiter: str | None, encoding: str | None, rename: list[str] | None
) -> dict[str, Any] | None:
    """The CSV options given, checked here where a line can name the flag."""
    if delimiter is None and encoding is None and not rename:
        return None
    if file is None or file.suffix.lower() != ".csv":
        raise ValueError("--delimiter, --encoding and --rename apply to a .csv --file")
    options: dict[str, Any] = {}
    if delimiter is not None:
        sep = "\t" if delimiter in ("\\t", "tab") else delimiter
        if len(sep) != 1:
            raise ValueError(f"--delimiter takes one character (\\t for tab), got {delimiter!r}")
        options["delimiter"] = sep
    if encoding is not None:
        options["encoding"] = encoding
    renames: dict[str, str] = {}
    for pair in rename or []:
        src, sep, dst = pair.partition("=")
        if not sep or not src or not dst:
            raise ValueError(
                f"--rename takes SRC=DST (a header name and a column name), got {pair!r}"
            )
        if src in renames:
            raise ValueError(f"--rename: {src!r} is renamed twice")
        renames[src] = dst
    if renames:
        options["rename"] = renames
    return options


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


def _parse_pi(pairs: list[str]) -> dict[str, str]:
    from exchange.domain import PI_CLASSES

    classes: dict[str, str] = {}
    for pair in pairs:
        column, sep, cls = pair.partition("=")
        if not sep or not column or cls not in PI_CLASSES:
            raise ValueError(f"--pi takes COLUMN=personal or COLUMN=sensitive, got {pair!r}")
        classes[column] = cls
    return classes


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
    pi: Annotated[
        list[str] | None,
        typer.Option(help="COLUMN=personal|sensitive: personal information, repeat"),
    ] = None,
    file: Annotated[Path | None, typer.Option(help="CSV or Parquet file to import")] = None,
    attach_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL to attach")] = None,
    attach_table: Annotated[str | None, typer.Option(help="table to attach")] = None,
    description: Annotated[str, typer.Option(help="what the dataset holds")] = "",
    delimiter: Delimiter = None,
    encoding: Encoding = None,
    rename: Rename = None,
    node: Annotated[
        Path | None,
        typer.Option(
            help="a node directory (zonex node init): import or attach on the node; only "
            "metadata and the snapshot digest reach the exchange"
        ),
    ] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Register a dataset in a zone you own.

    --level and --subject-column name the columns as imported (after --rename). With --node
    the rows stay on the zone's node (the node's key signs the registration).

    Examples:
      zonex dataset register tax companies --file companies.csv --subject-column company_id \\
        --level company_id=L3 --level district=L1 --level tax_paid=L3
      zonex dataset register tax firms --file firms.csv --encoding gb18030 --delimiter ";" \\
        --rename 统一社会信用代码=company_id --rename 纳税额=tax_paid ...
      zonex dataset register tax companies --node tax-node --file companies.csv ...
      zonex dataset register health visits --file visits.csv --subject-column person_id \
        --level person_id=L3 --level diagnosis=L4 --pi person_id=personal --pi diagnosis=sensitive
    """
    levels = _parse_levels(level or [], levels_file)
    classes = _parse_pi(pi or [])
    if (file is None) == (attach_url is None):
        raise ValueError("give exactly one of --file or --attach-url")
    csv = _csv_options(file, delimiter, encoding, rename)
    if node is not None:
        from exchange.node.datasets import register_on_node
        from exchange.node.home import NodeHome

        home = NodeHome(node)
        if home.zone != zone:
            raise ValueError(f"the node at {node} hosts zone {home.zone!r}, not {zone!r}")
        try:
            d = register_on_node(
                home,
                name,
                levels=levels,
                subject_column=subject_column,
                description=description,
                file=file,
                attach_url=attach_url,
                attach_table=attach_table,
                csv=csv,
                pi=classes,
            )
        finally:
            home.close()
        out.print(
            f"dataset {d['zone']}/{d['name']} level {d['level']} digest {d['digest'][:16]}… "
            "(rows on the node)"
        )
        return
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
            csv=csv,
            pi=classes,
        )
    out.print(f"dataset {d['zone']}/{d['name']} level {d['level']} digest {d['digest'][:16]}…")


@dataset_app.command("publish")
@one_line_errors
def dataset_publish(
    zone: str,
    name: str,
    file: Annotated[Path, typer.Option(help="CSV or Parquet file: the new snapshot")],
    level: Annotated[
        list[str] | None,
        typer.Option(help="COLUMN=LEVEL for a column whose level changes (others keep theirs)"),
    ] = None,
    levels_file: Annotated[Path | None, typer.Option(help="JSON object column -> level")] = None,
    subject_column: Annotated[
        str | None, typer.Option(help="a new subject/key column (default: unchanged)")
    ] = None,
    description: Annotated[str | None, typer.Option(help="a new description")] = None,
    delimiter: Delimiter = None,
    encoding: Encoding = None,
    rename: Rename = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Publish a new snapshot of a dataset you provide: same columns, a new digest, on the
    ledger. Grants carry over; receipts made on the previous snapshot keep verifying.

    Example:
      zonex dataset publish tax companies --file companies-2026.csv
    """
    levels = _parse_levels(level or [], levels_file)
    csv = _csv_options(file, delimiter, encoding, rename)
    with client(url, key) as c:
        previous = c.dataset(zone, name)["digest"]
        d = c.publish_snapshot(
            zone,
            name,
            file,
            levels=levels,
            subject_column=subject_column,
            description=description,
            csv=csv,
        )
    out.print(
        f"dataset {d['zone']}/{d['name']} snapshot {d['digest']} published "
        f"(previous {previous}), level {d['level']}"
    )


@dataset_app.command("retire")
@one_line_errors
def dataset_retire(
    zone: str,
    name: str,
    reason: Annotated[str, typer.Option(help="why (its digest goes on the ledger)")] = "",
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("provider.key"),
) -> None:
    """Retire a dataset you provide, for good: no more computations, gone from the catalog,
    its rows removed from the zone. Receipts made on it keep verifying.

    Example:
      zonex dataset retire tax companies --reason "superseded by companies_v2" --yes
    """
    if not yes and not typer.confirm(f"retire {zone}/{name} for good?", default=False):
        raise ValueError("not retired (confirm, or pass --yes)")
    with client(url, key) as c:
        d = c.retire_dataset(zone, name, reason)
    out.print(f"dataset {d['zone']}/{d['name']} retired (last snapshot {d['digest']})")


@app.command()
@one_line_errors
def catalog(
    zone: Annotated[str | None, typer.Option(help="only this zone")] = None,
    as_json: Json = False,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("consumer.key"),
) -> None:
    """Browse zones, datasets, columns and levels (never rows).

    Example:
      zonex catalog --key bank.key
    """
    with client(url, key) as c:
        zones = [c.zone(zone)] if zone else c.catalog()["zones"]
        hosts = c.request("GET", "/v1/availability")
    for z in zones:
        # where the zone's rows are, and whether a node-hosted zone can compute right now
        found = hosts.get(z["name"])
        z["host"] = "exchange" if found is None else "node"
        z["available"] = True if found is None else bool(found["online"])
    if as_json:
        print_json(zones)
        return
    # where rows live is shown once any zone runs on a node (the table stays narrow otherwise)
    hosted = any(z["host"] != "exchange" for z in zones)
    head = ["zone", "owner", *(["host"] if hosted else []), "dataset", "level", "rows"]
    table = Table(*head, "release", "columns")
    for z in zones:
        host = (
            z["host"]
            if z["host"] == "exchange"
            else ("node, online" if z["available"] else "node, OFFLINE")
        )
        where = [host] if hosted else []
        if not z["datasets"]:
            table.add_row(z["name"], z["owner_name"], *where, "-", "-", "-", "-", "-")
        for d in z["datasets"]:
            cols = ", ".join(
                f"{c['name']}:{c['level']}"
                + (f"/{c['pi']}" if c.get("pi", "none") != "none" else "")
                for c in d["columns"]
            )
            # the provider's opt-out from DP by default at L3 is shown wherever datasets are
            release = d.get("release_note") or ""
            table.add_row(
                z["name"],
                z["owner_name"],
                *where,
                d["name"],
                d["level"],
                d["row_count_band"],
                release,
                cols,
            )
    out.print(table)
