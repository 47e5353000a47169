"""Offline verification of a ledger export bundle. No database, no server.

A bundle is JSON Lines (UTF-8, "\\n" line ends): first every entry, each line exactly the RFC 8785
canonical bytes of the entry (the Merkle leaf input), then every checkpoint, oldest first, as
``{"checkpoint": <signed note>, "consistency": [<base64 hashes>]}`` where the proof leads from
the previous checkpoint in the bundle. :func:`check_bundle` recomputes every leaf and root,
checks ``seq`` = position, the ``prev`` chain, non-decreasing time, every checkpoint's signature,
root and consistency, and optionally a trusted checkpoint saved earlier (rollback, fork). It
reports the first fault in file order; faults about the bundle as a whole come after every line.

Line numbers are 1-based. Line 0 marks a fault of the trusted checkpoint (``trusted_invalid``,
``rollback``, ``fork``) or of the bundle as a whole (``no_checkpoint``).

A bundle file (:func:`read_bundle_lines`) is checked streaming, in memory that grows with the
number of checkpoints and the logarithm of the number of entries, and a large one on every core
(``jobs``): worker processes check aligned runs of lines and the first fault is then found by
the same sequential check, resumed where the first worker stopped (:mod:`exchange.audit._stream`).
Lines given any other way are checked in one pass keeping 32 bytes per entry.
"""

from __future__ import annotations

import datetime
import json
import json.scanner
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from hashlib import sha256
from typing import Any, Protocol

from crypto.canonical import MAX_SAFE_INTEGER, canonicalize
from crypto.encoding import b64_decode
from crypto.errors import EncodingError, VerificationError
from crypto.merkle import EMPTY_ROOT, CompactRange, verify_consistency
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint

GENESIS_PREV = "0" * 64
ANONYMOUS = "-"
ENTRY_KEYS = frozenset({"seq", "time", "kind", "actor", "refs", "digests", "attrs", "prev"})
CHECKPOINT_KEYS = frozenset({"checkpoint", "consistency"})
#: lines per run a worker checks when a bundle file is checked on several cores (a power of two,
#: so every run's leaves form whole subtrees); a bundle of one run or less is checked in-process
CHUNK_LINES = 1 << 13


class FaultKind(StrEnum):
    """Stable codes for what is wrong with a bundle."""

    MALFORMED_JSON = "malformed_json"
    NON_CANONICAL = "non_canonical"
    BAD_ENTRY = "bad_entry"
    SEQ_MISMATCH = "seq_mismatch"
    PREV_MISMATCH = "prev_mismatch"
    TIME_BACKWARDS = "time_backwards"
    ENTRY_AFTER_CHECKPOINTS = "entry_after_checkpoints"
    BAD_CHECKPOINT = "bad_checkpoint"
    BAD_CHECKPOINT_SIGNATURE = "bad_checkpoint_signature"
    WRONG_ORIGIN = "wrong_origin"
    CHECKPOINT_SIZE_EXCEEDS_ENTRIES = "checkpoint_size_exceeds_entries"
    ROOT_MISMATCH = "root_mismatch"
    CHECKPOINT_ORDER = "checkpoint_order"
    BAD_CONSISTENCY_PROOF = "bad_consistency_proof"
    ENTRIES_BEYOND_CHECKPOINT = "entries_beyond_checkpoint"
    NO_CHECKPOINT = "no_checkpoint"
    TRUSTED_INVALID = "trusted_invalid"
    ROLLBACK = "rollback"
    FORK = "fork"
    QUORUM_NOT_MET = "quorum_not_met"  # exchange.audit.quorum: a witness policy's quorum


@dataclass(frozen=True)
class AuditFault:
    """The first thing wrong with a bundle: where, what (a stable code) and why."""

    line: int
    kind: FaultKind
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class AuditReport:
    """``entries`` and ``checkpoints`` count the lines read up to the fault (or all of them)."""

    ok: bool
    entries: int
    checkpoints: int
    fault: AuditFault | None = None


class AuditError(Exception):
    """A bundle did not verify; ``fault`` says where and why."""

    def __init__(self, fault: AuditFault) -> None:
        super().__init__(str(fault))
        self.fault = fault


class _Fault(Exception):
    def __init__(self, line: int, kind: FaultKind, message: str) -> None:
        super().__init__(message)
        self.fault = AuditFault(line, kind, message)


