"""One level of the catalog chain checked against another, offline: a parent exchange's bundle
against a child's.

A parent records each checkpoint of a child that extends the last one it recorded
(``chain.checkpoint``: the child's signed note, its size and root) and each checkpoint that
does not (``chain.fork``: both signed notes). :func:`check_chain` verifies both bundles with
:func:`exchange.audit.check_bundle`, then, for the child the parent calls ``child_name``:

- the parent recorded the child (``chain.child_added``) under the log key given
  (``unknown_child``, ``child_key_mismatch``);
- every ``chain.checkpoint`` names a note that verifies with the child's key and agrees with
  the entry's size and root (``bad_child_note``, ``bad_chain_entry``);
- the root at each recorded size, recomputed from the child's own entries, is the recorded
  root (``fork``). A mismatch is proven by two checkpoints the child signed: the one the parent
  recorded and the child's own checkpoint covering that size in its bundle (whose root at that
  size, recomputed from its entries and bound to it by the bundle's consistency proofs, is
  another). A size beyond the child's bundle cannot be checked (``child_bundle_short``);
- every ``chain.fork`` the parent recorded is reported (``recorded_fork``) with its two notes,
  and whether its evidence holds: two notes of one size with different roots, or a consistency
  proof binding the new tree's root at the recorded size to its signed root.

Every finding is kept (not only the first); the report is ``ok`` when there is none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from hashlib import sha256
from typing import Any

from crypto.encoding import b64_decode, b64_encode
from crypto.errors import CryptoError, VerificationError
from crypto.merkle import CompactRange, MerkleTree, verify_consistency
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint
from exchange.audit import AuditReport, check_bundle

__all__ = [
    "CHAIN_CHECKPOINT",
    "CHAIN_FORK",
    "CHILD_ADDED",
    "ChainFinding",
    "ChainFindingKind",
    "ChainReport",
    "check_chain",
]

#: the parent's ledger entries this reads (exchange.server.chain writes them)
CHILD_ADDED = "chain.child_added"
CHAIN_CHECKPOINT = "chain.checkpoint"
CHAIN_FORK = "chain.fork"

_CHECKPOINT_LINE = b'{"checkpoint":'


class ChainFindingKind(StrEnum):
    """Stable codes for what is wrong between a parent and a child."""

    PARENT_BUNDLE = "parent_bundle"
    CHILD_BUNDLE = "child_bundle"
    UNKNOWN_CHILD = "unknown_child"
    CHILD_KEY_MISMATCH = "child_key_mismatch"
    BAD_CHAIN_ENTRY = "bad_chain_entry"
    BAD_CHILD_NOTE = "bad_child_note"
    CHILD_BUNDLE_SHORT = "child_bundle_short"
    FORK = "fork"
    RECORDED_FORK = "recorded_fork"


@dataclass(frozen=True)
class ChainFinding:
    """One thing wrong. ``line`` is the parent bundle's line it is about (0: neither bundle's
    line, or the child bundle's fault, whose own line is in the message). For ``fork`` and
    ``recorded_fork``, ``recorded_note`` and ``child_note`` are the two signed checkpoints that
    prove it, and ``child_root`` the child's root at ``size`` recomputed from its entries."""

    kind: ChainFindingKind
    line: int
    message: str
    size: int | None = None
    recorded_note: str | None = None
    child_note: str | None = None
    child_root: bytes | None = None
    #: for ``fork``: the RFC 9162 consistency proof, in the child's tree, from ``size`` to the
    #: size of ``child_note``: it binds ``child_root`` to the root the child signed there
    proof: tuple[bytes, ...] = ()

    def __str__(self) -> str:
        return f"line {self.line}: {self.kind}: {self.message}"


@dataclass(frozen=True)
class ChainReport:
    """``checked``: the parent's ``chain.checkpoint`` entries for the child that were found
    equal to the child's history; ``recorded``: all of them."""

    ok: bool
    child: str
    parent: AuditReport
    child_bundle: AuditReport | None
    recorded: int = 0
    checked: int = 0
    findings: tuple[ChainFinding, ...] = field(default=())


@dataclass
class _Recorded:
    line: int
    seq: int
    size: int
    root_hex: str
    note: str
    checkpoint: Checkpoint | None = None


@dataclass
class _RecordedFork:
    line: int
    seq: int
    attrs: dict[str, Any]
    digests: dict[str, Any]


def _is_checkpoint(line: bytes) -> bool:
    return line.startswith(_CHECKPOINT_LINE)


def _strip(raw: bytes) -> bytes:
    return raw[:-1] if raw.endswith(b"\n") else raw


