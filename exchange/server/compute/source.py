"""Where a dataset's rows are read: the zone's embedded store or the provider's attached table.

Both are reached through SQLAlchemy; queries are built as expressions or from a checked AST,
never by pasting user text.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine, TableClause, column, table

from exchange.errors import ConflictError, InvalidInputError
from exchange.node.store import ZoneStoreError, attach
from exchange.server.models import DatasetRow
from exchange.server.runtime import Exchange


@dataclass(frozen=True)
class Source:
    engine: Engine
    #: the relation to select from (a view named after the dataset, or the attached table)
    relation: TableClause
    dialect: str


@contextmanager
def open_source(ex: Exchange, row: DatasetRow) -> Iterator[Source]:
    names = [c["name"] for c in row.columns]
    if row.source == "node":
        # the rows are on the provider's node; aggregates, the zone's role of private joins,
        # scores and exports are dispatched there (they never open the source here)
        raise ConflictError(
            f"dataset {row.zone}/{row.name} is hosted on its zone's node, which runs aggregates, "
            "private joins, scores and exports once it is active; this computation is not "
            "available for node-hosted datasets",
            reason="node_hosted",
        )
    if row.source == "import":
        store = ex.zone_store(row.zone)
        yield Source(store.engine, table(row.name, *(column(n) for n in names)), "duckdb")
        return
    assert row.attach_url is not None and row.attach_table is not None
    try:
        attached = attach(
            row.attach_url, row.attach_table, allowed_prefixes=ex.settings.attach_allowed_prefixes
        )
    except ZoneStoreError as exc:
        raise InvalidInputError(f"the attached table is unavailable: {exc}") from exc
    try:
        relation = table(attached.table, *(column(n) for n in names), schema=attached.schema)
        yield Source(attached.engine, relation, attached.engine.dialect.name)
    finally:
        attached.close()
