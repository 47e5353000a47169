"""Witness policies on exported bundles: ``zonex audit verify BUNDLE --log-key K --policy FILE``
and :func:`exchange.audit.quorum.check_bundle_quorum`.

Bundles come from :mod:`tests.exchange.ledger_bundles` (and one from a real exchange's export);
witnesses are keys generated here that append cosignature lines to checkpoint notes with
:func:`crypto.note.cosign_checkpoint`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crypto.canonical import canonicalize
from crypto.encoding import b64_decode, b64_encode
from crypto.keys import SigningKey
from crypto.note import ALG_COSIGNATURE_V1, NoteSigner, NoteVerifier, cosign_checkpoint
from crypto.tlogpolicy import PolicyError, parse_policy
from exchange.audit import FaultKind, read_bundle_lines
from exchange.audit.quorum import QuorumAuditReport, check_bundle_quorum
from exchange.cli import app
from tests.exchange.ledger_bundles import Bundle, build_bundle, new_log

COUNT = 20  # entries on lines 1..20; checkpoints at sizes 6, 13, 20 on lines 21..23
FINAL = 23
TIME = 1_790_000_000
WITNESSES = [NoteSigner(f"district-{i}.example/witness", SigningKey.generate()) for i in range(3)]
STRANGER = NoteSigner("stranger.example/witness", SigningKey.generate())


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return build_bundle(COUNT)


def vkey(witness: NoteSigner) -> str:
    cosigner = NoteVerifier(witness.name, witness.key.public_key, signature_type=ALG_COSIGNATURE_V1)
    return cosigner.to_verifier_key()


def policy_text(log: NoteSigner | None, k: int = 2) -> str:
    """``k`` of the three district witnesses, for ``log`` (or no log line)."""
    return (
        ("" if log is None else f"# the city's log\nlog {log.verifier_key()}\n")
        + "".join(f"witness d{i} {vkey(w)}\n" for i, w in enumerate(WITNESSES))
        + f"group districts {k} d0 d1 d2\n"
        + "quorum districts\n"
    )


def cosigned(lines: Sequence[bytes], index: int, *witnesses: NoteSigner) -> list[bytes]:
    """The bundle's lines with ``witnesses``' cosignatures on the checkpoint at ``index``."""
    out = list(lines)
    obj = json.loads(out[index])
    for witness in witnesses:
        obj["checkpoint"] = cosign_checkpoint(obj["checkpoint"], witness, TIME)
    out[index] = canonicalize(obj)
    return out


def add_line(lines: Sequence[bytes], index: int, signature_line: str) -> list[bytes]:
    out = list(lines)
    obj = json.loads(out[index])
    obj["checkpoint"] += signature_line
    out[index] = canonicalize(obj)
    return out


def forged_line(note: str, claimed: NoteSigner, key: SigningKey) -> str:
    """A cosignature line in ``claimed``'s name and key ID, signed by another key."""
    body = note[: note.rfind("\n\n") + 1].encode("utf-8")
    signature = key.sign(b"cosignature/v1\ntime %d\n" % TIME + body)
    blob = claimed.cosignature_key_hash + TIME.to_bytes(8, "big") + signature
    return f"\u2014 {claimed.name} {b64_encode(blob)}\n"


def check(bundle: Bundle, lines: list[bytes], k: int = 2, **kw: str) -> QuorumAuditReport:
    return check_bundle_quorum(
        lines, bundle.verifier(), parse_policy(policy_text(bundle.signer, k)), **kw
    )