class BundleLines:
    """A bundle file's lines without their "\\n" (a last line without one is kept), read from
    the file each time they are iterated. :func:`check_bundle` reads the file itself: streaming,
    and on several cores for a large bundle."""

    __slots__ = ("path",)

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            for raw in f:
                yield raw[:-1] if raw.endswith(b"\n") else raw


def read_bundle_lines(path: str | os.PathLike[str]) -> BundleLines:
    """Stream a bundle file's lines without their "\\n" (a last line without one is kept)."""
    return BundleLines(path)


# -- parsing --------------------------------------------------------------------------------


class _NotJson(Exception):
    pass


class _NoFloats(Exception):
    pass


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not JSON")


def _refuse_float(text: str) -> Any:
    raise _NoFloats(text)


_DECODER = json.JSONDecoder(parse_float=_refuse_float, parse_constant=_refuse_constant)
# (typeshed declares make_scanner as a class taking a scanner context)
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(_DECODER)  # type: ignore[arg-type]


def _make_encoder() -> Callable[[Any], str]:
    """For ASCII keys and no floats this is RFC 8785 (see :mod:`crypto.canonical`)."""
    encoder = json.JSONEncoder(
        ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False
    )
    make = getattr(json.encoder, "c_make_encoder", None)
    if make is None:  # no C accelerator: the same encoding, slower
        return encoder.encode
    # built once instead of per call; parsed JSON has no cycles, so no cycle markers
    fast = make(
        None, encoder.default, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )

    def encode(value: Any) -> str:
        return "".join(fast(value, 0))

    return encode


_ENCODE = _make_encoder()


def _decode(text: str) -> Any:
    # the scanner alone, as a canonical line has no surrounding whitespace; anything else goes
    # to the full decoder, which explains the error (or accepts whitespace, refused below)
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        return _DECODER.decode(text)
    if end != len(text):
        return _DECODER.decode(text)
    return value


def _parse(line: bytes, number: int) -> Any:
    """Decode one line and insist that it is already in canonical form."""
    try:
        text = line.decode("utf-8")
        value = _decode(text)
    except UnicodeDecodeError as exc:
        raise _Fault(number, FaultKind.MALFORMED_JSON, "line is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise _Fault(
            number, FaultKind.MALFORMED_JSON, f"{exc.msg} at column {exc.pos + 1}"
        ) from exc
    except _NotJson as exc:
        raise _Fault(number, FaultKind.MALFORMED_JSON, str(exc)) from exc
    except RecursionError as exc:
        raise _Fault(number, FaultKind.MALFORMED_JSON, "JSON nested too deeply") from exc
    except _NoFloats as exc:
        raise _Fault(number, FaultKind.NON_CANONICAL, "numbers must be integers") from exc
    # output equal to an ASCII line has only ASCII keys, where the stdlib encoding is RFC 8785's
    try:
        same = _ENCODE(value) == text if line.isascii() else canonicalize(value) == line
    except (EncodingError, ValueError, RecursionError) as exc:
        raise _Fault(number, FaultKind.NON_CANONICAL, "value has no canonical form") from exc
    if not same:
        raise _Fault(number, FaultKind.NON_CANONICAL, "line is not RFC 8785 canonical JSON")
    return value


_TIME = re.compile(
    r"[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])"
    r"T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9]\.[0-9]{3}Z"
).fullmatch
_HEX64 = re.compile(r"[0-9a-f]{64}").fullmatch


def _bad_entry(number: int, message: str) -> _Fault:
    return _Fault(number, FaultKind.BAD_ENTRY, message)


_STR = frozenset({str})
_STR_INT = frozenset({str, int})


def _check_maps(obj: dict[str, Any], number: int) -> None:
    for field in ("refs", "digests", "attrs"):
        if type(obj[field]) is not dict:
            raise _bad_entry(number, f"{field} is not an object")
    if not _STR.issuperset(map(type, obj["refs"].values())):
        raise _bad_entry(number, "refs values must be strings")
    if not _STR.issuperset(map(type, obj["digests"].values())):
        raise _bad_entry(number, "digests values must be strings")
    attrs = obj["attrs"]
    types = set(map(type, attrs.values()))
    if not types <= _STR_INT:
        raise _bad_entry(number, "attrs values must be strings or integers")
    if int in types:
        for value in attrs.values():
            if type(value) is int and not -MAX_SAFE_INTEGER <= value <= MAX_SAFE_INTEGER:
                raise _bad_entry(number, "an attrs integer is outside +/-(2**53 - 1)")


