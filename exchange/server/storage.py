"""Control-plane engine creation and schema migrations (Alembic)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from exchange.errors import ConfigurationError

MIGRATIONS = Path(__file__).parent / "migrations"
#: execution option: this transaction will write, so take the write lock at BEGIN (SQLite)
WRITE = {"zonex_write": True}


def create_control_engine(url: str) -> Engine:
    """An engine for the control plane.

    SQLite: WAL, ``synchronous=FULL`` (a committed batch survives power loss), a busy timeout,
    foreign keys on, and ``BEGIN IMMEDIATE`` for transactions marked with :data:`WRITE` so two
    writers never deadlock upgrading a read lock, one at a time per process
    (:func:`_serialize_writers`).
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

        _serialize_writers(engine)
        return engine
    if parsed.get_backend_name() == "postgresql":
        return create_engine(url, pool_size=20, max_overflow=10, pool_pre_ping=True)
    raise ConfigurationError(f"unsupported control-plane database: {parsed.get_backend_name()}")


#: how long a writer of this process waits for another one before it gives up (as SQLite's busy
#: timeout does for writers of other processes)
WRITE_WAIT_SECONDS = 30.0


def _serialize_writers(engine: Engine) -> None:
    """``BEGIN IMMEDIATE`` for :data:`WRITE` transactions, taken one at a time per process.

    Writers of one process queue on a lock here, released once their COMMIT or ROLLBACK has
    returned, instead of in SQLite's busy handler, which retries after sleeping 1, 2, 5, 10 …
    ms while a commit takes well under one: every thread that wrote beside the ledger's writer
    (the nonce writer, a node's answer, a claim) paid those sleeps. Writers in other processes
    still meet the busy handler. A plain lock, not a reentrant one: a connection that is
    collected on another thread can release it."""
    lock = threading.Lock()
    holders: set[int] = set()  # the DBAPI connections (by id) in a transaction that holds it
    dialect = engine.dialect
    commit, rollback = dialect.do_commit, dialect.do_rollback

    def release(dbapi_conn: Any) -> None:
        raw = id(getattr(dbapi_conn, "dbapi_connection", dbapi_conn))
        if raw in holders:
            holders.discard(raw)
            lock.release()

    def do_commit(dbapi_conn: Any) -> None:
        try:
            commit(dbapi_conn)
        finally:
            release(dbapi_conn)

    def do_rollback(dbapi_conn: Any) -> None:
        try:
            rollback(dbapi_conn)
        finally:
            release(dbapi_conn)

    # per engine: create_engine gives each engine a dialect of its own
    setattr(dialect, "do_commit", do_commit)  # noqa: B010
    setattr(dialect, "do_rollback", do_rollback)  # noqa: B010

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        if not conn.get_execution_options().get("zonex_write"):
            conn.exec_driver_sql("BEGIN")
            return
        if not lock.acquire(timeout=WRITE_WAIT_SECONDS):
            raise OperationalError(
                "BEGIN IMMEDIATE", None, TimeoutError("another writer held the database")
            )
        raw = conn.connection.dbapi_connection
        holders.add(id(raw))
        try:
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        except BaseException:
            release(raw)
            raise


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.attributes["engine"] = engine
    return cfg


def migrate(engine: Engine) -> None:
    """Bring the control-plane schema to the newest revision."""
    command.upgrade(alembic_config(engine), "head")
