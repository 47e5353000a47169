"""The tamper-evident ledger: one append-only sequence, group-committed, Merkle-proofed.

Every state change of the exchange is applied *inside* the batch transaction that appends its
ledger entry (a savepoint per entry), so a change and its evidence commit together or not at
all, and a batch costs one durable commit however many entries it holds. Sequencing takes a
row lock on ``ledger_head`` (``BEGIN IMMEDIATE`` on SQLite), so ``seq`` stays gap-free across
threads, processes and crashes: a crash loses only an uncommitted, unacknowledged batch.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import IO, Any, cast

from sqlalchemy import Connection, Engine, Table, bindparam, insert, select, text, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from crypto.canonical import MAX_SAFE_INTEGER, canonicalize
from crypto.encoding import b64_encode
from crypto.errors import VerificationError
from crypto.merkle import leaf_hash, verify_consistency
from crypto.note import Checkpoint, NoteSigner, sign_checkpoint
from crypto.tiles import TileEdge
from exchange.errors import InvalidInputError, LedgerError, ZonexError
from exchange.server.batching import Delivery, HeldConnection, Waiter, new_waiter
from exchange.server.models import CheckpointRow, LedgerEntryRow, LedgerHeadRow
from exchange.server.observability import get_metrics
from exchange.server.storage import WRITE, create_control_engine
from exchange.server.tilestore import TileStore

log = logging.getLogger("zonex.ledger")

GENESIS_PREV = "0" * 64
ANONYMOUS = "-"


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, the only time format in ledger entries."""
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


@dataclass
class EntryDraft:
    """What a caller wants recorded. ``seq``, ``time`` and ``prev`` are assigned at commit.

    Never put raw data or raw identifiers here: sensitive values go in as salted digests.
    """

    kind: str
    actor: str = ANONYMOUS
    refs: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    attrs: dict[str, str | int] = field(default_factory=dict)
    #: the sequence number the entry receives, set just before ``apply`` runs (an apply that
    #: stores a reference to its own evidence, e.g. a queued task to its authorization)
    seq: int | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Appended:
    seq: int
    leaf_hash: bytes
    value: Any
    #: the entry's exact canonical bytes, as committed
    body: bytes = b""


@dataclass(frozen=True)
class SignedCheckpoint:
    size: int
    root: bytes
    note: str


#: an ``apply`` callback runs the state change inside the batch transaction; it may add refs
#: and digests to the draft, and its return value is handed back to the caller
Apply = Callable[[Session, EntryDraft], Any]


def entry_parts(draft: EntryDraft) -> tuple[bytes, bytes]:
    """The canonical bytes of ``draft``'s entry around the three values the writer assigns.

    An entry's keys in RFC 8785 order are actor, attrs, digests, kind, prev, refs, seq, time,
    so its bytes are ``head + prev + middle + seq + b',"time":"' + time + b'"}'``, each part
    canonical on its own. Encoding the parts in the caller's thread keeps the writer's
    critical path to a concatenation and a hash per entry. Raises ``ValueError``
    (:class:`~crypto.errors.EncodingError`) for a draft that cannot be canonicalized.
    """
    head = b"".join(
        (
            b'{"actor":',
            canonicalize(draft.actor),
            b',"attrs":',
            canonicalize(draft.attrs),
            b',"digests":',
            canonicalize(draft.digests),
            b',"kind":',
            canonicalize(draft.kind),
            b',"prev":"',
        )
    )
    return head, b'","refs":' + canonicalize(draft.refs) + b',"seq":'


def entry_body(parts: tuple[bytes, bytes], seq: int, time: str, prev: str) -> bytes:
    """An entry's canonical bytes from :func:`entry_parts` and the writer's values."""
    if not 0 <= seq <= MAX_SAFE_INTEGER:
        raise InvalidInputError("the ledger is full")
    return b"".join(
        (parts[0], prev.encode(), parts[1], str(seq).encode(), b',"time":"', time.encode(), b'"}')
    )


