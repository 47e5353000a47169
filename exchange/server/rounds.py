"""Background rounds over a table of remote peers, shared by the chain poller
(:mod:`exchange.server.chain`) and the witness cosigner (:mod:`exchange.server.cosigning`).

A round runs on a thread of its own, started by :meth:`Rounds.tick` (the ledger's ticker)
unless one is running. Several processes of one exchange share the peers through a lease on
each peer's row (:meth:`Rounds.claim`); a peer that fails waits 1, 2, 4 ... s (:func:`backoff`)
before its next turn and delays nobody else.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
from sqlalchemy import CursorResult, Engine, or_, update
from sqlalchemy.orm import Session

from exchange.server.models import ChainChildRow, WitnessRow
from exchange.server.storage import WRITE

__all__ = ["Rounds", "backoff"]


def backoff(failures: int, ceiling: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row: 1, 2, 4 ... up to ``ceiling``."""
    return min(ceiling, 2.0 ** min(failures - 1, 30))


class Rounds:
    """The scheduling half of a poller: subclasses implement :meth:`run_once`.

    ``join_timeout``: how long :meth:`close` waits for a running round (about one request's
    timeout). ``_http`` is the connection pool every round shares; only the thread running a
    round makes and uses it, and :meth:`close` closes it.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        thread_name: str,
        join_timeout: float,
        log: logging.Logger,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._write_engine = engine.execution_options(**WRITE)
        self._clock = clock
        self._thread_name = thread_name
        self._join_timeout = join_timeout
        self._round_log = log
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._http: httpx.Client | None = None

    def run_once(self, *, ignore_backoff: bool = False) -> dict[str, Any]:
        raise NotImplementedError

    def tick(self) -> None:
        """Start a round in the background unless one is running or this is closed."""
        with self._lock:
            if self._stopping.is_set() or (self._thread is not None and self._thread.is_alive()):
                return
            self._thread = threading.Thread(
                target=self._background_round, name=self._thread_name, daemon=True
            )
            self._thread.start()

    def start(self) -> None:
        """Let :meth:`tick` start rounds (again, after :meth:`close`)."""
        self._stopping.clear()

    def close(self) -> None:
        """Start no more rounds; wait (about one request's timeout) for the running one."""
        with self._lock:
            self._stopping.set()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=self._join_timeout)
            if thread.is_alive():
                return  # the round still uses the pool; the process is ending anyway
        if self._http is not None:
            self._http.close()
            self._http = None

    def _background_round(self) -> None:
        try:
            self.run_once()
        except Exception:  # never let a round kill the thread silently
            self._round_log.exception("%s round failed", self._thread_name)

    def claim(
        self, table: type[ChainChildRow] | type[WitnessRow], name: str, seconds: float
    ) -> bool:
        """Take the lease on the peer ``name`` (a row of ``table``) for ``seconds`` unless another
        process holds it; whether this process got it."""
        now = self._clock()
        with Session(self._write_engine) as session, session.begin():
            result = session.execute(
                update(table)
                .where(table.name == name)
                .where(or_(table.lease_until.is_(None), table.lease_until < now))
                .values(lease_until=now + timedelta(seconds=seconds))
            )
            return int(cast(CursorResult[Any], result).rowcount) == 1
