"""Checking a bundle file streaming, and on several cores.

Memory grows with the number of checkpoints and the logarithm of the number of entries, never
with the entries themselves: checkpoints come after every entry, so the sizes they name are
read first from the end of the file (:func:`tail_checkpoint_sizes`), and the roots at those
sizes are kept on the way through the entries (:class:`FrontierRoots`).

On several cores the file is cut into runs of ``chunk_lines`` lines (a power of two), found by
counting newlines. A worker process checks one run as if every line before it were a valid
entry (:func:`check_run`: syntax, canonical form, schema, ``seq`` = position, and ``prev``
and time within the run) and stops at the first line it cannot vouch for. Its answer is
small: the first ``prev`` and time, the last leaf hash and time, the perfect subtrees over its
leaves (a run starts at a multiple of its length, so they are whole subtrees of the ledger's
tree) and a hash per checkpoint size within it. The parent takes the answers in file order,
checks the links between runs, and folds the subtrees into the tree. At the first run that
stops early or does not link, it resumes the one sequential check (``exchange.audit._Audit``)
at that line with the state the sequential check would have there, so the first fault (a
fault, its line, its message) and the report are those of the sequential check, and the
checkpoint lines are checked in order as always.
"""

from __future__ import annotations

import bisect
import multiprocessing
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from hashlib import sha256
from itertools import chain, islice
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

from crypto.merkle import EMPTY_ROOT
from crypto.note import NoteVerifier
from exchange.audit import (
    AuditReport,
    _Audit,
    _check_entry,
    _check_trusted,
    _Fault,
    _parse,
)

#: reading blocks when counting lines
_BLOCK = 1 << 22
#: worker processes at most, whatever is asked
_MAX_JOBS = 64
#: a file of fewer runs is checked in-process: starting workers would cost more than they save
MIN_RUNS = 4
_CHECKPOINT_LINE = b'{"checkpoint":'


def _fold(stack: Iterable[bytes]) -> bytes:
    """The root over perfect subtrees given left to right (RFC 9162: fold from the right)."""
    root: bytes | None = None
    for left in reversed(list(stack)):
        root = left if root is None else sha256(b"\x01" + left + root).digest()
    return EMPTY_ROOT if root is None else root


class Frontier:
    """The perfect subtrees covering the first ``size`` leaves, left to right: one per set bit
    of ``size``, largest first (a compact range starting at 0)."""

    __slots__ = ("size", "stack")

    def __init__(self) -> None:
        self.size = 0
        self.stack: list[bytes] = []

    def append(self, leaf: bytes) -> None:
        """The next leaf hash."""
        self.append_subtree(leaf, 0)

    def append_subtree(self, digest: bytes, height: int) -> None:
        """The next ``2**height`` leaves, given as their subtree's hash; ``size`` must be a
        multiple of ``2**height``."""
        if self.size & ((1 << height) - 1):
            raise ValueError(f"a subtree of height {height} cannot start at {self.size}")
        stack = self.stack
        n = self.size >> height
        # every low one bit of the size is a subtree of the same height the new one completes
        while n & 1:
            digest = sha256(b"\x01" + stack.pop() + digest).digest()
            n >>= 1
        stack.append(digest)
        self.size += 1 << height

    def extend(self, stack: Iterable[bytes], count: int) -> None:
        """The next ``count`` leaves, given as the stack of a frontier over them alone (which
        describes them when ``size`` is a multiple of the power of two above ``count``)."""
        heights = [h for h in range(count.bit_length() - 1, -1, -1) if count >> h & 1]
        digests = list(stack)
        if len(digests) != len(heights):
            raise ValueError(f"{count} leaves make {len(heights)} subtrees, not {len(digests)}")
        for digest, height in zip(digests, heights, strict=True):
            self.append_subtree(digest, height)

    def root(self) -> bytes:
        return _fold(self.stack)