class _Pending:
    __slots__ = (
        "apply",
        "done",
        "draft",
        "error",
        "future",
        "more",
        "parts",
        "queued",
        "result",
        "results",
    )

    def __init__(
        self,
        draft: EntryDraft,
        apply: Apply | None,
        wait: bool,
        future: Waiter | None = None,
    ) -> None:
        self.draft = draft
        self.apply = apply
        # held until the writer settles the entry (a bare lock: cheaper to wake than an Event)
        self.done: threading.Lock | None = None
        if wait:
            self.done = threading.Lock()
            self.done.acquire()
        self.future = future
        self.queued = time.perf_counter()
        self.result: Appended | None = None
        self.error: BaseException | None = None
        #: further entries committed in the same transaction as ``draft`` (append_group)
        self.more: list[EntryDraft] = []
        self.results: list[Appended] = []
        #: the entry's bytes but for seq, time and prev, encoded here in the caller's thread
        #: (an ``apply`` may still change the draft: those are encoded by the writer)
        self.parts: tuple[bytes, bytes] | ValueError | None = None
        if apply is None:
            try:
                self.parts = entry_parts(draft)
            except ValueError as exc:
                self.parts = exc

    def finish(self, delivery: Delivery) -> None:
        if self.done is not None:
            self.done.release()
        if self.future is not None:
            get_metrics().ledger_append.observe(time.perf_counter() - self.queued)
            if self.result is not None:
                delivery.add(self.future, self.result)
            else:
                delivery.add(self.future, None, self.error or LedgerError("not recorded"))


_HEAD = cast(Table, LedgerHeadRow.__table__)
_ENTRIES = cast(Table, LedgerEntryRow.__table__)
_LOCK_HEAD = (
    select(_HEAD.c.size, _HEAD.c.last_hash, _HEAD.c.last_time)
    .where(_HEAD.c.id == 1)
    .with_for_update()
)
_UPDATE_HEAD = (
    update(_HEAD)
    .where(_HEAD.c.id == 1)
    .values(size=bindparam("size"), last_hash=bindparam("last_hash"))
    .values(last_time=bindparam("last_time"))
)

#: PostgreSQL: the batch's entries and the new head in one statement (a data-modifying CTE)
_APPEND_PG = text(
    "WITH appended AS (INSERT INTO ledger_entries (seq, body, leaf_hash) "
    "SELECT * FROM unnest(CAST(:seqs AS bigint[]), CAST(:bodies AS bytea[]), "
    "CAST(:hashes AS bytea[]))) "
    "UPDATE ledger_head SET size = :size, last_hash = :last_hash, last_time = :last_time "
    "WHERE id = 1"
)


def ensure_head(engine: Engine) -> None:
    """Create the head row of an empty ledger (idempotent)."""
    with Session(engine.execution_options(**WRITE)) as session, session.begin():
        if session.get(LedgerHeadRow, 1) is None:
            session.add(
                LedgerHeadRow(
                    id=1, size=0, last_hash=bytes(32), last_time="0000-00-00T00:00:00.000Z"
                )
            )


