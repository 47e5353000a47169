"""Writers of one process take SQLite's write lock one at a time (exchange.server.storage)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine

from exchange.server.storage import WRITE, create_control_engine


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    engine = create_control_engine(f"sqlite:///{tmp_path / 'control.db'}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (x INTEGER)")
    return engine


def _count(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("SELECT COUNT(*) FROM t").scalar_one())


def _finishes(fn: object, seconds: float = 10.0) -> bool:
    """Whether ``fn`` returns within ``seconds`` (a leaked lock would hold it for 30 s)."""
    thread = threading.Thread(target=fn, daemon=True)  # type: ignore[arg-type]
    thread.start()
    thread.join(seconds)
    return not thread.is_alive()


def test_concurrent_writers_all_commit(engine: Engine) -> None:
    writer = engine.execution_options(**WRITE)

    def write() -> None:
        for _ in range(50):
            with writer.begin() as conn:
                conn.exec_driver_sql("INSERT INTO t VALUES (1)")

    threads = [threading.Thread(target=write) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert _count(engine) == 300


def test_a_rolled_back_writer_releases_the_lock(engine: Engine) -> None:
    writer = engine.execution_options(**WRITE)
    with pytest.raises(ValueError), writer.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        raise ValueError("abandon the transaction")

    def next_writer() -> None:
        with writer.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (2)")

    assert _finishes(next_writer)
    assert _count(engine) == 1


def test_a_connection_returned_mid_transaction_releases_the_lock(engine: Engine) -> None:
    writer = engine.execution_options(**WRITE)
    conn = writer.connect()
    conn.begin()
    conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    conn.close()  # back to the pool, rolled back there

    def next_writer() -> None:
        with writer.begin() as c:
            c.exec_driver_sql("INSERT INTO t VALUES (2)")

    assert _finishes(next_writer)
    assert _count(engine) == 1


def test_a_write_from_another_thread_waits_for_the_open_one(engine: Engine) -> None:
    writer = engine.execution_options(**WRITE)
    second_done = threading.Event()

    def second() -> None:
        with writer.begin() as c:
            c.exec_driver_sql("INSERT INTO t VALUES (2)")
        second_done.set()

    with writer.begin() as conn:
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        # the second writer queues behind this transaction (bounded wait: 0.3 s)
        assert not second_done.wait(0.3)
    thread.join(10)
    assert second_done.is_set() and _count(engine) == 2