def _read_parent(
    lines: Iterable[bytes], name: str
) -> tuple[list[tuple[int, str]], list[_Recorded], list[_RecordedFork]]:
    """The parent's chain entries about ``name`` (its bundle verified: each entry parses)."""
    added: list[tuple[int, str]] = []
    recorded: list[_Recorded] = []
    forks: list[_RecordedFork] = []
    for number, raw in enumerate(lines, start=1):
        line = _strip(raw)
        if _is_checkpoint(line):
            break
        if b'"kind":"chain.' not in line:
            continue  # a quick filter; the entry itself is parsed below
        entry = json.loads(line)
        if entry["kind"] not in (CHILD_ADDED, CHAIN_CHECKPOINT, CHAIN_FORK):
            continue
        if entry["refs"].get("child") != name:
            continue
        attrs, digests = entry["attrs"], entry["digests"]
        if entry["kind"] == CHILD_ADDED:
            added.append((number, str(attrs.get("log_key", ""))))
        elif entry["kind"] == CHAIN_CHECKPOINT:
            size, note, root = attrs.get("size"), attrs.get("note"), digests.get("root")
            if type(size) is not int or type(note) is not str or type(root) is not str:
                size, note, root = -1, "", ""
            recorded.append(_Recorded(number, entry["seq"], size, root, note))
        else:
            forks.append(_RecordedFork(number, entry["seq"], attrs, digests))
    return added, recorded, forks


@dataclass
class _ChildHistory:
    """The child bundle read once: its size, its roots at the wanted sizes, and for each of
    them its own first checkpoint note at or above that size."""

    size: int = 0
    roots: dict[int, bytes] = field(default_factory=dict)
    covering: dict[int, str] = field(default_factory=dict)


def _read_child(lines: Iterable[bytes], wanted: list[int]) -> _ChildHistory:
    history = _ChildHistory()
    sizes = sorted(set(wanted))
    acc = CompactRange()
    at = 0  # the next wanted size to take a root at
    pending = 0  # the next wanted size still looking for a covering checkpoint note
    if sizes and sizes[0] == 0:
        history.roots[0] = acc.root()
        at = 1
    for raw in lines:
        line = _strip(raw)
        if _is_checkpoint(line):
            if pending >= len(sizes):
                continue
            note = json.loads(line)["checkpoint"]
            size = int(note.split("\n", 2)[1])  # the bundle verified: a well-formed note
            while pending < len(sizes) and sizes[pending] <= size:
                history.covering[sizes[pending]] = note
                pending += 1
            continue
        acc.append(sha256(b"\x00" + line).digest())
        while at < len(sizes) and sizes[at] == acc.size:
            history.roots[acc.size] = acc.root()
            at += 1
    history.size = acc.size
    return history


def _child_proof(lines: Iterable[bytes], size: int, covering: str) -> tuple[bytes, ...]:
    """The consistency proof, in the child's tree, from ``size`` to the size of its
    ``covering`` note (read again from its bundle: only when a fork was found)."""
    target = int(covering.split("\n", 2)[1])  # a note of the verified bundle
    tree = MerkleTree()
    for raw in lines:
        line = _strip(raw)
        if tree.size == target or _is_checkpoint(line):
            break
        tree.append(sha256(b"\x00" + line).digest())
    return tuple(tree.consistency_proof(size, target))


def _b64(digest: bytes) -> str:
    return b64_encode(digest)


def _check_fork_entry(fork: _RecordedFork, child_log: NoteVerifier) -> ChainFinding:
    """A ``chain.fork`` entry, reported with its two notes and whether its evidence holds."""
    attrs, digests = fork.attrs, fork.digests
    recorded_note, note = attrs.get("recorded_note"), attrs.get("note")
    if type(recorded_note) is not str or type(note) is not str:
        return ChainFinding(
            ChainFindingKind.BAD_CHAIN_ENTRY, fork.line, "a chain.fork entry without its notes"
        )
    try:
        old = verify_checkpoint(recorded_note, child_log)
        new = verify_checkpoint(note, child_log)
    except VerificationError as exc:
        return ChainFinding(
            ChainFindingKind.BAD_CHILD_NOTE,
            fork.line,
            f"a note of the chain.fork entry does not verify with the child's key: {exc}",
            recorded_note=recorded_note,
            child_note=note,
        )
    if old.size == new.size:
        proven = old.root != new.root
        how = (
            f"two checkpoints of size {new.size} with different roots"
            if proven
            else "the two notes agree: no fork shown"
        )
    else:
        proven = False
        how = "no consistency proof binds the new tree's root at the recorded size"
        prefix_hex, proof_text = digests.get("prefix_root"), attrs.get("proof")
        if type(prefix_hex) is str and type(proof_text) is str and old.size < new.size:
            try:
                prefix = bytes.fromhex(prefix_hex)
                proof = [b64_decode(p) for p in proof_text.split(",")] if proof_text else []
                verify_consistency(old.size, new.size, prefix, new.root, proof)
            except (ValueError, CryptoError) as exc:
                how = f"its consistency proof does not verify: {exc}"
            else:
                proven = prefix != old.root
                how = (
                    f"the child's checkpoint of size {new.size} has root {_b64(prefix)} at size "
                    f"{old.size} (by the consistency proof in the entry), not the recorded "
                    f"{_b64(old.root)}"
                    if proven
                    else "the proof shows the new checkpoint extends the recorded one"
                )
    verdict = "proven" if proven else "NOT proven"
    return ChainFinding(
        ChainFindingKind.RECORDED_FORK,
        fork.line,
        f"the parent recorded a fork of the child (entry {fork.seq}, {verdict}): {how}",
        size=old.size,
        recorded_note=recorded_note,
        child_note=note,
    )


