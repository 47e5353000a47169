"""Catalog reads are evidenced at a bounded volume: per interval, the first read of each
(principal, registry version, document) is a durable ``catalog.read`` entry before it is
answered; the others are counted into one ``catalog.read.summary`` at the interval's end.

Intervals are ended explicitly (``CatalogReadLog.end_interval``); the configured interval is an
hour, so the ticker never ends one during a test.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from crypto.keys import SigningKey
from crypto.note import NoteVerifier
from exchange.audit import read_bundle_lines, verify_bundle
from exchange.cli import app
from exchange.errors import LedgerError
from exchange.server.ledger import Appended
from exchange.server.readlog import READ, SUMMARY, CatalogReadLog
from exchange.server.runtime import Exchange
from exchange.settings import Settings
from tests.conftest import L2_LEVELS, LiveServer, serving, settings_for, tax_bureau_and_bank
from tests.security._support import entries, rejected_reasons, send, signed

HOUR = 3600.0


@pytest.fixture
def exchange(data_dir: Path) -> Iterator[Exchange]:
    ex = Exchange(
        settings_for(data_dir, checkpoint_interval_seconds=0.2, catalog_read_interval_seconds=HOUR)
    )
    ex.start()
    try:
        yield ex
    finally:
        ex.close()


def read(server: LiveServer, key: SigningKey) -> httpx.Response:
    response = send(signed("GET", server.url + "/v1/catalog", key))
    assert response.status_code == 200, response.text
    return response


def end_interval(ex: Exchange) -> list[Appended]:
    """End the interval and wait until its summaries are durable."""
    return [f.result(timeout=30) for f in ex.catalog_reads.end_interval()]


def reads_of(server: LiveServer, key: SigningKey) -> tuple[list[Any], list[Any]]:
    """The ``catalog.read`` entries and the summaries naming ``key``."""
    mine = [e for e in entries(server) if e["actor"] == key.key_id]
    return [e for e in mine if e["kind"] == READ], [e for e in mine if e["kind"] == SUMMARY]


def reads_per_principal(lines: list[dict[str, Any]]) -> Counter[str]:
    """What an auditor computes from a verified bundle: each principal's catalog reads."""
    total: Counter[str] = Counter()
    for entry in lines:
        if entry["kind"] == READ:
            total[entry["actor"]] += 1
        elif entry["kind"] == SUMMARY:
            total[entry["actor"]] += entry["attrs"]["count"]
    return total


def test_n_reads_in_an_interval_are_one_entry_and_one_summary_of_n_minus_one(
    server: LiveServer,
) -> None:
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    n = 7
    bodies = {read(server, consumer).content for _ in range(n)}
    assert len(bodies) == 1
    digest = hashlib.sha256(bodies.pop()).hexdigest()

    first, summaries = reads_of(server, consumer)
    assert len(first) == 1 and summaries == []  # the first read's entry, durable at once
    end_interval(server.exchange)
    first, summaries = reads_of(server, consumer)
    assert len(first) == 1 and len(summaries) == 1
    (entry,), (summary,) = first, summaries
    assert entry["digests"] == summary["digests"] == {"catalog": digest}
    version = entry["attrs"]["registry_version"]
    assert summary["attrs"] == {
        "registry_version": version,
        "count": n - 1,
        "first": entry["seq"],
        "since": summary["attrs"]["since"],
        "until": summary["attrs"]["until"],
    }
    assert summary["seq"] > entry["seq"]
    assert summary["attrs"]["since"] <= entry["time"] <= summary["attrs"]["until"]
    assert summary["refs"] == {}

    # the next interval starts afresh: its first read is ledgered again
    read(server, consumer)
    assert len(reads_of(server, consumer)[0]) == 2
    assert end_interval(server.exchange) == []  # read once: no summary


