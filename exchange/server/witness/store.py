"""The witness's durable state: the logs it trusts and the latest checkpoint it cosigned for
each, in one SQLite file (standard :mod:`sqlite3`, WAL, ``synchronous=FULL``).

Tables:

- ``log_keys``: (origin, verifier key) pairs; a log may have several keys.
- ``heads``: per origin, the size and root of the latest cosigned checkpoint and the note the
  witness returned (the log's signature and the witness's cosignature), for the monitoring
  endpoint. Sizes are stored as decimal text: a tree size may reach 2^64 - 1.
- ``evidence``: checkpoints the log did sign but the witness refused as inconsistent (422),
  kept as possible proof of a fork (the newest ``keep`` per log, see
  :meth:`WitnessStore.record_evidence`).

:meth:`WitnessStore.swap` replaces a head only if it still holds the expected state, in one
``BEGIN IMMEDIATE`` transaction: of two requests from the same old size, one wins, and the
stored size never decreases (c2sp.org/tlog-witness, "add-checkpoint": the check and the update
are one atomic step).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

from crypto.encoding import b64_encode
from crypto.note import NoteVerifier
from exchange.server.witness.decision import LogState
from exchange.server.witness.protocol import origin_hash

__all__ = ["StoredHead", "TrustedLog", "WitnessStore"]

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS log_keys (
    origin TEXT NOT NULL,
    verifier_key TEXT NOT NULL,
    added_at INTEGER NOT NULL,
    PRIMARY KEY (origin, verifier_key)
);
CREATE TABLE IF NOT EXISTS heads (
    origin TEXT PRIMARY KEY,
    origin_hash TEXT NOT NULL UNIQUE,
    size TEXT NOT NULL,
    root BLOB NOT NULL,
    note TEXT NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS evidence (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    origin TEXT NOT NULL,
    received_at INTEGER NOT NULL,
    old_size TEXT NOT NULL,
    proof TEXT NOT NULL,
    note TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_evidence_origin ON evidence (origin, id);
"""


@dataclass(frozen=True)
class StoredHead:
    """The latest checkpoint cosigned for a log: its state, the cosigned note, when (Unix s)."""

    state: LogState
    note: str
    updated_at: int


@dataclass(frozen=True)
class TrustedLog:
    """A log the witness cosigns: its origin, keys and latest cosigned size (``None``: none)."""

    origin: str
    verifier_keys: tuple[str, ...]
    size: int | None
    updated_at: int | None


class WitnessStore:
    """The witness database at ``path``; a connection per operation, safe across threads and
    processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self._connect() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise ValueError(f"{path}: made by a newer zonex (schema {version})")
            conn.executescript(_SCHEMA)
            conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # isolation_level=None: transactions are begun explicitly (BEGIN IMMEDIATE for writes)
        with closing(sqlite3.connect(self.path, timeout=30, isolation_level=None)) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            yield conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- trusted logs ---------------------------------------------------------------------

    def trust(self, verifier: NoteVerifier, now: int) -> bool:
        """Trust a log key for its origin (the key's name); ``False`` if it already was."""
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT OR IGNORE INTO log_keys (origin, verifier_key, added_at) VALUES (?, ?, ?)",
                (verifier.name, verifier.to_verifier_key(), now),
            )
            return cursor.rowcount == 1

    def trusted(self, origin: str) -> list[NoteVerifier]:
        """The keys trusted for ``origin`` (empty: an unknown log)."""
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT verifier_key FROM log_keys WHERE origin = ? ORDER BY verifier_key",
                (origin,),
            ).fetchall()
        return [NoteVerifier.from_verifier_key(key) for (key,) in rows]

    def logs(self) -> list[TrustedLog]:
        """Every trusted log with its latest cosigned size, by origin."""
        with self._connect() as conn:
            keys = conn.execute(
                "SELECT origin, verifier_key FROM log_keys ORDER BY origin, verifier_key"
            ).fetchall()
            heads = {
                origin: (int(size), updated)
                for origin, size, updated in conn.execute(
                    "SELECT origin, size, updated_at FROM heads"
                )
            }
        grouped: dict[str, list[str]] = {}
        for origin, key in keys:
            grouped.setdefault(origin, []).append(key)
        return [
            TrustedLog(
                origin,
                tuple(found),
                heads[origin][0] if origin in heads else None,
                heads[origin][1] if origin in heads else None,
            )
            for origin, found in grouped.items()
        ]

    # -- heads ----------------------------------------------------------------------------

    def head(self, origin: str) -> StoredHead | None:
        """The latest cosigned checkpoint of ``origin``; ``None`` if there is none."""
        return self._head("origin", origin)

    def head_by_hash(self, digest: str) -> StoredHead | None:
        """:meth:`head` by the lowercase hex SHA-256 of the origin (the monitoring path)."""
        return self._head("origin_hash", digest)

    def _head(self, column: str, value: str) -> StoredHead | None:
        with self._connect() as conn:
            row = conn.execute(
                f"SELECT size, root, note, updated_at FROM heads WHERE {column} = ?",
                (value,),
            ).fetchone()
        if row is None:
            return None
        size, root, note, updated_at = row
        return StoredHead(LogState(int(size), bytes(root)), note, updated_at)

    def swap(
        self, origin: str, expected: LogState | None, new: LogState, note: str, now: int
    ) -> bool:
        """Store ``new`` (and the cosigned ``note``) for ``origin`` if the stored state is still
        ``expected`` (``None``: nothing stored yet); ``False`` if another request changed it
        first. Durable before it returns."""
        if expected is not None and new.size < expected.size:
            raise ValueError("a witness never rolls a log back")
        with self._write() as conn:
            if expected is None:
                cursor = conn.execute(
                    "INSERT INTO heads (origin, origin_hash, size, root, note, updated_at) "
                    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (origin) DO NOTHING",
                    (origin, origin_hash(origin), str(new.size), new.root, note, now),
                )
            else:
                cursor = conn.execute(
                    "UPDATE heads SET size = ?, root = ?, note = ?, updated_at = ? "
                    "WHERE origin = ? AND size = ? AND root = ?",
                    (str(new.size), new.root, note, now, origin, str(expected.size), expected.root),
                )
            return cursor.rowcount == 1

    # -- evidence -------------------------------------------------------------------------

    def record_evidence(
        self,
        origin: str,
        old_size: int,
        proof: Sequence[bytes],
        note: str,
        reason: str,
        now: int,
        keep: int,
    ) -> None:
        """Keep a log-signed checkpoint refused as inconsistent, and only the newest ``keep``
        of the log's (only the log's own key can add to them)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO evidence (origin, received_at, old_size, proof, note, reason) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (origin, now, str(old_size), "\n".join(b64_encode(h) for h in proof), note, reason),
            )
            conn.execute(
                "DELETE FROM evidence WHERE origin = ? AND id NOT IN "
                "(SELECT id FROM evidence WHERE origin = ? ORDER BY id DESC LIMIT ?)",
                (origin, origin, keep),
            )

    def evidence(self, origin: str) -> list[tuple[int, str, str]]:
        """Refused log-signed checkpoints for ``origin``, oldest first: (time, reason, note)."""
        with self._connect() as conn:
            return [
                (int(t), str(reason), str(note))
                for t, reason, note in conn.execute(
                    "SELECT received_at, reason, note FROM evidence WHERE origin = ? ORDER BY id",
                    (origin,),
                )
            ]