def _check_entry(obj: Any, number: int, last_date: str) -> str:
    """Schema of one entry (types and formats); returns the entry's valid date."""
    if type(obj) is not dict or obj.keys() != ENTRY_KEYS:
        raise _bad_entry(number, "an entry has exactly " + ", ".join(sorted(ENTRY_KEYS)))
    seq = obj["seq"]
    if type(seq) is not int or not 0 <= seq <= MAX_SAFE_INTEGER:
        raise _bad_entry(number, "seq is not a non-negative integer")
    time = obj["time"]
    if type(time) is not str or not _TIME(time):
        raise _bad_entry(number, "time is not RFC 3339 UTC with milliseconds and Z")
    date: str = time[:10]
    if date != last_date:  # dates change rarely: check the calendar only then
        try:
            datetime.date.fromisoformat(date)
        except ValueError as exc:
            raise _bad_entry(number, f"time has no such date {date}") from exc
    kind = obj["kind"]
    if type(kind) is not str or not kind:
        raise _bad_entry(number, "kind is not a non-empty string")
    actor = obj["actor"]
    if type(actor) is not str or not (actor == ANONYMOUS or _HEX64(actor)):
        raise _bad_entry(number, "actor is not a key id or '-'")
    prev = obj["prev"]
    if type(prev) is not str or not _HEX64(prev):
        raise _bad_entry(number, "prev is not 64 lowercase hex digits")
    _check_maps(obj, number)
    return date


# -- the audit -------------------------------------------------------------------------------


class _Roots(Protocol):
    """The Merkle roots of the entries checked so far, at the sizes checkpoints ask for."""

    def add(self, leaf: bytes) -> None:
        """The next entry's leaf hash."""

    def root(self, size: int) -> bytes:
        """The root at ``size``, at most the number of leaves added."""

    @property
    def watched(self) -> bytes | None:
        """The root at the trusted checkpoint's size, once the entries reached it."""


class _LeafRoots:
    """Roots at increasing sizes over the stored leaf hashes: one pass with a CompactRange.

    The root at ``watch`` (the trusted checkpoint's size) is remembered on the way past.
    """

    def __init__(self, watch: int | None) -> None:
        self.leaves = bytearray()  # 32 bytes per entry
        self._range = CompactRange()
        self._watch = watch
        self.watched: bytes | None = EMPTY_ROOT if watch == 0 else None

    def add(self, leaf: bytes) -> None:
        self.leaves += leaf

    def _advance(self, size: int) -> None:
        acc = self._range
        with memoryview(self.leaves) as view:
            acc.extend(view[i : i + 32].tobytes() for i in range(acc.size * 32, size * 32, 32))

    def root(self, size: int) -> bytes:
        """The root at ``size``, which is never below an earlier call's."""
        watch = self._watch
        if watch is not None and self._range.size < watch <= size:
            self._advance(watch)
            self.watched = self._range.root()
        self._advance(size)
        return self._range.root()


def _decode_proof(items: list[Any], number: int) -> list[bytes]:
    proof = []
    for item in items:
        if type(item) is not str:
            raise _Fault(number, FaultKind.BAD_CONSISTENCY_PROOF, "a proof hash is not a string")
        try:
            digest = b64_decode(item)
        except EncodingError as exc:
            raise _Fault(
                number, FaultKind.BAD_CONSISTENCY_PROOF, "a proof hash is not canonical base64"
            ) from exc
        if len(digest) != 32:
            raise _Fault(
                number, FaultKind.BAD_CONSISTENCY_PROOF, f"a proof hash has {len(digest)} bytes"
            )
        proof.append(digest)
    return proof