def files(tmp_path: Path, bundle: Bundle, lines: list[bytes], policy: str) -> list[str]:
    """Write the bundle, log key and policy; the arguments of ``zonex audit verify``."""
    (tmp_path / "ledger.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    (tmp_path / "log.pub").write_text(bundle.signer.verifier_key() + "\n")
    (tmp_path / "witnesses.policy").write_text(policy)
    return [
        "audit",
        "verify",
        str(tmp_path / "ledger.jsonl"),
        "--log-key",
        str(tmp_path / "log.pub"),
        "--policy",
        str(tmp_path / "witnesses.policy"),
    ]


def run(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    return result.exit_code, result.output


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


# -- quorum met ------------------------------------------------------------------------------


def test_quorum_met_passes(bundle: Bundle, tmp_path: Path) -> None:
    lines = cosigned(bundle.lines, -1, WITNESSES[0], WITNESSES[2])
    report = check(bundle, lines)
    assert report.ok and report.fault is None
    assert (report.entries, report.checkpoints) == (COUNT, 3)
    assert report.final is not None
    assert [(c.name, c.timestamp) for c in report.final.cosigned] == [("d0", TIME), ("d2", TIME)]
    assert report.final.checkpoint.size == COUNT
    code, out = run(files(tmp_path, bundle, lines, policy_text(bundle.signer)))
    assert code == 0, out
    assert one_line(out) == (
        "OK: 20 entries, 3 checkpoints verified; quorum districts met, cosigned by d0, d2"
    )


def test_only_the_final_checkpoint_needs_the_quorum(bundle: Bundle) -> None:
    # earlier checkpoints are bound to the final one by the consistency proofs
    lines = cosigned(bundle.lines, -1, *WITNESSES)
    assert check(bundle, lines, k=3).ok
    early = cosigned(bundle.lines, COUNT, *WITNESSES)  # the first checkpoint only
    report = check(bundle, early)
    assert report.fault is not None
    assert (report.fault.kind, report.fault.line) == (FaultKind.QUORUM_NOT_MET, FINAL)


def test_quorum_none_and_a_policy_without_log_lines(bundle: Bundle) -> None:
    log = bundle.verifier()
    none = parse_policy(f"log {bundle.signer.verifier_key()}\nquorum none\n")
    assert check_bundle_quorum(bundle.lines, log, none).ok
    # the log is known from --log-key (tlog-policy: "known from other context")
    no_logs = parse_policy(policy_text(None))
    assert check_bundle_quorum(cosigned(bundle.lines, -1, *WITNESSES[:2]), log, no_logs).ok
    assert not check_bundle_quorum(bundle.lines, log, no_logs).ok


# -- quorum not met --------------------------------------------------------------------------


def test_quorum_not_met(bundle: Bundle, tmp_path: Path) -> None:
    lines = cosigned(bundle.lines, -1, WITNESSES[1])
    report = check(bundle, lines)
    assert not report.ok and report.fault is not None
    assert (report.fault.kind, report.fault.line) == (FaultKind.QUORUM_NOT_MET, FINAL)
    message = (
        "quorum districts not met: group districts: 1 of 3 witnessed, 2 needed (missing d0, d2)"
    )
    assert report.fault.message == message
    args = files(tmp_path, bundle, lines, policy_text(bundle.signer))
    code, out = run(args)
    assert code == 1
    assert one_line(out) == f"error: {args[2]}:{FINAL}: quorum_not_met: {message}"


def test_trusted_checkpoint_must_meet_the_quorum_too(bundle: Bundle) -> None:
    lines = cosigned(bundle.lines, -1, *WITNESSES[:2])
    trusted = bundle.note_at(13)
    report = check(bundle, lines, trusted=trusted)
    assert report.fault is not None
    assert (report.fault.kind, report.fault.line) == (FaultKind.QUORUM_NOT_MET, 0)
    assert report.fault.message.startswith("trusted checkpoint: quorum districts not met")
    for witness in WITNESSES[1:]:
        trusted = cosign_checkpoint(trusted, witness, TIME)
    report = check(bundle, lines, trusted=trusted)
    assert report.ok, report.fault
    assert report.trusted is not None and report.trusted.checkpoint.size == 13


def test_bundle_faults_come_first(bundle: Bundle) -> None:
    lines = cosigned(bundle.lines, -1, WITNESSES[0])
    lines[4] = lines[4].replace(b'"kind":"', b'"kind":"x', 1)
    report = check(bundle, lines)
    assert report.fault is not None and report.fault.kind == FaultKind.PREV_MISMATCH
    assert report.final is None


# -- cosignatures that do not count ----------------------------------------------------------


def test_cosignatures_by_keys_not_in_the_policy_are_ignored(bundle: Bundle) -> None:
    impostor = NoteSigner(WITNESSES[1].name, STRANGER.key)  # d1's name, another key
    lines = cosigned(bundle.lines, -1, STRANGER, impostor, WITNESSES[0])
    report = check(bundle, lines)
    assert report.fault is not None and report.fault.kind == FaultKind.QUORUM_NOT_MET
    assert report.final is not None and not report.final.invalid
    assert check(bundle, cosigned(lines, -1, WITNESSES[2])).ok


def test_forged_cosignature_with_a_wrong_key_does_not_count(bundle: Bundle, tmp_path: Path) -> None:
    lines = cosigned(bundle.lines, -1, WITNESSES[0])
    note = json.loads(lines[-1])["checkpoint"]
    lines = add_line(lines, -1, forged_line(note, WITNESSES[1], STRANGER.key))
    report = check(bundle, lines)
    assert report.fault is not None and report.fault.kind == FaultKind.QUORUM_NOT_MET
    assert "cosignatures that do not verify: d1 (bad Ed25519 signature)" in report.fault.message
    code, out = run(files(tmp_path, bundle, lines, policy_text(bundle.signer)))
    assert code == 1 and "quorum_not_met" in one_line(out)


def test_altered_timestamp_does_not_count(bundle: Bundle) -> None:
    lines = cosigned(bundle.lines, -1, WITNESSES[0], WITNESSES[1])
    note: str = json.loads(lines[-1])["checkpoint"]
    head, last = note[:-1].rsplit("\n", 1)
    name_part, encoded = last.rsplit(" ", 1)
    blob = bytearray(b64_decode(encoded))
    blob[4:12] = (TIME - 3600).to_bytes(8, "big")
    obj = json.loads(lines[-1])
    obj["checkpoint"] = f"{head}\n{name_part} {b64_encode(bytes(blob))}\n"
    lines[-1] = canonicalize(obj)
    report = check(bundle, lines)
    assert report.fault is not None and report.fault.kind == FaultKind.QUORUM_NOT_MET
    assert report.final is not None and list(report.final.invalid) == ["d1"]


# -- however the lines arrive -----------------------------------------------------------------


class FileLines:
    """Lines that name their file, as :func:`exchange.audit.read_bundle_lines` may give them."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __iter__(self) -> Iterator[bytes]:
        with open(self.path, "rb") as f:
            for raw in f:
                yield raw.rstrip(b"\n")


def test_lines_as_a_list_an_iterator_a_file_or_a_named_file(
    bundle: Bundle, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = cosigned(bundle.lines, -1, *WITNESSES[:2])
    bad = cosigned(bundle.lines, -1, WITNESSES[2])
    for lines, ok in ((good, True), (bad, False)):
        path = tmp_path / "ledger.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line in lines))
        policy = parse_policy(policy_text(bundle.signer))
        log = bundle.verifier()
        monkeypatch.setattr("exchange.audit.quorum._TAIL_BLOCK", 7)  # the tail in many reads
        with path.open("rb") as f:
            reports = [
                check_bundle_quorum(lines, log, policy),
                check_bundle_quorum(iter(lines), log, policy),
                check_bundle_quorum(f, log, policy),
                check_bundle_quorum(FileLines(path), log, policy),
                check_bundle_quorum(read_bundle_lines(path), log, policy),
            ]
        assert [r.ok for r in reports] == [ok] * 5
        assert len({r.fault for r in reports}) == 1
        assert len({r.final.explain() if r.final else None for r in reports}) == 1
        path.write_bytes(path.read_bytes().rstrip(b"\n"))  # no newline at the end
        assert check_bundle_quorum(FileLines(path), log, policy).ok is ok


def test_a_bundle_that_changes_between_reads(bundle: Bundle) -> None:
    """A second read must not pick up another checkpoint than the one verified."""
    fork = build_bundle(COUNT, signer=bundle.signer, overrides={3: {"kind": "zone.deleted"}})
    other = cosigned(fork.lines, -1, *WITNESSES)

    class Changing:
        def __init__(self) -> None:
            self.reads = 0

        def __iter__(self) -> Iterator[bytes]:
            self.reads += 1
            return iter(bundle.lines if self.reads == 1 else other)

    policy = parse_policy(policy_text(bundle.signer))
    report = check_bundle_quorum(Changing(), bundle.verifier(), policy)
    assert report.fault is not None
    assert (report.fault.kind, report.fault.line) == (FaultKind.BAD_CHECKPOINT, FINAL)


# -- refused policies ------------------------------------------------------------------------


def test_policy_for_another_log_is_refused(bundle: Bundle, tmp_path: Path) -> None:
    other = new_log("other.zonex/log")
    policy = parse_policy(policy_text(other))
    with pytest.raises(PolicyError, match=re.escape("the policy is for the log other.zonex/log+")):
        check_bundle_quorum(bundle.lines, bundle.verifier(), policy)
    # the same name with another key is another log
    same_name = parse_policy(policy_text(new_log(bundle.signer.name)))
    with pytest.raises(PolicyError):
        check_bundle_quorum(bundle.lines, bundle.verifier(), same_name)
    args = files(tmp_path, bundle, bundle.lines, policy_text(other))
    code, out = run(args)
    assert code == 1
    line = one_line(out)
    assert line.startswith(f"error: {args[-1]}: the policy is for the log other.zonex/log+")
    assert f"not {bundle.signer.name}+" in line


@pytest.mark.parametrize(
    ("policy", "where", "reason"),
    [
        ("witness d0 {d0}\nwitness d1 {d0}\nquorum d0\n", ":2", "one key is one witness"),
        ("witness d0 {d0}\n# c\ngroup g 2 d0 d9\nquorum g\n", ":3", "d9 is not defined above"),
        ("witness d0 {d0}\nquorum d0 # the district\n", ":2", "a quorum line is"),
        ("witness d0 {d0}\n", "", "no quorum line"),
        ("wittness d0 {d0}\nquorum none\n", ":1", "unknown keyword 'wittness'"),
    ],
)
def test_malformed_policy_is_one_readable_line(
    bundle: Bundle, tmp_path: Path, policy: str, where: str, reason: str
) -> None:
    args = files(tmp_path, bundle, bundle.lines, policy.format(d0=vkey(WITNESSES[0])))
    code, out = run(args)
    assert code == 1
    line = one_line(out)
    assert line.startswith(f"error: {args[-1]}{where}: "), line
    assert reason in line


def test_unreadable_policy_file(bundle: Bundle, tmp_path: Path) -> None:
    args = files(tmp_path, bundle, bundle.lines, "quorum none\n")
    args[-1] = str(tmp_path / "missing.policy")
    code, out = run(args)
    assert code == 1 and "missing.policy" in one_line(out)


# -- a real exchange's export ----------------------------------------------------------------


def test_exported_ledger_with_witness_cosignatures(data_dir: Path, tmp_path: Path) -> None:
    bundle_path = tmp_path / "ledger.jsonl"
    code, out = run(["ledger", "export", "--data-dir", str(data_dir), "--out", str(bundle_path)])
    assert code == 0, out
    lines = bundle_path.read_bytes().splitlines()
    log_pub = data_dir / "log.pub"
    log_line = f"log {log_pub.read_text().strip()}\n"
    policy = tmp_path / "witnesses.policy"
    policy.write_text(log_line + policy_text(None))
    args = ["audit", "verify", str(bundle_path), "--log-key", str(log_pub), "--policy", str(policy)]
    code, out = run(args)
    assert code == 1 and f":{len(lines)}: quorum_not_met:" in one_line(out)
    bundle_path.write_bytes(b"".join(line + b"\n" for line in cosigned(lines, -1, *WITNESSES[1:])))
    code, out = run(args)
    assert code == 0, out
    assert "quorum districts met, cosigned by d1, d2" in one_line(out)
