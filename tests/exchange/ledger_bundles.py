"""Build ledger export bundles in tests, exactly as the ledger service writes them.

A bundle is JSON Lines: every entry (its RFC 8785 canonical bytes, the Merkle leaf input), then
every checkpoint as ``{"checkpoint": <signed note>, "consistency": [<base64 hashes>]}`` with the
consistency proof from the previous checkpoint. Tests tamper with :attr:`Bundle.lines` and feed
the result to :func:`exchange.audit.check_bundle`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from crypto.canonical import canonicalize
from crypto.encoding import b64_encode
from crypto.keys import SigningKey
from crypto.merkle import MerkleTree, leaf_hash
from crypto.note import Checkpoint, NoteSigner, NoteVerifier, sign_checkpoint

ORIGIN = "audit.test.zonex/log"
GENESIS_PREV = "0" * 64
START = datetime(2026, 11, 25, 7, 1, 2, 123000, tzinfo=UTC)
KINDS = ("principal.registered", "zone.created", "access.decided", "computation.aggregate")


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with milliseconds, as in ledger entries."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def make_entry(seq: int, prev: str, time: str, **fields: Any) -> dict[str, Any]:
    """A plausible ledger entry; ``fields`` override kind, actor, refs, digests or attrs."""
    salt = seq.to_bytes(8, "big")
    entry: dict[str, Any] = {
        "seq": seq,
        "time": time,
        "kind": KINDS[seq % len(KINDS)],
        "actor": "-" if seq % 7 == 3 else hashlib.sha256(b"actor" + salt[-1:]).hexdigest(),
        "refs": {"zone": f"zone-{seq % 5}", "dataset": f"ds-{seq % 11}", "grant": f"g-{seq}"},
        "digests": {
            "query": hashlib.sha256(b"query" + salt).hexdigest(),
            "result": hashlib.sha256(b"result" + salt).hexdigest(),
        },
        "attrs": {"k": 10, "rows": seq * 3 % 1000, "rule": "p, analyst, zone, aggregate"},
        "prev": prev,
    }
    entry.update(fields)
    return entry


def checkpoint_line(note: str, proof: Sequence[bytes]) -> bytes:
    return canonicalize({"checkpoint": note, "consistency": [b64_encode(h) for h in proof]})


def iter_entry_lines(
    count: int,
    start: datetime = START,
    overrides: Mapping[int, Mapping[str, Any]] | None = None,
) -> Iterator[tuple[bytes, bytes]]:
    """``(line, leaf hash)`` for ``count`` chained entries, one millisecond apart.

    ``overrides[seq]`` replaces fields of that entry before it is chained, as a log that
    misbehaves but signs what it wrote would do.
    """
    prev = GENESIS_PREV
    for seq in range(count):
        time = format_time(start + timedelta(milliseconds=seq))
        entry = make_entry(seq, prev, time)
        entry.update((overrides or {}).get(seq, {}))
        line = canonicalize(entry)
        digest = leaf_hash(line)
        yield line, digest
        prev = digest.hex()


@dataclass
class Bundle:
    """A valid bundle and what built it."""

    signer: NoteSigner
    entries: list[bytes]
    checkpoints: list[bytes]
    sizes: list[int]
    tree: MerkleTree = field(repr=False)

    @property
    def lines(self) -> list[bytes]:
        return [*self.entries, *self.checkpoints]

    def data(self) -> bytes:
        return b"".join(line + b"\n" for line in self.lines)

    def verifier(self) -> NoteVerifier:
        return self.signer.verifier()

    def note_at(self, size: int, signer: NoteSigner | None = None) -> str:
        """A checkpoint note for this tree at ``size`` (for a trusted checkpoint)."""
        signer = signer or self.signer
        return sign_checkpoint(Checkpoint(signer.name, size, self.tree.root(size)), signer)

    def checkpoint_line_at(
        self, size: int, previous: int | None, signer: NoteSigner | None = None
    ) -> bytes:
        proof = [] if previous is None else self.tree.consistency_proof(previous, size)
        return checkpoint_line(self.note_at(size, signer), proof)


def build_bundle(
    count: int = 20,
    sizes: Sequence[int] | None = None,
    signer: NoteSigner | None = None,
    overrides: Mapping[int, Mapping[str, Any]] | None = None,
) -> Bundle:
    """``count`` entries and checkpoints at ``sizes`` (default: a third, two thirds, all)."""
    signer = signer or new_log()
    if sizes is None:
        sizes = sorted({count // 3, 2 * count // 3, count})
    tree = MerkleTree()
    entries = []
    for line, digest in iter_entry_lines(count, overrides=overrides):
        entries.append(line)
        tree.append(digest)
    bundle = Bundle(signer, entries, [], list(sizes), tree)
    previous: int | None = None
    for size in sizes:
        bundle.checkpoints.append(bundle.checkpoint_line_at(size, previous))
        previous = size
    return bundle


def new_log(name: str = ORIGIN) -> NoteSigner:
    return NoteSigner(name, SigningKey.generate())


# -- the checked-in vectors (tests/vectors/ledger/bundles) ----------------------------------

#: fixed keys, so the vectors are reproducible byte for byte (Ed25519 is deterministic)
VECTOR_LOG = NoteSigner("vectors.zonex/log", SigningKey(bytes(range(32))))
VECTOR_OTHER_KEY = NoteSigner("vectors.zonex/log", SigningKey(bytes(range(32, 64))))


@dataclass(frozen=True)
class VectorCase:
    name: str
    data: bytes
    trusted: str | None
    fault: str | None  # the expected fault code, None for a valid bundle
    line: int


def _join(lines: Sequence[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def vector_cases() -> list[VectorCase]:
    """A valid bundle (8 entries, checkpoints at 3, 6, 8) and attacks on it, named after them."""
    valid = build_bundle(8, [3, 6, 8], signer=VECTOR_LOG)
    entries, cps = valid.entries, valid.checkpoints
    changed = list(entries)
    changed[2] = changed[2].replace(b'"kind":"', b'"kind":"x', 1)
    non_canonical = list(entries)
    non_canonical[4] = non_canonical[4].replace(b'"seq":4', b'"seq": 4', 1)
    late = build_bundle(8, [3, 6, 8], VECTOR_LOG, {5: {"time": "2026-01-01T00:00:00.000Z"}})
    fork = build_bundle(8, [3, 6, 8], VECTOR_LOG, {1: {"kind": "zone.deleted"}})
    wrong_root = sign_checkpoint(Checkpoint(VECTOR_LOG.name, 6, bytes(32)), VECTOR_LOG)
    extra = checkpoint_line(
        valid.note_at(6), [*valid.tree.consistency_proof(3, 6), valid.tree.root(6)]
    )
    n = len(entries)
    return [
        VectorCase("valid", valid.data(), None, None, 0),
        VectorCase("valid_with_trusted", valid.data(), valid.note_at(5), None, 0),
        VectorCase("ledger_changed_entry", _join([*changed, *cps]), None, "prev_mismatch", 3),
        VectorCase(
            "ledger_deleted_entry",
            _join([*entries[:3], *entries[4:], *cps]),
            None,
            "seq_mismatch",
            4,
        ),
        VectorCase(
            "ledger_reordered_entries",
            _join([*entries[:2], entries[3], entries[2], *entries[4:], *cps]),
            None,
            "seq_mismatch",
            3,
        ),
        VectorCase(
            "ledger_non_canonical_entry", _join([*non_canonical, *cps]), None, "non_canonical", 5
        ),
        VectorCase("ledger_time_backwards", late.data(), None, "time_backwards", 6),
        VectorCase(
            "ledger_unsigned_tail",
            _join([*entries, *cps[:2]]),
            None,
            "entries_beyond_checkpoint",
            7,
        ),
        VectorCase(
            "ledger_truncated_tail",
            _join([*entries[:6], *cps[:2]]),
            valid.note_at(8),
            "rollback",
            0,
        ),
        VectorCase("ledger_fork", valid.data(), fork.note_at(6), "fork", 0),
        VectorCase(
            "checkpoint_other_key",
            _join([*entries, cps[0], valid.checkpoint_line_at(6, 3, VECTOR_OTHER_KEY), cps[2]]),
            None,
            "bad_checkpoint_signature",
            n + 2,
        ),
        VectorCase(
            "checkpoint_root_mismatch",
            _join([*entries, cps[0], checkpoint_line(wrong_root, []), cps[2]]),
            None,
            "root_mismatch",
            n + 2,
        ),
        VectorCase(
            "consistency_proof_extra_hash",
            _join([*entries, cps[0], extra, cps[2]]),
            None,
            "bad_consistency_proof",
            n + 2,
        ),
    ]


def write_vectors(folder: Path) -> None:
    """(Re)write the bundle vectors and their manifest into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"log": VECTOR_LOG.verifier_key(), "cases": []}
    files: dict[bytes, str] = {}  # cases that differ only in the trusted checkpoint share one
    for case in vector_cases():
        if case.data not in files:
            files[case.data] = f"{case.name}.jsonl"
            (folder / files[case.data]).write_bytes(case.data)
        manifest["cases"].append(
            {
                "name": case.name,
                "bundle": files[case.data],
                "trusted": case.trusted,
                "fault": case.fault,
                "line": case.line,
            }
        )
    text = json.dumps(manifest, ensure_ascii=False, indent=2) + "\n"
    (folder / "manifest.json").write_text(text, "utf-8")
