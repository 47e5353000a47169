"""The auditor on bundle files: streaming, and in worker processes.

The sequential check of a list of lines is the reference. A bundle file must get the same
report (fault kind, line, message and the counts) checked streaming in this process and in
worker processes, whatever is planted where, and in particular on the lines where the file is
cut into runs (runs of 4 and 8 lines here, so that every fault falls near a cut).
"""

from __future__ import annotations

import json
import multiprocessing
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from crypto.canonical import canonicalize
from crypto.merkle import EMPTY_ROOT, MerkleTree, leaf_hash
from exchange.audit import (
    AuditReport,
    FaultKind,
    _stream,
    check_bundle,
    read_bundle_lines,
    verify_bundle,
)
from exchange.audit._stream import (
    Frontier,
    FrontierRoots,
    _lines_backwards,
    run_starts,
    tail_checkpoint_sizes,
)
from exchange.cli import app
from tests.exchange.ledger_bundles import (
    START,
    Bundle,
    build_bundle,
    checkpoint_line,
    format_time,
)

COUNT = 40  # entries on lines 1..40, checkpoints at 13, 32, 40 on lines 41..43
SIZES = [13, 32, 40]
RUNS = (4, 8)


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return build_bundle(COUNT, SIZES)


#: worker sets started (their sizes), for the checks that the parallel path did run
STARTED: list[int] = []


@pytest.fixture(autouse=True)
def count_worker_sets(monkeypatch: pytest.MonkeyPatch) -> None:
    original = _stream._Workers.__init__

    def counted(self: _stream._Workers, jobs: int, path: str) -> None:
        STARTED.append(jobs)
        original(self, jobs, path)

    monkeypatch.setattr(_stream._Workers, "__init__", counted)


def write(tmp_path: Path, lines: list[bytes], end: bytes = b"\n") -> Path:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(b"\n".join(lines) + (end if lines else b""))
    return path


def reports(
    b: Bundle, lines: list[bytes], tmp_path: Path, trusted: str | None = None, end: bytes = b"\n"
) -> list[tuple[str, AuditReport]]:
    """The report of the sequential check of ``lines``, then of their file checked streaming
    in this process and by workers in runs of 4 and 8 lines."""
    path = write(tmp_path, lines, end)
    log = b.verifier()
    got = [("list", check_bundle(lines, log, trusted))]
    got.append(("file", check_bundle(read_bundle_lines(path), log, trusted, jobs=1)))
    for run in RUNS:
        started = len(STARTED)
        report = check_bundle(read_bundle_lines(path), log, trusted, jobs=2, chunk_lines=run)
        got.append((f"workers, runs of {run}", report))
        refused_first = report.fault is not None and report.fault.kind == FaultKind.TRUSTED_INVALID
        if len(lines) > (_stream.MIN_RUNS - 1) * run and not refused_first:
            assert len(STARTED) == started + 1, f"no workers for runs of {run}"
    return got


def assert_same(got: list[tuple[str, AuditReport]]) -> AuditReport:
    reference = got[0][1]
    for how, report in got[1:]:
        assert report == reference, how
    return reference


# -- valid bundles -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "sizes"),
    [(40, SIZES), (40, [40]), (32, [0, 8, 8, 16, 32]), (33, [4, 33]), (9, [9]), (0, [0])],
)
def test_valid_bundles_pass(count: int, sizes: list[int], tmp_path: Path) -> None:
    b = build_bundle(count, sizes)
    report = assert_same(reports(b, b.lines, tmp_path))
    assert report == AuditReport(True, count, len(sizes))
    for size in (0, 1, 4, 7, 8, 9, count):
        if size <= count:
            assert_same(reports(b, b.lines, tmp_path, b.note_at(size)))


def test_last_line_without_newline(bundle: Bundle, tmp_path: Path) -> None:
    assert assert_same(reports(bundle, bundle.lines, tmp_path, end=b"")).ok


def test_verify_bundle_on_a_file(bundle: Bundle, tmp_path: Path) -> None:
    path = write(tmp_path, bundle.lines)
    verify_bundle(read_bundle_lines(path), bundle.verifier(), jobs=2, chunk_lines=4)


def test_bundle_lines_can_be_read_twice(bundle: Bundle, tmp_path: Path) -> None:
    lines = read_bundle_lines(write(tmp_path, bundle.lines))
    assert list(lines) == list(lines) == bundle.lines