class FrontierRoots:
    """Roots of the entries in O(log n) plus one hash per wanted size.

    ``wanted`` are the sizes the bundle's checkpoints (and the trusted checkpoint) name, read
    before the entries; the root at each is kept on the way past. A size not foreseen (a
    checkpoint line among the entries, or a file changed between reads) costs ``refetch``: the
    root recomputed from the first entries of the file.
    """

    def __init__(
        self, wanted: Iterable[int], watch: int | None, refetch: Callable[[int], bytes]
    ) -> None:
        self.frontier = Frontier()
        self._wanted = sorted({*wanted, *(() if watch is None else (watch,))} - {0})
        self._next = 0  # index in _wanted of the first size beyond the frontier
        self._target = self._wanted[0] if self._wanted else -1
        self._known: dict[int, bytes] = {0: EMPTY_ROOT}
        self._watch = watch
        self._refetch = refetch

    def wanted_within(self, low: int, high: int) -> tuple[int, ...]:
        """The wanted sizes in ``(low, high]``."""
        wanted = self._wanted
        return tuple(wanted[bisect.bisect_right(wanted, low) : bisect.bisect_right(wanted, high)])

    def _skip_to(self, size: int) -> None:
        self._next = bisect.bisect_right(self._wanted, size)
        self._target = self._wanted[self._next] if self._next < len(self._wanted) else -1

    def add(self, leaf: bytes) -> None:
        frontier = self.frontier
        frontier.append(leaf)
        if frontier.size == self._target:
            self._known[self._target] = frontier.root()
            self._skip_to(frontier.size)

    def add_run(
        self, stack: Iterable[bytes], count: int, roots: Iterable[tuple[int, bytes]]
    ) -> None:
        """``count`` leaves given as the subtrees of a worker's run, and ``roots``: for sizes
        within the run, the hash over the run's leaves up to that size."""
        prefix = self.frontier.stack
        for size, partial in roots:
            self._known[size] = _fold([*prefix, partial])
        self.frontier.extend(stack, count)
        self._skip_to(self.frontier.size)

    def root(self, size: int) -> bytes:
        if size == self.frontier.size:
            return self.frontier.root()
        known = self._known.get(size)
        if known is None:
            known = self._known[size] = self._refetch(size)
        return known

    @property
    def watched(self) -> bytes | None:
        watch = self._watch
        if watch is None or watch > self.frontier.size:
            return None
        return self.root(watch)


# -- reading the file ------------------------------------------------------------------------


def _stripped(raw: bytes) -> bytes:
    return raw[:-1] if raw.endswith(b"\n") else raw


def _lines_backwards(path: str) -> Iterator[bytes]:
    """The file's lines, last first, without their "\\n"."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        pieces: list[bytes] = []  # the line being read backwards, in pieces (no quadratic joins)
        first = True
        while pos > 0:
            step = min(_BLOCK, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            end = len(block)
            while (cut := block.rfind(b"\n", 0, end)) >= 0:
                pieces.append(block[cut + 1 : end])
                line = b"".join(reversed(pieces))
                pieces = []
                if not (first and not line):  # the file's final "\n" ends a line, starts none
                    yield line
                first = False
                end = cut
            pieces.append(block[:end])
        if pieces and (line := b"".join(reversed(pieces))):
            yield line
        elif not first:
            yield b""  # the file starts with "\n": an empty first line


def tail_checkpoint_sizes(path: str) -> set[int]:
    """The sizes named by the checkpoint lines that end the file (read from its end)."""
    sizes: set[int] = set()
    for line in _lines_backwards(path):
        if not line.startswith(_CHECKPOINT_LINE):
            break
        try:
            note = _parse(line, 0).get("checkpoint")
            size_line = note.split("\n", 2)[1]
        except (_Fault, AttributeError, IndexError):
            continue  # the check in order says what is wrong with it
        if size_line.isascii() and size_line.isdigit():
            sizes.add(int(size_line))
    return sizes


def run_starts(path: str, chunk_lines: int) -> Iterator[int]:
    """Byte offsets of lines 1, 1 + ``chunk_lines``, 1 + 2 * ``chunk_lines``, ... that exist."""
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return
        yield 0
        need = chunk_lines  # newlines to pass before the next run starts
        base = 0
        block = bytearray(_BLOCK)  # one buffer, filled again and again
        while got := f.readinto(block):
            pos = 0
            while (count := block.count(b"\n", pos, got)) >= need:
                for _ in range(need):
                    pos = block.index(b"\n", pos, got) + 1
                if base + pos >= size:
                    return
                yield base + pos
                need = chunk_lines
            need -= count
            base += got


def _root_of_first(path: str, size: int) -> bytes:
    """The root over the leaf hashes of the file's first ``size`` lines."""
    frontier = Frontier()
    with open(path, "rb") as f:
        for raw in islice(f, size):
            frontier.append(sha256(b"\x00" + _stripped(raw)).digest())
    if frontier.size != size:
        raise OSError(f"{path} changed while it was checked")
    return frontier.root()


