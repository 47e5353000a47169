"""Datasets registered on a node: the rows go into the node's own store (or stay in the
provider's database, attached by a URL that never leaves the node); the exchange receives only
the metadata and the snapshot digest, in a request signed with the node's key."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from exchange.client.sdk import Client
from exchange.domain import leveled_columns
from exchange.errors import InvalidInputError
from exchange.node.home import HostedDataset, NodeHome, own
from exchange.node.store import CsvOptions, ZoneStoreError, attach

__all__ = ["register_on_node"]


def register_on_node(
    home: NodeHome,
    name: str,
    *,
    levels: Mapping[str, str],
    subject_column: str,
    description: str = "",
    file: Path | None = None,
    attach_url: str | None = None,
    attach_table: str | None = None,
    csv: Mapping[str, Any] | None = None,
    url: str | None = None,
    pi: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Import or attach on the node, then register the metadata with the exchange.

    Nothing stays behind when the exchange refuses: an imported table is dropped again.
    """
    if name in home.datasets():
        raise InvalidInputError(f"this node already hosts a dataset {name!r}")
    store = home.store
    imported = False
    try:
        if file is not None:
            try:
                if file.suffix.lower() == ".parquet":
                    info = store.import_parquet(name, file)
                else:
                    options = None
                    if csv:
                        options = CsvOptions(
                            delimiter=str(csv.get("delimiter", ",")),
                            encoding=str(csv.get("encoding", "utf-8")),
                            rename=tuple(
                                (str(k), str(v)) for k, v in dict(csv.get("rename") or {}).items()
                            ),
                        )
                    info = store.import_csv(name, file, options=options)
            except ZoneStoreError as exc:
                raise InvalidInputError(str(exc), reason=exc.code) from exc
            imported = True
            hosted_source, url_kept, table_kept = "import", None, None
        else:
            if attach_url is None or not attach_table:
                raise InvalidInputError("give a file, or an attach URL and a table")
            try:
                attached = attach(attach_url, attach_table, allowed_prefixes=(own(attach_url),))
                info = attached.describe()
                attached.close()
            except ZoneStoreError as exc:
                raise InvalidInputError(str(exc), reason=exc.code) from exc
            hosted_source, url_kept, table_kept = "attach", attach_url, attach_table
        columns = leveled_columns(
            [(c.name, c.type) for c in info.columns], levels, subject_column, pi
        )
        with Client(url or home.exchange, home.key) as client:
            registered: dict[str, Any] = client.request(
                "POST",
                "/v1/node/datasets",
                json={
                    "name": name,
                    "description": description,
                    "subject_column": subject_column,
                    "columns": columns,
                    "row_count": info.row_count,
                    "digest": info.digest,
                },
            )
    except BaseException:
        if imported:
            store.drop(name)
        raise
    home.add_dataset(
        HostedDataset(
            name=name,
            subject_column=subject_column,
            columns=tuple(columns),
            digest=info.digest,
            row_count=info.row_count,
            source=hosted_source,
            attach_url=url_kept,
            attach_table=table_kept,
        )
    )
    return registered