def test_principals_and_registry_versions_are_evidenced_apart(server: LiveServer) -> None:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    other = SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Harbour Bank", "enterprise", other.public_key)
    for _ in range(3):
        read(server, consumer)
    for _ in range(2):
        read(server, other)
    before = read(server, consumer)

    # the registry changes mid-interval: the next read is of a new version and document, and
    # its entry is durable before the answer, as for a first read
    with server.client(provider) as p:
        p.create_zone("land", "land records")
    after = read(server, consumer)
    assert after.content != before.content
    first, _ = reads_of(server, consumer)
    assert len(first) == 2
    assert first[1]["digests"]["catalog"] == hashlib.sha256(after.content).hexdigest()
    assert first[1]["attrs"]["registry_version"] > first[0]["attrs"]["registry_version"]
    read(server, consumer)

    end_interval(server.exchange)
    first, summaries = reads_of(server, consumer)
    assert [(e["attrs"]["registry_version"], e["attrs"]["count"]) for e in summaries] == [
        (first[0]["attrs"]["registry_version"], 3),
        (first[1]["attrs"]["registry_version"], 1),
    ]
    assert [s["attrs"]["first"] for s in summaries] == [e["seq"] for e in first]
    assert [s["digests"] for s in summaries] == [e["digests"] for e in first]
    other_first, other_summaries = reads_of(server, other)
    assert len(other_first) == 1
    assert [s["attrs"]["count"] for s in other_summaries] == [1]
    counted = reads_per_principal(entries(server))
    assert (counted[consumer.key_id], counted[other.key_id]) == (6, 2)


def test_each_worker_evidences_its_own_reads_and_the_sum_is_exact(
    server: LiveServer, data_dir: Path
) -> None:
    """Two workers on one database: each writes its own first entry and summary."""
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    settings = settings_for(
        data_dir, checkpoint_interval_seconds=0.2, catalog_read_interval_seconds=HOUR
    )
    with Exchange(settings) as ex, serving(ex, data_dir) as second:
        for worker, times in ((server, 4), (second, 3), (server, 2)):
            for _ in range(times):
                read(worker, consumer)
        end_interval(server.exchange)
        end_interval(second.exchange)
    first, summaries = reads_of(server, consumer)
    assert len(first) == 2
    assert len({e["digests"]["catalog"] for e in first + summaries}) == 1
    assert sorted(s["attrs"]["count"] for s in summaries) == [2, 5]
    assert reads_per_principal(entries(server))[consumer.key_id] == 9


def test_a_suspended_principal_s_read_is_refused_ledgered_and_not_counted(
    server: LiveServer,
) -> None:
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    read(server, consumer)
    read(server, consumer)
    with server.client(server.operator) as op:
        op.set_principal_status(consumer.key_id, "suspended")
    refused = send(signed("GET", server.url + "/v1/catalog", consumer))
    assert refused.status_code == 401
    assert "suspended" in rejected_reasons(server)
    rejected = [e for e in entries(server, "request.rejected") if e["actor"] == consumer.key_id]
    assert [e["attrs"] for e in rejected] == [{"reason": "suspended", "route": "GET /v1/catalog"}]

    end_interval(server.exchange)
    first, summaries = reads_of(server, consumer)
    assert len(first) == 1
    assert [s["attrs"]["count"] for s in summaries] == [1]  # the answered read, not the refused


def test_the_summary_survives_a_clean_shutdown_and_the_bundle_verifies(
    exchange: Exchange, data_dir: Path, tmp_path: Path
) -> None:
    with serving(exchange, data_dir) as server:
        _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
        other = SigningKey.generate()
        with server.client(server.operator) as op:
            op.register_principal("Harbour Bank", "enterprise", other.public_key)
        for _ in range(5):
            read(server, consumer)
        for _ in range(3):
            read(server, other)
    exchange.close()  # no interval ended: the close writes the counts

    bundle, log_pub = tmp_path / "ledger.jsonl", data_dir / "log.pub"
    runner = CliRunner()
    out = runner.invoke(
        app, ["ledger", "export", "--data-dir", str(data_dir), "--out", str(bundle)]
    )
    assert out.exit_code == 0, out.output
    out = runner.invoke(app, ["audit", "verify", str(bundle), "--log-key", str(log_pub)])
    assert out.exit_code == 0 and out.output.startswith("OK:"), out.output

    # the auditor, offline: verify the bundle, then sum each principal's reads
    verifier = NoteVerifier.from_verifier_key(log_pub.read_text().strip())
    verify_bundle(read_bundle_lines(bundle), verifier)
    lines = [json.loads(line) for line in read_bundle_lines(bundle)]
    found = [line for line in lines if "seq" in line]
    summarized = {e["actor"]: e["attrs"]["count"] for e in found if e["kind"] == SUMMARY}
    assert summarized == {consumer.key_id: 4, other.key_id: 2}
    per_principal = reads_per_principal(found)
    assert (per_principal[consumer.key_id], per_principal[other.key_id]) == (5, 3)