def check_chain(
    child_lines: Iterable[bytes],
    child_log: NoteVerifier,
    parent_lines: Iterable[bytes],
    parent_log: NoteVerifier,
    child_name: str,
) -> ChainReport:
    """Check what the parent recorded about ``child_name`` against the child's own bundle.

    Both ``*_lines`` must be readable more than once (a list, or
    :func:`exchange.audit.read_bundle_lines` for a file). Never raises for bad bundles: the
    report lists the findings.
    """
    for lines in (child_lines, parent_lines):
        if iter(lines) is lines:
            raise TypeError("bundle lines are read twice: give a list or read_bundle_lines(path)")
    parent = check_bundle(parent_lines, parent_log)
    if not parent.ok:
        assert parent.fault is not None
        finding = ChainFinding(
            ChainFindingKind.PARENT_BUNDLE, 0, f"the parent bundle: {parent.fault}"
        )
        return ChainReport(False, child_name, parent, None, findings=(finding,))
    child = check_bundle(child_lines, child_log)
    if not child.ok:
        assert child.fault is not None
        finding = ChainFinding(ChainFindingKind.CHILD_BUNDLE, 0, f"the child bundle: {child.fault}")
        return ChainReport(False, child_name, parent, child, findings=(finding,))

    added, recorded, forks = _read_parent(parent_lines, child_name)
    findings: list[ChainFinding] = []
    if not added:
        findings.append(
            ChainFinding(
                ChainFindingKind.UNKNOWN_CHILD,
                0,
                f"the parent bundle records no child {child_name!r} (chain.child_added)",
            )
        )
    for line, key in added:
        try:
            same = NoteVerifier.from_verifier_key(key) == child_log
        except CryptoError:
            same = False
        if not same:
            findings.append(
                ChainFinding(
                    ChainFindingKind.CHILD_KEY_MISMATCH,
                    line,
                    f"the parent recorded {child_name!r} with the log key {key}, not "
                    f"{child_log.to_verifier_key()} (the key given)",
                )
            )

    good: list[_Recorded] = []
    for item in recorded:
        try:
            signed = verify_checkpoint(item.note, child_log)
        except VerificationError as exc:
            findings.append(
                ChainFinding(
                    ChainFindingKind.BAD_CHILD_NOTE,
                    item.line,
                    f"the recorded note does not verify with the child's key: {exc}",
                    recorded_note=item.note or None,
                )
            )
            continue
        if signed.size != item.size or signed.root.hex() != item.root_hex:
            findings.append(
                ChainFinding(
                    ChainFindingKind.BAD_CHAIN_ENTRY,
                    item.line,
                    "the entry's size or root is not its note's",
                    recorded_note=item.note,
                )
            )
            continue
        item.checkpoint = signed
        good.append(item)

    history = _read_child(child_lines, [item.size for item in good])
    checked = 0
    for item in good:
        cp = item.checkpoint
        assert cp is not None
        if cp.size > history.size:
            findings.append(
                ChainFinding(
                    ChainFindingKind.CHILD_BUNDLE_SHORT,
                    item.line,
                    f"the parent recorded size {cp.size}, beyond the child bundle's "
                    f"{history.size} entries: export a newer bundle of the child",
                    size=cp.size,
                    recorded_note=item.note,
                )
            )
            continue
        own = history.roots[cp.size]
        if own == cp.root:
            checked += 1
            continue
        covering = history.covering.get(cp.size)
        proof = () if covering is None else _child_proof(child_lines, cp.size, covering)
        findings.append(
            ChainFinding(
                ChainFindingKind.FORK,
                item.line,
                f"the parent recorded the child's checkpoint of size {cp.size} with root "
                f"{_b64(cp.root)} (entry {item.seq}); the child's bundle has root {_b64(own)} at "
                "that size",
                size=cp.size,
                recorded_note=item.note,
                child_note=covering,
                child_root=own,
                proof=proof,
            )
        )
    findings.extend(_check_fork_entry(fork, child_log) for fork in forks)
    return ChainReport(
        ok=not findings,
        child=child_name,
        parent=parent,
        child_bundle=child,
        recorded=len(recorded),
        checked=checked,
        findings=tuple(findings),
    )
