"""The c2sp.org/tlog-witness wire format: the ``add-checkpoint`` request body, the 409 size body
and the cosignature response, as bytes in and typed values out. No I/O.

Request body ("add-checkpoint")::

    old <size>\\n
    <base64 hash>\\n          zero to 63 consistency proof lines
    \\n
    <checkpoint note>        text, blank line, signature lines

A 409 answer is ``<size>\\n`` with ``Content-Type: text/x.tlog.size``; a 200 answer is one or
more note signature lines (``— <name> <base64>\\n``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass

from crypto.encoding import b64_decode, b64_encode
from crypto.errors import EncodingError
from crypto.note import MAX_TREE_SIZE, SIGNATURE_PREFIX

__all__ = [
    "ADD_CHECKPOINT_PATH",
    "MAX_PROOF_LINES",
    "SIZE_MEDIA_TYPE",
    "AddCheckpointRequest",
    "ProtocolError",
    "format_add_checkpoint",
    "format_size",
    "origin_hash",
    "parse_add_checkpoint",
    "parse_cosignature_lines",
    "parse_size",
]

#: the submission path under a witness's submission prefix
ADD_CHECKPOINT_PATH = "/add-checkpoint"
#: "The client MUST NOT send more than 63 consistency proof lines."
MAX_PROOF_LINES = 63
#: the media type of a 409 answer's body
SIZE_MEDIA_TYPE = "text/x.tlog.size"

_DECIMAL = re.compile(rb"0|[1-9][0-9]*")


class ProtocolError(ValueError):
    """A body that does not follow the tlog-witness format (a request: 400 Bad Request)."""


@dataclass(frozen=True)
class AddCheckpointRequest:
    """A parsed add-checkpoint body. ``note`` is the submitted checkpoint, not yet verified."""

    old_size: int
    proof: tuple[bytes, ...]
    note: str


def _size(text: bytes, what: str) -> int:
    """A tree size: ASCII decimal with no leading zeroes, at most 2^64 - 1."""
    if not _DECIMAL.fullmatch(text) or len(text) > 20 or int(text) > MAX_TREE_SIZE:
        raise ProtocolError(f"{what} is not a decimal tree size without leading zeroes")
    return int(text)


def parse_add_checkpoint(body: bytes) -> AddCheckpointRequest:
    """Parse an add-checkpoint body strictly (tlog-witness, "add-checkpoint").

    Checks the syntax only: the old size line, at most 63 proof lines of base64 32-byte
    hashes, the empty line, then a note that is UTF-8. The note itself is checked by
    :func:`exchange.server.witness.decision.decide`.
    """
    head, sep, rest = body.partition(b"\n")
    if not sep or not head.startswith(b"old "):
        raise ProtocolError("the body must start with the line 'old <size>'")
    old_size = _size(head[4:], "the old size")
    proof: list[bytes] = []
    while True:
        line, sep, after = rest.partition(b"\n")
        if not sep:
            raise ProtocolError("no empty line between the proof and the checkpoint")
        rest = after
        if line == b"":
            break
        if len(proof) == MAX_PROOF_LINES:
            raise ProtocolError(f"more than {MAX_PROOF_LINES} consistency proof lines")
        try:
            digest = b64_decode(line.decode("ascii"))
        except (UnicodeDecodeError, EncodingError):
            raise ProtocolError("a proof line is not standard base64") from None
        if len(digest) != 32:
            raise ProtocolError("a proof line does not hold one 32-byte hash")
        proof.append(digest)
    try:
        note = rest.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("the checkpoint is not UTF-8") from None
    if not note:
        raise ProtocolError("no checkpoint after the empty line")
    return AddCheckpointRequest(old_size, tuple(proof), note)


def format_add_checkpoint(old_size: int, proof: Sequence[bytes], note: str) -> bytes:
    """The add-checkpoint body for ``note`` with a consistency proof from ``old_size``."""
    if isinstance(old_size, bool) or not 0 <= old_size <= MAX_TREE_SIZE:
        raise ValueError("the old size is an integer in 0..2**64-1")
    if len(proof) > MAX_PROOF_LINES:
        raise ValueError(f"a consistency proof has at most {MAX_PROOF_LINES} hashes")
    lines = [f"old {old_size}", *(b64_encode(h) for h in proof), ""]
    return ("".join(line + "\n" for line in lines) + note).encode("utf-8")


def format_size(size: int) -> bytes:
    """The body of a 409 answer: the stored size in decimal and a newline."""
    return b"%d\n" % size


def parse_size(body: bytes) -> int:
    """The size in a 409 answer's body."""
    if not body.endswith(b"\n"):
        raise ProtocolError("a size body ends in a newline")
    return _size(body[:-1], "the size")


def parse_cosignature_lines(body: bytes) -> tuple[str, ...]:
    """The signature lines of a 200 answer (each without its newline): one or more lines,
    each starting with an em dash and a space and ending in a newline. Their keys and
    signatures are checked by whoever appends them to the checkpoint."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("the cosignature answer is not UTF-8") from None
    if not text.endswith("\n"):
        raise ProtocolError("the cosignature answer does not end in a newline")
    lines = tuple(text[:-1].split("\n"))
    if any(not line.startswith(SIGNATURE_PREFIX) for line in lines):
        raise ProtocolError("the cosignature answer holds a line that is not a signature")
    return lines


def origin_hash(origin: str) -> str:
    """Lowercase hex SHA-256 of a log's origin: the path segment of the monitoring
    ``GET <prefix>/<origin hash>/checkpoint``."""
    return hashlib.sha256(origin.encode("utf-8")).hexdigest()
