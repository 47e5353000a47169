"""Epoch mode of the private joins: what the consumer, the exchange and the zone share
(``docs/psi.md``, "Epoch mode").

In epoch mode a zone blinds its subjects once per epoch under an epoch key ``k_e``; the image
``I = {k_e·H_e(y)}`` is kept by the exchange as sorted fingerprints, and a session costs the
consumer O(|X|): it sends ``A = c·H_e(x)``, downloads ``A_e = k_e·A``, and uploads
``F = c⁻¹·A_e = k_e·H_e(x)``, which the exchange looks up in the image. ``H_e`` hashes under
:func:`epoch_domain`, the session domain of the epoch id.

The preparation's kernel is here too, shared by the exchange (zones it hosts) and a zone's node:
:func:`keyed_order` (the zone's secret order of its subjects), :func:`blind_image` (the image's
fingerprints in that order, chunk by chunk into a file, resumable) and :func:`sort_image` (the
sorted fingerprints and each one's position). No database, no server; the only file is the one
:func:`blind_image` writes and :func:`sort_image` reads.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import math
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import numpy as np

from crypto import psi as cpsi
from exchange.errors import InvalidInputError, ZonexError
from exchange.psi_protocol import LABEL, MAX_ID_CHARS, normalize_id

__all__ = [
    "CLUSTER_BATCH",
    "DEFAULT_CHUNK",
    "FP_BITS",
    "FP_DTYPE",
    "PROTOCOLS",
    "ClusterError",
    "EpochPreparingError",
    "blind_image",
    "choose_protocol",
    "epoch_domain",
    "false_match_bound",
    "fingerprints",
    "keyed_order",
    "retry_seconds",
    "sort_image",
    "usable_ids",
]

#: ``session`` (fresh keys on both sides, O(|Y|) for the consumer) or ``epoch``
PROTOCOLS = ("session", "epoch")
#: a point's fingerprint: the first 96 bits of SHA-256 over its encoding, as a 64-bit high
#: word and a 32-bit low word (both little-endian). 96 bits bound the chance that any of 10^3
#: consumer points meets any of 10^8 image points by chance at 10^11 / 2^96 < 1.3·10^-18
#: per session (:func:`false_match_bound`); 64 bits would leave 5.4·10^-9
FP_BITS = 96
FP_DTYPE = np.dtype([("hi", "<u8"), ("lo", "<u4")])
#: subjects blinded per chunk of a preparation when the caller does not say
DEFAULT_CHUNK = 262_144
#: subjects per task sent to a Dask cluster's worker
CLUSTER_BATCH = 16_384
_TAG_BLOCK = 65_536

#: ``on_chunk(done, seconds_per_item)`` after each chunk is on disk: the subjects done so far
#: (a restart passes it back as ``start``) and the chunk's cost per subject
ChunkCallback = Callable[[int, float], None]


class EpochPreparingError(ZonexError):
    """The zone is preparing the epoch a session needs; the session was not opened. Retry after
    ``retry_after`` seconds (also the ``Retry-After`` header)."""

    code = "epoch_preparing"
    status = 503
    title = "Epoch in preparation"

    def __init__(self, detail: str, *, retry_after: int, done: int = 0, total: int = 0) -> None:
        super().__init__(detail, retry_after=retry_after, done=done, total=total)
        self.retry_after = retry_after


class ClusterError(ZonexError):
    """A preparation asked for a Dask cluster that cannot be used: the optional extra is not
    installed, the scheduler is unreachable or has no workers."""

    code = "psi_cluster_unavailable"
    status = 503
    title = "Preparation cluster unavailable"


def epoch_domain(epoch: str) -> bytes:
    """``H_e``'s hashing domain: :func:`crypto.psi.session_domain` over the epoch id and the
    label every private join hashes under. Sessions of one epoch share it; epochs do not."""
    return cpsi.session_domain(epoch, LABEL)


def fingerprints(points: Sequence[bytes]) -> np.ndarray[Any, np.dtype[Any]]:
    """Each point's :data:`FP_BITS`-bit fingerprint, in order (a :data:`FP_DTYPE` array)."""
    raw = b"".join(hashlib.sha256(p).digest()[:12] for p in points)
    return np.frombuffer(raw, dtype=FP_DTYPE).copy()