def test_workers_do_the_checking(bundle: Bundle, tmp_path: Path) -> None:
    lines = read_bundle_lines(write(tmp_path, bundle.lines))
    started = len(STARTED)
    assert check_bundle(lines, bundle.verifier(), jobs=2, chunk_lines=4).ok
    assert check_bundle(lines, bundle.verifier(), jobs=1, chunk_lines=4).ok
    assert check_bundle(lines, bundle.verifier(), jobs=2, chunk_lines=16).ok  # 3 runs only
    assert STARTED[started:] == [2]


def test_a_workers_error_reaches_the_caller(tmp_path: Path) -> None:
    ours, theirs = multiprocessing.Pipe()
    ours.send((0, 1, 4, ()))
    ours.send(None)
    _stream._serve(theirs, str(tmp_path / "gone.jsonl"))
    assert isinstance(ours.recv(), FileNotFoundError)
    ours.close()


def test_audit_verify_jobs(bundle: Bundle, tmp_path: Path) -> None:
    path = write(tmp_path, _changed(bundle, 7))
    log_pub = tmp_path / "log.pub"
    log_pub.write_text(bundle.signer.verifier_key() + "\n")
    runner = CliRunner()
    for jobs in ("1", "2"):
        args = ["audit", "verify", str(path), "--log-key", str(log_pub), "--jobs", jobs]
        out = runner.invoke(app, args)
        assert out.exit_code == 1 and f"{path}:8: prev_mismatch" in out.output, out.output
    out = runner.invoke(
        app, ["audit", "verify", str(path), "--log-key", str(log_pub), "--jobs", "0"]
    )
    assert out.exit_code == 2


def test_bad_parameters(bundle: Bundle, tmp_path: Path) -> None:
    lines = read_bundle_lines(write(tmp_path, bundle.lines))
    with pytest.raises(ValueError, match="power of two"):
        check_bundle(lines, bundle.verifier(), chunk_lines=6)
    with pytest.raises(ValueError, match="jobs"):
        check_bundle(lines, bundle.verifier(), jobs=0)


# -- planted faults, near every cut --------------------------------------------------------

Plant = Callable[[Bundle, int], list[bytes]]


def _replace(lines: list[bytes], index: int, **fields: object) -> list[bytes]:
    obj = {**json.loads(lines[index]), **fields}
    lines[index] = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    return lines


def _changed(b: Bundle, i: int) -> list[bytes]:
    lines = b.lines
    lines[i] = lines[i].replace(b'"kind":"', b'"kind":"X', 1)
    return lines


def _deleted(b: Bundle, i: int) -> list[bytes]:
    lines = b.lines
    del lines[i]
    return lines


def _duplicated(b: Bundle, i: int) -> list[bytes]:
    lines = b.lines
    lines.insert(i, lines[i])
    return lines


def _swapped(b: Bundle, i: int) -> list[bytes]:
    lines = b.lines
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    return lines


def _non_canonical(b: Bundle, i: int) -> list[bytes]:
    lines = b.lines
    lines[i] += b" "
    return lines


def _malformed(b: Bundle, i: int) -> list[bytes]:
    lines = b.lines
    lines[i] = lines[i][:-1]
    return lines


def _blank(b: Bundle, i: int) -> list[bytes]:
    lines = b.lines
    lines.insert(i, b"")
    return lines


def _checkpoint_among_entries(b: Bundle, i: int) -> list[bytes]:
    # a valid checkpoint (of a size no checkpoint at the end names) before entry i
    lines = b.lines
    lines.insert(i, b.checkpoint_line_at(max(i - 1, 0), None))
    return lines


PLANTS: dict[str, Plant] = {
    "changed": _changed,
    "deleted": _deleted,
    "duplicated": _duplicated,
    "swapped": _swapped,
    "non_canonical": _non_canonical,
    "malformed": _malformed,
    "blank": _blank,
    "bad_entry": lambda b, i: _replace(b.lines, i, kind=""),
    "wrong_prev": lambda b, i: _replace(b.lines, i, prev="ab" * 32),
    "wrong_seq": lambda b, i: _replace(b.lines, i, seq=i + 1),
    "checkpoint_among_entries": _checkpoint_among_entries,
}
#: entry indexes (0-based; line = index + 1) on both sides of every cut between runs of 4 and 8
AT_CUTS = [0, 1, 2, 3, 4, 7, 8, 9, 15, 16, 23, 24, 31, 32, 38]


