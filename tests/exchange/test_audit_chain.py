"""``zonex audit chain``: a parent's records of a child checked against the child's own bundle,
offline. A child that showed the parent one history and exports another is caught, and the two
checkpoints it signed are printed as the proof; so are forks the parent recorded itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from crypto.encoding import b64_encode
from crypto.keys import SigningKey
from crypto.merkle import MerkleTree, verify_consistency
from crypto.note import NoteSigner, NoteVerifier
from exchange.audit.chain import (
    CHAIN_CHECKPOINT,
    CHAIN_FORK,
    CHILD_ADDED,
    ChainFindingKind,
    ChainReport,
    check_chain,
)
from exchange.cli import app
from tests.exchange.ledger_bundles import Bundle, build_bundle, new_log

CHILD = "district-1"


def chain_entries(child: Bundle, sizes: list[int], **extra: Any) -> dict[int, dict[str, Any]]:
    """Overrides of a parent bundle's entries: the child added at seq 1, then a
    ``chain.checkpoint`` of the child at each of ``sizes``, at seqs 3, 5, ..."""
    key = extra.pop("log_key", child.verifier().to_verifier_key())
    name = extra.pop("name", CHILD)
    entries: dict[int, dict[str, Any]] = {
        1: {
            "kind": CHILD_ADDED,
            "actor": "-",
            "refs": {"child": name},
            "digests": {},
            "attrs": {"url": "http://d1.test", "log_key": key},
        }
    }
    for index, size in enumerate(sizes):
        note = child.note_at(size)
        entries[3 + 2 * index] = {
            "kind": CHAIN_CHECKPOINT,
            "actor": "-",
            "refs": {"child": name},
            "digests": {"root": child.tree.root(size).hex()},
            "attrs": {"size": size, "note": note},
        }
    return entries


def parent_bundle(overrides: dict[int, dict[str, Any]], count: int = 30) -> Bundle:
    return build_bundle(count, signer=new_log("city.test/log"), overrides=overrides)


def child_bundle(signer: NoteSigner, count: int = 40, tamper_at: int | None = None) -> Bundle:
    """The child's history; ``tamper_at``: the same log with another entry there (a fork)."""
    overrides = None
    if tamper_at is not None:
        overrides = {tamper_at: {"attrs": {"k": 99, "rows": 1, "rule": "another history"}}}
    return build_bundle(count, sizes=[10, 25, count], signer=signer, overrides=overrides)


def check(child: Bundle, parent: Bundle, name: str = CHILD) -> ChainReport:
    return check_chain(child.lines, child.verifier(), parent.lines, parent.verifier(), name)


@pytest.fixture
def child() -> Bundle:
    return child_bundle(new_log("district-1.test/log"))


def test_a_child_whose_history_is_what_the_parent_recorded(child: Bundle) -> None:
    parent = parent_bundle(chain_entries(child, [10, 25, 40]))
    report = check(child, parent)
    assert report.ok, report.findings
    assert (report.recorded, report.checked) == (3, 3)


def test_a_child_that_exports_another_history_is_a_fork_shown_by_two_notes(child: Bundle) -> None:
    parent = parent_bundle(chain_entries(child, [10, 25]))
    other = child_bundle(child.signer, tamper_at=15)  # the same key, another entry 15
    report = check(other, parent)
    assert not report.ok and report.checked == 1  # size 10 is common to both histories
    [fork] = report.findings
    assert fork.kind == ChainFindingKind.FORK and fork.size == 25
    assert fork.line == 6  # the parent's chain.checkpoint entry of size 25 (seq 5)
    # the two checkpoints the child signed, and the root its own entries give at that size
    assert fork.recorded_note == child.note_at(25)
    assert fork.child_note == other.note_at(25)
    assert fork.child_root == other.tree.root(25) != child.tree.root(25)
    assert b64_encode(child.tree.root(25)) in fork.message


