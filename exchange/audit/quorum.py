"""A witness policy on an exported ledger bundle: the quorum of a C2SP tlog-policy file.

:func:`check_bundle_quorum` verifies the bundle with :func:`exchange.audit.check_bundle` (which
reads a bundle file its own way) and, when it verifies, checks the policy's quorum on its
**final** checkpoint (its last line) and on the trusted checkpoint, if one is given. The final
checkpoint is enough for the bundle: every earlier checkpoint is tied to it by verified
consistency proofs, so the witnesses who cosigned it vouch for that whole history; the trusted
checkpoint is checked because the auditor's rollback and fork checks rest on it. Witness
cosignatures are extra signature lines on those notes (c2sp.org/tlog-cosignature); lines from
keys the policy does not name are ignored, and a line that does not verify never counts.

A quorum that is not met is the fault ``quorum_not_met``, at the final checkpoint's line (or
line 0 for the trusted checkpoint), with one line saying which group is short. It is reported
only for a bundle that otherwise verifies.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from crypto.errors import VerificationError
from crypto.note import NoteVerifier
from crypto.tlogpolicy import Policy, PolicyError, QuorumReport, check_quorum
from exchange.audit import AuditFault, FaultKind, check_bundle

#: how much of a bundle file is read at a time, from its end, to find its last line
_TAIL_BLOCK = 1 << 16


@dataclass(frozen=True)
class QuorumAuditReport:
    """:class:`exchange.audit.AuditReport` plus the quorum reports of the final and the trusted
    checkpoint (``None`` where not reached)."""

    ok: bool
    entries: int
    checkpoints: int
    fault: AuditFault | None = None
    final: QuorumReport | None = None
    trusted: QuorumReport | None = None


def require_policy_log(policy: Policy, log: NoteVerifier) -> None:
    """Raise :class:`PolicyError` unless the policy lists ``log`` (name and key).

    A policy that lists no log at all leaves the log to the caller (tlog-policy: "the
    appropriate log(s) are known from other context").
    """
    if policy.logs and not policy.lists_log(log):
        listed = ", ".join(f"{e.verifier.name}+{e.verifier.key_hash.hex()}" for e in policy.logs)
        raise PolicyError(
            f"the policy is for the log {listed}, not {log.name}+{log.key_hash.hex()} "
            "(the log key given)"
        )


class _LastLine:
    """Passes a one-shot iterator's lines through, remembering the last."""

    def __init__(self, lines: Iterator[bytes]) -> None:
        self._lines = lines
        self.line: bytes | None = None

    def __iter__(self) -> Iterator[bytes]:
        for raw in self._lines:
            self.line = raw
            yield raw


def _last_line_of_file(path: str) -> bytes | None:
    """A file's last line without its "\\n", read from the end."""
    with open(path, "rb") as f:
        position = f.seek(0, os.SEEK_END)
        data = text = b""
        while position > 0:
            step = min(_TAIL_BLOCK, position)
            position -= step
            f.seek(position)
            data = f.read(step) + data
            text = data[:-1] if data.endswith(b"\n") else data  # the newline ending the file
            cut = text.rfind(b"\n")
            if cut >= 0:
                return text[cut + 1 :]
        return text or None


def _last_line(lines: Iterable[bytes]) -> bytes | None:
    """The last of ``lines``, which can be read again: from the end of the file when they name
    one (as :func:`exchange.audit.read_bundle_lines` gives them), else in a second pass."""
    path = getattr(lines, "path", None)
    if isinstance(path, str):
        return _last_line_of_file(path)
    last = deque(lines, maxlen=1)
    return last[0] if last else None


def _final_note(line: bytes | None) -> str | None:
    if line is None:
        return None
    try:
        note = json.loads(line[:-1] if line.endswith(b"\n") else line)["checkpoint"]
    except (ValueError, TypeError, KeyError):
        return None
    return note if isinstance(note, str) else None


def _quorum(note: str, policy: Policy, log: NoteVerifier, line: int, what: str) -> QuorumReport:
    try:
        return check_quorum(note, policy, log)
    except VerificationError as exc:  # check_bundle verified this note: never expected
        raise _Fault(AuditFault(line, FaultKind.BAD_CHECKPOINT_SIGNATURE, f"{what}{exc}")) from exc


_CHANGED = "the bundle's last line is not the final checkpoint it held when it was checked"


class _Fault(Exception):
    def __init__(self, fault: AuditFault) -> None:
        super().__init__(str(fault))
        self.fault = fault


def check_bundle_quorum(
    lines: Iterable[bytes],
    log: NoteVerifier,
    policy: Policy,
    trusted: str | None = None,
    *,
    jobs: int | None = None,
) -> QuorumAuditReport:
    """Verify a bundle as :func:`exchange.audit.check_bundle` does, then require the policy's
    quorum on its final checkpoint and on ``trusted`` (a checkpoint note saved earlier).

    Raises :class:`PolicyError` before reading anything if the policy is for another log
    (see :func:`require_policy_log`); never raises for a bad bundle.
    """
    require_policy_log(policy, log)
    if isinstance(lines, Iterator):  # read once: remember the last line on the way
        tap = _LastLine(lines)
        report = check_bundle(tap, log, trusted, jobs=jobs)
        last = tap.line if report.ok else None
    else:  # passed on as given, so that check_bundle reads a bundle file its own way
        before = _last_line(lines)
        report = check_bundle(lines, log, trusted, jobs=jobs)
        # read before and after: a file that changed meanwhile is not taken for the one checked
        last = _last_line(lines) if report.ok else None
        if last != before:
            last = None
    counts = (report.entries, report.checkpoints)
    if not report.ok:
        return QuorumAuditReport(False, *counts, report.fault)
    # in a bundle that verified, the last line is the final checkpoint, covering every entry
    number = report.entries + report.checkpoints
    note = _final_note(last)
    final = trusted_report = None
    try:
        if note is None:
            raise _Fault(AuditFault(number, FaultKind.BAD_CHECKPOINT, _CHANGED))
        final = _quorum(note, policy, log, number, "")
        if final.checkpoint.size != report.entries:
            raise _Fault(AuditFault(number, FaultKind.BAD_CHECKPOINT, _CHANGED))
        if not final.ok:
            raise _Fault(AuditFault(number, FaultKind.QUORUM_NOT_MET, final.explain()))
        if trusted is not None:
            trusted_report = _quorum(trusted, policy, log, 0, "trusted checkpoint: ")
            if not trusted_report.ok:
                message = f"trusted checkpoint: {trusted_report.explain()}"
                raise _Fault(AuditFault(0, FaultKind.QUORUM_NOT_MET, message))
    except _Fault as exc:
        return QuorumAuditReport(False, *counts, exc.fault, final, trusted_report)
    return QuorumAuditReport(True, *counts, None, final, trusted_report)
