"""A log's side of c2sp.org/tlog-witness: submit a checkpoint, get the cosignature lines.

The lines returned are not verified here: append them to the checkpoint and check them with
the witness's key (:func:`crypto.note.check_cosignatures`) before keeping them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import httpx

from exchange.server.witness.protocol import (
    ADD_CHECKPOINT_PATH,
    ProtocolError,
    format_add_checkpoint,
    parse_cosignature_lines,
    parse_size,
)

__all__ = [
    "ProofSource",
    "WitnessConflictError",
    "WitnessError",
    "WitnessRefusedError",
    "WitnessUnreachableError",
    "submit_checkpoint",
]

#: the consistency proof from a given old size to the submitted checkpoint's size
ProofSource = Callable[[int], Sequence[bytes]]

#: refusal text kept from an answer (one line in the exchange's log)
_DETAIL_CHARS = 200


class WitnessError(Exception):
    """A submission that produced no cosignature."""


class WitnessUnreachableError(WitnessError):
    """No HTTP answer: connection refused, timeout, ..."""


class WitnessRefusedError(WitnessError):
    """The witness answered with an error status (400, 403, 404, 422, ...) or an answer
    that is not in the protocol's format."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"witness answered {status}: {detail}")
        self.status = status
        self.detail = detail


class WitnessConflictError(WitnessError):
    """The witness's latest cosigned size is not the old size sent, even after one retry
    from the size it reported (409), or is beyond the submitted checkpoint."""

    def __init__(self, size: int) -> None:
        super().__init__(f"the witness's latest cosigned checkpoint has size {size}")
        self.size = size


def _checkpoint_size(note: str) -> int:
    """The size line of the (own, to be submitted) checkpoint note."""
    lines = note.split("\n", 2)
    if len(lines) < 3 or not lines[1].isascii() or not lines[1].isdigit():
        raise ValueError("not a checkpoint note")
    return int(lines[1])


def submit_checkpoint(
    url: str,
    note: str,
    old_size: int,
    proof: ProofSource,
    *,
    client: httpx.Client | None = None,
    timeout: float = 10.0,
) -> tuple[str, ...]:
    """POST ``note`` to the witness at ``url`` (its submission prefix) with a consistency
    proof from ``old_size``; return the cosignature lines of its 200 answer, each without
    its newline (tlog-witness, "add-checkpoint").

    ``proof(n)`` gives the consistency proof from size ``n`` to the note's size; it is not
    called for size 0, whose proof is empty. On 409 the request is sent once more from the
    size the witness reports (with a fresh proof): how a log that lost track of a witness's
    state, or never knew it, catches up.

    Raises :class:`WitnessConflictError` (409 twice, or a reported size beyond the note's),
    :class:`WitnessRefusedError` (any other refusal or a malformed answer) and
    :class:`WitnessUnreachableError` (no answer).
    """
    endpoint = url.rstrip("/") + ADD_CHECKPOINT_PATH
    size = _checkpoint_size(note)
    http = client if client is not None else httpx.Client(timeout=timeout)
    try:
        for attempt in range(2):
            hashes = proof(old_size) if old_size else ()
            body = format_add_checkpoint(old_size, hashes, note)
            try:
                response = http.post(endpoint, content=body)
            except httpx.HTTPError as exc:
                raise WitnessUnreachableError(f"{endpoint}: {exc or type(exc).__name__}") from exc
            if response.status_code == 200:
                try:
                    return parse_cosignature_lines(response.content)
                except ProtocolError as exc:
                    raise WitnessRefusedError(200, str(exc)) from exc
            if response.status_code == 409:
                try:
                    reported = parse_size(response.content)
                except ProtocolError as exc:
                    raise WitnessRefusedError(409, str(exc)) from exc
                if attempt == 0 and reported != old_size and reported <= size:
                    old_size = reported
                    continue
                raise WitnessConflictError(reported)
            detail = response.text.strip().split("\n", 1)[0][:_DETAIL_CHARS]
            raise WitnessRefusedError(response.status_code, detail)
        raise AssertionError("unreachable")  # pragma: no cover
    finally:
        if client is None:
            http.close()
