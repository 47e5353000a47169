"""The zone store's engine keeps its DuckDB connections for reuse, but a reused connection
never reads another set of dataset files than the one published when it is checked out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from exchange.node.store import TableInfo, ZoneStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ZoneStore]:
    with ZoneStore(tmp_path / "store") as s:
        yield s


def _csv(path: Path, body: str) -> Path:
    path.write_text(body, "utf-8")
    return path


def _sum(store: ZoneStore, table: str) -> tuple[int, object]:
    """The table's sum and the DuckDB connection that computed it."""
    with store.engine.connect() as conn:
        value = conn.execute(text(f"SELECT sum(a) FROM {table}")).scalar()
        raw = conn.connection.dbapi_connection
        assert value is not None and raw is not None
        return int(value), raw


def test_a_pooled_connection_is_reused_until_the_datasets_change(
    store: ZoneStore, tmp_path: Path
) -> None:
    store.import_csv("t", _csv(tmp_path / "a.csv", "a\n1\n"))
    first, conn1 = _sum(store, "t")
    again, conn2 = _sum(store, "t")
    assert (first, again) == (1, 1)
    assert conn2 is conn1  # reused: no new connection (and no scan of every file) per query

    # a new snapshot of the same dataset (same name, new file): the pooled connection is
    # discarded, the next one reads the new rows
    def publish(temp: Path, info: TableInfo) -> None:
        store.replace("t", temp)

    store.import_csv("t", _csv(tmp_path / "b.csv", "a\n2\n3\n"), publish=publish)
    store.discard_previous()
    replaced, conn3 = _sum(store, "t")
    assert replaced == 5 and conn3 is not conn1

    # a dataset added beside it is visible at once; one dropped is gone
    store.import_csv("u", _csv(tmp_path / "c.csv", "a\n7\n"))
    assert _sum(store, "u")[0] == 7
    store.drop("u")
    with pytest.raises(DBAPIError, match="Table with name u does not exist"):
        _sum(store, "u")

    assert _sum(store, "t")[0] == 5