def test_a_fork_covered_only_by_a_later_checkpoint_of_the_child(child: Bundle) -> None:
    parent = parent_bundle(chain_entries(child, [20]))
    other = child_bundle(child.signer, tamper_at=15)
    [fork] = check(other, parent).findings
    assert fork.kind == ChainFindingKind.FORK
    # the child's bundle has checkpoints at 10, 25, 40: the one covering 20 is 25's
    assert fork.child_note == other.note_at(25)
    assert fork.child_root == other.tree.root(20)
    # and the proof, from the child's tree, that binds that root to the root it signed at 25
    verify_consistency(20, 25, fork.child_root, other.tree.root(25), list(fork.proof))
    assert fork.proof and fork.child_root != child.tree.root(20)


def fork_entry(child: Bundle, forked: Bundle, old: int, new: int, proof: bool = True) -> Any:
    attrs: dict[str, Any] = {
        "reason": "same_size" if old == new else "inconsistent",
        "recorded_size": old,
        "recorded_note": child.note_at(old),
        "size": new,
        "note": forked.note_at(new),
    }
    digests = {"recorded_root": child.tree.root(old).hex(), "root": forked.tree.root(new).hex()}
    if old != new:
        digests["prefix_root"] = forked.tree.root(old).hex()
        hashes = forked.tree.consistency_proof(old, new) if proof else [bytes(32)]
        attrs["proof"] = ",".join(b64_encode(h) for h in hashes)
    return {"kind": CHAIN_FORK, "actor": "-", "refs": {"child": CHILD}, "digests": digests}, attrs


@pytest.mark.parametrize(
    ("old", "new", "proof", "verdict"),
    [(25, 25, True, "proven"), (25, 40, True, "proven"), (25, 40, False, "NOT proven")],
)
def test_forks_the_parent_recorded_are_reported(
    child: Bundle, old: int, new: int, proof: bool, verdict: str
) -> None:
    forked = child_bundle(child.signer, tamper_at=15)
    overrides = chain_entries(child, [10, 25])
    entry, attrs = fork_entry(child, forked, old, new, proof)
    overrides[9] = {**entry, "attrs": attrs}
    report = check(child, parent_bundle(overrides))
    assert not report.ok and report.checked == 2
    [finding] = report.findings
    assert finding.kind == ChainFindingKind.RECORDED_FORK and finding.line == 10
    assert f"entry 9, {verdict})" in finding.message
    assert (finding.recorded_note, finding.child_note) == (child.note_at(old), forked.note_at(new))


def test_a_parent_that_never_recorded_the_child(child: Bundle) -> None:
    parent = parent_bundle(chain_entries(child, [10], name="district-2"))
    [finding] = check(child, parent).findings
    assert finding.kind == ChainFindingKind.UNKNOWN_CHILD


def test_the_child_under_another_key(child: Bundle) -> None:
    other_key = NoteSigner(child.signer.name, SigningKey.generate()).verifier_key()
    parent = parent_bundle(chain_entries(child, [10], log_key=other_key))
    [finding] = check(child, parent).findings
    assert finding.kind == ChainFindingKind.CHILD_KEY_MISMATCH and finding.line == 2


def test_a_recorded_note_the_child_never_signed(child: Bundle) -> None:
    overrides = chain_entries(child, [10, 25])
    impostor = NoteSigner(child.signer.name, SigningKey.generate())
    overrides[5]["attrs"] = {"size": 10, "note": child.note_at(10, impostor)}
    report = check(child, parent_bundle(overrides))
    [finding] = report.findings
    assert finding.kind == ChainFindingKind.BAD_CHILD_NOTE and finding.line == 6
    assert report.checked == 1


def test_an_entry_whose_root_is_not_its_notes(child: Bundle) -> None:
    overrides = chain_entries(child, [10])
    overrides[3]["digests"] = {"root": child.tree.root(11).hex()}
    [finding] = check(child, parent_bundle(overrides)).findings
    assert finding.kind == ChainFindingKind.BAD_CHAIN_ENTRY


