"""What a witness answers to an add-checkpoint request, decided from its stored state alone.

:func:`decide` is pure: given the request, the keys the witness trusts for the checkpoint's
origin and the state it stored for that log, it returns either the new state to store or a
typed refusal. Reading and writing the state (atomically, compare-and-swap) is the store's
job, cosigning the service's. The checks and their order follow c2sp.org/tlog-witness,
section "add-checkpoint".
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from crypto.errors import VerificationError
from crypto.merkle import EMPTY_ROOT, verify_consistency
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint
from exchange.server.witness.protocol import AddCheckpointRequest

__all__ = ["Accepted", "LogState", "Refusal", "RefusalKind", "decide"]


@dataclass(frozen=True)
class LogState:
    """The latest checkpoint a witness cosigned for one log: its size and root hash."""

    size: int
    root: bytes


class RefusalKind(enum.Enum):
    """Why a witness refuses a checkpoint; the value is the HTTP status the spec prescribes."""

    #: the body is not an add-checkpoint request, or the old size exceeds the checkpoint's
    BAD_REQUEST = 400
    #: no signature from a trusted key for the origin, or one that does not verify
    BAD_SIGNATURE = 403
    #: the witness trusts no key for the checkpoint's origin
    UNKNOWN_LOG = 404
    #: the old size is not the size the witness last cosigned for the log
    OLD_SIZE_MISMATCH = 409
    #: not consistent with what the witness cosigned: a bad or wrong proof, different roots
    #: at the same size, a non-empty tree of size 0 (possible evidence of a fork)
    INCONSISTENT = 422

    @property
    def status(self) -> int:
        return self.value


@dataclass(frozen=True)
class Refusal:
    """A refused add-checkpoint request.

    ``stored_size`` is the size the witness last cosigned (for 409, the body of the answer).
    ``checkpoint`` is set once the log's signature verified: a refused checkpoint that the
    log did sign may be proof of misbehaviour, worth keeping.
    """

    kind: RefusalKind
    detail: str
    stored_size: int | None = None
    checkpoint: Checkpoint | None = None


@dataclass(frozen=True)
class Accepted:
    """The checkpoint is signed by the log and consistent: store ``state``, then cosign."""

    checkpoint: Checkpoint
    state: LogState


def _verify_log_signature(note: str, trusted: Sequence[NoteVerifier]) -> Checkpoint | Refusal:
    """The checkpoint, if a trusted key signed it and no trusted key's signature fails."""
    checkpoint: Checkpoint | None = None
    for verifier in trusted:
        try:
            checkpoint = verify_checkpoint(note, verifier)
        except VerificationError as exc:
            message = str(exc)
            if message.startswith(("no signature from key", "origin mismatch")):
                continue  # a trusted key that did not sign this note, or not for this log
            if message.startswith("malformed note"):
                return Refusal(RefusalKind.BAD_REQUEST, "the checkpoint note is malformed")
            # a line naming a trusted key whose signature fails makes the note malformed
            # per signed-note: 403, not 400 (tlog-witness)
            return Refusal(RefusalKind.BAD_SIGNATURE, "a log signature does not verify")
    if checkpoint is None:
        return Refusal(RefusalKind.BAD_SIGNATURE, "no signature from a key trusted for the log")
    return checkpoint


def decide(
    request: AddCheckpointRequest,
    trusted: Sequence[NoteVerifier],
    stored: LogState | None,
) -> Accepted | Refusal:
    """Decide an add-checkpoint request (c2sp.org/tlog-witness, "add-checkpoint").

    ``trusted`` are the log keys the witness trusts for the checkpoint's origin (empty: an
    unknown log); ``stored`` is the latest checkpoint it cosigned for that log, ``None`` if
    none. In the spec's order:

    1. unknown origin: 404; no trusted signature, or a failing one: 403;
    2. old size above the checkpoint size: 400;
    3. old size not the stored size (0 if none): 409 with the stored size;
    4. a checkpoint of size 0 whose root is not the empty tree's: 422;
    5. old size 0 with a non-empty proof: 422;
    6. same size as stored but another root, or a consistency proof (RFC 6962 section 2.1.2)
       from the stored root that does not verify: 422.

    The new state is never smaller than the stored one: with the old size equal to the
    stored size and at most the checkpoint size, a witness cannot be rolled back.
    """
    if not trusted:
        return Refusal(RefusalKind.UNKNOWN_LOG, "this witness does not know the log")
    checked = _verify_log_signature(request.note, trusted)
    if isinstance(checked, Refusal):
        return checked
    checkpoint = checked
    stored_size = 0 if stored is None else stored.size
    if request.old_size > checkpoint.size:
        return Refusal(
            RefusalKind.BAD_REQUEST,
            f"the old size {request.old_size} exceeds the checkpoint size {checkpoint.size}",
            checkpoint=checkpoint,
        )
    if request.old_size != stored_size:
        return Refusal(
            RefusalKind.OLD_SIZE_MISMATCH,
            f"the latest cosigned checkpoint has size {stored_size}",
            stored_size=stored_size,
            checkpoint=checkpoint,
        )

    def inconsistent(detail: str) -> Refusal:
        return Refusal(
            RefusalKind.INCONSISTENT, detail, stored_size=stored_size, checkpoint=checkpoint
        )

    if checkpoint.size == 0 and checkpoint.root != EMPTY_ROOT:
        return inconsistent("a checkpoint of size 0 must have the empty tree's root")
    if request.old_size == 0 and request.proof:
        return inconsistent("from size 0 the consistency proof must be empty")
    if stored is None:
        # old size 0 and nothing stored: the empty tree is consistent with any tree
        return Accepted(checkpoint, LogState(checkpoint.size, checkpoint.root))
    if checkpoint.size == stored.size and checkpoint.root != stored.root:
        return inconsistent("same size as the latest cosigned checkpoint but another root")
    try:
        verify_consistency(
            stored.size, checkpoint.size, stored.root, checkpoint.root, request.proof
        )
    except VerificationError as exc:
        return inconsistent(f"the consistency proof does not verify: {exc}")
    return Accepted(checkpoint, LogState(checkpoint.size, checkpoint.root))
