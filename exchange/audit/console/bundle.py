"""A verified ledger bundle, indexed for the console: counts, filtered pages, entries and
their inclusion proofs. No web framework here.

The bundle is verified once, when it is opened (:func:`exchange.audit.check_bundle`). A bundle
that does not verify is still opened, so the auditor can look at it, and its fault (line, code,
message) is kept for every page to show. The index holds, per entry, its place in the file
and the fields the explorer filters on (kind, actor, zone); an entry's bytes are read from the
file when it is shown. The leaf hashes form a :class:`~crypto.merkle.MerkleTree` (about 64 bytes
per entry), from which every inclusion proof against the bundle's last checkpoint is computed
and then verified with :func:`~crypto.merkle.verify_inclusion`, as any RFC 9162 client would.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from crypto.errors import EncodingError, VerificationError
from crypto.merkle import MerkleTree, verify_inclusion
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint
from exchange.audit import AuditFault, AuditReport, check_bundle, read_bundle_lines

#: entries per explorer page
PAGE_SIZE = 50


@dataclass(frozen=True, slots=True)
class IndexedEntry:
    """Where an entry sits in the bundle file and what the explorer filters on."""

    seq: int  # the position in the bundle (0-based), the entry's seq when the bundle verifies
    line: int  # 1-based line number in the file
    offset: int
    length: int
    time: str
    kind: str
    actor: str
    zone: str


@dataclass(frozen=True)
class Filter:
    """The explorer's filter: each given field must match exactly (``kind`` also as a prefix
    ending in ``.``, e.g. ``computation.``)."""

    kind: str = ""
    actor: str = ""
    zone: str = ""

    def matches(self, entry: IndexedEntry) -> bool:
        if self.kind:
            if self.kind.endswith("."):
                if not entry.kind.startswith(self.kind):
                    return False
            elif entry.kind != self.kind:
                return False
        if self.actor and entry.actor != self.actor:
            return False
        return not (self.zone and entry.zone != self.zone)


@dataclass(frozen=True)
class Page:
    entries: list[IndexedEntry]
    number: int  # 1-based
    pages: int
    total: int  # entries matching the filter


@dataclass(frozen=True)
class InclusionProof:
    """An entry's inclusion proof against the bundle's last checkpoint, and whether it holds."""

    index: int
    size: int
    root: bytes
    path: list[bytes]
    verified: bool
    message: str


@dataclass(frozen=True)
class EntryDetail:
    entry: IndexedEntry
    canonical: str  # the exact bytes of the line (the Merkle leaf input), as text
    fields: dict[str, Any] | None  # the parsed entry, None if the line does not parse
    leaf_hash: bytes
    proof: InclusionProof | None  # None: no verified checkpoint covers this entry


class EntryNotFoundError(LookupError):
    """No entry at that position in the bundle."""


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


class LedgerBundle:
    """An opened bundle file: its verification report, index, tree and last checkpoint."""

    def __init__(self, path: Path, log: NoteVerifier, *, jobs: int | None = None) -> None:
        self.path = path
        self.log = log
        self.report: AuditReport = check_bundle(read_bundle_lines(path), log, jobs=jobs)
        self.entries: list[IndexedEntry] = []
        self.checkpoint_count = 0
        self.tree = MerkleTree()
        self.checkpoint: Checkpoint | None = None
        self.checkpoint_note = ""
        self.checkpoint_problem = ""
        self._index()

    @property
    def ok(self) -> bool:
        return self.report.ok

    @property
    def fault(self) -> AuditFault | None:
        return self.report.fault

    def _index(self) -> None:
        intern: dict[str, str] = {}

        def keep(value: str) -> str:
            return intern.setdefault(value, value)

        last_note: str | None = None
        offset = 0
        with self.path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                line = raw[:-1] if raw.endswith(b"\n") else raw
                start, offset = offset, offset + len(raw)
                try:
                    obj = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # shown as the bundle's fault; nothing to index
                if not isinstance(obj, dict):
                    continue
                if "checkpoint" in obj:
                    self.checkpoint_count += 1
                    if isinstance(obj["checkpoint"], str):
                        last_note = obj["checkpoint"]
                    continue
                refs = obj.get("refs")
                zone = _text(refs.get("zone")) if isinstance(refs, dict) else ""
                self.entries.append(
                    IndexedEntry(
                        seq=len(self.entries),
                        line=number,
                        offset=start,
                        length=len(line),
                        time=_text(obj.get("time")),
                        kind=keep(_text(obj.get("kind"))),
                        actor=keep(_text(obj.get("actor"))),
                        zone=keep(zone),
                    )
                )
                self.tree.append(sha256(b"\x00" + line).digest())
        if last_note is None:
            self.checkpoint_problem = "the bundle has no checkpoint"
            return
        self.checkpoint_note = last_note
        try:
            self.checkpoint = verify_checkpoint(last_note, self.log)
        except (VerificationError, EncodingError) as exc:
            self.checkpoint_problem = f"the last checkpoint does not verify: {exc}"

    # -- what the pages show ----------------------------------------------------------------

    def counts_by_kind(self) -> list[tuple[str, int]]:
        counts = Counter(e.kind for e in self.entries)
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    def kinds(self) -> list[str]:
        return sorted({e.kind for e in self.entries})

    def zones(self) -> list[str]:
        return sorted({e.zone for e in self.entries if e.zone})

    def time_span(self) -> tuple[str, str]:
        if not self.entries:
            return "", ""
        return self.entries[0].time, self.entries[-1].time

    def page(self, where: Filter, number: int, size: int = PAGE_SIZE) -> Page:
        """Page ``number`` (1-based, clamped to the pages there are) of the matching entries."""
        matching = [e for e in self.entries if where.matches(e)]
        pages = max(1, -(-len(matching) // size))
        number = min(max(1, number), pages)
        start = (number - 1) * size
        return Page(matching[start : start + size], number, pages, len(matching))

    def _read(self, entry: IndexedEntry) -> bytes:
        with self.path.open("rb") as f:
            f.seek(entry.offset)
            return f.read(entry.length)

    def detail(self, seq: int) -> EntryDetail:
        """The entry at position ``seq``, its leaf hash and its inclusion proof."""
        if not 0 <= seq < len(self.entries):
            raise EntryNotFoundError(f"the bundle has no entry {seq}")
        entry = self.entries[seq]
        line = self._read(entry)
        try:
            fields = json.loads(line)
        except ValueError:
            fields = None
        leaf = sha256(b"\x00" + line).digest()
        return EntryDetail(
            entry=entry,
            canonical=line.decode("utf-8", "replace"),
            fields=fields if isinstance(fields, dict) else None,
            leaf_hash=leaf,
            proof=self._proof(seq, leaf),
        )

    def _proof(self, seq: int, leaf: bytes) -> InclusionProof | None:
        cp = self.checkpoint
        if cp is None or not seq < cp.size <= self.tree.size:
            return None
        path = self.tree.inclusion_proof(seq, cp.size)
        try:
            verify_inclusion(seq, cp.size, leaf, path, cp.root)
        except VerificationError as exc:
            return InclusionProof(seq, cp.size, cp.root, path, False, str(exc))
        return InclusionProof(
            seq, cp.size, cp.root, path, True, "the path leads to the signed root"
        )

    def entry_bytes(self, seq: int) -> bytes | None:
        """The exact bytes of the entry at ``seq`` (for a receipt's check), if there is one."""
        if not 0 <= seq < len(self.entries):
            return None
        return self._read(self.entries[seq])

    def periods(self) -> list[str]:
        """The months (``YYYY-MM``) and quarters (``YYYYQn``) the entries fall in, newest
        first, for the reports' form."""
        months = sorted({e.time[:7] for e in self.entries if len(e.time) >= 7}, reverse=True)
        quarters = sorted({f"{m[:4]}Q{(int(m[5:7]) - 1) // 3 + 1}" for m in months}, reverse=True)
        return months + quarters

    def __iter__(self) -> Iterator[IndexedEntry]:
        return iter(self.entries)


def open_bundle(
    path: str | os.PathLike[str], log: NoteVerifier, *, jobs: int | None = None
) -> LedgerBundle:
    """Verify and index the bundle file at ``path``; never raises for a bad bundle (see
    :attr:`LedgerBundle.fault`), only for a file that cannot be read."""
    return LedgerBundle(Path(path), log, jobs=jobs)