def false_match_bound(x_count: int, y_count: int, bits: int = FP_BITS) -> float:
    """An upper bound on the chance that one of ``x_count`` points that are not in the image
    shares a fingerprint with one of its ``y_count`` points (a union bound over the pairs)."""
    return min(1.0, x_count * y_count / 2.0**bits)


def choose_protocol(requested: str | None, *, x_count: int, y_count: int | None, ratio: int) -> str:
    """The protocol of a session. ``requested`` wins when given; otherwise ``epoch`` when a
    prepared epoch is usable (``y_count`` is its |Y|, else ``None``) and |Y| ≥ ``ratio``·|X|
    (the unbalanced case, where the consumer would otherwise download and re-blind |Y| points
    to send |X|), and ``session`` for balanced sizes."""
    if requested is not None:
        return requested
    if y_count is not None and y_count >= ratio * x_count:
        return "epoch"
    return "session"


def retry_seconds(remaining: int, seconds_per_item: float) -> int:
    """A ``Retry-After`` for a preparation with ``remaining`` subjects left to blind."""
    return max(1, min(3600, math.ceil(remaining * seconds_per_item)))


# -- the preparation's kernel ---------------------------------------------------------------


def usable_ids(values: Iterable[object], max_items: int) -> tuple[list[str], int]:
    """The distinct usable subject ids among a subject column's distinct ``values``, in order
    of first appearance, and how many distinct values were skipped as no usable id: what
    :func:`exchange.psi_protocol.read_y` makes of them for a session, the same set and count.

    A value normalization leaves as it is (printable ASCII of 1 to
    :data:`~exchange.psi_protocol.MAX_ID_CHARS` characters, no space at either end: NFC and
    stripping change nothing, and no character is refused) is taken as it is; any other goes
    through :func:`~exchange.psi_protocol.normalize_id`. More than ``max_items`` ids is refused.
    """
    index: dict[str, None] = {}
    unusable: set[str] = set()
    for value in values:
        if (
            isinstance(value, str)
            and 0 < len(value) <= MAX_ID_CHARS
            and value.isascii()
            and value.isprintable()
            and value[0] != " "
            and value[-1] != " "
        ):
            index[value] = None
        else:
            try:
                ident = normalize_id(value)
            except InvalidInputError:
                unusable.add(str(value))
                continue
            if ident is None:
                continue
            index[ident] = None
        if len(index) > max_items:
            raise InvalidInputError("the dataset has too many subjects for a private join")
    return list(index), len(unusable)


def _keyed_rank(seed: bytes, ids: Sequence[str]) -> np.ndarray[Any, np.dtype[np.int64]]:
    """:func:`keyed_order` as an array: the 16-byte tags read as two big-endian words, so a
    stable sort on them is the byte order of the tags (ties keep the ids' order)."""
    tags = np.empty((len(ids), 16), dtype=np.uint8)
    for a in range(0, len(ids), _TAG_BLOCK):  # a block at a time: no list of |Y| digests
        block = ids[a : a + _TAG_BLOCK]
        tags[a : a + len(block)] = np.frombuffer(
            b"".join(
                [
                    hashlib.blake2b(i.encode("utf-8"), key=seed, digest_size=16).digest()
                    for i in block
                ]
            ),
            dtype=np.uint8,
        ).reshape(-1, 16)
    words = tags.view(">u8")
    rank: np.ndarray[Any, np.dtype[np.int64]] = np.lexsort((words[:, 1], words[:, 0]))
    return rank


def keyed_order(seed: bytes, ids: Sequence[str]) -> list[int]:
    """The zone's secret order of its subjects: the indices of ``ids`` sorted by a keyed
    BLAKE2b (key ``seed``, 16 bytes) of each id, so the same ids give the same order whenever
    they are read (a resumed preparation, a session's values in the image's order)."""
    if not ids:
        return []
    order: list[int] = _keyed_rank(seed, ids).tolist()
    return order


