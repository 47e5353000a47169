"""Offline verification of an exported ledger bundle. No database, no server.

The bundle is JSON Lines: every entry (its exact canonical bytes, the Merkle leaf input), then
every checkpoint as ``{"checkpoint": <signed note>, "consistency": [<base64 hashes>]}``, the
proof leading from the previous checkpoint. ``check_bundle`` recomputes every leaf and root and
reports the first fault in file order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from crypto.canonical import parse_canonical
from crypto.encoding import b64_decode
from crypto.errors import EncodingError, VerificationError
from crypto.merkle import MerkleTree, leaf_hash, verify_consistency
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint

GENESIS_PREV = "0" * 64
ENTRY_KEYS = frozenset({"seq", "time", "kind", "actor", "refs", "digests", "attrs", "prev"})
CHECKPOINT_KEYS = frozenset({"checkpoint", "consistency"})
_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
_HEX64 = re.compile(r"[0-9a-f]{64}")

#: fault kinds (stable codes)
FAULT_KINDS = (
    "malformed_json",
    "non_canonical",
    "bad_entry",
    "seq_mismatch",
    "prev_mismatch",
    "time_backwards",
    "entry_after_checkpoints",
    "bad_checkpoint",
    "bad_checkpoint_signature",
    "wrong_origin",
    "checkpoint_size_exceeds_entries",
    "root_mismatch",
    "checkpoint_order",
    "bad_consistency_proof",
    "entries_beyond_checkpoint",
    "no_checkpoint",
    "trusted_invalid",
    "rollback",
    "fork",
)


@dataclass(frozen=True)
class AuditFault:
    #: 1-based line number in the bundle; 0 for faults of the bundle as a whole or of the
    #: trusted checkpoint
    line: int
    kind: str
    message: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class AuditReport:
    ok: bool
    entries: int
    checkpoints: int
    fault: AuditFault | None = None


class AuditError(Exception):
    def __init__(self, fault: AuditFault) -> None:
        super().__init__(str(fault))
        self.fault = fault


class _Fault(Exception):
    def __init__(self, line: int, kind: str, message: str) -> None:
        super().__init__(message)
        self.fault = AuditFault(line, kind, message)


def read_bundle_lines(path: Path) -> Iterator[bytes]:
    """Stream a bundle's lines (without their newline)."""
    with path.open("rb") as f:
        for raw in f:
            yield raw[:-1] if raw.endswith(b"\n") else raw


def _check_entry(obj: object, number: int) -> dict[str, object]:
    if not isinstance(obj, dict) or set(obj) != ENTRY_KEYS:
        raise _Fault(number, "bad_entry", "entry does not have exactly the entry fields")
    if not isinstance(obj["seq"], int) or isinstance(obj["seq"], bool):
        raise _Fault(number, "bad_entry", "seq is not an integer")
    if not isinstance(obj["time"], str) or not _TIME.fullmatch(obj["time"]):
        raise _Fault(number, "bad_entry", "time is not RFC 3339 UTC with milliseconds")
    if not isinstance(obj["kind"], str) or not isinstance(obj["actor"], str):
        raise _Fault(number, "bad_entry", "kind and actor must be strings")
    if not isinstance(obj["prev"], str) or not _HEX64.fullmatch(obj["prev"]):
        raise _Fault(number, "bad_entry", "prev is not a 64-digit hex hash")
    for field in ("refs", "digests", "attrs"):
        if not isinstance(obj[field], dict):
            raise _Fault(number, "bad_entry", f"{field} is not an object")
    return obj