def test_a_child_bundle_older_than_what_the_parent_recorded(child: Bundle) -> None:
    parent = parent_bundle(chain_entries(child, [10, 40]))
    older = build_bundle(30, sizes=[10, 25, 30], signer=child.signer)
    [finding] = check(older, parent).findings
    assert finding.kind == ChainFindingKind.CHILD_BUNDLE_SHORT and finding.size == 40


def test_bundles_that_do_not_verify_are_named(child: Bundle) -> None:
    parent = parent_bundle(chain_entries(child, [10]))
    truncated = Bundle(child.signer, child.entries[:-1], child.checkpoints, [], MerkleTree())
    [finding] = check(truncated, parent).findings
    assert finding.kind == ChainFindingKind.CHILD_BUNDLE
    report = check_chain(
        child.lines, child.verifier(), parent.lines, NoteVerifier.from_verifier_key(
            new_log("city.test/log").verifier_key()
        ), CHILD
    )  # fmt: skip
    assert [f.kind for f in report.findings] == [ChainFindingKind.PARENT_BUNDLE]


def write(folder: Path, name: str, bundle: Bundle) -> tuple[Path, Path]:
    path = folder / f"{name}.jsonl"
    path.write_bytes(bundle.data())
    key = folder / f"{name}.pub"
    key.write_text(bundle.verifier().to_verifier_key() + "\n")
    return path, key


def audit_chain(child: tuple[Path, Path], parent: tuple[Path, Path]) -> Result:
    return CliRunner().invoke(
        app,
        [
            "audit", "chain", str(child[0]), "--log-key", str(child[1]),
            "--parent-bundle", str(parent[0]), "--parent-key", str(parent[1]),
            "--child-name", CHILD,
        ],
        env={"COLUMNS": "200"},
    )  # fmt: skip


def test_the_command_prints_the_two_signed_checkpoints(child: Bundle, tmp_path: Path) -> None:
    parent = write(tmp_path, "city", parent_bundle(chain_entries(child, [10, 25])))
    good = audit_chain(write(tmp_path, "district", child), parent)
    assert good.exit_code == 0, good.output
    assert "OK: 2 checkpoints of district-1 recorded" in good.stdout

    other = child_bundle(child.signer, tamper_at=15)
    bad = audit_chain(write(tmp_path, "district-copy", other), parent)
    assert bad.exit_code == 1
    stdout: str = bad.stdout
    assert f"{parent[0]}:6: fork:" in stdout
    # both notes verbatim: anyone can verify them with the child's key
    assert child.note_at(25) in stdout and other.note_at(25) in stdout
    assert b64_encode(other.tree.root(25)) in stdout
    assert "1 findings (fork)" in bad.stderr
    lines = [json.loads(line) for line in parent[0].read_text().splitlines()[:8]]
    assert lines[5]["kind"] == CHAIN_CHECKPOINT


def test_the_command_needs_neither_server_nor_node(child: Bundle, tmp_path: Path) -> None:
    from tests.test_install_layout import _run

    parent = write(tmp_path, "city", parent_bundle(chain_entries(child, [10, 25])))
    district = write(tmp_path, "district", child)
    args = [
        "audit", "chain", str(district[0]), "--log-key", str(district[1]),
        "--parent-bundle", str(parent[0]), "--parent-key", str(parent[1]), "--child-name", CHILD,
    ]  # fmt: skip
    done = _run(
        f"import sys\nfrom exchange.cli import main\nsys.argv = ['zonex', *{args!r}]\nmain()"
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "OK: 2 checkpoints" in done.stdout


def test_one_shot_lines_are_refused(child: Bundle) -> None:
    parent = parent_bundle(chain_entries(child, [10]))
    with pytest.raises(TypeError):
        check_chain(iter(child.lines), child.verifier(), parent.lines, parent.verifier(), CHILD)
