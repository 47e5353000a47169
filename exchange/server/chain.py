"""The catalog chain (市、区、街): an exchange records its child exchanges' checkpoints.

Each level of a city/district/street chain runs its own exchange, log and witness. The
operator of a parent names its children (:func:`exchange.server.children.add_child`: name, URL,
the child's log key; ledgered as ``chain.child_added``). On the ledger's ticker,
:class:`ChainPoller` fetches each child's latest checkpoint (``GET {url}/v1/log/checkpoint``,
unsigned), verifies it with the child's log key and checks that it extends the checkpoint last
recorded for that child, with a consistency proof computed from the child's unsigned hash tiles
(``GET {url}/v1/log/tile/...``, :class:`crypto.tiles.TiledTree`) and verified against both
signed roots. A checkpoint that grew is ledgered as ``chain.checkpoint``, together with the
digest of the catalog the child publishes (:mod:`exchange.server.publishing`,
``GET /v1/chain/published``), which is kept to be listed.

A checkpoint that does not extend the recorded one is a fork, proven by two signed checkpoints:
the same size with another root, or a larger tree whose root at the recorded size (bound to its
signed root by a consistency proof) is another root. It is ledgered as ``chain.fork`` with both
notes (and that proof), logged at CRITICAL, and not accepted as the child's state. Tiles that
do not reproduce the child's own signed root prove nothing: that is a failure, not a fork.

Polls run on a thread of their own, never on the ledger's writer or ticker; a child that is slow,
down or misbehaving is polled again after 1, 2, 4 ... s (at most ``chain_backoff_max_seconds``)
and delays nothing else. Several processes of one exchange share the work through a lease on
each child's row. The names of :mod:`exchange.server.children` and
:mod:`exchange.server.publishing` are importable from here too.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy import Engine, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from crypto.canonical import MAX_SAFE_INTEGER
from crypto.encoding import b64_encode
from crypto.errors import CryptoError, VerificationError
from crypto.merkle import verify_consistency
from crypto.note import (
    MAX_NOTE_BYTES,
    Checkpoint,
    NoteVerifier,
    keep_signatures,
    verify_checkpoint,
)
from crypto.tiles import TiledTree, needed_width, tile_path
from exchange.errors import ConflictError, ZonexError
from exchange.published import PublishedError, verify_published
from exchange.server.children import (
    CHILD_ADDED,
    ChildFork,
    ChildInfo,
    RecordedCheckpoint,
    add_child,
    list_children,
    parse_child_log_key,
)
from exchange.server.ledger import ANONYMOUS, EntryDraft, Ledger, entry_parts
from exchange.server.models import ChainChildRow
from exchange.server.publishing import render_published
from exchange.server.rounds import Rounds, backoff
from exchange.settings import Settings

__all__ = [
    "CHAIN_CHECKPOINT",
    "CHAIN_FORK",
    "CHILD_ADDED",
    "ChainPoller",
    "ChildFork",
    "ChildInfo",
    "RecordedCheckpoint",
    "add_child",
    "list_children",
    "parse_child_log_key",
    "render_published",
]

log = logging.getLogger("zonex.chain")

#: the ledger entries of the parent's records
CHAIN_CHECKPOINT = "chain.checkpoint"
CHAIN_FORK = "chain.fork"

#: a child's note is recorded as served up to this length (its witnesses' cosignatures
#: included), else with its log's signature lines only: two notes fit any ledger entry
MAX_RECORDED_NOTE = 8 * 1024
#: characters of a failure kept on the child's row and in the log line
_ERROR_CHARS = 500
#: one hash tile is at most 256 hashes
_TILE_BYTES = 256 * 32


class _ChildError(Exception):
    """A poll that recorded nothing: the child is unreachable, answered something unusable, or
    its tiles prove nothing. Retried with backoff."""


@dataclass(frozen=True)
class _Fork:
    """Two signed checkpoints of one child that cannot both be of one history."""

    reason: str  # same_size | inconsistent
    note: str
    size: int
    root: bytes
    #: for ``inconsistent``: the new tree's root at the recorded size, bound to its signed root
    #: by ``proof``
    prefix_root: bytes | None = None
    proof: tuple[bytes, ...] = ()


def _recordable(note: str, verifier: NoteVerifier) -> str:
    """The note as served if short enough, else with the log's own signature lines only."""
    return note if len(note) <= MAX_RECORDED_NOTE else keep_signatures(note, [verifier])


