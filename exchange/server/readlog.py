"""Evidence of catalog reads at a bounded volume: one entry per reader, version and document
per interval, plus a count.

Every catalog read used to append its own ``catalog.read`` entry (some 60 million a day at 700
reads per second). Now, per interval (``catalog_read_interval_seconds``, default 60 s) and per
key ``(principal, registry version, catalog digest)``:

- the **first** read is ledgered as ``catalog.read`` (actor, ``registry_version``, the SHA-256 of
  the exact document) and answered only once that entry is durable;
- **further** reads of the same key are answered without a ledger write (when the first is
  still being committed they wait for it, never less) and only counted in memory;
- at the end of the interval, each key read more than once gets one ``catalog.read.summary``
  entry: the same actor, version and digest, ``count`` (the further reads), ``first`` (the
  ``seq`` of its ``catalog.read``), ``since`` and ``until``.

So "who was shown exactly which document" is on the ledger, durably, before any answer leaves;
only "how many more times" waits for the interval's end. A crash loses at most the counts of
the interval under way. Each worker process keeps its own counter, so with N workers a key can
have up to N ``catalog.read`` entries and N summaries per interval; the number of reads is the
number of ``catalog.read`` entries plus the sum of the summaries' ``count``, whatever N is.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, wait
from dataclasses import dataclass
from datetime import UTC, datetime

from exchange.server.ledger import Appended, EntryDraft, Ledger, format_time

__all__ = ["READ", "SUMMARY", "CatalogReadLog"]

READ = "catalog.read"
SUMMARY = "catalog.read.summary"

#: (principal key id, registry version, lowercase hex SHA-256 of the document)
_Key = tuple[str, int, str]


@dataclass
class _Mark:
    """One key's state in the current interval: its ``catalog.read`` entry (pending until
    durable) and the reads counted after it."""

    first: Future[Appended]
    #: reads of the key admitted after the first (counted when admitted: a read waiting for a
    #: pending first entry is answered once it is durable, or not at all if it fails, and
    #: then the whole mark is dropped)
    count: int = 0
    #: the committed entry, once seen
    entry: Appended | None = None

    def durable(self) -> Appended | None:
        """The committed ``catalog.read`` entry, or ``None`` while it is pending or failed."""
        first = self.first
        settled = self.entry is None and first.done() and not first.cancelled()
        if settled and first.exception() is None:
            self.entry = first.result()
        return self.entry


class CatalogReadLog:
    """One process's catalog-read evidence (see the module docstring). Thread-safe: reads are
    recorded on the event loop, the interval is flushed by the ledger's ticker thread."""

    def __init__(
        self, ledger: Ledger, *, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
    ) -> None:
        self._ledger = ledger
        self._clock = clock
        self._lock = threading.Lock()
        self._marks: dict[_Key, _Mark] = {}
        self._since = format_time(clock())

    async def record(self, actor: str, version: int, digest: str) -> None:
        """Return once this read may be answered: its key's ``catalog.read`` of this interval is
        durable (appended by this call if it is the first). Raises what the ledger raised when
        that entry could not be recorded; the read must then not be answered."""
        key = (actor, version, digest)
        with self._lock:
            mark = self._marks.get(key)
            if mark is not None and mark.first.done() and mark.durable() is None:
                mark = None  # its entry failed: this read tries to ledger one again
            if mark is not None:
                mark.count += 1
                if mark.durable() is not None:
                    return  # the common case: the evidence is durable, nothing to wait for
            else:
                draft = EntryDraft(
                    kind=READ,
                    actor=actor,
                    digests={"catalog": digest},
                    attrs={"registry_version": version},
                )
                # a thread future: every read of the key may wait on it, from any event loop
                submitted = self._ledger.submit(draft)
                assert isinstance(submitted, Future)
                mark = self._marks[key] = _Mark(submitted)
        try:
            # shielded: a client going away cancels its own wait, not the entry others await
            await asyncio.shield(asyncio.wrap_future(mark.first))
        except asyncio.CancelledError:
            raise
        except BaseException:
            with self._lock:
                if self._marks.get(key) is mark:
                    del self._marks[key]  # not evidenced: the next read tries again
            raise

    def flush(self) -> None:
        """End the interval (the ledger's ticker calls this): see :meth:`end_interval`."""
        self.end_interval()

    def end_interval(self) -> list[Future[Appended]]:
        """End the interval: queue one ``catalog.read.summary`` per key read more than once and
        start the next interval. A key whose ``catalog.read`` is still pending is carried into
        the next interval with the reads waiting on it, which are answered in that one.
        Returns the summaries' futures (each resolves once durable)."""
        until = format_time(self._clock())
        with self._lock:
            ended: list[tuple[_Key, _Mark]] = []
            carried: dict[_Key, _Mark] = {}
            for key, mark in self._marks.items():
                if mark.first.done():
                    ended.append((key, mark))
                else:
                    carried[key] = mark
            self._marks = carried
            since, self._since = self._since, until
        summaries: list[Future[Appended]] = []
        for (actor, version, digest), mark in sorted(ended, key=lambda item: item[0]):
            entry = mark.durable()
            if entry is None or mark.count == 0:
                continue
            draft = EntryDraft(
                kind=SUMMARY,
                actor=actor,
                digests={"catalog": digest},
                attrs={
                    "registry_version": version,
                    "count": mark.count,
                    "first": entry.seq,
                    "since": since,
                    "until": until,
                },
            )
            submitted = self._ledger.submit(draft)
            assert isinstance(submitted, Future)
            summaries.append(submitted)
        return summaries

    def close(self, timeout: float = 10.0) -> None:
        """The final flush (before the ledger closes): waits for ``catalog.read`` entries still
        pending, so their counts are summarized too, then for the summaries themselves."""
        with self._lock:
            pending = [m.first for m in self._marks.values() if not m.first.done()]
        wait(pending, timeout=timeout)
        wait(self.end_interval(), timeout=timeout)
