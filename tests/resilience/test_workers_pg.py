"""Concurrency: ``zonex serve --workers 4`` on one PostgreSQL database under eight client threads.

Mixed work for a bounded time (zone creations, ledgered denials, catalog reads, grant cycles
that use a grant right before and right after its revocation, DP aggregates that run budgets
dry), over fresh connections so every worker process takes part. Afterwards the ledger is one
linear, offline-verifiable sequence: every checkpoint anyone saw (from the API, inside receipts,
on record) is consistent with the final one by consistency proofs, no computation used a grant
after its revocation's ``seq``, and no budget is over-spent.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto.encoding import b64_decode
from crypto.merkle import verify_consistency
from crypto.note import verify_checkpoint
from exchange.client.sdk import Client
from exchange.keyfile import load_private_key
from exchange.server.models import CheckpointRow
from exchange.server.runtime import Exchange
from exchange.settings import Settings
from tests.resilience.harness import Acks, Load, Servers, audit, set_up, verifier_of

SECONDS = 12.0
WORKERS = 4
#: per consumer: 12 releases of ε 0.01, so the budgets run dry early in the run
BUDGET = Decimal("0.12")
#: how much longer than SECONDS the load may run for a budget to run dry
DRY_WITHIN = 120.0


@pytest.fixture
def servers(data_dir: Path, database_url: str | None, tmp_path: Path) -> Iterator[Servers]:
    started = Servers(data_dir, database_url, tmp_path / "server.log")
    try:
        yield started
    finally:
        started.close()


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_four_workers_keep_one_linear_ledger(
    servers: Servers, data_dir: Path, tmp_path: Path
) -> None:
    server = servers.start(workers=WORKERS)
    server.wait_ready()
    cast = set_up(
        server.url,
        load_private_key(data_dir / "operator.key"),
        consumers=3,
        grantees=2,
        budget=str(BUDGET),
    )
    acks = Acks()
    load = Load(
        server.url,
        cast,
        acks,
        "w",
        tmp_path / "unused.csv",
        aggregators=3,
        granters=2,
        appenders=2,
        registrars=0,
        fresh_connections=True,
    )
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # the eighth client: checkpoints as the API serves them
        try:
            while not stop.is_set():
                with Client(server.url, cast.consumers[0], timeout=30) as c:
                    seen.append(c.checkpoint()["note"])
                time.sleep(0.05)
        except httpx.TransportError as exc:  # pragma: no cover - reported below
            acks.add("errors", f"watcher: {exc!r}")

    watcher = threading.Thread(target=watch, name="watch", daemon=True)
    load.start()
    watcher.start()
    time.sleep(SECONDS)
    # the run lasts until some budget ran dry as well (at least SECONDS): on a loaded machine 12
    # releases per consumer can take longer than SECONDS, and the refusals are what is checked
    deadline = time.monotonic() + DRY_WITHIN
    while sum(acks.exhausted.values()) == 0 and time.monotonic() < deadline and not acks.errors:
        time.sleep(0.2)
    stop.set()
    load.finish()
    watcher.join(30)
    assert not acks.errors, acks.errors

    # the server's own answer: its latest checkpoint and consistency proofs to it
    verifier = verifier_of(data_dir)
    with Client(server.url, cast.consumers[0], timeout=30) as c:
        head = c.checkpoint()
        latest = verify_checkpoint(head["note"], verifier)
        for size in sorted({verify_checkpoint(n, verifier).size for n in seen}):
            if 0 < size < latest.size:
                proof = c.consistency_proof(size, latest.size)["proof"]
                old = next(
                    cp for cp in (verify_checkpoint(n, verifier) for n in seen) if cp.size == size
                )
                verify_consistency(
                    size, latest.size, old.root, latest.root, [b64_decode(h) for h in proof]
                )
    server.stop()

    result = audit(data_dir, acks, tmp_path, budget=BUDGET)
    ex = Exchange(Settings.from_data_dir(data_dir))
    try:
        with Session(ex.engine) as s:
            recorded = list(s.scalars(select(CheckpointRow.note)))
    finally:
        ex.close()
    in_receipts = [receipt["checkpoint"] for receipt, _ in acks.receipts]
    final = verify_checkpoint(recorded[-1], verifier) if recorded else None
    assert final is not None
    for note in [*seen, *in_receipts, *recorded]:
        cp = verify_checkpoint(note, verifier)
        proof = result.tree.consistency_proof(cp.size, result.size)
        verify_consistency(cp.size, result.size, cp.root, result.tree.root(result.size), proof)
    # budgets ran dry somewhere, and the refusals held (audit: spent <= budget, = ledger sum)
    assert sum(acks.exhausted.values()) > 0
    print(
        f"\n{WORKERS} workers, {SECONDS:.0f} s: ledger {result.size} entries, "
        f"{len(recorded)} checkpoints on record, {len(seen)} seen by the watcher; acknowledged "
        f"{len(acks.receipts)} releases, {len(acks.grants)} grants, {len(acks.revoked)} "
        f"revocations, {len(acks.zones)} zones, {sum(acks.denials.values())} denials, "
        f"{sum(acks.exhausted.values())} budget refusals, {acks.catalog_reads} catalog reads"
    )