# -- a worker's run --------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """What a worker vouches for: the first ``clean`` lines of its run are entries that pass
    every check of the sequential audit, given that the line before them is a valid entry
    whose leaf hash is ``first_prev`` and whose time is at most ``first_time``."""

    first: int  # the run's first line number
    clean: int
    #: byte offset of the line after the clean ones
    stop: int
    first_prev: str
    first_time: str
    last_hash: str
    last_time: str
    #: the frontier over the clean lines' leaves
    stack: tuple[bytes, ...]
    #: (size, hash over the run's leaves up to that size) for the wanted sizes reached
    roots: tuple[tuple[int, bytes], ...]


def check_run(path: str, offset: int, first: int, count: int, wanted: tuple[int, ...]) -> Run:
    """Check up to ``count`` lines from byte ``offset`` (line ``first``) as entries, stopping at
    the first line that is not a valid entry in sequence (including a checkpoint line)."""
    frontier = Frontier()
    start = first - 1  # the leaf index of the run's first line
    targets = iter(wanted)
    target = next(targets, -1)
    roots: list[tuple[int, bytes]] = []
    clean = 0
    first_prev = first_time = prev_hex = prev_time = last_date = ""
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in islice(f, count):
            line = _stripped(raw)
            number = first + clean
            try:
                obj = _parse(line, number)
                if type(obj) is dict and "checkpoint" in obj:
                    break
                last_date = _check_entry(obj, number, last_date)
            except _Fault:
                break
            if obj["seq"] != number - 1:
                break
            time = obj["time"]
            if clean == 0:
                first_prev, first_time = obj["prev"], time
            elif obj["prev"] != prev_hex or time < prev_time:
                break
            digest = sha256(b"\x00" + line).digest()
            frontier.append(digest)
            clean += 1
            offset += len(raw)
            prev_hex, prev_time = digest.hex(), time
            if start + clean == target:
                roots.append((target, frontier.root()))
                target = next(targets, -1)
    return Run(
        first,
        clean,
        offset,
        first_prev,
        first_time,
        prev_hex,
        prev_time,
        tuple(frontier.stack),
        tuple(roots),
    )


# -- the parent ------------------------------------------------------------------------------


def default_jobs() -> int:
    """Every core this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _threads() -> int:
    """Threads of this process, as the OS counts them (threads started outside the threading
    module too)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:  # pragma: no cover - no /proc
        return threading.active_count()


def _start_method() -> str:
    # fork starts a worker in milliseconds, but forking a process with other threads may copy
    # a lock one of them holds; then workers start afresh (a few hundred milliseconds)
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and _threads() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _serve(conn: Connection, path: str) -> None:
    """A worker: check the runs it is sent, one at a time, until ``None``."""
    with conn:
        while (task := conn.recv()) is not None:
            try:
                answer: Run | Exception = check_run(path, *task)
            except Exception as exc:  # handed to the parent, which raises it
                answer = exc
            conn.send(answer)


class _Workers:
    """Worker processes with one pipe each and no thread in this process, each given one run
    at a time: a new run goes to whichever worker answers first."""

    def __init__(self, jobs: int, path: str) -> None:
        method = _start_method()
        if method == "forkserver":
            # a server started now imports this module once, and its children start ready
            # (it has no effect on a server this process already runs)
            multiprocessing.set_forkserver_preload(["__main__", __name__])
        # (typeshed's BaseContext declares no Process)
        context: Any = multiprocessing.get_context(method)
        self.idle: list[Connection] = []
        self._conns: list[Connection] = []
        self._processes: list[BaseProcess] = []
        self._busy: dict[Connection, int] = {}
        try:
            for _ in range(jobs):
                ours, theirs = context.Pipe()
                process = context.Process(
                    target=_serve, args=(theirs, path), name="zonex-audit", daemon=True
                )
                process.start()
                theirs.close()
                self._conns.append(ours)
                self.idle.append(ours)
                self._processes.append(process)
        except BaseException:
            self.close()
            raise

    @property
    def busy(self) -> bool:
        return bool(self._busy)

    def give(self, index: int, task: tuple[int, int, int, tuple[int, ...]]) -> None:
        conn = self.idle.pop()
        conn.send(task)
        self._busy[conn] = index

    def answers(self) -> Iterator[tuple[int, Run]]:
        """The runs finished since the last call (at least one; waits for it)."""
        for conn in wait(list(self._busy)):
            assert isinstance(conn, Connection)
            index = self._busy.pop(conn)
            try:
                answer = conn.recv()
            except EOFError:
                raise RuntimeError("a bundle verification worker stopped") from None
            if isinstance(answer, Exception):
                raise answer
            self.idle.append(conn)
            yield index, answer

    def close(self) -> None:
        if self._busy:  # runs after a fault (or an error): of no use, stop them
            for process in self._processes:
                process.terminate()
        else:
            for conn in self.idle:
                with suppress(OSError):
                    conn.send(None)
        for process in self._processes:
            process.join()
        for conn in self._conns:
            conn.close()


def _check_runs(
    path: str, audit: _Audit, roots: FrontierRoots, jobs: int, chunk_lines: int
) -> tuple[int, int] | None:
    """Check the file's runs on ``jobs`` workers and fold what they vouch for into ``audit``.

    Returns where the sequential check resumes (byte offset, line number), or ``None`` for a
    file of fewer than ``MIN_RUNS`` runs (nothing was done).
    """
    starts = run_starts(path, chunk_lines)
    head = list(islice(starts, MIN_RUNS))
    if len(head) < MIN_RUNS:
        return None
    queued = enumerate(chain(head, starts))
    offsets: dict[int, int] = {}  # of the runs given out and not yet folded in
    done: dict[int, Run] = {}  # runs finished before the ones ahead of them
    workers = _Workers(min(jobs, _MAX_JOBS), path)
    try:
        index = 0  # the next run to fold in
        while True:
            # every idle worker gets the next run while there is one: so each worker has a run
            # out (under way, or done and waiting here) until the runs are all given out
            for given, offset in islice(queued, len(workers.idle)):
                low = given * chunk_lines
                wanted = roots.wanted_within(low, low + chunk_lines)
                workers.give(given, (offset, low + 1, chunk_lines, wanted))
                offsets[given] = offset
            while index not in done:
                done.update(workers.answers())
            run = done.pop(index)
            offset = offsets.pop(index)
            index += 1
            if run.clean:
                if run.first_prev != audit.prev_hex or run.first_time < audit.prev_time:
                    return offset, run.first  # the link between runs: let the check name it
                roots.add_run(run.stack, run.clean, run.roots)
                audit.entries += run.clean
                audit.prev_hex, audit.prev_time = run.last_hash, run.last_time
            if run.clean < chunk_lines or not (workers.busy or done):
                # a line the worker could not vouch for, or the last run (none out any more)
                return run.stop, run.first + run.clean
    finally:
        workers.close()


def check_file(
    path: str,
    log: NoteVerifier,
    trusted: str | None,
    *,
    jobs: int | None,
    chunk_lines: int,
) -> AuditReport:
    """:func:`exchange.audit.check_bundle` of a bundle file."""
    if chunk_lines < 1 or chunk_lines & (chunk_lines - 1):
        raise ValueError(f"chunk_lines must be a power of two, not {chunk_lines}")
    jobs = default_jobs() if jobs is None else jobs
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    try:
        trusted_cp = None if trusted is None else _check_trusted(trusted, log)
    except _Fault as fault:
        return AuditReport(False, 0, 0, fault.fault)
    roots = FrontierRoots(
        tail_checkpoint_sizes(path),
        None if trusted_cp is None else trusted_cp.size,
        lambda size: _root_of_first(path, size),
    )
    audit = _Audit(log, trusted_cp, roots)
    offset, first = 0, 1
    if jobs > 1:
        resume = _check_runs(path, audit, roots, jobs, chunk_lines)
        if resume is not None:
            offset, first = resume
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            audit.run(f, first)
        audit.finish()
    except _Fault as fault:
        return audit.report(fault)
    return audit.report()