class Ledger:
    """The process's handle on the ledger. Thread-safe; start() runs the writer and ticker."""

    def __init__(
        self,
        engine: Engine,
        signer: NoteSigner | None,
        *,
        batch_max: int = 2000,
        checkpoint_interval: float = 1.0,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._write_engine = engine.execution_options(**WRITE)
        self._signer = signer
        self._batch_max = batch_max
        self._checkpoint_interval = checkpoint_interval
        self._clock = clock
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        #: the Merkle tree lives in the database as tiles; this process keeps only caches
        self.tiles = TileStore(engine)
        #: the writer's edge after its last commit (None: read it from the database next batch)
        self._edge: TileEdge | None = None
        self._checkpoint_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._tickers: list[tuple[float, Callable[[], None]]] = []
        self.rejections = RejectionCounter(self)
        #: the largest checkpoint this process signed or read (shared by receipts)
        self._recent: SignedCheckpoint | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        ensure_head(self._engine)
        self._stopping.clear()
        writer = threading.Thread(target=self._writer_loop, name="zonex-ledger-writer", daemon=True)
        ticker = threading.Thread(target=self._ticker_loop, name="zonex-ledger-ticker", daemon=True)
        self._threads = [writer, ticker]
        for thread in self._threads:
            thread.start()

    def close(self) -> None:
        """Finish every queued entry, flush rejection summaries, sign a last checkpoint, stop."""
        if not self._threads:
            return
        self.rejections.flush()
        self._stopping.set()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads = []
        if self._signer is not None:
            try:
                self.checkpoint()
            except ZonexError as exc:  # pragma: no cover - logged, shutdown continues
                log.error("final checkpoint failed: %s", exc)

    @property
    def running(self) -> bool:
        """The writer thread is alive and not shutting down (readiness)."""
        return bool(self._threads) and self._threads[0].is_alive() and not self._stopping.is_set()

    def add_ticker(self, interval: float, action: Callable[[], None]) -> None:
        """Run ``action`` about every ``interval`` seconds on the ticker thread."""
        self._tickers.append((interval, action))

    # -- appending -------------------------------------------------------------------------

    def append(self, draft: EntryDraft, apply: Apply | None = None) -> Appended:
        """Apply the state change (if any) and append its entry; return once durable."""
        if not self._threads:
            raise LedgerError("the ledger is not running")
        pending = _Pending(draft, apply, wait=True)
        queued = time.perf_counter()
        self._queue.put(pending)
        assert pending.done is not None
        pending.done.acquire()
        get_metrics().ledger_append.observe(time.perf_counter() - queued)
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def append_group(self, drafts: list[EntryDraft], apply: Apply | None = None) -> list[Appended]:
        """Apply the state change (called with the first draft) and append every draft, in
        order, in one transaction: all are recorded or none. Return once durable."""
        if not drafts:
            return []
        if not self._threads:
            raise LedgerError("the ledger is not running")
        pending = _Pending(drafts[0], apply, wait=True)
        pending.more = list(drafts[1:])
        queued = time.perf_counter()
        self._queue.put(pending)
        assert pending.done is not None
        pending.done.acquire()
        get_metrics().ledger_append.observe(time.perf_counter() - queued)
        if pending.error is not None:
            raise pending.error
        return pending.results

    def submit(self, draft: EntryDraft, loop: asyncio.AbstractEventLoop | None = None) -> Waiter:
        """Queue an entry that changes no state. The returned future resolves (to
        :class:`Appended`) once the entry is durable: an asyncio future on ``loop`` to await
        there, else a ``concurrent.futures.Future``."""
        if not self._threads:
            raise LedgerError("the ledger is not running")
        future = new_waiter(loop)
        self._queue.put(_Pending(draft, None, wait=False, future=future))
        return future

    def append_nowait(self, draft: EntryDraft) -> None:
        """Queue an entry that nobody waits for (rejection records)."""
        if self._threads:
            self._queue.put(_Pending(draft, None, wait=False))

    def append_batch_sync(self, drafts: list[EntryDraft]) -> list[Appended]:
        """Commit ``drafts`` as one batch in the calling thread (offline tools, benchmarks)."""
        return [p.result for p in self._commit([_Pending(d, None, wait=False) for d in drafts])]  # type: ignore[misc]

    def _writer_loop(self) -> None:
        # the writer keeps one connection across batches (no pool checkout and liveness ping
        # per batch); after a failed batch it takes a fresh one
        held = HeldConnection(self._write_engine)
        try:
            while True:
                first = self._queue.get()
                if first is None:
                    return
                batch = [first]
                stop = False
                while len(batch) < self._batch_max:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stop = True
                        break
                    batch.append(item)
                self._commit(batch, held)
                if stop:
                    return
        finally:
            held.close()

    def _commit(self, batch: list[_Pending], held: HeldConnection | None = None) -> list[_Pending]:
        committed: list[_Pending] = []
        started = time.perf_counter()
        edge: TileEdge | None = None
        changed: dict[tuple[int, int], bytes] = {}
        try:
            conn = self._write_engine.connect() if held is None else held.get()
            session: Session | None = None
            try:
                with conn.begin():
                    head = conn.execute(_LOCK_HEAD).one()
                    size, last_hash, last_time = head.size, bytes(head.last_hash), head.last_time
                    first = size
                    now: str | None = None
                    rows: list[dict[str, Any]] = []
                    for item in batch:
                        value = None
                        if item.apply is not None:
                            if session is None:  # state changes: an ORM session in this transaction
                                session = Session(bind=conn, join_transaction_mode="rollback_only")
                            savepoint = session.begin_nested()
                            item.draft.seq = size
                            try:
                                value = item.apply(session, item.draft)
                                session.flush()
                                savepoint.commit()
                            except Exception as exc:
                                savepoint.rollback()
                                item.error = _translate(exc)
                                continue
                        appended: list[Appended] = []
                        for draft in (item.draft, *item.more):
                            # one time per batch: its entries become durable together
                            if now is None:
                                now = max(format_time(self._clock()), last_time)
                            prev = last_hash.hex() if size else GENESIS_PREV
                            try:
                                parts = item.parts if draft is item.draft else None
                                if isinstance(parts, ValueError):
                                    raise parts
                                if parts is None:
                                    parts = entry_parts(draft)
                                body = entry_body(parts, size, now, prev)
                            except ValueError as exc:
                                item.error = InvalidInputError(f"entry cannot be recorded: {exc}")
                                if item.apply is not None or item.more:
                                    raise  # never keep a change, or part of a group, alone
                                break
                            digest = leaf_hash(body)
                            rows.append({"seq": size, "body": body, "leaf_hash": digest})
                            appended.append(Appended(size, digest, value, body))
                            size, last_hash, last_time = size + 1, digest, now
                        if not appended:
                            continue
                        item.result, item.results = appended[0], appended
                        committed.append(item)
                    if rows:
                        # the tiles change in the same transaction as the leaves they hash
                        edge, self._edge = self._edge, None
                        if edge is None or edge.size != first:
                            edge = self.tiles.load_edge(conn, first)
                        changed = edge.extend([r["leaf_hash"] for r in rows])
                        self.tiles.write(conn, changed)
                        head_values = {"size": size, "last_hash": last_hash, "last_time": last_time}
                        if conn.dialect.name == "postgresql":
                            # one round trip for the entries and the head
                            conn.execute(
                                _APPEND_PG,
                                {
                                    "seqs": [r["seq"] for r in rows],
                                    "bodies": [r["body"] for r in rows],
                                    "hashes": [r["leaf_hash"] for r in rows],
                                    **head_values,
                                },
                            )
                        else:
                            conn.execute(insert(_ENTRIES), rows)
                            conn.execute(_UPDATE_HEAD, head_values)
                if edge is not None:  # committed: readers see the new tiles, then the writer
                    self.tiles.committed(edge, changed)
                    self._edge = edge
                    get_metrics().ledger_size.set(edge.size)
            finally:
                if session is not None:
                    session.close()
                if held is None:
                    conn.close()
        except Exception as exc:
            if held is not None:
                held.discard()
            log.exception("ledger batch of %d failed", len(batch))
            error = LedgerError("the ledger could not record this request; nothing was changed")
            error.__cause__ = exc
            for item in batch:
                item.result, item.results = None, []
                item.error = item.error or error
            committed = []
        get_metrics().ledger_commit.observe(time.perf_counter() - started)
        delivery = Delivery()
        for item in batch:
            item.finish(delivery)
        delivery.send()
        return committed

    # -- tree, checkpoints, proofs ---------------------------------------------------------

    def size(self) -> int:
        """The number of committed entries (one query)."""
        with self._engine.connect() as conn:
            size = conn.execute(select(_HEAD.c.size).where(_HEAD.c.id == 1)).scalar_one_or_none()
        return int(size or 0)

    def _committed_at_least(self, size: int) -> bool:
        return size <= self.tiles.known_size or size <= self.size()

    def latest_checkpoint(self) -> SignedCheckpoint | None:
        with Session(self._engine) as session:
            row = session.execute(
                select(CheckpointRow).order_by(CheckpointRow.size.desc()).limit(1)
            ).scalar_one_or_none()
            return None if row is None else SignedCheckpoint(row.size, bytes(row.root), row.note)

    def checkpoint(self, *, persist: bool = True, covering: int | None = None) -> SignedCheckpoint:
        """Sign a checkpoint of everything committed so far, unless the latest one covers it.

        Refuses (``LedgerError``) to sign a tree that is not consistent with the last checkpoint.
        ``persist=False`` signs without storing the note (receipts carry their own checkpoint;
        the periodic checkpoints on record cover the same entries moments later, and any two
        signed sizes can be proven consistent from the log). With ``covering=seq`` (and
        ``persist=False``), a checkpoint this process signed that already includes entry ``seq``
        is returned as it is: concurrent releases share one signature instead of queueing for
        one each.
        """
        if self._signer is None:
            raise LedgerError("this process holds no log key")
        shared = None if persist or covering is None else self._covering(covering)
        if shared is not None:
            return shared
        with self._checkpoint_lock:
            if not persist and covering is not None:
                shared = self._covering(covering)  # signed while this thread waited
                if shared is not None:
                    return shared
            signed = self._checkpoint_locked(persist, covering)
            if self._recent is None or signed.size > self._recent.size:
                self._recent = signed
            return signed

    def _covering(self, seq: int) -> SignedCheckpoint | None:
        recent = self._recent
        return recent if recent is not None and recent.size > seq else None

    def _checkpoint_locked(self, persist: bool, covering: int | None) -> SignedCheckpoint:
        assert self._signer is not None
        # a stored checkpoint is of the database's tree; a receipt's may be of the tree this
        # process's writer committed last (its own state: no reads), checked against the last
        # checkpoint this process signed
        last = self.latest_checkpoint() if persist or self._recent is None else self._recent
        size = self.tiles.known_size
        if persist or covering is None or size <= covering:
            size = self.size()
        if last is not None and last.size >= size:
            if last.size == size or not persist:
                return last
            raise LedgerError("the ledger is shorter than its last checkpoint")
        tree = self.tiles.tree(size)
        root = tree.root()
        if last is not None:
            try:
                verify_consistency(
                    last.size, size, last.root, root, tree.consistency_proof(last.size)
                )
            except VerificationError as exc:
                log.critical("refusing to sign an inconsistent checkpoint: %s", exc)
                raise LedgerError("ledger is inconsistent with its last checkpoint") from exc
        note = sign_checkpoint(Checkpoint(self._signer.name, size, root), self._signer)
        if not persist:
            return SignedCheckpoint(size, root, note)
        try:
            with Session(self._write_engine) as session, session.begin():
                session.add(CheckpointRow(size=size, root=root, note=note))
        except IntegrityError:
            pass  # another process signed this very size; the bytes are identical
        return SignedCheckpoint(size, root, note)

    def inclusion_proof(self, seq: int, size: int) -> list[bytes]:
        """RFC 9162 inclusion proof of entry ``seq`` in the tree of ``size``, from tiles."""
        if not 0 <= seq < size or not self._committed_at_least(size):
            raise InvalidInputError("need 0 <= seq < size <= ledger size")
        return self.tiles.tree(size).inclusion_proof(seq)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """RFC 9162 consistency proof from the tree of ``size1`` to that of ``size2``."""
        if not 0 <= size1 <= size2 or not self._committed_at_least(size2):
            raise InvalidInputError("need 0 <= size1 <= size2 <= ledger size")
        return self.tiles.tree(size2).consistency_proof(size1)

    def entry(self, seq: int) -> bytes:
        if not 0 <= seq < 1 << 63:  # no such seq, and beyond a BIGINT the driver would overflow
            raise InvalidInputError(f"no ledger entry {seq}")
        with self._engine.connect() as conn:
            body = conn.execute(
                select(LedgerEntryRow.body).where(LedgerEntryRow.seq == seq)
            ).scalar_one_or_none()
        if body is None:
            raise InvalidInputError(f"no ledger entry {seq}")
        return bytes(body)

    # -- export ----------------------------------------------------------------------------

    def export(self, out: IO[bytes], final: SignedCheckpoint | None = None) -> SignedCheckpoint:
        """Write the JSON Lines bundle: every entry, then every checkpoint with a consistency
        proof from the one before, up to ``final`` (default: a fresh checkpoint of all)."""
        final = self.checkpoint() if final is None else final
        with self._engine.connect() as conn:
            for bodies in _body_batches(conn, 0, final.size):
                out.write(b"\n".join(bodies) + b"\n")
        for line in self.checkpoint_lines(final):
            out.write(line)
        return final

    def export_parallel(
        self, out: IO[bytes], path: Path, final: SignedCheckpoint, jobs: int
    ) -> SignedCheckpoint:
        """:meth:`export` to the file ``out`` (open at ``path``) by ``jobs`` processes: each
        writes one range of entries at its byte offset (the ranges' sizes are summed by the
        database first), then this one writes the checkpoints after them. The same bytes."""
        size = final.size
        bounds = [size * i // jobs for i in range(jobs + 1)]
        ranges = list(pairwise(bounds))
        lengths = text(
            "SELECT COALESCE(SUM(LENGTH(body)), 0) FROM ledger_entries "
            "WHERE seq >= :lo AND seq < :hi"
        )
        with self._engine.connect() as conn:
            spans = [
                int(conn.execute(lengths, {"lo": lo, "hi": hi}).scalar_one()) + hi - lo
                for lo, hi in ranges
            ]
        offsets = [sum(spans[:i]) for i in range(jobs)]
        out.flush()
        os.truncate(out.fileno(), sum(spans))
        url = self._engine.url.render_as_string(hide_password=False)
        context = multiprocessing.get_context(
            "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        )
        with ProcessPoolExecutor(max_workers=jobs - 1, mp_context=context) as pool:
            others = [
                pool.submit(_export_range, url, str(path), lo, hi, at)
                for (lo, hi), at in zip(ranges[1:], offsets[1:], strict=True)
            ]
            with self._engine.connect() as conn:
                written = [_write_range(conn, out.fileno(), *ranges[0], 0)]
            written += [future.result() for future in others]
        if written != spans:
            raise LedgerError("the ledger changed under a parallel export; nothing was written")
        out.seek(sum(spans))
        for line in self.checkpoint_lines(final):
            out.write(line)
        return final

    def export_lines(self, final: SignedCheckpoint) -> Iterator[bytes]:
        """The bundle's lines (each ending in a newline) up to the signed checkpoint ``final``:
        the same bytes :meth:`export` writes for it, produced lazily for a streamed answer."""
        with self._engine.connect() as conn:
            for bodies in _body_batches(conn, 0, final.size):
                for body in bodies:
                    yield body + b"\n"
        yield from self.checkpoint_lines(final)

    def checkpoint_lines(self, final: SignedCheckpoint) -> Iterator[bytes]:
        """The bundle's checkpoint lines up to ``final``, each with a consistency proof from
        the one before."""
        previous = 0
        with Session(self._engine) as session:
            notes = session.execute(
                select(CheckpointRow.size, CheckpointRow.note)
                .where(CheckpointRow.size <= final.size)
                .order_by(CheckpointRow.size)
            ).all()
        for index, (size, note) in enumerate(notes):
            proof = [] if index == 0 or size == previous else self.consistency_proof(previous, size)
            line = {"checkpoint": note, "consistency": [b64_encode(h) for h in proof]}
            yield canonicalize(line) + b"\n"
            previous = size

    # -- background ------------------------------------------------------------------------

    def _ticker_loop(self) -> None:
        started = time.monotonic()
        last_run = dict.fromkeys(range(len(self._tickers)), started)
        while not self._stopping.wait(
            min([self._checkpoint_interval, *[i for i, _ in self._tickers]])
        ):
            now = time.monotonic()
            if self._signer is not None:
                try:
                    self.checkpoint()
                except (ZonexError, SQLAlchemyError):
                    log.exception("periodic checkpoint failed")
            for index, (interval, action) in enumerate(self._tickers):
                if now - last_run.get(index, started) >= interval:
                    last_run[index] = now
                    try:
                        action()
                    except Exception:
                        log.exception("ledger ticker action failed")


@dataclass(frozen=True)
class Refusal:
    """An authenticated request the exchange refused: its signature verified, then the call was
    answered with a 4xx problem. Codes only: never the body, a value or an identifier."""

    #: the key id whose signature verified
    actor: str
    #: method and route template, e.g. ``POST /v1/zones/{zone}/aggregate``
    route: str
    #: the problem's ``code``
    code: str
    #: a stable reason code (the problem's ``code`` when the error names none)
    reason: str
    status: int

    def to_draft(self, query_digest: str | None = None) -> EntryDraft:
        return EntryDraft(
            kind=REFUSED,
            actor=self.actor,
            digests={} if query_digest is None else {"query": query_digest},
            attrs={
                "route": self.route,
                "code": self.code,
                "reason": self.reason,
                "status": self.status,
            },
        )


#: entry kinds of refused requests: before authentication (``REJECTED``) and after (``REFUSED``)
REJECTED = "request.rejected"
REFUSED = "request.refused"


class RejectionCounter:
    """Bounded ledgering of rejected and refused requests.

    *Rejections* fail authentication. One that names a registered key is ledgered individually
    (``request.rejected``: reason code, key id, route; never the payload) up to a limit per key
    and interval; everything else, including every rejection that names no known key, is only
    counted and written as one ``request.rejected.summary`` entry per interval, so an anonymous
    caller cannot flood the ledger.

    *Refusals* are 4xx answers to requests whose signature verified (:class:`Refusal`). Each is
    ledgered individually (``request.refused``) up to the same limit per key and interval, then
    counted, per code and reason and per key, in one ``request.refused.summary`` per interval.
    The two limits are kept apart: a rejection names a key id the caller merely *claims*, so a
    forger cannot use up the quota of the key it names and hide that key's own refusals.
    """

    def __init__(self, ledger: Ledger, per_key_limit: int = 10) -> None:
        self._ledger = ledger
        self.per_key_limit = per_key_limit
        self._lock = threading.Lock()
        self._per_key: Counter[str] = Counter()
        self._summary: Counter[str] = Counter()
        self._refused_per_key: Counter[str] = Counter()
        self._refused: Counter[str] = Counter()
        self._refused_by: Counter[str] = Counter()
        self._since = format_time(datetime.now(UTC))

    def record(self, reason: str, known_key: str | None, route: str) -> None:
        """Ledger (or count) one request that failed authentication."""
        with self._lock:
            if known_key is not None and self._per_key[known_key] < self.per_key_limit:
                self._per_key[known_key] += 1
                individual = True
            else:
                self._summary[reason] += 1
                individual = False
        if individual:
            assert known_key is not None
            self._ledger.append_nowait(
                EntryDraft(
                    kind=REJECTED,
                    actor=known_key,
                    attrs={"reason": reason, "route": route},
                )
            )

    def record_refusal(
        self, refusal: Refusal, query_digest: Callable[[], str | None] | None = None
    ) -> bool:
        """Ledger one refusal on its own entry while its actor is under the limit, else count it
        for the interval's summary. ``query_digest`` is called only for an entry of its own (it
        may parse a query: no work is spent on refusals beyond the limit). Returns whether the
        refusal got its own entry."""
        with self._lock:
            individual = self._refused_per_key[refusal.actor] < self.per_key_limit
            if individual:
                self._refused_per_key[refusal.actor] += 1
            else:
                self._refused[f"{refusal.code}.{refusal.reason}"] += 1
                self._refused_by[refusal.actor] += 1
        if individual:
            digest = query_digest() if query_digest is not None else None
            self._ledger.append_nowait(refusal.to_draft(digest))
        return individual

    def flush(self) -> None:
        """Write this interval's summaries (if anything was counted) and start a new interval."""
        with self._lock:
            summary, self._summary = self._summary, Counter()
            refused, self._refused = self._refused, Counter()
            refused_by, self._refused_by = self._refused_by, Counter()
            self._per_key.clear()
            self._refused_per_key.clear()
            since, self._since = self._since, format_time(datetime.now(UTC))
        if summary:
            attrs: dict[str, str | int] = {f"count.{k}": v for k, v in sorted(summary.items())}
            attrs["since"] = since
            self._ledger.append_nowait(EntryDraft(kind=f"{REJECTED}.summary", attrs=attrs))
        if refused:
            attrs = {f"count.{k}": v for k, v in sorted(refused.items())}
            attrs.update((f"actor.{k}", v) for k, v in sorted(refused_by.items()))
            attrs["since"] = since
            self._ledger.append_nowait(EntryDraft(kind=f"{REFUSED}.summary", attrs=attrs))


def _translate(exc: BaseException) -> BaseException:
    if isinstance(exc, ZonexError):
        return exc
    if isinstance(exc, IntegrityError):
        from exchange.errors import ConflictError

        return ConflictError("conflicts with an existing record")
    return exc


#: a ledger this size or larger is exported by several processes when asked (starting them
#: costs about a second; one process writes some 400,000 entries a second)
PARALLEL_EXPORT_MIN = 1_000_000


def write_export(
    ledger: Ledger, path: Path, final: SignedCheckpoint | None = None, *, jobs: int = 1
) -> SignedCheckpoint:
    """Export atomically: write a temporary file, then rename. ``jobs`` > 1: with that many
    processes for a ledger of at least :data:`PARALLEL_EXPORT_MIN` entries."""
    tmp = path.with_name(path.name + ".partial")
    final = ledger.checkpoint() if final is None else final
    try:
        with tmp.open("wb") as out:
            if jobs > 1 and final.size >= PARALLEL_EXPORT_MIN:
                ledger.export_parallel(out, tmp, final, jobs)
            else:
                ledger.export(out, final)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never half a bundle left beside the target
        raise
    tmp.replace(path)
    return final


def _body_batches(
    conn: Connection, start: int, stop: int, batch: int = 10_000
) -> Iterator[list[bytes]]:
    """The bodies of entries ``start`` to ``stop - 1`` in order, a batch at a time, read
    through the driver's own cursor (SQLAlchemy's row handling doubled an export's cost)."""
    mark = "?" if conn.dialect.paramstyle == "qmark" else "%s"
    sql = f"SELECT body FROM ledger_entries WHERE seq >= {mark} AND seq < {mark} ORDER BY seq"
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    cursor = dbapi.cursor()
    try:
        for lo in range(start, stop, batch):
            cursor.execute(sql, (lo, min(stop, lo + batch)))
            yield [bytes(row[0]) for row in cursor.fetchall()]
    finally:
        cursor.close()


def _write_range(conn: Connection, fd: int, start: int, stop: int, offset: int) -> int:
    """Write entries ``start`` to ``stop - 1``, a line each, at ``offset`` of ``fd``; bytes
    written."""
    at = offset
    for bodies in _body_batches(conn, start, stop):
        data = memoryview(b"\n".join(bodies) + b"\n")
        while data:
            done = os.pwrite(fd, data, at)
            data, at = data[done:], at + done
    return at - offset


def _export_range(url: str, path: str, start: int, stop: int, offset: int) -> int:
    """A worker process of :meth:`Ledger.export_parallel`: one range into the shared file."""
    engine = create_control_engine(url)
    fd = os.open(path, os.O_WRONLY)
    try:
        with engine.connect() as conn:
            return _write_range(conn, fd, start, stop, offset)
    finally:
        os.close(fd)
        engine.dispose()