def blind_image(
    key: cpsi.PsiKey,
    seed: bytes,
    epoch: str,
    ids: Sequence[str],
    path: Path,
    *,
    start: int = 0,
    chunk: int = DEFAULT_CHUNK,
    workers: int | None = None,
    max_chunks: int | None = None,
    on_chunk: ChunkCallback | None = None,
    scheduler: str | None = None,
) -> bool:
    """Write the fingerprints of the image ``I = k_e·H_e(y)`` of ``ids`` in the zone's order
    (:func:`keyed_order` under ``seed``) to ``path``: :data:`FP_DTYPE` records, the i-th being
    the fingerprint of the i-th subject in that order. Returns whether every subject is done.

    Resumable: the first ``start`` records (an earlier call's last ``on_chunk``) are kept and
    the rest written ``chunk`` subjects at a time, each chunk flushed to disk before
    ``on_chunk`` is told; ``max_chunks`` stops after that many chunks (returning ``False``).
    ``key`` is ``k_e``, ``epoch`` the epoch id (``H_e`` hashes under :func:`epoch_domain` of
    it); ``workers`` caps the cores used (default: every available one).

    A chunk is blinded by :func:`crypto.psi.blind_to_digests`: on helper processes, one per
    core, which return only the fingerprints (threads would share one interpreter lock
    between the calls into libsodium); the key goes to them over a pipe and nowhere else.

    With ``scheduler`` (a Dask scheduler's address, ``tcp://host:8786``: the optional extra
    ``zonex[psi-dask]``) the chunks go to that cluster's workers instead, in batches of
    :data:`CLUSTER_BATCH`, which must be the zone's own machines: each task carries ``k_e``.
    Still the same file, byte for byte.
    """
    n = len(ids)
    if not 0 <= start <= n:
        raise ValueError(f"start {start} is outside 0..{n}")
    if chunk < 1:
        raise ValueError("chunk must be at least 1")
    if workers is not None and workers < 1:
        raise ValueError("workers must be at least 1")
    size = FP_DTYPE.itemsize
    if start == n and path.exists() and path.stat().st_size == n * size:
        return True
    end = n if max_chunks is None else min(n, start + max(0, max_chunks) * chunk)
    if scheduler is not None and end > start:
        return (
            _blind_on_dask(scheduler, key, seed, epoch, ids, path, start, end, chunk, on_chunk)
            and end == n
        )
    if min(chunk, end - start) >= cpsi.PROCESS_MIN_BATCH:
        cpsi.start_helpers(workers)  # they start while the order is computed
    rank = _keyed_rank(seed, ids) if end > start else np.zeros(0, dtype=np.int64)
    domain = epoch_domain(epoch)
    with path.open("r+b" if path.exists() else "w+b") as f:
        f.truncate(start * size)
        for begin in range(start, end, chunk):
            stop = min(begin + chunk, end)
            began = time.perf_counter()
            items = _items(ids, rank, begin, stop)
            _flush(f, begin, cpsi.blind_to_digests(key, domain, items, size, workers=workers))
            if on_chunk is not None:
                on_chunk(stop, (time.perf_counter() - began) / (stop - begin))
    return end == n


