"""The authentication hot path's shared state: the registry version, the per-process caches
validated against it, and group-committed nonces.

The cross-worker tests run two exchanges (two caches, two ledger and nonce writers) behind two
real servers on one database, as ``zonex serve --workers 2`` does.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.orm import Session

from crypto.keys import SigningKey
from exchange.client.sdk import ApiError, Client
from exchange.errors import LedgerError
from exchange.server.ledger import EntryDraft
from exchange.server.models import (
    DatasetRow,
    GrantRow,
    NonceRow,
    PrincipalRow,
    ZoneRow,
)
from exchange.server.registry import NonceLog, _Waiting, registry_version
from exchange.server.runtime import Exchange
from tests.conftest import (
    EXAMPLES,
    L2_LEVELS,
    LiveServer,
    serving,
    settings_for,
    tax_bureau_and_bank,
)
from tests.security._support import entries, rejected_reasons, send, signed


def version_of(ex: Exchange) -> int:
    with ex.engine.connect() as conn:
        return registry_version(conn)


# -- the version -------------------------------------------------------------------------------


def test_every_change_to_principals_zones_and_datasets_bumps_the_version(
    exchange: Exchange,
) -> None:
    """ORM flushes, Core statements and plain SQL alike: the database bumps it itself."""
    key = SigningKey.generate()
    changes = [
        lambda s: s.add(
            PrincipalRow(
                key_id=key.key_id,
                name="Someone",
                kind="enterprise",
                public_key=key.public_key.raw,
                status="active",
            )
        ),
        lambda s: s.execute(
            update(PrincipalRow).where(PrincipalRow.key_id == key.key_id).values(status="suspended")
        ),
        lambda s: s.add(
            ZoneRow(name="z1", owner=key.key_id, public_key=bytes(32), description="d")
        ),
        lambda s: s.execute(text("UPDATE zones SET description = 'changed' WHERE name = 'z1'")),
        lambda s: s.add(
            DatasetRow(
                zone="z1",
                name="d1",
                subject_column="id",
                columns=[],
                level="L1",
                row_count=1,
                digest="0" * 64,
                source="import",
            )
        ),
        lambda s: s.execute(update(DatasetRow).values(row_count=2)),
        lambda s: s.execute(delete(DatasetRow)),
        lambda s: s.execute(delete(ZoneRow).where(ZoneRow.name == "z1")),
        lambda s: s.execute(delete(PrincipalRow).where(PrincipalRow.key_id == key.key_id)),
    ]
    for i, change in enumerate(changes):
        before = version_of(exchange)
        with Session(exchange.engine) as session, session.begin():
            change(session)
        assert version_of(exchange) > before, f"change {i} did not bump the version"


def test_unrelated_writes_leave_the_version_alone(server: LiveServer) -> None:
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    ex = server.exchange
    before = version_of(ex)
    with server.client(consumer) as c:
        c.request_access(
            "tax",
            ["companies"],
            ["export"],
            "credit-assessment",
            duration_seconds=3600,
            justification="x",
        )
        c.catalog()
    with Session(ex.engine) as session, session.begin():
        session.execute(delete(NonceRow))
        session.execute(update(GrantRow).values(status="active"))
    assert version_of(ex) == before


# -- the caches across workers -------------------------------------------------------------------


@pytest.fixture
def second(server: LiveServer, data_dir: Path) -> Iterator[LiveServer]:
    """Another worker: its own exchange (caches, writers) on the same database."""
    with (
        Exchange(settings_for(data_dir, checkpoint_interval_seconds=0.2)) as ex,
        serving(ex, data_dir) as live,
    ):
        yield live


def test_a_suspension_in_one_worker_stops_the_next_request_in_another(
    server: LiveServer, second: LiveServer
) -> None:
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    with second.client(consumer) as c:
        c.whoami()  # the second worker has the consumer cached as active
    assert second.exchange.registry.cached_key(consumer.key_id) is not None
    with server.client(server.operator) as op:
        op.set_principal_status(consumer.key_id, "suspended")
    with second.client(consumer) as c, pytest.raises(ApiError) as refused:
        c.whoami()  # at once: no refresh interval, no retry
    assert refused.value.status == 401
    assert "suspended" in rejected_reasons(second)
    with server.client(server.operator) as op:
        op.set_principal_status(consumer.key_id, "active")
    with second.client(consumer) as c:
        assert c.whoami()["status"] == "active"


def test_the_catalog_is_never_older_than_the_request(
    server: LiveServer, second: LiveServer
) -> None:
    provider, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    with second.client(consumer) as c:
        assert [z["name"] for z in c.catalog()["zones"]] == ["tax"]
    with server.client(provider) as p:
        p.create_zone("land", "land registry")
        p.register_dataset(
            "land",
            "parcels",
            levels=L2_LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    with second.client(consumer) as c:
        zones = c.catalog()["zones"]
    assert [z["name"] for z in zones] == ["land", "tax"]
    assert [d["name"] for d in zones[0]["datasets"]] == ["parcels"]
    with server.client(server.operator) as op:
        op.set_zone_status("land", "suspended")
    with second.client(consumer) as c:
        assert c.catalog()["zones"][0]["status"] == "suspended"


def test_a_catalog_read_is_on_the_ledger_with_the_digest_of_what_was_shown(
    server: LiveServer,
) -> None:
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    with httpx.Client(timeout=30) as http:
        response = http.send(signed("GET", server.url + "/v1/catalog", consumer))
    assert response.status_code == 200
    reads = entries(server, "catalog.read")
    assert len(reads) == 1
    assert reads[0]["actor"] == consumer.key_id
    assert reads[0]["digests"]["catalog"] == hashlib.sha256(response.content).hexdigest()
    assert reads[0]["attrs"]["registry_version"] == version_of(server.exchange)
    # the ledger entry is durable before the answer: it is there the moment the read returns
    assert server.exchange.ledger.size() >= reads[0]["seq"] + 1


def test_a_refused_catalog_read_is_not_recorded_as_a_read(server: LiveServer) -> None:
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    with server.client(server.operator) as op:
        op.set_principal_status(consumer.key_id, "suspended")
    assert send(signed("GET", server.url + "/v1/catalog", consumer)).status_code == 401
    assert entries(server, "catalog.read") == []


# -- nonces ----------------------------------------------------------------------------------


def test_concurrent_replays_of_one_request_act_once(server: LiveServer, second: LiveServer) -> None:
    """The same signed request sent 24 times at once to two workers: one answer, 23 refusals,
    whichever batches and processes they land in."""
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    request = signed("GET", server.url + "/v1/catalog", consumer, nonce="only-once")
    other = signed("GET", second.url + "/v1/catalog", consumer, nonce="only-once")
    with ThreadPoolExecutor(24) as pool:
        codes = list(pool.map(lambda i: send(request if i % 2 else other).status_code, range(24)))
    assert sorted(codes) == [200] + [401] * 23
    assert len(entries(server, "catalog.read")) == 1
    second.exchange.ledger.rejections.flush()
    assert rejected_reasons(server, 23).count("replayed") == 23


def _waiting(key: str, nonce: str) -> _Waiting:
    return _Waiting(key, nonce, int(datetime.now(UTC).timestamp()))


def test_a_nonce_twice_in_one_batch_is_a_replay(exchange: Exchange) -> None:
    log = NonceLog(exchange.engine)
    batch = [_waiting("k" * 64, "a"), _waiting("k" * 64, "b"), _waiting("k" * 64, "a")]
    log._commit(batch)
    assert [w.future.result().fresh for w in batch] == [True, True, False]
    again = [_waiting("k" * 64, "b"), _waiting("j" * 64, "a")]
    log._commit(again)
    assert [w.future.result().fresh for w in again] == [False, True]
    version = version_of(exchange)
    assert {w.future.result().registry_version for w in batch + again} == {version}


def test_a_failed_nonce_batch_fails_its_requests_and_the_next_batch_recovers(
    exchange: Exchange,
) -> None:
    log = NonceLog(exchange.engine)
    log.start()
    try:
        assert log.record("k" * 64, "first", 0).fresh
        with exchange.engine.begin() as conn:
            conn.execute(text("ALTER TABLE nonces RENAME TO nonces_away"))
        try:
            with pytest.raises(Exception, match="nonces"):
                log.record("k" * 64, "lost", 0)
        finally:
            with exchange.engine.begin() as conn:
                conn.execute(text("ALTER TABLE nonces_away RENAME TO nonces"))
        # nothing was recorded by the failed batch: the nonce is still fresh
        assert log.record("k" * 64, "lost", 0).fresh
        assert not log.record("k" * 64, "first", 0).fresh
    finally:
        log.close()
    with Session(exchange.engine) as s:
        assert s.execute(select(NonceRow.nonce).order_by(NonceRow.nonce)).scalars().all() == [
            "first",
            "lost",
        ]


def test_a_request_whose_nonce_cannot_be_recorded_gets_503_and_can_be_retried(
    server: LiveServer,
) -> None:
    _, consumer = tax_bureau_and_bank(server, L2_LEVELS)
    request = signed("GET", server.url + "/v1/principals/me", consumer, nonce="retry-me")
    with server.exchange.engine.begin() as conn:
        conn.execute(text("ALTER TABLE nonces RENAME TO nonces_away"))
    try:
        response = send(request)
    finally:
        with server.exchange.engine.begin() as conn:
            conn.execute(text("ALTER TABLE nonces_away RENAME TO nonces"))
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["code"] == "unavailable"
    # nothing was recorded: the very same request goes through once, then is a replay
    assert send(request).status_code == 200
    assert send(request).status_code == 401


def test_ledger_submit_resolves_once_durable_and_refuses_when_stopped(
    exchange: Exchange,
) -> None:
    appended = exchange.ledger.submit(EntryDraft(kind="catalog.read", actor="k" * 64)).result(10)
    assert exchange.ledger.size() > appended.seq
    exchange.close()
    with pytest.raises(LedgerError):
        exchange.ledger.submit(EntryDraft(kind="catalog.read"))


def test_principal_cache_is_bounded(exchange: Exchange) -> None:
    registry = exchange.registry
    registry.max_keys = 3
    operator = exchange.operator_key_id()
    for _ in range(5):
        registry.load_key(operator)
        assert registry.load_key("0" * 64) is None
    assert len(registry._keys) <= 3
    assert registry.cached_key(operator) is not None


def test_unknown_keys_are_refused_without_being_cached(server: LiveServer) -> None:
    stranger = SigningKey.generate()
    with Client(server.url, stranger) as c, pytest.raises(ApiError) as refused:
        c.whoami()
    assert refused.value.status == 401
    assert server.exchange.registry.cached_key(stranger.key_id) is None
