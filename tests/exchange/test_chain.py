"""The catalog chain at the parent: a child's checkpoints are recorded only after a consistency
proof computed from its unsigned hash tiles verifies; a child that shows another history is
recorded as a fork with both signed checkpoints; a child that is down, slow, tampers with its
tiles or signs with another key records nothing and is retried with backoff.

The children here are fakes served through ``httpx.MockTransport`` (a log under the test's
control, honest or hostile); ``test_chain_api.py`` polls real exchanges over loopback.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy.orm import Session

from crypto.encoding import b64_decode, b64url_decode
from crypto.envelope import sign_envelope
from crypto.keys import SigningKey
from crypto.merkle import MerkleTree, leaf_hash, verify_consistency
from crypto.note import Checkpoint, NoteSigner, cosign_checkpoint, sign_checkpoint
from crypto.tiles import TileEdge, parse_tile_path
from exchange.errors import ConflictError, InvalidInputError
from exchange.published import PAYLOAD_TYPE, PUBLISHED_TYPE
from exchange.server.chain import (
    CHAIN_CHECKPOINT,
    CHAIN_FORK,
    CHILD_ADDED,
    ChainPoller,
    add_child,
    list_children,
)
from exchange.server.models import ChainChildRow
from exchange.server.runtime import Exchange
from tests.conftest import settings_for

CHILD = "district-1"
URL = "http://district-1.test"


@dataclass
class FakeChild:
    """A child log under the test's control, served as an exchange serves it."""

    origin: str = "district-1.test/log"
    key: SigningKey = field(default_factory=SigningKey.generate)
    leaves: list[bytes] = field(default_factory=list)
    tag: bytes = b""
    #: the size of the checkpoint served (None: every leaf)
    served: int | None = None
    #: tiles served with one flipped byte
    tamper: bool = False
    #: sign the published catalog with this key instead
    publish_key: SigningKey | None = None
    down: bool = False
    requests: list[str] = field(default_factory=list)

    @property
    def signer(self) -> NoteSigner:
        return NoteSigner(self.origin, self.key)

    def vkey(self) -> str:
        return self.signer.verifier_key()

    def grow(self, to: int) -> FakeChild:
        while len(self.leaves) < to:
            self.leaves.append(leaf_hash(b"%s entry %d" % (self.tag, len(self.leaves))))
        return self

    def fork(self, common: int, tag: bytes = b"fork") -> FakeChild:
        """The same key and origin over a history sharing only the first ``common`` leaves."""
        return FakeChild(self.origin, self.key, list(self.leaves[:common]), tag)

    def size(self) -> int:
        return len(self.leaves) if self.served is None else self.served

    def root(self, size: int | None = None) -> bytes:
        tree = MerkleTree()
        for leaf in self.leaves[: self.size() if size is None else size]:
            tree.append(leaf)
        return tree.root()

    def note(self) -> str:
        return sign_checkpoint(Checkpoint(self.origin, self.size(), self.root()), self.signer)

    def tiles(self) -> dict[tuple[int, int], bytes]:
        edge = TileEdge()
        out: dict[tuple[int, int], bytes] = {}
        for key, data in edge.extend(self.leaves).items():
            out[key] = data
        return out

    def published(self) -> bytes:
        payload = {
            "type": PUBLISHED_TYPE,
            "origin": self.origin,
            "ledger_size": len(self.leaves),
            "registry_version": 3,
            "published_at": "2026-11-25T07:01:02.123Z",
            "zones": [
                {
                    "name": "enterprises",
                    "description": "district enterprises",
                    "owner_name": "District Statistics Office",
                    "status": "active",
                    "datasets": [
                        {
                            "name": "firms",
                            "description": "",
                            "level": "L3",
                            "subject_column": "firm_id",
                            "columns": [
                                {"name": "firm_id", "type": "VARCHAR", "level": "L2"},
                                {"name": "revenue", "type": "BIGINT", "level": "L3"},
                            ],
                            "row_count_band": "1-99",
                            "exact_release": False,
                        }
                    ],
                }
            ],
        }
        key = self.publish_key or self.key
        return sign_envelope(PAYLOAD_TYPE, payload, [key]).model_dump_json().encode()

    def handler(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(path)
        if self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/v1/log/checkpoint":
            return httpx.Response(200, text=self.note())
        if path == "/v1/chain/published":
            return httpx.Response(200, content=self.published())
        if path.startswith("/v1/log/tile/"):
            level, index, width = parse_tile_path(path.removeprefix("/v1/log/"))
            data = self.tiles().get((level or 0, index), b"")
            if level is None or len(data) < 32 * width:
                return httpx.Response(404)
            data = data[: 32 * width]
            if self.tamper:
                data = bytes([data[0] ^ 1]) + data[1:]
            return httpx.Response(200, content=data)
        return httpx.Response(404)


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 25, 7, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def city(data_dir: Path) -> Iterator[Exchange]:
    """A parent exchange whose own poller never runs during a test (the test polls)."""
    ex = Exchange(
        settings_for(data_dir, checkpoint_interval_seconds=0.2, chain_interval_seconds=3600)
    )
    ex.start()
    try:
        yield ex
    finally:
        ex.close()


@dataclass
class Parent:
    exchange: Exchange
    child: FakeChild
    clock: Clock
    poller: ChainPoller

    def switch(self, child: FakeChild) -> None:
        """Another child answers under the same URL (a copy of its directory, say)."""
        self.child = child

    def poll(self, *, ignore_backoff: bool = True) -> str:
        return self.poller.run_once(ignore_backoff=ignore_backoff).get(CHILD, "not polled")

    def entries(self, kind: str) -> list[dict[str, object]]:
        found = []
        for seq in range(self.exchange.ledger.size()):
            entry = json.loads(self.exchange.ledger.entry(seq))
            if entry["kind"] == kind:
                found.append(entry)
        return found

    def row(self) -> ChainChildRow:
        with Session(self.exchange.engine) as session:
            row = session.get(ChainChildRow, CHILD)
            assert row is not None
            session.expunge(row)
            return row


@pytest.fixture
def parent(city: Exchange) -> Iterator[Parent]:
    child = FakeChild().grow(5)
    clock = Clock()
    holder: dict[str, Parent] = {}

    def route(request: httpx.Request) -> httpx.Response:
        return holder["p"].child.handler(request)

    poller = ChainPoller(
        city.engine, city.ledger, city.settings, transport=httpx.MockTransport(route), clock=clock
    )
    add_child(city.engine, city.ledger, city.operator_key_id(), CHILD, URL, child.vkey())
    holder["p"] = Parent(city, child, clock, poller)
    try:
        yield holder["p"]
    finally:
        poller.close()


def test_a_child_is_added_on_the_ledger(parent: Parent) -> None:
    [added] = parent.entries(CHILD_ADDED)
    assert added["refs"] == {"child": CHILD}
    assert added["attrs"] == {"url": URL, "log_key": parent.child.vkey()}
    assert added["actor"] == parent.exchange.operator_key_id()
    [info] = list_children(parent.exchange.engine)
    assert (info.name, info.url, info.checkpoint, info.origin) == (
        CHILD,
        URL,
        None,
        "district-1.test/log",
    )


def test_the_first_checkpoint_is_recorded_with_the_published_catalog(parent: Parent) -> None:
    assert parent.poll() == "recorded"
    [entry] = parent.entries(CHAIN_CHECKPOINT)
    note = parent.child.note()
    envelope = json.loads(parent.child.published())
    payload_digest = hashlib.sha256(b64url_decode(envelope["payload"])).hexdigest()
    assert entry["refs"] == {"child": CHILD}
    assert entry["actor"] == "-"
    assert entry["attrs"] == {"size": 5, "note": note}
    assert entry["digests"] == {"root": parent.child.root().hex(), "published": payload_digest}
    [info] = list_children(parent.exchange.engine)
    assert info.checkpoint is not None
    assert (info.checkpoint.size, info.checkpoint.root, info.checkpoint.note) == (
        5,
        parent.child.root(),
        note,
    )
    assert info.checkpoint.seq == entry["seq"]
    assert info.published == parent.child.published().decode()
    assert info.published_digest == payload_digest
    # nothing new: no entry, and no tile is read
    parent.child.requests.clear()
    assert parent.poll() == "unchanged"
    assert len(parent.entries(CHAIN_CHECKPOINT)) == 1
    assert parent.child.requests == ["/v1/log/checkpoint"]


@pytest.mark.parametrize("sizes", [(5, 300), (1, 2), (256, 257), (300, 70_000)])
def test_growth_is_proven_from_the_childs_tiles(parent: Parent, sizes: tuple[int, int]) -> None:
    first, second = sizes
    parent.child.leaves.clear()
    parent.child.grow(first)
    assert parent.poll() == "recorded"
    parent.child.grow(second)
    parent.child.requests.clear()
    assert parent.poll() == "recorded"
    tiles = [p for p in parent.child.requests if p.startswith("/v1/log/tile/")]
    assert tiles, "the proof was computed from the child's tiles"
    if second > 65_536:  # three tile levels
        assert any(p.startswith("/v1/log/tile/2/") for p in tiles)
    assert len(tiles) <= 6
    recorded = [e["attrs"]["size"] for e in parent.entries(CHAIN_CHECKPOINT)]  # type: ignore[index]
    assert recorded == [first, second]
    assert parent.row().size == second


def test_a_checkpoint_of_the_same_size_with_another_root_is_a_fork(
    parent: Parent, caplog: pytest.LogCaptureFixture
) -> None:
    assert parent.poll() == "recorded"
    recorded_note = parent.child.note()
    parent.switch(parent.child.fork(common=3))
    parent.child.grow(5)
    forked_note = parent.child.note()
    with caplog.at_level(logging.CRITICAL, logger="zonex.chain"):
        assert parent.poll() == "fork"
    assert any(r.levelno == logging.CRITICAL and "FORKED" in r.message for r in caplog.records)
    [fork] = parent.entries(CHAIN_FORK)
    assert fork["refs"] == {"child": CHILD}
    assert fork["attrs"] == {
        "reason": "same_size",
        "recorded_size": 5,
        "recorded_note": recorded_note,
        "size": 5,
        "note": forked_note,
    }
    row = parent.row()
    # not accepted: the recorded state is the first history's
    assert (row.size, row.note) == (5, recorded_note)
    assert (row.fork_size, row.fork_note, row.fork_seq) == (5, forked_note, fork["seq"])
    assert row.failures == 1 and row.last_error and "fork" in row.last_error
    # seen again: no second entry, but backoff grows
    assert parent.poll() == "fork"
    assert len(parent.entries(CHAIN_FORK)) == 1
    assert parent.row().failures == 2


def test_a_history_that_does_not_extend_the_recorded_one_is_a_fork_with_its_proof(
    parent: Parent,
) -> None:
    parent.child.grow(300)
    assert parent.poll() == "recorded"
    recorded = parent.child
    parent.switch(recorded.fork(common=290))
    parent.child.grow(700)
    assert parent.poll() == "fork"
    [fork] = parent.entries(CHAIN_FORK)
    attrs, digests = fork["attrs"], fork["digests"]
    assert isinstance(attrs, dict) and isinstance(digests, dict)
    assert attrs["reason"] == "inconsistent"
    assert (attrs["recorded_size"], attrs["size"]) == (300, 700)
    assert digests["recorded_root"] == recorded.root().hex()
    assert digests["root"] == parent.child.root().hex()
    # the entry proves the fork by itself: the new tree's root at 300 is bound to its signed
    # root by the proof, and it is not the recorded root
    prefix = bytes.fromhex(digests["prefix_root"])
    proof = [b64_decode(h) for h in attrs["proof"].split(",")]
    verify_consistency(300, 700, prefix, parent.child.root(), proof)
    assert prefix == parent.child.root(300) != recorded.root()
    assert parent.row().size == 300


def test_tiles_that_do_not_match_the_childs_own_root_prove_nothing(parent: Parent) -> None:
    parent.child.grow(40)
    assert parent.poll() == "recorded"
    parent.child.grow(600)
    parent.child.tamper = True
    assert parent.poll() == "failed"
    assert parent.entries(CHAIN_FORK) == []
    row = parent.row()
    assert row.size == 40 and row.last_error is not None
    assert "tiles do not match its own checkpoint" in row.last_error
    parent.child.tamper = False
    assert parent.poll() == "recorded"
    assert parent.row().size == 600 and parent.row().failures == 0


@pytest.mark.parametrize(
    ("hostile", "error"),
    [
        ("other_key", "does not verify with its log key"),
        ("other_origin", "does not verify with its log key"),
        ("shrunk", "below the size 9 recorded"),
        ("huge", "exceeds"),
        ("missing_tile", "answered 404"),
        ("too_large", "beyond what a ledger entry records"),
    ],
)
def test_a_hostile_or_broken_child_records_nothing(
    parent: Parent, hostile: str, error: str
) -> None:
    parent.child.grow(9)
    assert parent.poll() == "recorded"
    before = parent.exchange.ledger.size()
    child = parent.child
    if hostile == "other_key":
        child.key = SigningKey.generate()
        child.grow(12)
    elif hostile == "other_origin":
        child.origin = "elsewhere.test/log"
        child.grow(12)
    elif hostile == "shrunk":
        child.served = 7
    elif hostile == "too_large":  # a size no ledger entry can hold (JSON integers: 2**53 - 1)
        child.served = 1 << 60
    elif hostile == "huge":
        note = child.note()
        child.handler = lambda request: httpx.Response(  # type: ignore[method-assign]
            200, text=note + "x" * 70_000
        )
    else:
        child.grow(12)
        tiles = child.tiles

        def without_level0() -> dict[tuple[int, int], bytes]:
            return {k: v for k, v in tiles().items() if k[0] != 0}

        child.tiles = without_level0  # type: ignore[method-assign]
    assert parent.poll() == "failed"
    assert parent.exchange.ledger.size() == before
    row = parent.row()
    assert row.size == 9 and row.last_error is not None and error in row.last_error, row.last_error


def test_an_unreachable_child_is_retried_with_backoff(parent: Parent) -> None:
    parent.child.down = True
    waits = []
    for failures in range(1, 5):
        assert parent.poll(ignore_backoff=False) == "failed"
        row = parent.row()
        assert row.failures == failures and row.retry_at is not None
        waits.append((row.retry_at - parent.clock.now).total_seconds())
        # before the retry time it is not polled at all
        parent.clock.now += timedelta(seconds=waits[-1] / 2)
        assert parent.poll(ignore_backoff=False) == "not polled"
        parent.clock.now = row.retry_at
    assert waits == [1, 2, 4, 8]
    assert "connection refused" in (parent.row().last_error or "")
    parent.child.down = False
    assert parent.poll(ignore_backoff=False) == "recorded"
    row = parent.row()
    assert (row.failures, row.last_error, row.retry_at) == (0, None, None)


def test_a_catalog_signed_by_another_key_is_not_kept(parent: Parent) -> None:
    parent.child.publish_key = SigningKey.generate()
    assert parent.poll() == "recorded"
    [entry] = parent.entries(CHAIN_CHECKPOINT)
    assert set(entry["digests"]) == {"root"}  # type: ignore[arg-type]
    assert parent.row().published is None
    # once it publishes a good one, it is kept (no entry: it goes with the next checkpoint)
    parent.child.publish_key = None
    assert parent.poll() == "unchanged"
    assert parent.row().published == parent.child.published().decode()
    assert len(parent.entries(CHAIN_CHECKPOINT)) == 1


def test_a_cosigned_note_is_recorded_as_served(parent: Parent) -> None:
    witness = NoteSigner("witness.test/w", SigningKey.generate())
    plain = parent.child.note
    parent.child.note = lambda: cosign_checkpoint(plain(), witness, 1_800_000_000)  # type: ignore[method-assign]
    assert parent.poll() == "recorded"
    [entry] = parent.entries(CHAIN_CHECKPOINT)
    note = entry["attrs"]["note"]  # type: ignore[index]
    assert note.count("\n— ") == 2 and "witness.test/w" in note


def test_a_leased_child_is_left_to_the_process_that_holds_it(parent: Parent) -> None:
    other = ChainPoller(
        parent.exchange.engine,
        parent.exchange.ledger,
        parent.exchange.settings,
        transport=httpx.MockTransport(parent.child.handler),
        clock=parent.clock,
    )
    assert other.claim(ChainChildRow, CHILD, 60)  # another worker is polling it
    assert parent.poll() == "not polled"
    parent.clock.now += timedelta(minutes=5)  # its lease ran out
    assert parent.poll() == "recorded"
    other.close()


@pytest.mark.parametrize(
    ("name", "url", "key", "error"),
    [
        ("District 1", URL, None, "--name"),
        (CHILD + "-x", "ftp://d1.test", None, "--url"),
        (CHILD + "-x", URL + "?a=1", None, "--url"),
        (CHILD + "-x", URL, "nonsense", "not a log verifier key"),
        (CHILD + "-x", URL, "witness", "cosignature key"),
        (CHILD + "-x", URL, "own", "own log key"),
    ],
)
def test_add_child_refuses_what_cannot_be_a_child(
    parent: Parent, name: str, url: str, key: str | None, error: str
) -> None:
    ex = parent.exchange
    vkey = FakeChild().vkey() if key is None else key
    if key == "witness":
        vkey = NoteSigner("w.test/w", SigningKey.generate()).cosignature_verifier_key()
    own = ex.log_signer.verifier() if ex.log_signer is not None else None
    if key == "own":
        assert own is not None
        vkey = own.to_verifier_key()
    with pytest.raises(InvalidInputError, match=error):
        add_child(ex.engine, ex.ledger, ex.operator_key_id(), name, url, vkey, own_log=own)


def test_add_child_refuses_a_name_or_key_recorded_already(parent: Parent) -> None:
    ex = parent.exchange
    actor = ex.operator_key_id()
    with pytest.raises(ConflictError):
        add_child(ex.engine, ex.ledger, actor, CHILD, URL, FakeChild().vkey())
    with pytest.raises(ConflictError):
        add_child(ex.engine, ex.ledger, actor, "district-2", URL, parent.child.vkey())
    assert len(parent.entries(CHILD_ADDED)) == 1
