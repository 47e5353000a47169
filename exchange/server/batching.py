"""Plumbing shared by the group-committing writer threads (the ledger, the nonce log).

- :class:`HeldConnection`: a writer keeps one connection across its batches (no pool checkout
  and liveness ping per batch) and takes a fresh one after a failed batch.
- :class:`Delivery`: a batch's outcomes go to their waiters. Waiters on an event loop are
  settled with one wake-up of that loop per batch, not one per request; thread waiters
  (``concurrent.futures.Future``) directly.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from contextlib import suppress
from typing import Any

from sqlalchemy import Connection, Engine

__all__ = ["Delivery", "HeldConnection", "Waiter", "new_waiter"]

#: where one item's outcome goes
Waiter = Future[Any] | asyncio.Future[Any]


def new_waiter(loop: asyncio.AbstractEventLoop | None) -> Waiter:
    """An asyncio future on ``loop`` (await it there), or a thread future without one."""
    return loop.create_future() if loop is not None else Future()


class HeldConnection:
    """One connection kept by a writer thread across its batches; replaced after a failure."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None

    def get(self) -> Connection:
        if self._conn is None:
            self._conn = self._engine.connect()
        return self._conn

    def discard(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                conn.invalidate()
                conn.close()

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(Exception):
                conn.close()


class Delivery:
    """Collects a batch's outcomes, then :meth:`send` settles every waiter."""

    def __init__(self) -> None:
        self._threads: list[tuple[Future[Any], Any, BaseException | None]] = []
        self._loops: dict[asyncio.AbstractEventLoop, list[tuple[Any, Any, Any]]] = {}

    def add(self, waiter: Waiter, result: Any = None, error: BaseException | None = None) -> None:
        if isinstance(waiter, asyncio.Future):
            self._loops.setdefault(waiter.get_loop(), []).append((waiter, result, error))
        else:
            self._threads.append((waiter, result, error))

    def send(self) -> None:
        for future, result, error in self._threads:
            _settle(future, result, error)
        for loop, items in self._loops.items():
            with suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle_all, items)
        self._threads, self._loops = [], {}


def _settle(future: Waiter, result: Any, error: BaseException | None) -> None:
    if future.done():  # cancelled: the client went away
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_all(items: list[tuple[Any, Any, Any]]) -> None:
    for future, result, error in items:
        _settle(future, result, error)
