"""The catalog-chain example runs end to end (three exchanges and three witnesses, each its own
process) and leaves bundles that show, checked here again from the files alone, what the story
says: the city's ledger meets the 2-of-2 witness policy, it recorded both districts and one fork
of district-1 whose evidence holds, the city's witness refused the copy's checkpoint, and the
copy's bundle contradicts a checkpoint the city recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from crypto.encoding import b64_decode
from crypto.merkle import verify_consistency
from crypto.note import NoteVerifier, verify_checkpoint
from crypto.tlogpolicy import parse_policy
from exchange.audit import read_bundle_lines
from exchange.audit.chain import ChainFindingKind, check_chain
from exchange.audit.quorum import check_bundle_quorum
from exchange.server.cosigning import list_witnesses
from exchange.server.runtime import Exchange
from exchange.server.witness.store import WitnessStore
from exchange.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "catalog_chain"))

import catalog_chain


def log_key(base: Path, name: str) -> NoteVerifier:
    return NoteVerifier.from_verifier_key((base / name / "log.pub").read_text().strip())


def entries(bundle: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in bundle.read_text().splitlines()]
    return [line for line in lines if "checkpoint" not in line]


def test_the_catalog_chain_example(tmp_path: Path) -> None:
    base = tmp_path / "chain"
    assert catalog_chain.main(["--data-dir", str(base)]) == 0
    audit = base / "audit"
    city, d1, d2 = (log_key(base, n) for n in ("city", "district-1", "district-2"))

    # the city's export meets its policy: cosigned by both districts' witnesses
    policy = parse_policy((audit / "city.policy").read_bytes())
    report = check_bundle_quorum(read_bundle_lines(audit / "city.jsonl"), city, policy)
    assert report.ok, report.fault
    assert report.final is not None
    assert {c.name for c in report.final.cosigned} == {"d1", "d2"}

    # the city recorded both districts, and the copy's history of district-1 as forks (one
    # per forked checkpoint it saw: the copy signs a few while it registers its firms), each
    # proven by its entry
    recorded = entries(audit / "city.jsonl")
    children = {e["refs"]["child"] for e in recorded if e["kind"] == "chain.checkpoint"}
    assert children == {"district-1", "district-2"}
    forks = [e for e in recorded if e["kind"] == "chain.fork"]
    assert forks
    for fork in forks:
        assert fork["refs"] == {"child": "district-1"}
        old = verify_checkpoint(fork["attrs"]["recorded_note"], d1)
        new = verify_checkpoint(fork["attrs"]["note"], d1)
        if fork["attrs"]["reason"] == "same_size":  # seen just as the copy reached that size
            assert old.size == new.size and old.root != new.root
            continue
        assert fork["attrs"]["reason"] == "inconsistent"
        prefix = bytes.fromhex(fork["digests"]["prefix_root"])
        proof = [b64_decode(h) for h in fork["attrs"]["proof"].split(",")]
        verify_consistency(old.size, new.size, prefix, new.root, proof)
        assert prefix != old.root and old.size < new.size

    # the city's witness refused the copy's checkpoints and kept them as evidence; the copy
    # was told so (422)
    refused = WitnessStore(base / "witness-city" / "witness.db").evidence(d1.name)
    assert refused
    for _, _, note in refused:
        assert verify_checkpoint(note, d1).size >= old.size
    copy = Exchange(Settings.from_data_dir(base / "district-1-copy"))
    try:
        [witness] = list_witnesses(copy.engine)
    finally:
        copy.close()
    assert witness.last_error is not None and "422" in witness.last_error

    # from the bundles alone: district-2 matches; the copy contradicts a recorded checkpoint
    # (two notes of district-1's key); the original matches but the recorded fork is shown
    def chain(bundle: str, key: NoteVerifier, child: str) -> list[Any]:
        return list(
            check_chain(
                read_bundle_lines(audit / bundle),
                key,
                read_bundle_lines(audit / "city.jsonl"),
                city,
                child,
            ).findings
        )

    assert chain("district-2.jsonl", d2, "district-2") == []
    found = chain("district-1-copy.jsonl", d1, "district-1")
    recorded_forks = [ChainFindingKind.RECORDED_FORK] * len(forks)
    assert [f.kind for f in found] == [ChainFindingKind.FORK, *recorded_forks]
    contradiction = found[0]
    assert contradiction.recorded_note is not None and contradiction.child_note is not None
    ours, theirs = (
        verify_checkpoint(contradiction.recorded_note, d1),
        verify_checkpoint(contradiction.child_note, d1),
    )
    assert contradiction.child_root is not None and contradiction.child_root != ours.root
    verify_consistency(
        ours.size, theirs.size, contradiction.child_root, theirs.root, list(contradiction.proof)
    )
    original = chain("district-1.jsonl", d1, "district-1")
    assert [f.kind for f in original] == recorded_forks
    assert all("proven" in f.message and "NOT proven" not in f.message for f in original)
