"""Control-plane storage: migrations match the models, on SQLite and PostgreSQL."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import exchange.server.policystore  # noqa: F401 - register every table on the metadata
from exchange.server.db import Base
from exchange.server.runtime import Exchange


def test_migrations_match_the_models(exchange: Exchange) -> None:
    with exchange.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []


def test_sqlite_is_durable(exchange: Exchange) -> None:
    if exchange.engine.dialect.name != "sqlite":
        return
    with exchange.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