def _check_checkpoint(
    obj: dict[str, Any],
    number: int,
    log: NoteVerifier,
    previous: Checkpoint | None,
    entries: int,
    roots: _Roots,
) -> Checkpoint:
    if obj.keys() != CHECKPOINT_KEYS:
        raise _Fault(
            number,
            FaultKind.BAD_CHECKPOINT,
            "a checkpoint line has exactly checkpoint, consistency",
        )
    note, proof_items = obj["checkpoint"], obj["consistency"]
    if type(note) is not str or type(proof_items) is not list:
        raise _Fault(
            number, FaultKind.BAD_CHECKPOINT, "checkpoint is not text or consistency not a list"
        )
    try:
        cp = verify_checkpoint(note, log)
    except VerificationError as exc:
        kind = (
            FaultKind.WRONG_ORIGIN
            if str(exc).startswith("origin mismatch")
            else FaultKind.BAD_CHECKPOINT_SIGNATURE
        )
        raise _Fault(number, kind, str(exc)) from exc
    if cp.size > entries:
        raise _Fault(
            number,
            FaultKind.CHECKPOINT_SIZE_EXCEEDS_ENTRIES,
            f"checkpoint size {cp.size} but the bundle has {entries} entries",
        )
    if previous is not None and cp.size < previous.size:
        raise _Fault(
            number,
            FaultKind.CHECKPOINT_ORDER,
            f"checkpoint size {cp.size} after size {previous.size}",
        )
    if roots.root(cp.size) != cp.root:
        first = 1 if previous is None else previous.size + 1  # earlier roots matched
        where = (
            f"an entry on lines {first}..{cp.size} differs from what the log signed"
            if first <= cp.size
            else "the log signed another root for this size"
        )
        raise _Fault(
            number,
            FaultKind.ROOT_MISMATCH,
            f"the root of the first {cp.size} entries is not the signed root: {where}",
        )
    proof = _decode_proof(proof_items, number)
    if previous is None:
        if proof:
            raise _Fault(
                number, FaultKind.BAD_CONSISTENCY_PROOF, "the first checkpoint carries a proof"
            )
        return cp
    try:
        verify_consistency(previous.size, cp.size, previous.root, cp.root, proof)
    except VerificationError as exc:
        raise _Fault(number, FaultKind.BAD_CONSISTENCY_PROOF, str(exc)) from exc
    return cp


def _broken_link(number: int, line: bytes, following: bytes | None) -> _Fault:
    """Name the line that broke the ``prev`` chain at ``number``, looking one line ahead.

    If the next line chains correctly to this one, this entry is intact and the one before it
    was changed; otherwise this entry's ``prev`` is wrong.
    """
    if number > 1 and following is not None:
        following = following[:-1] if following.endswith(b"\n") else following
        try:
            successor = _parse(following, number + 1)
        except _Fault:
            successor = None
        own = sha256(b"\x00" + line).hexdigest()
        if type(successor) is dict and successor.get("prev") == own:
            return _Fault(
                number - 1,
                FaultKind.PREV_MISMATCH,
                "this entry was changed: the next entry's prev records a different leaf hash",
            )
    return _Fault(number, FaultKind.PREV_MISMATCH, "prev is not the previous entry's leaf hash")


def _check_trusted(trusted: str, log: NoteVerifier) -> Checkpoint:
    try:
        return verify_checkpoint(trusted, log)
    except VerificationError as exc:
        raise _Fault(0, FaultKind.TRUSTED_INVALID, f"trusted checkpoint: {exc}") from exc


