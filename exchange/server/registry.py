"""The authentication hot path's two shared states: request nonces and the registry.

**Nonces** (:class:`NonceLog`). Every signed request's ``(key id, nonce)`` must be recorded
durably, across every worker process, before the request is answered: that is what refuses a
replay. One writer thread per process takes every nonce waiting and records them in one
transaction (``INSERT … ON CONFLICT DO NOTHING RETURNING``: the pairs not returned are
replays), so a busy worker pays one commit per batch rather than one per request. A request
waits for its batch's commit, never longer.

**Registry** (:class:`RegistryCache`). Principals (by key id) and derived snapshots such as the
catalog are cached per process and validated, not timed out. The database keeps one counter,
``registry_state.version``, that triggers bump in the transaction of every change to
principals, zones or datasets (migration 0007). The nonce batch reads that counter in its own
transaction, so every authenticated request learns, at no extra round trip, the registry
version as of a moment after it arrived. A cached entry read at an older version is reloaded
before it is used: a suspension or a new dataset committed by any process is seen by the next
request anywhere, exactly as if nothing were cached.

Entries are loaded by reading the version first and the rows after it, so an entry's rows are
at least as new as its version (newer is harmless: it is only reloaded once more).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, select
from sqlalchemy.dialects import postgresql, sqlite

from exchange.domain import Principal, PrincipalKind
from exchange.server.batching import Delivery, HeldConnection, Waiter, new_waiter
from exchange.server.models import NonceRow, PrincipalRow, RegistryStateRow
from exchange.server.storage import WRITE

__all__ = [
    "KnownKey",
    "NonceLog",
    "Recorded",
    "RegistryCache",
    "registry_version",
    "to_principal",
]

log = logging.getLogger("zonex.registry")

T = TypeVar("T")

_NONCES = NonceRow.__table__
_PRINCIPALS = PrincipalRow.__table__
_VERSION = select(RegistryStateRow.__table__.c.version).where(RegistryStateRow.__table__.c.id == 1)


def to_principal(row: Any) -> Principal:
    """A principal from its row (an ORM ``PrincipalRow`` or a Core row of ``principals``)."""
    return Principal(
        key_id=row.key_id,
        name=row.name,
        kind=PrincipalKind(row.kind),
        status=row.status,
        created_at=row.created_at,
        jurisdiction=row.jurisdiction,
        ciio=bool(row.ciio),
    )


def registry_version(conn: Connection) -> int:
    """The registry version as this connection's transaction sees it."""
    return int(conn.execute(_VERSION).scalar_one())


# -- nonces --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recorded:
    """A nonce's fate: ``fresh`` unless it was seen before; the registry version read in the
    transaction that recorded it."""

    fresh: bool
    registry_version: int


@dataclass
class _Waiting:
    key_id: str
    nonce: str
    created: int
    future: Waiter = field(default_factory=Future)


