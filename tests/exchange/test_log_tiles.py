"""The C2SP tlog-tiles read API, checked by a client written here from the specs alone.

The client below uses only ``hashlib``, ``base64`` and ``httpx``: it parses the checkpoint note
itself, fetches hash tiles by their C2SP paths and computes RFC 9162 roots and inclusion proofs
from them, without the ledger's code (``crypto.tiles``, ``crypto.merkle``). Only the signature
check borrows ``crypto.note`` (the note format is tested on its own against the C2SP vectors).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from crypto.keys import SigningKey
from crypto.note import verify_checkpoint
from exchange.client.sdk import ApiError
from exchange.server.ledger import EntryDraft
from exchange.server.models import LedgerTileRow
from exchange.server.runtime import Exchange
from tests.conftest import LiveServer, serving, settings_for


def _sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _path(level: int | str, index: int, width: int) -> str:
    """c2sp.org/tlog-tiles: the index in 3-digit elements, all but the last prefixed "x"."""
    digits = f"{index:03d}"
    digits = "0" * (-len(digits) % 3) + digits
    elements = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    encoded = "/".join([*("x" + e for e in elements[:-1]), elements[-1]])
    return f"tile/{level}/{encoded}" + ("" if width == 256 else f".p/{width}")


class TileClient:
    """Reads a log of ``size`` leaves through its tiles, as a monitor would."""

    def __init__(self, base: str, size: int) -> None:
        self.base, self.size = base, size
        self.fetched: list[str] = []

    def _tile(self, level: int, index: int) -> bytes:
        # the width this tile has in a tree of self.size leaves
        hashes_at_level = self.size >> (8 * level)
        width = min(256, hashes_at_level - 256 * index)
        path = _path(level, index, width)
        self.fetched.append(path)
        response = httpx.get(f"{self.base}/v1/log/{path}")
        assert response.status_code == 200, (path, response.text)
        assert len(response.content) == 32 * width
        return response.content

    def hash_at(self, height: int, index: int) -> bytes:
        """The perfect subtree of height ``height`` number ``index`` (leaves [i·2^h, (i+1)·2^h))."""
        level, rest = divmod(height, 8)
        first = index << rest
        tile = self._tile(level, first // 256)
        offset = first % 256
        row = [tile[32 * (offset + i) : 32 * (offset + i + 1)] for i in range(1 << rest)]
        while len(row) > 1:
            row = [_sha(b"\x01" + row[i] + row[i + 1]) for i in range(0, len(row), 2)]
        return row[0]

    def mth(self, lo: int, hi: int) -> bytes:
        """RFC 9162 MTH(D[lo:hi]) by its recursive definition over perfect subtrees."""
        n = hi - lo
        if n & (n - 1) == 0 and lo % n == 0:
            return self.hash_at(n.bit_length() - 1, lo // n)
        k = 1 << ((n - 1).bit_length() - 1)
        return _sha(b"\x01" + self.mth(lo, lo + k) + self.mth(lo + k, hi))

    def path(self, m: int, lo: int, hi: int) -> list[bytes]:
        """RFC 9162 section 2.1.3.1 PATH(m, D[lo:hi])."""
        n = hi - lo
        if n == 1:
            return []
        k = 1 << ((n - 1).bit_length() - 1)
        if m < k:
            return [*self.path(m, lo, lo + k), self.mth(lo + k, hi)]
        return [*self.path(m - k, lo + k, hi), self.mth(lo, lo + k)]


def _root_from_path(index: int, size: int, leaf: bytes, proof: list[bytes]) -> bytes:
    """RFC 9162 section 2.1.3.2, written out again."""
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        if fn & 1 or fn == sn:
            r = _sha(b"\x01" + p + r)
            while fn and not fn & 1:
                fn >>= 1
                sn >>= 1
        else:
            r = _sha(b"\x01" + r + p)
        fn >>= 1
        sn >>= 1
    assert sn == 0
    return r


def _parse_note(note: str) -> tuple[str, int, bytes]:
    text = note[: note.index("\n\n") + 1]
    origin, size, root = text.splitlines()[:3]
    return origin, int(size), base64.b64decode(root, validate=True)


def fill(exchange: Exchange, total: int) -> Exchange:
    """Append test entries in uneven batches until the ledger holds ``total``; checkpoint."""
    done = exchange.ledger.size()
    drafts = [EntryDraft(kind="test.tile", attrs={"i": i}) for i in range(done, total)]
    for start in range(0, len(drafts), 7919):
        exchange.ledger.append_batch_sync(drafts[start : start + 7919])
    exchange.ledger.checkpoint()
    return exchange


@pytest.fixture
def big_log(exchange: Exchange) -> Exchange:
    return fill(exchange, 256 * 256 + 3 * 256 + 17)  # three levels of tiles


@pytest.fixture
def tiled_server(big_log: Exchange, data_dir: Path) -> Iterator[LiveServer]:
    with serving(big_log, data_dir) as live:
        yield live


@pytest.fixture
def small_server(exchange: Exchange, data_dir: Path) -> Iterator[LiveServer]:
    with serving(fill(exchange, 3 * 256 + 17), data_dir) as live:
        yield live


def test_a_monitor_computes_the_root_and_proofs_from_tiles_alone(tiled_server: LiveServer) -> None:
    response = httpx.get(f"{tiled_server.url}/v1/log/checkpoint")  # unsigned
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    note = response.text
    checkpoint = verify_checkpoint(note, tiled_server.log_verifier())
    origin, size, root = _parse_note(note)
    assert (origin, size, root) == (checkpoint.origin, checkpoint.size, checkpoint.root)
    assert size > 256 * 256
    client = TileClient(tiled_server.url, size)
    assert client.mth(0, size) == root
    # the partial tile at every level and a full tile at levels 0 and 1 were read
    assert any(".p/" in p for p in client.fetched) and any("tile/2/" in p for p in client.fetched)

    exchange = tiled_server.exchange
    for index in (0, 255, 256, 40_000, size - 1):
        leaf = _sha(b"\x00" + exchange.ledger.entry(index))
        proof = client.path(index, 0, size)
        assert _root_from_path(index, size, leaf, proof) == root
        assert proof == exchange.ledger.inclusion_proof(index, size)


def test_entry_bundles_need_an_auditors_signature(small_server: LiveServer) -> None:
    tiled_server = small_server
    url = f"{tiled_server.url}/v1/log/{_path('entries', 1, 256)}"
    assert httpx.get(url).status_code == 401
    consumer = SigningKey.generate()
    auditor = SigningKey.generate()
    with tiled_server.client(tiled_server.operator) as op:
        op.register_principal("City Bank", "enterprise", consumer.public_key)
        op.register_principal("Audit Office", "auditor", auditor.public_key)
    with tiled_server.client(consumer) as c, pytest.raises(ApiError) as refused:
        c.entry_bundle(1)
    assert refused.value.status == 403
    with tiled_server.client(auditor) as a:
        entries = a.entry_bundle(1)
        partial = a.entry_bundle(0, 3)
    assert len(entries) == 256 and len(partial) == 3
    assert entries[0] == tiled_server.exchange.ledger.entry(256)
    assert partial == [tiled_server.exchange.ledger.entry(i) for i in range(3)]


def test_tiles_beyond_the_log_and_malformed_paths_are_refused(small_server: LiveServer) -> None:
    tiled_server = small_server
    base = f"{tiled_server.url}/v1/log/"
    size = tiled_server.exchange.ledger.size()
    last_full = size // 256 - 1
    assert httpx.get(base + _path(0, last_full, 256)).status_code == 200
    assert httpx.get(base + _path(0, last_full + 1, 256)).status_code == 404  # still partial
    assert httpx.get(base + _path(0, last_full + 1, 255)).status_code == 404  # wider than it is
    assert httpx.get(base + _path(0, 10**9, 1)).status_code == 404
    huge = httpx.get(base + _path(0, 10**24, 1))  # beyond a BIGINT: a 404, not a 500
    assert huge.status_code == 404
    assert huge.headers["content-type"] == "application/problem+json"
    for bad in ("tile/0/1", "tile/0/x000/001", "tile/0/000.p/256", "tile/99/000", "tile/a/000"):
        response = httpx.get(base + bad)
        assert response.status_code in (404, 422), bad
        assert response.headers["content-type"] == "application/problem+json"
    # a full tile is immutable and a partial one is served at the width asked
    full = httpx.get(base + _path(0, 0, 256))
    assert "immutable" in full.headers["cache-control"]
    assert httpx.get(base + _path(0, 0, 5)).content == full.content[: 5 * 32]


def test_a_worker_serves_proofs_without_reading_the_whole_tree(
    exchange: Exchange, data_dir: Path
) -> None:
    size = fill(exchange, 20 * 256 + 5).ledger.size()
    exchange.close()
    fresh = Exchange(settings_for(data_dir)).start()  # a new worker: nothing cached
    try:
        with fresh.engine.connect() as conn:
            stored = conn.execute(select(func.count()).select_from(LedgerTileRow)).scalar_one()
        assert stored == 20 + 1  # full level-0 tiles and level 1 ...
        fresh.ledger.inclusion_proof(1_234, size)
        assert 0 < fresh.ledger.tiles.reads <= 3  # ... and a proof reads a few of them
    finally:
        fresh.close()