def _blind_on_dask(
    scheduler: str,
    key: cpsi.PsiKey,
    seed: bytes,
    epoch: str,
    ids: Sequence[str],
    path: Path,
    start: int,
    end: int,
    chunk: int,
    on_chunk: ChunkCallback | None,
) -> bool:
    """:func:`blind_image`'s chunks on a Dask cluster (imported here only: the extra is
    optional and the command line starts without it)."""
    try:
        distributed: Any = importlib.import_module("distributed")
    except ImportError as exc:
        raise ClusterError(
            "preparing on a Dask cluster needs the optional extra: pip install 'zonex[psi-dask]'"
        ) from exc
    try:
        _reachable(scheduler)
        client = distributed.Client(scheduler, timeout=30, set_as_default=False)
    except OSError as exc:
        raise ClusterError(f"the Dask scheduler at {scheduler} is unreachable: {exc}") from exc
    with client:
        threads = sum(client.nthreads().values())
        if threads < 1:
            raise ClusterError(f"the Dask cluster at {scheduler} has no workers")
        rank = _keyed_rank(seed, ids)
        with path.open("r+b" if path.exists() else "w+b") as f:
            f.truncate(start * FP_DTYPE.itemsize)
            executor = client.get_executor(pure=False)
            chunks = _blind_pooled(executor, threads, key, epoch, ids, rank, f, start, end, chunk)
            for done, seconds_per_item in chunks:
                if on_chunk is not None:
                    on_chunk(done, seconds_per_item)
    return True


def _reachable(address: str) -> None:
    """Refuse at once a ``tcp://host:port`` nobody listens on (the client would retry for its
    whole timeout); other addresses are left to the client."""
    parts = urlsplit(address)
    if parts.scheme == "tcp" and parts.hostname and parts.port:
        socket.create_connection((parts.hostname, parts.port), timeout=10).close()


def _flush(f: BinaryIO, offset: int, data: bytes) -> None:
    f.seek(offset * FP_DTYPE.itemsize)
    f.write(data)
    f.flush()
    os.fsync(f.fileno())


def _items(
    ids: Sequence[str], rank: np.ndarray[Any, np.dtype[np.int64]], a: int, b: int
) -> list[bytes]:
    return [ids[i].encode("utf-8") for i in rank[a:b].tolist()]


def _blind_pooled(
    pool: Executor,
    cores: int,
    key: cpsi.PsiKey,
    epoch: str,
    ids: Sequence[str],
    rank: np.ndarray[Any, np.dtype[np.int64]],
    f: BinaryIO,
    start: int,
    end: int,
    chunk: int,
) -> Iterator[tuple[int, float]]:
    """The chunks on an executor (a Dask cluster's) of ``cores`` workers, at most ``4·cores``
    batches of :data:`CLUSTER_BATCH` in flight (memory stays bounded whatever |Y|), the next
    chunk's batches sent while this one's return."""
    scalar, domain, size = key.to_bytes(), epoch_domain(epoch), FP_DTYPE.itemsize
    batches = (
        (min(b + CLUSTER_BATCH, c + chunk, end), b)
        for c in range(start, end, chunk)
        for b in range(c, min(c + chunk, end), CLUSTER_BATCH)
    )
    flight: deque[tuple[int, Future[bytes]]] = deque()
    parts: list[bytes] = []
    begin, began = start, time.perf_counter()

    def send() -> None:
        for stop, b in itertools.islice(batches, 4 * cores - len(flight)):
            items = _items(ids, rank, b, stop)
            flight.append((stop, pool.submit(cpsi.blind_digests, scalar, domain, items, size)))

    send()
    while flight:
        stop, future = flight.popleft()
        parts.append(future.result())
        send()
        if stop == end or (stop - start) % chunk == 0:
            _flush(f, begin, b"".join(parts))
            now = time.perf_counter()
            yield stop, (now - began) / (stop - begin)
            parts, begin, began = [], stop, now


def sort_image(path: Path) -> tuple[np.ndarray[Any, np.dtype[Any]], np.ndarray[Any, np.dtype[Any]]]:
    """The fingerprints :func:`blind_image` wrote to ``path``, sorted for lookup, and each
    one's position in the image's order (``uint32`` below 2^32 subjects, else ``uint64``):
    ``fp[k]`` is the fingerprint of the ``pos[k]``-th subject in the zone's order."""
    fp = np.fromfile(path, dtype=FP_DTYPE)
    rank = np.lexsort((fp["lo"], fp["hi"]))
    return fp[rank], rank.astype(np.uint32 if len(fp) < 2**32 else np.uint64)