@pytest.mark.parametrize("index", AT_CUTS)
@pytest.mark.parametrize("plant", PLANTS, ids=str)
def test_planted_fault_same_everywhere(
    bundle: Bundle, plant: str, index: int, tmp_path: Path
) -> None:
    lines = PLANTS[plant](bundle, index)
    report = assert_same(reports(bundle, lines, tmp_path))
    assert not report.ok


@pytest.mark.parametrize("index", [3, 4, 7, 8, 31, 39])
def test_time_backwards_same_everywhere(index: int, tmp_path: Path) -> None:
    # signed by the log that wrote it: only the auditor's rule catches it
    b = build_bundle(
        COUNT, SIZES, overrides={index: {"time": format_time(START.replace(year=2025))}}
    )
    report = assert_same(reports(b, b.lines, tmp_path))
    assert report.fault is not None and report.fault.kind == FaultKind.TIME_BACKWARDS
    assert report.fault.line == index + 1


def test_changed_entry_before_a_cut_is_named(bundle: Bundle, tmp_path: Path) -> None:
    # the last entry of a run changed: the next run's first prev no longer links, and the
    # entry after that still chains, so the changed line itself is named, as in order
    report = assert_same(reports(bundle, _changed(bundle, 7), tmp_path))
    assert report.fault is not None
    assert (report.fault.kind, report.fault.line) == (FaultKind.PREV_MISMATCH, 8)
    assert "this entry was changed" in report.fault.message


def test_checkpoint_faults_same_everywhere(bundle: Bundle, tmp_path: Path) -> None:
    tree = bundle.tree
    cases = {
        "root_mismatch": [*bundle.entries, bundle.checkpoints[0], b"", bundle.checkpoints[2]],
        "order": [*bundle.entries, bundle.checkpoint_line_at(32, None), *bundle.checkpoints[:1]],
        "missing_hash": [
            *bundle.entries,
            bundle.checkpoints[0],
            checkpoint_line(json.loads(bundle.checkpoints[1])["checkpoint"], []),
        ],
        "beyond": [*bundle.entries, *bundle.checkpoints[:2]],
        "exceeds": [*bundle.entries[:30], *bundle.checkpoints],
        "none": bundle.entries,
        "changed_last": _changed(bundle, COUNT - 1),
        "after": [*bundle.entries[:-1], bundle.checkpoints[0], *bundle.entries[-1:]],
        "proof_of_other_sizes": [
            *bundle.entries,
            bundle.checkpoints[0],
            checkpoint_line(
                json.loads(bundle.checkpoints[1])["checkpoint"], tree.consistency_proof(8, 32)
            ),
        ],
    }
    kinds = set()
    for name, lines in cases.items():
        report = assert_same(reports(bundle, lines, tmp_path))
        assert report.fault is not None, name
        kinds.add(report.fault.kind)
    assert len(kinds) >= 7


def test_trusted_faults_same_everywhere(bundle: Bundle, tmp_path: Path) -> None:
    fork = build_bundle(COUNT, SIZES, signer=bundle.signer, overrides={8: {"kind": "quietly"}})
    for size in (9, 13, 40):
        report = assert_same(reports(bundle, bundle.lines, tmp_path, fork.note_at(size)))
        assert report.fault is not None and report.fault.kind == FaultKind.FORK
    assert assert_same(reports(bundle, bundle.lines, tmp_path, fork.note_at(8))).ok
    old = [*bundle.entries[:32], *bundle.checkpoints[:2]]
    report = assert_same(reports(bundle, old, tmp_path, bundle.note_at(40)))
    assert report.fault is not None and report.fault.kind == FaultKind.ROLLBACK
    report = assert_same(reports(bundle, bundle.lines, tmp_path, "not a note"))
    assert report.fault is not None and report.fault.kind == FaultKind.TRUSTED_INVALID