def test_a_read_is_answered_only_once_its_key_s_entry_is_durable(exchange: Exchange) -> None:
    """Reads that arrive while the first entry is being committed wait for it; they are counted
    and none returns before the entry is durable."""
    key = ("k" * 64, 1, "d" * 64)
    log = exchange.catalog_reads

    async def many() -> None:
        await asyncio.gather(*(log.record(*key) for _ in range(10)))

    asyncio.run(many())
    found = [e for e in _committed(exchange) if e["kind"] == READ]
    assert len(found) == 1 and found[0]["actor"] == key[0]
    (summary,) = [json.loads(a.body) for a in end_interval(exchange)]
    assert summary["attrs"]["count"] == 9 and summary["attrs"]["first"] == found[0]["seq"]


def _committed(ex: Exchange) -> list[dict[str, Any]]:
    return [json.loads(ex.ledger.entry(seq)) for seq in range(ex.ledger.size())]


class _HeldLedger:
    """A ledger stand-in whose entries become durable (or fail) when the test says so."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Any, Future[Appended]]] = []

    def submit(self, draft: Any) -> Future[Appended]:
        future: Future[Appended] = Future()
        self.submitted.append((draft, future))
        return future


def test_waiting_reads_fail_with_their_first_entry_and_the_next_read_tries_again() -> None:
    ledger = _HeldLedger()
    log = CatalogReadLog(ledger)  # type: ignore[arg-type]
    key = ("k" * 64, 3, "d" * 64)

    async def scenario() -> None:
        waiting = [asyncio.ensure_future(log.record(*key)) for _ in range(3)]
        await asyncio.sleep(0)
        assert len(ledger.submitted) == 1
        assert not any(w.done() for w in waiting)  # nobody is answered before it is durable
        # an interval ending now carries the pending key (and its waiting reads) over
        assert log.end_interval() == []
        ledger.submitted[0][1].set_exception(LedgerError("the disk is gone"))
        outcomes = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(o, LedgerError) for o in outcomes)
        # nothing was evidenced, nothing is counted; the next read asks for an entry again
        assert log.end_interval() == []
        again = asyncio.ensure_future(log.record(*key))
        await asyncio.sleep(0)
        assert len(ledger.submitted) == 2
        ledger.submitted[1][1].set_result(Appended(5, b"", None))
        await again
        await log.record(*key)  # durable: answered at once, counted

    asyncio.run(scenario())
    assert len(log.end_interval()) == 1
    draft = ledger.submitted[2][0]
    assert draft.kind == SUMMARY and draft.attrs["count"] == 1 and draft.attrs["first"] == 5


def test_without_a_running_ledger_a_read_is_refused(data_dir: Path) -> None:
    ex = Exchange(settings_for(data_dir))
    try:
        with pytest.raises(LedgerError):
            asyncio.run(ex.catalog_reads.record("k" * 64, 1, "d" * 64))
    finally:
        ex.close()


def test_the_interval_is_a_setting(data_dir: Path) -> None:
    assert Settings.model_fields["catalog_read_interval_seconds"].default == 60.0
    with pytest.raises(ValueError):
        settings_for(data_dir, catalog_read_interval_seconds=0)