class ChainPoller(Rounds):
    """Polls the recorded children and records their checkpoints and published catalogs.

    :meth:`tick` (registered on the ledger's ticker) starts a round on a thread of its own
    unless one is running, and returns at once; :meth:`run_once` runs a round in the caller's
    thread and says what happened to each child polled (``recorded``, ``unchanged``, ``fork``
    or ``failed``).
    """

    def __init__(
        self,
        engine: Engine,
        ledger: Ledger,
        settings: Settings,
        *,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__(
            engine,
            thread_name="zonex-chain-poll",
            join_timeout=settings.chain_timeout_seconds + 5,
            log=log,
            clock=clock,
        )
        self._ledger = ledger
        self._settings = settings
        self._transport = transport

    # -- one round -------------------------------------------------------------------------

    def run_once(self, *, ignore_backoff: bool = False) -> dict[str, str]:
        """Poll every child that is due (with ``ignore_backoff``, also those waiting after a
        failure); what happened to each."""
        now = self._clock()
        query = select(ChainChildRow)
        if not ignore_backoff:
            query = query.where(
                or_(ChainChildRow.retry_at.is_(None), ChainChildRow.retry_at <= now)
            )
        try:
            with Session(self._engine) as session:
                due = [ChildInfo.from_row(row) for row in session.execute(query).scalars()]
        except SQLAlchemyError:
            log.exception("chain round: cannot read the children")
            return {}
        outcome: dict[str, str] = {}
        for child in due:
            if self._stopping.is_set():
                break
            if not self.claim(
                ChainChildRow, child.name, 4 * self._settings.chain_timeout_seconds + 5
            ):
                continue  # another process of this exchange is at it
            outcome[child.name] = self._poll(child)
        return outcome

    def _poll(self, child: ChildInfo) -> str:
        try:
            verifier = child.verifier()
            note = self._get(child.url + "/v1/log/checkpoint", MAX_NOTE_BYTES).decode("utf-8")
            try:
                cp = verify_checkpoint(note, verifier)
            except VerificationError as exc:
                raise _ChildError(
                    f"its checkpoint does not verify with its log key: {exc}"
                ) from exc
            if cp.size > MAX_SAFE_INTEGER:
                raise _ChildError(
                    f"its checkpoint size {cp.size} is beyond what a ledger entry records"
                )
            note = _recordable(note, verifier)
            recorded = child.checkpoint
            if recorded is not None and cp.size == recorded.size and cp.root == recorded.root:
                # a catalog not taken with the recorded checkpoint (none yet, or its fetch
                # failed then) is asked for again every round until it is
                stale = child.published is None or (
                    recorded.recorded_at is not None
                    and (child.published_at is None or child.published_at < recorded.recorded_at)
                )
                if stale:
                    self._record(child, cp.size, cp.root, note, only_published=True)
                self._succeeded(child)
                return "unchanged"
            fork = None if recorded is None else self._check_extends(child, recorded, cp, note)
            if fork is not None:
                self._forked(child, fork)
                return "fork"
            self._record(child, cp.size, cp.root, note)
            return "recorded"
        except (_ChildError, ZonexError, SQLAlchemyError, CryptoError, UnicodeDecodeError) as exc:
            self._failed(child, exc)
            return "failed"

    def _check_extends(
        self, child: ChildInfo, recorded: RecordedCheckpoint, cp: Checkpoint, note: str
    ) -> _Fork | None:
        """``None`` if the checkpoint ``cp`` extends the recorded one; the fork if it provably
        does not; raise :class:`_ChildError` if this cannot be told."""
        if cp.size == recorded.size:
            return _Fork("same_size", note, cp.size, cp.root)
        if cp.size < recorded.size:
            raise _ChildError(
                f"its checkpoint has size {cp.size}, below the size {recorded.size} recorded "
                "for it (a rollback, or a stale copy answering)"
            )
        tiles: dict[tuple[int, int], bytes] = {}

        def fetch(level: int, index: int, width: int) -> bytes:
            # always the tile as it is in the tree of the new size: one fetch serves both trees
            key = (level, index)
            if key not in tiles:
                full = needed_width(cp.size, level, index)
                if full < width:
                    raise _ChildError(f"asked for a tile beyond size {cp.size}")
                path = tile_path(level, index, full)
                data = self._get(f"{child.url}/v1/log/{path}", _TILE_BYTES)
                if len(data) != full * 32:
                    raise _ChildError(f"its tile {path} has {len(data)} bytes, not {full * 32}")
                tiles[key] = data
            return tiles[key]

        try:
            proof = TiledTree(cp.size, fetch).consistency_proof(recorded.size)
        except ValueError as exc:
            raise _ChildError(f"its tiles do not make a tree of size {cp.size}: {exc}") from exc
        try:
            verify_consistency(recorded.size, cp.size, recorded.root, cp.root, proof)
            return None
        except VerificationError:
            pass
        # the proof failed: a fork only if the tiles are those of the child's signed tree, i.e.
        # the same proof binds the new tree's root at the recorded size to its signed root
        try:
            prefix = TiledTree(recorded.size, fetch).root()
            verify_consistency(recorded.size, cp.size, prefix, cp.root, proof)
        except (ValueError, VerificationError) as exc:
            raise _ChildError(
                f"its tiles do not match its own checkpoint of size {cp.size}: {exc}"
            ) from exc
        return _Fork("inconsistent", note, cp.size, cp.root, prefix, tuple(proof))

    # -- HTTP ------------------------------------------------------------------------------

    def _client(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(
                timeout=self._settings.chain_timeout_seconds, transport=self._transport
            )
        return self._http

    def _get(self, url: str, limit: int) -> bytes:
        """The body of a 200 answer to ``GET url``, at most ``limit`` bytes."""
        try:
            with self._client().stream("GET", url) as response:
                if response.status_code != 200:
                    raise _ChildError(f"GET {url} answered {response.status_code}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > limit:
                        raise _ChildError(f"GET {url}: the answer exceeds {limit} bytes")
                return bytes(body)
        except httpx.HTTPError as exc:
            raise _ChildError(f"GET {url}: {exc or type(exc).__name__}") from exc

    def _published(self, child: ChildInfo, *, quiet: bool = False) -> tuple[str, str] | None:
        """The child's published catalog (envelope JSON, SHA-256 of its payload), verified
        with its log key; ``None`` (logged, ``quiet``: at debug level) when it has none that
        verifies."""
        try:
            data = self._get(
                child.url + "/v1/chain/published", self._settings.chain_max_published_bytes
            )
            envelope, _ = verify_published(data, child.verifier())
        except (_ChildError, PublishedError) as exc:
            level = logging.DEBUG if quiet else logging.WARNING
            log.log(level, "child %s: no published catalog taken: %s", child.name, exc)
            return None
        return data.decode("utf-8"), hashlib.sha256(envelope.payload_bytes()).hexdigest()

    # -- outcomes --------------------------------------------------------------------------

    def _record(
        self, child: ChildInfo, size: int, root: bytes, note: str, *, only_published: bool = False
    ) -> None:
        """Ledger ``chain.checkpoint`` (with the digest of the catalog published now) and keep
        it as the child's state; with ``only_published``, keep a first published catalog of an
        unchanged checkpoint (no entry: it is ledgered with the next checkpoint)."""
        # an unchanged checkpoint asks again every round: a child without one says so once
        published = self._published(child, quiet=only_published)
        expected = child.checkpoint
        now = self._clock()

        def apply(session: Session, draft: EntryDraft | None) -> None:
            row = session.get(ChainChildRow, child.name, with_for_update=True)
            if row is None:  # pragma: no cover - children are never deleted
                raise ConflictError(f"child {child.name!r} is gone")
            if (row.size, row.root) != (
                (None, None) if expected is None else (expected.size, expected.root)
            ):
                raise ConflictError(f"the record of child {child.name!r} changed meanwhile")
            if draft is not None:
                row.size, row.root, row.note = size, root, note
                row.recorded_seq, row.recorded_at = draft.seq, now
            if published is not None:
                row.published, row.published_digest = published
                row.published_at = now
            row.failures, row.last_error, row.retry_at, row.lease_until = 0, None, None, None

        if only_published:
            with Session(self._write_engine) as session, session.begin():
                apply(session, None)
            return
        digests = {"root": root.hex()}
        if published is not None:
            digests["published"] = published[1]
        self._append(
            EntryDraft(
                kind=CHAIN_CHECKPOINT,
                actor=ANONYMOUS,
                refs={"child": child.name},
                digests=digests,
                attrs={"size": size, "note": note},
            ),
            apply,
        )
        log.info("child %s: recorded checkpoint %d", child.name, size)

    def _forked(self, child: ChildInfo, fork: _Fork) -> None:
        recorded = child.checkpoint
        assert recorded is not None
        known = child.fork is not None and (child.fork.size, child.fork.root) == (
            fork.size,
            fork.root,
        )
        log.critical(
            "child %s at %s FORKED: it signed a checkpoint of size %d (root %s) that %s the "
            "recorded checkpoint of size %d (root %s); not accepted%s",
            child.name,
            child.url,
            fork.size,
            b64_encode(fork.root),
            "conflicts with" if fork.reason == "same_size" else "does not extend",
            recorded.size,
            b64_encode(recorded.root),
            " (recorded before)" if known else "",
        )
        message = f"fork: its checkpoint of size {fork.size} does not extend the recorded one"
        if known:  # one entry per forked checkpoint, however often it is seen
            self._failed(child, _ChildError(message), level=logging.ERROR)
            return
        failures = child.failures + 1
        now = self._clock()
        retry = now + timedelta(seconds=backoff(failures, self._settings.chain_backoff_max_seconds))

        def apply(session: Session, draft: EntryDraft) -> None:
            row = session.get(ChainChildRow, child.name, with_for_update=True)
            if row is None:  # pragma: no cover - children are never deleted
                raise ConflictError(f"child {child.name!r} is gone")
            row.fork_size, row.fork_root, row.fork_note = fork.size, fork.root, fork.note
            row.fork_seq, row.fork_at = draft.seq, now
            row.failures, row.last_error = failures, message
            row.retry_at, row.lease_until = retry, None

        attrs: dict[str, str | int] = {
            "reason": fork.reason,
            "recorded_size": recorded.size,
            "recorded_note": recorded.note,
            "size": fork.size,
            "note": fork.note,
        }
        digests = {"recorded_root": recorded.root.hex(), "root": fork.root.hex()}
        if fork.prefix_root is not None:
            digests["prefix_root"] = fork.prefix_root.hex()
            attrs["proof"] = ",".join(b64_encode(h) for h in fork.proof)
        try:
            self._append(
                EntryDraft(
                    kind=CHAIN_FORK,
                    actor=ANONYMOUS,
                    refs={"child": child.name},
                    digests=digests,
                    attrs=attrs,
                ),
                apply,
            )
        except (_ChildError, ZonexError) as exc:
            self._failed(child, exc)

    def _append(self, draft: EntryDraft, apply: Callable[[Session, EntryDraft], None]) -> None:
        # a draft the writer cannot encode would fail its whole batch: check it here first
        try:
            entry_parts(draft)
        except ValueError as exc:
            raise _ChildError(f"its checkpoint cannot be recorded: {exc}") from exc
        self._ledger.append(draft, apply=apply)

    def _succeeded(self, child: ChildInfo) -> None:
        with Session(self._write_engine) as session, session.begin():
            session.execute(
                update(ChainChildRow)
                .where(ChainChildRow.name == child.name)
                .values(failures=0, last_error=None, retry_at=None, lease_until=None)
            )

    def _failed(self, child: ChildInfo, exc: Exception, level: int = logging.WARNING) -> None:
        failures = child.failures + 1
        delay = backoff(failures, self._settings.chain_backoff_max_seconds)
        message = (str(exc) or type(exc).__name__)[:_ERROR_CHARS]
        log.log(
            level,
            "child %s at %s: %s (failure %d; next poll in %.0f s)",
            child.name,
            child.url,
            message,
            failures,
            delay,
        )
        try:
            with Session(self._write_engine) as session, session.begin():
                session.execute(
                    update(ChainChildRow)
                    .where(ChainChildRow.name == child.name)
                    .values(
                        failures=failures,
                        last_error=message,
                        retry_at=self._clock() + timedelta(seconds=delay),
                        lease_until=None,
                    )
                )
        except SQLAlchemyError:
            log.exception("child %s: cannot record the failure", child.name)