SMALL = build_bundle(24, [5, 16, 24])


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_any_flipped_byte_same_everywhere(
    data: st.DataObject, tmp_path_factory: pytest.TempPathFactory
) -> None:
    raw = bytearray(SMALL.data())
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[index] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]), label="byte")
    lines = bytes(raw).split(b"\n")
    end = b"\n" if lines[-1] == b"" else b""
    lines = lines[:-1] if end else lines
    folder = tmp_path_factory.mktemp("flipped")
    report = assert_same(reports(SMALL, lines, folder, SMALL.note_at(20), end=end))
    assert not report.ok


# -- the pieces ----------------------------------------------------------------------------


def test_frontier_roots_match_the_tree() -> None:
    tree = MerkleTree()
    frontier = Frontier()
    assert frontier.root() == EMPTY_ROOT
    for i in range(70):
        digest = leaf_hash(i.to_bytes(2, "big"))
        tree.append(digest)
        frontier.append(digest)
        assert frontier.root() == tree.root()


@pytest.mark.parametrize("run", [1, 2, 4, 8, 16])
def test_frontier_extended_by_runs(run: int) -> None:
    leaves = [leaf_hash(i.to_bytes(2, "big")) for i in range(53)]
    tree = MerkleTree()
    tree.extend(leaves)
    roots = FrontierRoots([3, 8, 9, 16, 17, 52], None, lambda size: pytest.fail(f"{size}"))
    for low in range(0, len(leaves), run):
        part = Frontier()
        partial = []
        for index, digest in enumerate(leaves[low : low + run]):
            part.append(digest)
            if low + index + 1 in roots.wanted_within(low, low + run):
                partial.append((low + index + 1, part.root()))
        roots.add_run(part.stack, part.size, partial)
    assert roots.root(len(leaves)) == tree.root()
    for size in (3, 8, 9, 16, 17, 52):
        assert roots.root(size) == tree.root(size)


def test_frontier_refuses_a_misaligned_subtree() -> None:
    frontier = Frontier()
    frontier.append(bytes(32))
    with pytest.raises(ValueError, match="cannot start"):
        frontier.append_subtree(bytes(32), 1)


def test_unforeseen_sizes_are_recomputed() -> None:
    leaves = [leaf_hash(bytes([i])) for i in range(10)]
    tree = MerkleTree()
    tree.extend(leaves)
    asked: list[int] = []

    def refetch(size: int) -> bytes:
        asked.append(size)
        return tree.root(size)

    roots = FrontierRoots([4], 6, refetch)
    for digest in leaves:
        roots.add(digest)
    assert roots.root(4) == tree.root(4) and roots.watched == tree.root(6)
    assert roots.root(7) == tree.root(7) and roots.root(10) == tree.root(10)
    assert asked == [7]


@pytest.mark.parametrize(
    "data",
    [b"", b"\n", b"a", b"a\n", b"\n\na\n", b"a\nbb\nccc", b"a\nbb\nccc\n", b"x" * 5000 + b"\ny"],
    ids=repr,
)
def test_lines_backwards(data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("exchange.audit._stream._BLOCK", 3)
    path = tmp_path / "f"
    path.write_bytes(data)
    assert list(_lines_backwards(str(path))) == list(reversed(list(read_bundle_lines(path))))


@pytest.mark.parametrize("run", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("data", [b"", b"a\n", b"a\nb\nc\nd\n", b"a\nb\nc\nd\ne", b"\n" * 9])
def test_run_starts(run: int, data: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("exchange.audit._stream._BLOCK", 3)
    path = tmp_path / "f"
    path.write_bytes(data)
    starts, offset = [], 0
    for number, line in enumerate(data.splitlines(keepends=True)):
        if number % run == 0:
            starts.append(offset)
        offset += len(line)
    assert list(run_starts(str(path), run)) == starts


def test_tail_checkpoint_sizes(bundle: Bundle, tmp_path: Path) -> None:
    path = write(tmp_path, bundle.lines)
    assert tail_checkpoint_sizes(str(path)) == set(SIZES)
    # only the checkpoint lines that end the file; a line that is no checkpoint is skipped
    lines = [*bundle.entries[:20], bundle.checkpoints[0], *bundle.entries[20:], b'{"checkpoint":1}']
    lines += [canonicalize({"checkpoint": "o\nx\n", "consistency": []}), bundle.checkpoints[2]]
    assert tail_checkpoint_sizes(str(write(tmp_path, lines))) == {40}
