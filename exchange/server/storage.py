"""Control-plane engine creation and schema migrations (Alembic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from exchange.errors import ConfigurationError

MIGRATIONS = Path(__file__).parent / "migrations"
#: execution option: this transaction will write, so take the write lock at BEGIN (SQLite)
WRITE = {"zonex_write": True}


def create_control_engine(url: str) -> Engine:
    """An engine for the control plane.

    SQLite: WAL, ``synchronous=FULL`` (a committed batch survives power loss), a busy timeout,
    foreign keys on, and ``BEGIN IMMEDIATE`` for transactions marked with :data:`WRITE` so two
    writers never deadlock upgrading a read lock.
    """
    try:
        parsed = make_url(url)
    except (SQLAlchemyError, ValueError) as exc:
        raise ConfigurationError(f"bad database URL: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        engine = create_engine(
            url, connect_args={"timeout": 30, "check_same_thread": False}, pool_size=20
        )

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Any) -> None:
            immediate = conn.get_execution_options().get("zonex_write")
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_size=20, max_overflow=10, pool_pre_ping=True)
    raise ConfigurationError(f"unsupported control-plane database: {parsed.get_backend_name()}")


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the control-plane schema to the newest revision."""
    command.upgrade(alembic_config(engine), "head")