class _Audit:
    """The checks of :func:`check_bundle` over lines in file order, as a state that can be
    resumed: the parallel path hands over the state where its workers stopped, so the first
    fault is always found, and described, by this one sequence of checks."""

    def __init__(self, log: NoteVerifier, trusted: Checkpoint | None, roots: _Roots) -> None:
        self.log = log
        self.trusted = trusted
        self.roots = roots
        self.entries = 0
        self.checkpoints = 0
        self.last: Checkpoint | None = None
        self.prev_hex = GENESIS_PREV
        self.prev_time = ""

    def run(self, lines: Iterable[bytes], first: int = 1) -> None:
        """Check ``lines``, numbered from ``first``; raise :class:`_Fault` at the first fault."""
        log, roots, add = self.log, self.roots, self.roots.add
        entries, checkpoints, last = self.entries, self.checkpoints, self.last
        prev_hex, prev_time = self.prev_hex, self.prev_time
        last_date = ""
        stream = iter(lines)
        try:
            for number, raw in enumerate(stream, start=first):
                line = raw[:-1] if raw.endswith(b"\n") else raw
                obj = _parse(line, number)
                if type(obj) is dict and "checkpoint" in obj:
                    last = _check_checkpoint(obj, number, log, last, entries, roots)
                    checkpoints += 1
                    continue
                if checkpoints:
                    raise _Fault(
                        number,
                        FaultKind.ENTRY_AFTER_CHECKPOINTS,
                        "an entry after the checkpoints began",
                    )
                last_date = _check_entry(obj, number, last_date)
                if obj["seq"] != entries:
                    raise _Fault(
                        number,
                        FaultKind.SEQ_MISMATCH,
                        f"seq {obj['seq']} at position {entries}: entries deleted, inserted or "
                        "moved",
                    )
                if obj["prev"] != prev_hex:
                    raise _broken_link(number, line, next(stream, None))
                time = obj["time"]
                if time < prev_time:
                    raise _Fault(
                        number, FaultKind.TIME_BACKWARDS, f"time {time} is before {prev_time}"
                    )
                digest = sha256(b"\x00" + line).digest()  # the RFC 9162 leaf hash
                add(digest)
                entries += 1
                prev_hex, prev_time = digest.hex(), time
        finally:
            self.entries, self.checkpoints, self.last = entries, checkpoints, last
            self.prev_hex, self.prev_time = prev_hex, prev_time

    def finish(self) -> None:
        """The checks after the last line; raise :class:`_Fault` for the first that fails."""
        last, entries, trusted_cp = self.last, self.entries, self.trusted
        if last is None:
            raise _Fault(0, FaultKind.NO_CHECKPOINT, "the bundle has no checkpoint")
        if last.size != entries:
            raise _Fault(
                last.size + 1,
                FaultKind.ENTRIES_BEYOND_CHECKPOINT,
                f"{entries - last.size} entries after size {last.size} are not covered "
                "by the last checkpoint",
            )
        if trusted_cp is not None:
            if trusted_cp.size > last.size:
                raise _Fault(
                    0,
                    FaultKind.ROLLBACK,
                    f"the bundle ends at size {last.size}, before the trusted size "
                    f"{trusted_cp.size}",
                )
            if self.roots.watched != trusted_cp.root:
                raise _Fault(
                    0,
                    FaultKind.FORK,
                    f"the bundle's root at the trusted size {trusted_cp.size} differs from "
                    "the trusted root",
                )

    def report(self, fault: _Fault | None = None) -> AuditReport:
        if fault is None:
            return AuditReport(True, self.entries, self.checkpoints)
        return AuditReport(False, self.entries, self.checkpoints, fault.fault)


def check_bundle(
    lines: Iterable[bytes],
    log: NoteVerifier,
    trusted: str | None = None,
    *,
    jobs: int | None = None,
    chunk_lines: int = CHUNK_LINES,
) -> AuditReport:
    """Verify a bundle against the log's key (and a trusted checkpoint, if given).

    ``lines`` are the bundle's lines, with or without their final "\\n" (as
    :func:`read_bundle_lines` or iterating a binary file gives them). Never raises for a bad
    bundle: the report names the first fault.

    A bundle file from :func:`read_bundle_lines` is read streaming. One with more than one run
    of ``chunk_lines`` lines (a power of two) is checked by ``jobs`` worker processes (default:
    every core this process may use; 1 checks in this process); the report is the same either
    way. Other ``lines`` are checked in this process.
    """
    if isinstance(lines, BundleLines):
        from exchange.audit._stream import check_file

        return check_file(lines.path, log, trusted, jobs=jobs, chunk_lines=chunk_lines)
    try:
        trusted_cp = None if trusted is None else _check_trusted(trusted, log)
    except _Fault as fault:
        return AuditReport(False, 0, 0, fault.fault)
    audit = _Audit(log, trusted_cp, _LeafRoots(None if trusted_cp is None else trusted_cp.size))
    try:
        audit.run(lines)
        audit.finish()
    except _Fault as fault:
        return audit.report(fault)
    return audit.report()


def verify_bundle(
    lines: Iterable[bytes],
    log: NoteVerifier,
    trusted: str | None = None,
    *,
    jobs: int | None = None,
    chunk_lines: int = CHUNK_LINES,
) -> None:
    """Return ``None`` if the bundle verifies; raise :class:`AuditError` naming the first fault.

    ``jobs`` and ``chunk_lines`` as for :func:`check_bundle`.
    """
    report = check_bundle(lines, log, trusted, jobs=jobs, chunk_lines=chunk_lines)
    if report.fault is not None:
        raise AuditError(report.fault)
