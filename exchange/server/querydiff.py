"""Near-duplicate aggregate queries, noticed where the SQL is seen (docs/incidents.md).

A differencing attack asks two aggregates that differ by one filter term or one constant
(``... WHERE district = 'A'`` and ``... WHERE district = 'A' AND company_id <> 'C042'``) and
subtracts. The ledger holds only the digest of each statement, which is equal for equal
statements and tells nothing about neighbours; so the exchange compares each aggregate a
consumer runs with that consumer's recent ones, in memory, and appends a
``query.near_duplicate`` entry (actor: the consumer; refs: zone, the two computations' seqs;
attrs: ``difference`` = ``term`` | ``constant``) when one is a neighbour of another.

Nothing new is written but that fact: no digest of the query or of its parts (a keyed digest
would sit in the entry bytes every receipt carries, handing the consumer a keyed digest of a
string it chose). The comparison state stays in the process: per consumer the queries of the
last ``WINDOW_SECONDS``, at most ``PER_CONSUMER`` of them, for at most ``MAX_CONSUMERS``
consumers (least recently active forgotten first), each held as SHA-256 digests of its parts,
never its text. With several workers each compares only the queries it served.

The comparison runs off the request path: :func:`record_query` hands the released query to one
thread per exchange, which parses it, compares and ledgers, so an aggregate's answer never
waits for a second parse. At most ``QUEUE_MAX`` queries wait; beyond that one is compared
late by the caller itself rather than dropped (nothing goes unobserved), and the exchange's
``close`` compares those still waiting before the ledger stops.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
import weakref
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

from exchange.server.ledger import EntryDraft
from exchange.server.runtime import Exchange

__all__ = [
    "NEAR_DUPLICATE",
    "NearDuplicates",
    "QueryShape",
    "flush",
    "near_duplicate",
    "record_query",
]

log = logging.getLogger("zonex.querydiff")

NEAR_DUPLICATE = "query.near_duplicate"
WINDOW_SECONDS = 3600
PER_CONSUMER = 32
MAX_CONSUMERS = 10_000
DIALECT = "duckdb"
#: released queries waiting for their comparison, at most
QUEUE_MAX = 4096


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _mask(node: exp.Expression) -> exp.Expression:
    return exp.Placeholder() if isinstance(node, exp.Literal) else node


@dataclass(frozen=True)
class QueryShape:
    """A query in parts: everything but the top-level filter with its constants masked
    (``skeleton``), and each top-level ``AND`` term of the filter (``terms``: its digest with
    its constants, mapped to the digest of its form with them masked)."""

    skeleton: str
    terms: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, sql: str) -> QueryShape | None:
        """The shape of one SELECT statement (None for anything else or what does not parse)."""
        try:
            tree = sqlglot.parse_one(sql, read=DIALECT)
        except Exception:  # foreign parser on text the checker already accepted; no shape
            return None
        if not isinstance(tree, exp.Select):
            return None
        where = tree.args.get("where")
        terms: list[tuple[str, str]] = []
        if isinstance(where, exp.Where):
            condition = where.this
            parts = list(condition.flatten()) if isinstance(condition, exp.And) else [condition]
            for part in parts:
                exact = part.sql(dialect=DIALECT)
                masked = part.copy().transform(_mask).sql(dialect=DIALECT)
                terms.append((_digest(exact), _digest(masked)))
        rest = tree.copy()
        rest.set("where", None)
        skeleton = _digest(rest.transform(_mask).sql(dialect=DIALECT))
        return cls(skeleton, tuple(sorted(terms)))


def near_duplicate(a: QueryShape, b: QueryShape) -> str | None:
    """``"term"`` if the two filters differ by exactly one term added or removed,
    ``"constant"`` if exactly one term differs only in its constants; else None."""
    if a.skeleton != b.skeleton:
        return None
    ta, tb = Counter(t for t, _ in a.terms), Counter(t for t, _ in b.terms)
    only_a, only_b = ta - tb, tb - ta
    if sum(only_a.values()) + sum(only_b.values()) == 1:
        return "term"
    if sum(only_a.values()) == 1 and sum(only_b.values()) == 1:
        masked = dict(a.terms) | dict(b.terms)
        (left,), (right,) = only_a, only_b
        if masked[left] == masked[right]:
            return "constant"
    return None


class NearDuplicates:
    """Per consumer, its recent aggregates' shapes (bounded as the module says)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, deque[tuple[float, str, QueryShape, int]]] = OrderedDict()

    def observe(
        self, consumer: str, zone: str, shape: QueryShape, seq: int
    ) -> tuple[int, str] | None:
        """Remember ``shape`` (computation ``seq``); return ``(earlier seq, difference)`` of the
        most recent earlier query of the consumer in the same zone it is a neighbour of."""
        now = self._clock()
        with self._lock:
            recent = self._recent.get(consumer)
            if recent is None:
                if len(self._recent) >= MAX_CONSUMERS:
                    self._recent.popitem(last=False)
                recent = self._recent[consumer] = deque(maxlen=PER_CONSUMER)
            else:
                self._recent.move_to_end(consumer)
            while recent and recent[0][0] < now - WINDOW_SECONDS:
                recent.popleft()
            found = None
            for _, other_zone, other, other_seq in reversed(recent):
                if other_zone != zone:
                    continue
                difference = near_duplicate(shape, other)
                if difference is not None:
                    found = (other_seq, difference)
                    break
            recent.append((now, zone, shape, seq))
            return found