class NonceLog:
    """Group-committed nonce records (see the module docstring).

    Not started, :meth:`record` commits in the calling thread (offline tools, tests).
    """

    def __init__(self, engine: Engine, *, batch_max: int = 512) -> None:
        # PostgreSQL: the one INSERT is its own transaction (autocommit), so a batch costs one
        # round trip; SQLite: an explicit write transaction
        if engine.dialect.name == "postgresql":
            self._engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        else:
            self._engine = engine.execution_options(**WRITE)
        self.batch_max = batch_max
        dialect = {"postgresql": postgresql, "sqlite": sqlite}[engine.dialect.name]
        # one statement records the nonces and reads the registry version (same snapshot)
        self._insert = (
            dialect.insert(_NONCES)
            .on_conflict_do_nothing()
            .returning(_NONCES.c.key_id, _NONCES.c.nonce, _VERSION.scalar_subquery())
        )
        self._waiting: list[_Waiting] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="zonex-nonces", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Commit what is waiting, then stop the writer."""
        thread = self._thread
        if thread is None:
            return
        with self._cond:
            self._stopping = True
            self._cond.notify()
        thread.join()
        self._thread = None

    def submit(
        self,
        key_id: str,
        nonce: str,
        created: int,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Waiter:
        """Queue a nonce. The returned future resolves (to :class:`Recorded`) when its batch has
        committed, or fails with what the database raised: an asyncio future on ``loop`` to
        await there, else a ``concurrent.futures.Future``."""
        waiting = _Waiting(key_id, nonce, created, new_waiter(loop))
        with self._cond:
            if self._thread is None or self._stopping:
                run_inline = True
            else:
                run_inline = False
                self._waiting.append(waiting)
                self._cond.notify()
        if run_inline:
            self._commit([waiting])
        return waiting.future

    def record(self, key_id: str, nonce: str, created: int) -> Recorded:
        """Record a nonce and wait for the commit. Raises what the database raised."""
        future = self.submit(key_id, nonce, created)
        assert isinstance(future, Future)
        recorded: Recorded = future.result()
        return recorded

    def _run(self) -> None:
        held = HeldConnection(self._engine)
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._stopping:
                        self._cond.wait()
                    if not self._waiting:
                        return
                    batch = self._waiting[: self.batch_max]
                    del self._waiting[: self.batch_max]
                self._commit(batch, held)
        finally:
            held.close()

    def _commit(self, batch: list[_Waiting], held: HeldConnection | None = None) -> None:
        first: dict[tuple[str, str], _Waiting] = {}
        repeats: list[_Waiting] = []
        for waiting in batch:
            pair = (waiting.key_id, waiting.nonce)
            if pair in first:
                repeats.append(waiting)  # the same nonce twice in one batch: the later is a replay
            else:
                first[pair] = waiting
        params = [
            {"key_id": w.key_id, "nonce": w.nonce, "created": w.created} for w in first.values()
        ]
        try:
            conn = self._engine.connect() if held is None else held.get()
            try:
                with conn.begin():
                    rows = conn.execute(self._insert, params).all()
                    # every pair a replay: nothing returned, so read the version on its own
                    version = int(rows[0][2]) if rows else registry_version(conn)
            finally:
                if held is None:
                    conn.close()
            inserted = {(row[0], row[1]) for row in rows}
        except BaseException as exc:  # every waiter learns of the failure; nothing was recorded
            if held is not None:
                held.discard()
            failed = Delivery()
            for waiting in batch:
                failed.add(waiting.future, None, exc)
            failed.send()
            if not isinstance(exc, Exception):
                raise
            log.warning("recording %d nonce(s) failed: %s", len(batch), exc)
            return
        delivery = Delivery()
        for pair, waiting in first.items():
            delivery.add(waiting.future, Recorded(pair in inserted, version))
        for waiting in repeats:
            delivery.add(waiting.future, Recorded(False, version))
        delivery.send()


# -- the registry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class KnownKey:
    """A principal and its public key, read at registry version ``version`` or later."""

    principal: Principal
    public_key: bytes
    version: int


class RegistryCache:
    """Principals by key id and named snapshots, each valid while the registry version it was
    read at is current (see the module docstring)."""

    def __init__(self, engine: Engine, *, max_keys: int = 100_000) -> None:
        self._engine = engine
        self.max_keys = max_keys
        self._keys: dict[str, KnownKey] = {}
        self._snapshots: dict[str, tuple[int, Any]] = {}
        self._lock = threading.Lock()

    # principals

    def cached_key(self, key_id: str) -> KnownKey | None:
        """The cached entry, whatever its version (the caller checks it against the current one)."""
        return self._keys.get(key_id)

    def load_key(self, key_id: str) -> KnownKey | None:
        """Read the principal from the database (``None``: no such key) and cache it."""
        with self._engine.connect() as conn:
            version = registry_version(conn)
            row = conn.execute(select(_PRINCIPALS).where(_PRINCIPALS.c.key_id == key_id)).first()
        if row is None:
            with self._lock:
                self._keys.pop(key_id, None)
            return None
        known = KnownKey(to_principal(row), bytes(row.public_key), version)
        with self._lock:
            held = self._keys.get(key_id)
            if held is None or held.version <= version:
                if held is None and len(self._keys) >= self.max_keys:
                    self._keys.clear()  # bounded: a flood of keys costs reloads, not memory
                self._keys[key_id] = known
        return known

    def current_key(self, key_id: str, version: int) -> KnownKey | None:
        """The principal as of registry ``version`` or later: the cached entry if it is that
        new, else a fresh read."""
        known = self._keys.get(key_id)
        if known is not None and known.version >= version:
            return known
        return self.load_key(key_id)

    # snapshots

    def peek(self, name: str, version: int) -> Any | None:
        """The snapshot ``name`` if it was read at ``version`` or later, else ``None``."""
        held = self._snapshots.get(name)
        if held is not None and held[0] >= version:
            return held[1]
        return None

    def snapshot(self, name: str, version: int, load: Callable[[Connection, int], T]) -> T:
        """The snapshot ``name`` as of registry ``version`` or later, reloaded when the cached
        one is older by ``load(connection, version read)``, inside one read transaction after
        reading the version."""
        held = self.peek(name, version)
        if held is not None:
            return held  # type: ignore[no-any-return]
        with self._engine.connect() as conn:
            current = registry_version(conn)
            value = load(conn, current)
        with self._lock:
            cached = self._snapshots.get(name)
            if cached is None or cached[0] <= current:
                self._snapshots[name] = (current, value)
        return value
