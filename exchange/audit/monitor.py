"""The monitor's follow loop: read the log over the signed API, verify it, detect, respond.

Each round reads the latest checkpoint (``GET /v1/log/checkpoint``) and checks its signature
with the log's key, then reads the entries it has not seen through entry bundles
(``GET /v1/log/tile/entries/<N>[.p/<W>]``) and hashes them onto the compact range of every
entry it verified before: the resulting root must be the checkpoint's. Only then are the
entries fed to the detectors (:mod:`exchange.audit.detectors`); a checkpoint that is smaller
than the last one, or a root the entries do not reproduce, stops the monitor with
:class:`LogVerificationError` before it acts on anything.

Starting at ``from_seq`` > 0, the compact range of the entries before it is built from the
log's hash tiles, which the checkpoint's root then vouches for the same way.

Each finding is answered as the configuration says (``alert``, ``throttle``, ``suspend``;
:meth:`~exchange.audit.detectors.MonitorConfig.response_for`) by opening an incident at the
exchange; an incident the exchange already holds for the same evidence (409) is not an error.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from crypto.errors import VerificationError
from crypto.merkle import EMPTY_ROOT, leaf_hash
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint
from crypto.tiles import TILE_WIDTH, TiledTree, needed_width
from exchange.audit.detectors import Detectors, Finding, MonitorConfig
from exchange.client.sdk import ApiError, Client

__all__ = ["LogFollower", "LogVerificationError", "Monitor", "Response", "RoundReport"]


class LogVerificationError(ValueError):
    """The log served something its signed checkpoint does not vouch for."""


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


class _Frontier:
    """The roots of the perfect subtrees covering the first ``size`` leaves, left to right."""

    def __init__(self, size: int = 0, stack: list[bytes] | None = None) -> None:
        self.size = size
        self.stack = list(stack or [])

    def copy(self) -> _Frontier:
        return _Frontier(self.size, self.stack)

    def append(self, leaf: bytes) -> None:
        n = self.size
        while n & 1:
            leaf = _node(self.stack.pop(), leaf)
            n >>= 1
        self.stack.append(leaf)
        self.size += 1

    def root(self) -> bytes:
        if not self.stack:
            return EMPTY_ROOT
        root = self.stack[-1]
        for left in reversed(self.stack[:-1]):
            root = _node(left, root)
        return root


class LogFollower:
    """Reads new entries of one exchange's log, each verified against a signed checkpoint."""

    def __init__(self, client: Client, verifier: NoteVerifier, from_seq: int = 0) -> None:
        self.client = client
        self.verifier = verifier
        self.from_seq = from_seq
        self._frontier: _Frontier | None = None
        self.checkpoint: Checkpoint | None = None

    def _checkpoint(self) -> Checkpoint:
        note = self.client.checkpoint()["note"]
        try:
            return verify_checkpoint(note, self.verifier)
        except VerificationError as exc:
            raise LogVerificationError(f"the checkpoint does not verify: {exc}") from exc

    def _start(self, size: int) -> _Frontier:
        """The frontier at ``from_seq`` from the log's hash tiles (a tree of ``size``)."""
        start = min(self.from_seq, size)
        if start == 0:
            return _Frontier()

        def fetch(level: int, index: int, width: int) -> bytes:
            have = needed_width(size, level, index)
            return self.client.tile(level, index, None if have == TILE_WIDTH else have)

        tree = TiledTree(size, fetch)
        frontier = _Frontier()
        at = 0
        for height in range(start.bit_length() - 1, -1, -1):
            if start >> height & 1:
                frontier.stack.append(tree.perfect(height, at >> height))
                at += 1 << height
        frontier.size = start
        return frontier

    def poll(self) -> list[tuple[int, bytes]]:
        """The entries appended since the last poll, verified; ``[]`` if none."""
        checkpoint = self._checkpoint()
        previous = self.checkpoint
        if previous is not None and checkpoint.size < previous.size:
            raise LogVerificationError(
                f"the log shrank from {previous.size} to {checkpoint.size} entries"
            )
        if self._frontier is None:
            self._frontier = self._start(checkpoint.size)
        frontier = self._frontier.copy()
        entries: list[tuple[int, bytes]] = []
        seq = frontier.size
        while seq < checkpoint.size:
            index = seq // TILE_WIDTH
            width = needed_width(checkpoint.size, 0, index)
            bundle = self.client.entry_bundle(index, None if width == TILE_WIDTH else width)
            if len(bundle) != width:
                raise LogVerificationError(f"entry bundle {index} holds {len(bundle)} entries")
            for offset in range(seq - index * TILE_WIDTH, width):
                body = bundle[offset]
                frontier.append(leaf_hash(body))
                entries.append((index * TILE_WIDTH + offset, body))
            seq = (index + 1) * TILE_WIDTH
        if frontier.root() != checkpoint.root:
            raise LogVerificationError(
                f"the entries up to {checkpoint.size} do not hash to the checkpoint's root"
            )
        self._frontier, self.checkpoint = frontier, checkpoint
        return entries


@dataclass(frozen=True)
class Response:
    """A finding and what became of it: the incident opened (or already held)."""

    finding: Finding
    response: str
    incident: str | None
    #: opened | existing | refused (the exchange's problem code follows a colon)
    outcome: str


@dataclass
class RoundReport:
    entries: int = 0
    size: int = 0
    responses: list[Response] = field(default_factory=list)


class Monitor:
    """The detectors over a :class:`LogFollower`, answering findings through ``client``."""

    def __init__(
        self,
        client: Client,
        verifier: NoteVerifier,
        config: MonitorConfig | None = None,
        *,
        from_seq: int = 0,
    ) -> None:
        self.client = client
        self.config = config or MonitorConfig()
        self.follower = LogFollower(client, verifier, from_seq)
        self.detectors = Detectors(self.config)

    def round(self, on_response: Callable[[Response], None] | None = None) -> RoundReport:
        entries = self.follower.poll()
        checkpoint = self.follower.checkpoint
        report = RoundReport(len(entries), checkpoint.size if checkpoint is not None else 0)
        for seq, body in entries:
            for finding in self.detectors.feed(seq, body):
                response = self.respond(finding)
                report.responses.append(response)
                if on_response is not None:
                    on_response(response)
        return report

    def respond(self, finding: Finding) -> Response:
        response = self.config.response_for(finding)
        try:
            opened = self.client.open_incident(
                finding.detector,
                finding.severity,
                response,
                finding.first_seq,
                finding.last_seq,
                principal=finding.principal,
                zone=finding.zone,
                throttle_seconds=self.config.throttle_seconds if response == "throttle" else None,
            )
        except ApiError as exc:
            if exc.status == 409 and isinstance(exc.body, dict) and exc.body.get("incident"):
                return Response(finding, response, str(exc.body["incident"]), "existing")
            return Response(finding, response, None, f"refused:{exc.code}")
        return Response(finding, response, str(opened["id"]), "opened")