#: (consumer, zone, canonical SQL, computation seq), or None to stop
_Job = tuple[str, str, str, int] | None


class _Worker:
    """One exchange's comparisons, on a thread of its own (module docstring)."""

    def __init__(self, ex: Exchange) -> None:
        self._ledger = ex.ledger
        self.tracker = NearDuplicates()
        self._jobs: queue.Queue[_Job] = queue.Queue(maxsize=QUEUE_MAX)
        self._thread = threading.Thread(target=self._run, name="zonex-querydiff", daemon=True)
        self._thread.start()
        ex.on_close(self.close)

    def submit(self, job: tuple[str, str, str, int]) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self._compare(*job)  # late rather than never

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                self._compare(*job)
            except Exception:  # one query's comparison must not stop the others'
                log.exception("comparing an aggregate with the consumer's recent ones failed")
            finally:
                self._jobs.task_done()
        self._jobs.task_done()

    def _compare(self, consumer: str, zone: str, sql: str, seq: int) -> None:
        shape = QueryShape.of(sql)
        if shape is None:
            return
        found = self.tracker.observe(consumer, zone, shape, seq)
        if found is None:
            return
        earlier, difference = found
        self._ledger.append(
            EntryDraft(
                kind=NEAR_DUPLICATE,
                actor=consumer,
                refs={"zone": zone, "computation": str(seq), "previous": str(earlier)},
                attrs={"difference": difference},
            )
        )

    def flush(self) -> None:
        self._jobs.join()

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()


_workers: weakref.WeakKeyDictionary[Exchange, _Worker] = weakref.WeakKeyDictionary()
_workers_lock = threading.Lock()


def _worker(ex: Exchange) -> _Worker:
    with _workers_lock:
        found = _workers.get(ex)
        if found is None:
            found = _workers[ex] = _Worker(ex)
        return found


def record_query(ex: Exchange, consumer: str, zone: str, sql: str, seq: int) -> None:
    """Compare the aggregate ``sql`` (its checked canonical form) that computation ``seq`` ran
    with the consumer's recent ones, off the request path; a ``query.near_duplicate`` is
    ledgered if it neighbours one."""
    _worker(ex).submit((consumer, zone, sql, seq))


def flush(ex: Exchange) -> None:
    """Wait until every query recorded so far has been compared (and its entry appended)."""
    with _workers_lock:
        found = _workers.get(ex)
    if found is not None:
        found.flush()