def check_bundle(
    lines: Iterable[bytes], log: NoteVerifier, trusted: str | None = None
) -> AuditReport:
    """Verify a bundle; the report names the first fault, if any."""
    entries = 0
    checkpoints = 0
    try:
        trusted_cp: Checkpoint | None = None
        if trusted is not None:
            try:
                trusted_cp = verify_checkpoint(trusted, log)
            except VerificationError as exc:
                raise _Fault(0, "trusted_invalid", f"trusted checkpoint: {exc}") from exc
        tree = MerkleTree()  # every checkpoint's root is recomputed from the entries
        prev_hash = GENESIS_PREV
        prev_time = ""
        last: Checkpoint | None = None
        number = 0
        for number, line in enumerate(lines, start=1):  # noqa: B007 - used after the loop
            try:
                obj = parse_canonical(line)
            except EncodingError as exc:
                kind = "non_canonical" if "canonical" in str(exc) else "malformed_json"
                raise _Fault(number, kind, str(exc)) from exc
            if isinstance(obj, dict) and "checkpoint" in obj:
                checkpoints += 1
                last = _check_checkpoint(obj, number, log, last, tree)
                continue
            if checkpoints:
                raise _Fault(number, "entry_after_checkpoints", "entry after the checkpoints")
            entry = _check_entry(obj, number)
            if entry["seq"] != entries:
                raise _Fault(
                    number, "seq_mismatch", f"seq {entry['seq']} at position {entries}"
                )
            if entry["prev"] != prev_hash:
                raise _Fault(number, "prev_mismatch", "prev is not the previous entry's hash")
            time = entry["time"]
            assert isinstance(time, str)
            if time < prev_time:
                raise _Fault(number, "time_backwards", f"time {time} before {prev_time}")
            digest = leaf_hash(line)
            tree.append(digest)
            entries += 1
            prev_hash, prev_time = digest.hex(), time
        if last is None:
            raise _Fault(number + 1 if number else 0, "no_checkpoint", "the bundle has no checkpoint")
        if last.size != entries:
            raise _Fault(
                0,
                "entries_beyond_checkpoint",
                f"{entries - last.size} entries are not covered by the last checkpoint",
            )
        if trusted_cp is not None:
            if trusted_cp.size > last.size:
                raise _Fault(
                    0, "rollback", f"bundle ends at {last.size}, trusted size {trusted_cp.size}"
                )
            if tree.root(trusted_cp.size) != trusted_cp.root:
                raise _Fault(0, "fork", "the bundle's tree differs from the trusted checkpoint")
    except _Fault as fault:
        return AuditReport(False, entries, checkpoints, fault.fault)
    return AuditReport(True, entries, checkpoints)


def _check_checkpoint(
    obj: dict[str, object],
    number: int,
    log: NoteVerifier,
    previous: Checkpoint | None,
    tree: MerkleTree,
) -> Checkpoint:
    if set(obj) != CHECKPOINT_KEYS:
        raise _Fault(number, "bad_checkpoint", "checkpoint line has unexpected fields")
    note, proof_text = obj["checkpoint"], obj["consistency"]
    if not isinstance(note, str) or not isinstance(proof_text, list):
        raise _Fault(number, "bad_checkpoint", "checkpoint line has wrong types")
    try:
        cp = verify_checkpoint(note, log)
    except VerificationError as exc:
        kind = "wrong_origin" if "origin" in str(exc) else "bad_checkpoint_signature"
        raise _Fault(number, kind, str(exc)) from exc
    if cp.size > tree.size:
        raise _Fault(
            number, "checkpoint_size_exceeds_entries", f"size {cp.size} > {tree.size} entries"
        )
    if previous is not None and cp.size < previous.size:
        raise _Fault(number, "checkpoint_order", "checkpoint sizes go backwards")
    if tree.root(cp.size) != cp.root:
        raise _Fault(number, "root_mismatch", f"root at size {cp.size} differs from the entries")
    try:
        proof = [b64_decode(h) if isinstance(h, str) else b"" for h in proof_text]
    except EncodingError as exc:
        raise _Fault(number, "bad_consistency_proof", "proof hash is not base64") from exc
    if previous is None:
        if proof:
            raise _Fault(number, "bad_consistency_proof", "the first checkpoint has a proof")
    else:
        try:
            verify_consistency(previous.size, cp.size, previous.root, cp.root, proof)
        except VerificationError as exc:
            raise _Fault(number, "bad_consistency_proof", str(exc)) from exc
    return cp
