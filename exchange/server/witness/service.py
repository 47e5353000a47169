"""The witness: decide an add-checkpoint request against the stored state, store the new state
with compare-and-swap, and cosign (c2sp.org/tlog-witness, c2sp.org/tlog-cosignature).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from crypto.errors import VerificationError
from crypto.note import NoteSigner, checkpoint_origin, cosign_checkpoint, keep_signatures
from exchange.server.witness.decision import Refusal, RefusalKind, decide
from exchange.server.witness.protocol import AddCheckpointRequest
from exchange.server.witness.settings import WitnessSettings
from exchange.server.witness.store import StoredHead, WitnessStore

__all__ = ["Cosigned", "Witness"]

log = logging.getLogger("zonex.witness")


@dataclass(frozen=True)
class Cosigned:
    """An accepted checkpoint: the witness's cosignature line(s) (each without its newline),
    the body of the 200 answer, and the note stored for monitors."""

    lines: tuple[str, ...]
    note: str
    size: int


class Witness:
    """One witness key over one state store. Thread-safe: every state change is a
    compare-and-swap in the store, so several threads or processes may serve one store."""

    def __init__(
        self,
        signer: NoteSigner,
        store: WitnessStore,
        settings: WitnessSettings,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.signer = signer
        self.store = store
        self.settings = settings
        self._clock = clock

    def _now(self) -> int:
        # tlog-witness: "the timestamp MUST NOT be zero"
        return max(1, int(self._clock()))

    def add_checkpoint(self, request: AddCheckpointRequest) -> Cosigned | Refusal:
        """Answer one add-checkpoint request (tlog-witness, "add-checkpoint").

        The decision is taken on the state read from the store, and the new state is stored
        only if that state is still there (compare-and-swap); a request that lost a race to
        another is decided again on the state that won, which then usually refuses it (409).
        The new checkpoint is durable before the cosignature is returned.
        """
        try:
            origin = checkpoint_origin(request.note)
        except VerificationError:
            return Refusal(RefusalKind.BAD_REQUEST, "the checkpoint note is malformed")
        trusted = self.store.trusted(origin)
        head: StoredHead | None = None
        for _ in range(self.settings.swap_attempts):
            head = self.store.head(origin)
            stored = None if head is None else head.state
            outcome = decide(request, trusted, stored)
            if isinstance(outcome, Refusal):
                self._refused(origin, request, outcome)
                return outcome
            now = self._now()
            # stored for monitors: the log's verified signature(s) and this cosignature only
            base = keep_signatures(request.note, trusted)
            note = cosign_checkpoint(base, self.signer, now)
            if self.store.swap(origin, stored, outcome.state, note, now):
                log.info(
                    "cosigned %s size %d (old size %d)",
                    origin,
                    outcome.state.size,
                    request.old_size,
                )
                return Cosigned((note[len(base) : -1],), note, outcome.state.size)
        size = 0 if head is None else head.state.size
        return Refusal(
            RefusalKind.OLD_SIZE_MISMATCH,
            "the log's state kept changing; retry with the latest size",
            stored_size=size,
        )

    def _refused(self, origin: str, request: AddCheckpointRequest, refusal: Refusal) -> None:
        if refusal.kind is RefusalKind.INCONSISTENT and refusal.checkpoint is not None:
            # signed by the log yet inconsistent with what was cosigned: keep it (tlog-witness:
            # "it might be proof of log misbehavior")
            log.warning(
                "refused a signed checkpoint of %s size %d: %s",
                origin,
                refusal.checkpoint.size,
                refusal.detail,
            )
            self.store.record_evidence(
                origin,
                request.old_size,
                request.proof,
                request.note,
                refusal.detail,
                self._now(),
                self.settings.max_evidence_per_log,
            )
        else:
            log.info("refused a checkpoint of %s: %s", origin, refusal.detail)

    def checkpoint(self, origin_hash: str) -> str | None:
        """The latest cosigned note of the log whose origin hashes to ``origin_hash``
        (tlog-witness, "Monitor Retrieval Mechanism"); ``None`` if there is none."""
        head = self.store.head_by_hash(origin_hash)
        return None if head is None else head.note
