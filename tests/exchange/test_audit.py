"""The offline auditor against valid bundles and a hostile log or courier that tampers with them.

Each tampering test names the attack and the fault code the auditor must report, at the line
where the bundle first goes wrong.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto.canonical import canonicalize
from crypto.encoding import b64_encode
from crypto.keys import SigningKey
from crypto.merkle import EMPTY_ROOT
from crypto.note import Checkpoint, NoteSigner, NoteVerifier, cosign_checkpoint, sign_checkpoint
from exchange.audit import (
    AuditError,
    AuditReport,
    FaultKind,
    check_bundle,
    read_bundle_lines,
    verify_bundle,
)
from tests.exchange.ledger_bundles import (
    ORIGIN,
    START,
    Bundle,
    build_bundle,
    checkpoint_line,
    format_time,
    make_entry,
    new_log,
    write_vectors,
)

COUNT = 20  # entries on lines 1..20; checkpoints at sizes 6, 13, 20 on lines 21..23


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return build_bundle(COUNT)


def check(bundle: Bundle, lines: list[bytes], trusted: str | None = None) -> AuditReport:
    return check_bundle(lines, bundle.verifier(), trusted)


def assert_fault(report: AuditReport, kind: FaultKind, line: int) -> None:
    assert not report.ok
    assert report.fault is not None
    assert (report.fault.kind, report.fault.line) == (kind, line), report.fault


def entry_obj(line: bytes) -> dict[str, object]:
    value: dict[str, object] = json.loads(line)
    return value


def canonical(obj: object) -> bytes:
    """RFC 8785 for ASCII keys, without refusing what the auditor must refuse itself."""
    return json.dumps(obj, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


def replace_entry(lines: list[bytes], index: int, **fields: object) -> list[bytes]:
    out = list(lines)
    out[index] = canonical({**entry_obj(out[index]), **fields})
    return out


# -- valid bundles -------------------------------------------------------------------------


def test_valid_bundle_passes(bundle: Bundle) -> None:
    report = check(bundle, bundle.lines)
    assert report == AuditReport(True, COUNT, 3, None)
    verify_bundle(bundle.lines, bundle.verifier())


@pytest.mark.parametrize("size", [0, 1, 5, 6, 13, 19, 20])
def test_valid_with_trusted_passes(bundle: Bundle, size: int) -> None:
    assert check(bundle, bundle.lines, bundle.note_at(size)).ok


def test_valid_bundle_read_from_file(bundle: Bundle, tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(bundle.data())
    assert list(read_bundle_lines(path)) == bundle.lines
    assert check_bundle(read_bundle_lines(path), bundle.verifier()).ok
    with path.open("rb") as f:  # lines that keep their "\n" are accepted too
        assert check_bundle(f, bundle.verifier()).ok


def test_valid_variants() -> None:
    # a first checkpoint at size 0, repeated sizes, one checkpoint only, a single entry
    for count, sizes in ((8, [0, 3, 3, 8, 8]), (8, [8]), (1, [1]), (0, [0])):
        b = build_bundle(count, sizes)
        assert check(b, b.lines).ok, (count, sizes)


def test_cosigned_checkpoints_pass(bundle: Bundle) -> None:
    witness = NoteSigner("witness.example/w1", SigningKey.generate())
    lines = bundle.lines
    last = json.loads(lines[-1])
    last["checkpoint"] = cosign_checkpoint(last["checkpoint"], witness, 1_700_000_000)
    lines[-1] = canonicalize(last)
    assert check(bundle, lines).ok


def test_entries_with_unicode_pass() -> None:
    b = build_bundle(5, overrides={2: {"refs": {"zone": "区-1", "数据": "集"}}})
    assert b"\xe5\x8c\xba" in b.entries[2]  # raw UTF-8, as RFC 8785 writes it
    assert check(b, b.lines).ok


def test_verify_bundle_raises(bundle: Bundle) -> None:
    with pytest.raises(AuditError) as info:
        verify_bundle(bundle.lines[:COUNT], bundle.verifier())
    assert info.value.fault.kind == FaultKind.NO_CHECKPOINT
    assert "no_checkpoint" in str(info.value)


# -- syntax --------------------------------------------------------------------------------


def test_malformed_json(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[4] = lines[4][:-1]
    assert_fault(check(bundle, lines), FaultKind.MALFORMED_JSON, 5)


@pytest.mark.parametrize(
    "bad", [b"", b"\xff{}", b"NaN", b'{"a":1} {"b":2}', b"[" * 100_000], ids=repr
)
def test_malformed_lines(bundle: Bundle, bad: bytes) -> None:
    lines = bundle.lines
    lines[2] = bad
    assert_fault(check(bundle, lines), FaultKind.MALFORMED_JSON, 3)


def test_non_canonical_json(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[3] = json.dumps(entry_obj(lines[3])).encode()  # spaces after separators
    assert_fault(check(bundle, lines), FaultKind.NON_CANONICAL, 4)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda line: line + b" ",
        lambda line: line + b"\r",  # a CRLF file
        lambda line: line.replace(b'"seq":', b'"seq":1,"seq":', 1),  # duplicate key
        lambda line: line.replace(b'"zone":"', b'"zone":"\\u007a', 1),  # needless escape
        lambda line: line.replace(b'"k":10', b'"k":10.0', 1),  # a float
        lambda line: line.replace(b'"k":10', b'"k":1e1', 1),
        lambda line: line.replace(b'{"actor":', b'{"time":"x","actor":', 1),  # unsorted keys
    ],
)
def test_non_canonical_variants(bundle: Bundle, mangle: Callable[[bytes], bytes]) -> None:
    lines = bundle.lines
    lines[3] = mangle(lines[3])
    assert_fault(check(bundle, lines), FaultKind.NON_CANONICAL, 4)


def test_blank_line_between_entries(bundle: Bundle) -> None:
    lines = bundle.lines
    lines.insert(5, b"")
    assert_fault(check(bundle, lines), FaultKind.MALFORMED_JSON, 6)


# -- entries -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"seq": "3"},
        {"seq": True},
        {"seq": -1},
        {"time": "2026-11-25T07:01:02Z"},
        {"time": "2026-11-25 07:01:02.123Z"},
        {"time": "2026-11-25T07:01:02.123+00:00"},
        {"time": "2026-02-30T07:01:02.123Z"},
        {"kind": ""},
        {"kind": 7},
        {"actor": "ABC"},
        {"actor": None},
        {"prev": "00"},
        {"refs": []},
        {"refs": {"zone": 1}},
        {"digests": {"q": None}},
        {"attrs": {"n": 2**53}},
        {"attrs": {"n": [1]}},
        {"extra": "x"},
    ],
    ids=repr,
)
def test_bad_entry(bundle: Bundle, fields: dict[str, object]) -> None:
    lines = replace_entry(bundle.lines, 3, **fields)
    assert_fault(check(bundle, lines), FaultKind.BAD_ENTRY, 4)


def test_bad_entry_missing_field(bundle: Bundle) -> None:
    lines = bundle.lines
    obj = entry_obj(lines[3])
    del obj["digests"]
    lines[3] = canonicalize(obj)
    assert_fault(check(bundle, lines), FaultKind.BAD_ENTRY, 4)


def test_bad_entry_not_an_object(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[0] = b"[1,2]"
    assert_fault(check(bundle, lines), FaultKind.BAD_ENTRY, 1)


def test_changed_byte_in_entry(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[7] = lines[7].replace(b'"kind":"', b'"kind":"X', 1)
    # the entry is well-formed; the next entry's prev no longer matches it, and the one after
    # still chains to the next, so the changed line itself is named
    report = check(bundle, lines)
    assert_fault(report, FaultKind.PREV_MISMATCH, 8)
    assert report.fault is not None and "this entry was changed" in report.fault.message


def test_changed_byte_in_second_to_last_entry(bundle: Bundle) -> None:
    # nothing after the next entry to tell which of the two changed: the link is named
    lines = bundle.lines
    lines[COUNT - 2] = lines[COUNT - 2].replace(b'"kind":"', b'"kind":"X', 1)
    assert_fault(check(bundle, lines), FaultKind.PREV_MISMATCH, COUNT)


def test_changed_byte_in_last_entry(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[COUNT - 1] = lines[COUNT - 1].replace(b'"kind":"', b'"kind":"X', 1)
    assert_fault(check(bundle, lines), FaultKind.ROOT_MISMATCH, COUNT + 3)


def test_deleted_entry(bundle: Bundle) -> None:
    lines = bundle.lines
    del lines[4]
    assert_fault(check(bundle, lines), FaultKind.SEQ_MISMATCH, 5)


def test_deleted_first_entry(bundle: Bundle) -> None:
    assert_fault(check(bundle, bundle.lines[1:]), FaultKind.SEQ_MISMATCH, 1)


def test_inserted_entry(bundle: Bundle) -> None:
    # a forged entry that fits position 5 exactly (seq, prev and time all right)
    lines = bundle.lines
    prev = entry_obj(lines[4])
    forged = canonicalize(make_entry(5, str(entry_obj(lines[5])["prev"]), str(prev["time"])))
    lines.insert(5, forged.replace(b"g-5", b"g-forged"))
    assert_fault(check(bundle, lines), FaultKind.SEQ_MISMATCH, 7)


def test_duplicated_entry(bundle: Bundle) -> None:
    lines = bundle.lines
    lines.insert(6, lines[5])
    assert_fault(check(bundle, lines), FaultKind.SEQ_MISMATCH, 7)


def test_reordered_entries(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[8], lines[9] = lines[9], lines[8]
    assert_fault(check(bundle, lines), FaultKind.SEQ_MISMATCH, 9)


def test_wrong_prev(bundle: Bundle) -> None:
    lines = replace_entry(bundle.lines, 10, prev="ab" * 32)
    assert_fault(check(bundle, lines), FaultKind.PREV_MISMATCH, 11)


def test_wrong_prev_on_first_entry(bundle: Bundle) -> None:
    lines = replace_entry(bundle.lines, 0, prev="00" * 31 + "01")
    assert_fault(check(bundle, lines), FaultKind.PREV_MISMATCH, 1)


def test_time_backwards() -> None:
    # the log itself wrote and signed it: only the auditor's rule catches it
    earlier = format_time(START.replace(year=2025))
    b = build_bundle(COUNT, overrides={9: {"time": earlier}})
    assert_fault(check(b, b.lines), FaultKind.TIME_BACKWARDS, 10)


def test_equal_times_pass() -> None:
    b = build_bundle(6, overrides={i: {"time": "2026-11-25T07:01:02.123Z"} for i in range(6)})
    assert check(b, b.lines).ok


def test_entry_after_checkpoints(bundle: Bundle) -> None:
    lines = bundle.lines
    moved = lines.pop(COUNT - 1)
    lines.insert(COUNT, moved)  # after the first checkpoint line
    # the checkpoint at size 6 still verifies; the entry after it is out of place
    assert_fault(check(bundle, lines), FaultKind.ENTRY_AFTER_CHECKPOINTS, COUNT + 1)


# -- checkpoints ---------------------------------------------------------------------------


def test_changed_byte_in_checkpoint(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[COUNT + 1] = lines[COUNT + 1].replace(b"\\n13\\n", b"\\n12\\n", 1)
    assert_fault(check(bundle, lines), FaultKind.BAD_CHECKPOINT_SIGNATURE, COUNT + 2)


def test_checkpoint_signed_by_other_key(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[COUNT + 2] = bundle.checkpoint_line_at(COUNT, 13, signer=new_log(ORIGIN))
    assert_fault(check(bundle, lines), FaultKind.BAD_CHECKPOINT_SIGNATURE, COUNT + 3)


def test_checkpoint_from_other_log(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[COUNT] = bundle.checkpoint_line_at(6, None, signer=new_log("other.example/log"))
    assert_fault(check(bundle, lines), FaultKind.WRONG_ORIGIN, COUNT + 1)


def test_checkpoint_with_malformed_note(bundle: Bundle) -> None:
    lines = bundle.lines
    obj = json.loads(lines[COUNT])
    obj["checkpoint"] = obj["checkpoint"].replace("\n\n", "\n")
    lines[COUNT] = canonicalize(obj)
    assert_fault(check(bundle, lines), FaultKind.BAD_CHECKPOINT_SIGNATURE, COUNT + 1)


@pytest.mark.parametrize(
    "obj",
    [
        {"checkpoint": "x", "consistency": [], "cosignatures": []},
        {"checkpoint": "x"},
        {"checkpoint": 5, "consistency": []},
        {"checkpoint": "x", "consistency": "AAAA"},
    ],
    ids=repr,
)
def test_bad_checkpoint_line(bundle: Bundle, obj: dict[str, object]) -> None:
    lines = bundle.lines
    lines[COUNT] = canonicalize(obj)
    assert_fault(check(bundle, lines), FaultKind.BAD_CHECKPOINT, COUNT + 1)


def test_checkpoint_size_exceeds_entries(bundle: Bundle) -> None:
    lines = bundle.lines
    del lines[COUNT - 2 : COUNT]  # the last two entries are gone
    assert_fault(check(bundle, lines), FaultKind.CHECKPOINT_SIZE_EXCEEDS_ENTRIES, COUNT + 1)


def test_root_mismatch(bundle: Bundle) -> None:
    # the log signs a root that is not the root of the entries it exports
    lines = bundle.lines
    note = sign_checkpoint(Checkpoint(ORIGIN, 13, bytes(32)), bundle.signer)
    lines[COUNT + 1] = checkpoint_line(note, bundle.tree.consistency_proof(6, 13))
    assert_fault(check(bundle, lines), FaultKind.ROOT_MISMATCH, COUNT + 2)


def test_checkpoint_order(bundle: Bundle) -> None:
    lines = bundle.lines
    lines[COUNT + 1] = bundle.checkpoint_line_at(20, 6)
    lines[COUNT + 2] = bundle.checkpoint_line_at(13, None)
    assert_fault(check(bundle, lines), FaultKind.CHECKPOINT_ORDER, COUNT + 3)


def _with_proof(bundle: Bundle, index: int, proof: list[bytes]) -> list[bytes]:
    lines = bundle.lines
    obj = json.loads(lines[COUNT + index])
    lines[COUNT + index] = checkpoint_line(obj["checkpoint"], proof)
    return lines


def test_consistency_proof_extra_hash(bundle: Bundle) -> None:
    proof = bundle.tree.consistency_proof(6, 13)
    lines = _with_proof(bundle, 1, [*proof, bundle.tree.root(13)])
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 2)


def test_consistency_proof_missing_hash(bundle: Bundle) -> None:
    proof = bundle.tree.consistency_proof(6, 13)
    lines = _with_proof(bundle, 1, proof[:-1])
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 2)


def test_consistency_proof_empty(bundle: Bundle) -> None:
    lines = _with_proof(bundle, 2, [])
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 3)


def test_consistency_proof_zero_length_hash(bundle: Bundle) -> None:
    proof = bundle.tree.consistency_proof(6, 13)
    lines = _with_proof(bundle, 1, [b"", *proof])
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 2)


def test_consistency_proof_short_hash(bundle: Bundle) -> None:
    proof = bundle.tree.consistency_proof(6, 13)
    lines = _with_proof(bundle, 1, [proof[0][:31], *proof[1:]])
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 2)


def test_consistency_proof_swapped_sizes(bundle: Bundle) -> None:
    # the proofs of the 6->13 and 13->20 steps exchanged
    lines = bundle.lines
    first, second = json.loads(lines[COUNT + 1]), json.loads(lines[COUNT + 2])
    lines[COUNT + 1] = canonicalize({**first, "consistency": second["consistency"]})
    lines[COUNT + 2] = canonicalize({**second, "consistency": first["consistency"]})
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 2)


def test_consistency_proof_not_base64(bundle: Bundle) -> None:
    lines = bundle.lines
    obj = json.loads(lines[COUNT + 1])
    obj["consistency"][0] = obj["consistency"][0].rstrip("=")
    lines[COUNT + 1] = canonicalize(obj)
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 2)


def test_consistency_proof_on_first_checkpoint(bundle: Bundle) -> None:
    lines = _with_proof(bundle, 0, [EMPTY_ROOT])
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 1)


def test_consistency_proof_not_a_string(bundle: Bundle) -> None:
    lines = bundle.lines
    obj = json.loads(lines[COUNT + 1])
    obj["consistency"][0] = 1
    lines[COUNT + 1] = canonicalize(obj)
    assert_fault(check(bundle, lines), FaultKind.BAD_CONSISTENCY_PROOF, COUNT + 2)


# -- the bundle as a whole -----------------------------------------------------------------


def test_entry_beyond_last_checkpoint(bundle: Bundle) -> None:
    lines = bundle.lines[:-1]  # the last checkpoint (size 20) is gone; 13 remains
    assert_fault(check(bundle, lines), FaultKind.ENTRIES_BEYOND_CHECKPOINT, 14)


def test_no_checkpoint(bundle: Bundle) -> None:
    assert_fault(check(bundle, bundle.lines[:COUNT]), FaultKind.NO_CHECKPOINT, 0)


def test_empty_bundle(bundle: Bundle) -> None:
    report = check(bundle, [])
    assert_fault(report, FaultKind.NO_CHECKPOINT, 0)
    assert (report.entries, report.checkpoints) == (0, 0)


def test_trusted_invalid(bundle: Bundle) -> None:
    other = sign_checkpoint(Checkpoint(ORIGIN, 5, bundle.tree.root(5)), new_log())
    assert_fault(check(bundle, bundle.lines, other), FaultKind.TRUSTED_INVALID, 0)
    assert_fault(check(bundle, bundle.lines, "not a note"), FaultKind.TRUSTED_INVALID, 0)


def test_truncated_tail_detected_with_trusted(bundle: Bundle) -> None:
    # an older export (up to size 13) handed over after the auditor saw size 20
    old = bundle.entries[:13] + bundle.checkpoints[:2]
    assert check(bundle, old).ok  # on its own it is a valid, shorter ledger
    assert_fault(check(bundle, old, bundle.note_at(20)), FaultKind.ROLLBACK, 0)


def test_fork_against_trusted(bundle: Bundle) -> None:
    # the same log key signed a different history: the auditor's saved checkpoint is from it
    fork = build_bundle(COUNT, signer=bundle.signer, overrides={3: {"kind": "quietly.changed"}})
    assert check(fork, fork.lines).ok
    for size in (4, 6, 15, 20):
        assert_fault(check(bundle, bundle.lines, fork.note_at(size)), FaultKind.FORK, 0)
    assert check(bundle, bundle.lines, fork.note_at(3)).ok  # before the fork point


def test_first_fault_in_file_order(bundle: Bundle) -> None:
    lines = bundle.lines
    del lines[COUNT + 2]  # entries beyond the last checkpoint, reported at the end
    lines[COUNT + 1] = lines[COUNT + 1].replace(b"\\n13\\n", b"\\n12\\n", 1)
    lines[15] = lines[15] + b" "
    lines[3] = replace_entry(lines, 3, kind="")[3]
    report = check(bundle, lines, bundle.note_at(20))
    assert_fault(report, FaultKind.BAD_ENTRY, 4)
    assert (report.entries, report.checkpoints) == (3, 0)


def test_fault_kinds_are_stable() -> None:
    assert {k.value for k in FaultKind} == {
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
        "quorum_not_met",
    }


# -- properties ----------------------------------------------------------------------------

SMALL = build_bundle(9, [2, 5, 9], signer=NoteSigner(ORIGIN, SigningKey(b"\x07" * 32)))


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_any_flipped_byte_anywhere_fails(data: st.DataObject) -> None:
    raw = bytearray(SMALL.data())
    index = data.draw(st.integers(0, len(raw) - 1), label="index")
    raw[index] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[index]), label="byte")
    report = check_bundle(io.BytesIO(bytes(raw)), SMALL.verifier())
    assert not report.ok


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_truncation_fails(data: st.DataObject) -> None:
    raw = SMALL.data()
    cut = data.draw(st.integers(0, len(raw) - 2), label="cut")  # keeps at most all but "\n"
    report = check_bundle(io.BytesIO(raw[:cut]), SMALL.verifier(), SMALL.note_at(9))
    assert not report.ok


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_line_deleted_or_duplicated_fails(data: st.DataObject) -> None:
    lines = SMALL.lines
    index = data.draw(st.integers(0, len(lines) - 1), label="index")
    duplicate = data.draw(st.booleans(), label="duplicate")
    if duplicate:
        lines.insert(index, lines[index])
    else:
        del lines[index]
    report = check_bundle(lines, SMALL.verifier(), SMALL.note_at(9))
    # only a repeated first checkpoint (no proof, same size) is harmless
    assert report.ok == (duplicate and index == 9)


def test_every_proof_hash_is_checked() -> None:
    for index in range(1, 3):
        obj = json.loads(SMALL.checkpoints[index])
        for j in range(len(obj["consistency"])):
            bad = list(obj["consistency"])
            bad[j] = b64_encode(bytes(32))
            lines = SMALL.lines
            lines[9 + index] = canonicalize({**obj, "consistency": bad})
            report = check_bundle(lines, SMALL.verifier())
            assert_fault(report, FaultKind.BAD_CONSISTENCY_PROOF, 10 + index)


# -- the checked-in vectors ----------------------------------------------------------------

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "ledger" / "bundles"
MANIFEST: dict[str, Any] = json.loads((VECTORS / "manifest.json").read_text("utf-8"))


@pytest.mark.parametrize("case", MANIFEST["cases"], ids=lambda c: c["name"])
def test_bundle_vector(case: dict[str, Any]) -> None:
    log = NoteVerifier.from_verifier_key(MANIFEST["log"])
    report = check_bundle(read_bundle_lines(VECTORS / case["bundle"]), log, case["trusted"])
    if case["fault"] is None:
        assert report.ok, report.fault
    else:
        assert_fault(report, FaultKind(case["fault"]), case["line"])


def test_bundle_vectors_are_reproducible(tmp_path: Path) -> None:
    write_vectors(tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in VECTORS.iterdir())
    for name in written:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name
