"""The catalog chain between two real exchanges on loopback: a district publishes its catalog
(metadata only, signed by its log key, once its operator opts in), the city polls the
district's checkpoint and tiles over HTTP, records them with the published catalog, and lists
both to its principals; the ``zonex chain`` commands configure and show it."""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crypto.encoding import b64_encode, b64url_decode
from crypto.keys import SigningKey
from crypto.note import NoteSigner, verify_checkpoint
from exchange.published import PAYLOAD_TYPE, verify_published
from exchange.server.chain import CHAIN_CHECKPOINT, add_child
from exchange.server.ledger import EntryDraft
from exchange.server.runtime import Exchange, init_data_dir
from tests.conftest import (
    EXAMPLES,
    L3_LEVELS,
    LiveServer,
    serving,
    settings_for,
    tax_bureau_and_bank,
)
from tests.witness._support import cli


@pytest.fixture
def server(data_dir: Path) -> Iterator[LiveServer]:
    """A district whose operator opted in to publishing its catalog to its parent."""
    settings = settings_for(data_dir, checkpoint_interval_seconds=0.2, chain_publish_catalog=True)
    ex = Exchange(settings)
    ex.start()
    try:
        with serving(ex, data_dir) as live:
            yield live
    finally:
        ex.close()


@pytest.fixture
def city(tmp_path: Path) -> Iterator[LiveServer]:
    """The parent exchange, served; its own poller never runs during a test (the test polls)."""
    d = tmp_path / "city"
    init_data_dir(d, origin="city.test/log")
    ex = Exchange(settings_for(d, checkpoint_interval_seconds=0.2, chain_interval_seconds=3600))
    ex.start()
    try:
        with serving(ex, d) as live:
            yield live
    finally:
        ex.close()


def fill(ex: Exchange, count: int) -> None:
    """``count`` entries at once, and a checkpoint covering them."""
    waiters = [ex.ledger.submit(EntryDraft(kind="test.filler")) for _ in range(count)]
    for waiter in waiters:
        waiter.result(timeout=30)  # type: ignore[union-attr]
    ex.ledger.checkpoint()


def test_a_district_publishes_its_catalog_as_signed_metadata(server: LiveServer) -> None:
    tax_bureau_and_bank(server, L3_LEVELS)
    response = httpx.get(f"{server.url}/v1/chain/published")  # unsigned
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    envelope, catalog = verify_published(response.content, server.log_verifier())
    assert envelope.payloadType == PAYLOAD_TYPE
    assert catalog.origin == "test.zonex/log"
    assert 0 < catalog.ledger_size <= server.exchange.ledger.size()
    [zone] = catalog.zones
    [dataset] = zone.datasets
    assert (zone.name, zone.owner_name, dataset.name) == ("tax", "Tax Bureau", "companies")
    assert {c.name: c.level for c in dataset.columns} == L3_LEVELS
    assert dataset.level == "L3" and dataset.row_count_band == "100-999"
    # metadata only: no row value, no snapshot digest, no principal's key id
    body = envelope.payload_bytes().decode()
    with (EXAMPLES / "companies.csv").open() as f:
        rows = list(csv.DictReader(f))
    values = {r["company_id"] for r in rows} | {
        r["tax_paid_2025"]
        for r in rows
        if len(r["tax_paid_2025"]) >= 5  # not found by chance
    }
    assert len(values) > 400 and not any(v in body for v in values)
    registered = json.loads(httpx.get(f"{server.url}/v1/chain/published").content)
    assert registered == json.loads(response.content)  # made once per registry version
    with server.client(server.operator) as op:
        detail = op.request("GET", "/v1/zones/tax/datasets/companies")
        assert detail["digest"] not in body and zone.name in body
        assert op.whoami().key_id not in body
        op.register_principal("Another Firm", "enterprise", SigningKey.generate().public_key)
    _, newer = verify_published(
        httpx.get(f"{server.url}/v1/chain/published").content, server.log_verifier()
    )
    assert newer.registry_version > catalog.registry_version
    assert newer.ledger_size > catalog.ledger_size


def test_the_city_records_a_district_over_http_and_lists_it(
    server: LiveServer, city: LiveServer
) -> None:
    district = server
    tax_bureau_and_bank(district, L3_LEVELS)
    ex = city.exchange
    add_child(
        ex.engine,
        ex.ledger,
        ex.operator_key_id(),
        "district-1",
        district.url,
        (district.data_dir / "log.pub").read_text(),
    )
    district.exchange.ledger.checkpoint()
    assert ex.chain.run_once() == {"district-1": "recorded"}
    fill(district.exchange, 600)  # past two level-0 tiles: the proof reads level 1 too
    assert ex.chain.run_once() == {"district-1": "recorded"}
    latest = district.exchange.ledger.latest_checkpoint()
    assert latest is not None

    with city.client(city.operator) as op:
        [child] = op.request("GET", "/v1/chain/children")
    assert child["name"] == "district-1" and child["url"] == district.url
    assert child["origin"] == "test.zonex/log"
    checkpoint = child["checkpoint"]
    assert checkpoint["size"] >= latest.size - 1  # the district may have signed one more
    cp = verify_checkpoint(checkpoint["note"], district.log_verifier())
    assert (cp.size, b64_encode(cp.root)) == (checkpoint["size"], checkpoint["root"])
    published = child["published"]
    envelope = json.dumps(published["envelope"]).encode()
    _, catalog = verify_published(envelope, district.log_verifier())
    assert [z.name for z in catalog.zones] == ["tax"]
    assert published["catalog"]["zones"][0]["datasets"][0]["name"] == "companies"
    payload = hashlib.sha256(b64url_decode(published["envelope"]["payload"])).hexdigest()
    assert published["digest"] == payload
    assert child["fork"] is None and child["failures"] == 0

    # on the city's ledger: the district's checkpoints, with the digest of what it published
    recorded = [
        json.loads(ex.ledger.entry(seq))
        for seq in range(ex.ledger.size())
        if json.loads(ex.ledger.entry(seq))["kind"] == CHAIN_CHECKPOINT
    ]
    assert [e["attrs"]["size"] for e in recorded][-1] == checkpoint["size"]
    assert recorded[-1]["digests"]["published"] == payload

    # unsigned, the listing is refused; anyone registered may read it
    assert httpx.get(f"{city.url}/v1/chain/children").status_code == 401
    firm = SigningKey.generate()
    with city.client(city.operator) as op:
        op.register_principal("Some Firm", "enterprise", firm.public_key)
    with city.client(firm) as c:
        assert [x["name"] for x in c.request("GET", "/v1/chain/children")] == ["district-1"]


def test_an_exchange_publishes_nothing_unless_its_operator_opts_in(city: LiveServer) -> None:
    refused = httpx.get(f"{city.url}/v1/chain/published")
    assert refused.status_code == 404
    assert refused.headers["content-type"] == "application/problem+json"
    assert "chain_publish_catalog" in refused.json()["detail"]


def test_an_unreachable_district_delays_nothing(city: LiveServer) -> None:
    ex = city.exchange
    log_key = NoteSigner("street-9.test/log", SigningKey.generate()).verifier_key()
    add_child(ex.engine, ex.ledger, ex.operator_key_id(), "street-9", "http://127.0.0.1:9", log_key)
    assert ex.chain.run_once() == {"street-9": "failed"}
    with city.client(city.operator) as op:
        [child] = op.request("GET", "/v1/chain/children")
        # the ledger goes on meanwhile
        op.register_principal("Some Firm", "enterprise", SigningKey.generate().public_key)
    assert child["checkpoint"] is None and child["failures"] == 1
    assert child["retry_at"] is not None and child["last_error"]


def test_the_chain_commands(city: LiveServer, tmp_path: Path) -> None:
    child_dir = tmp_path / "district"
    init_data_dir(child_dir, origin="district.test/log")
    d = str(city.data_dir)
    done = cli(
        "chain", "add-child", "--data-dir", d, "--name", "district-1",
        "--url", "http://127.0.0.1:9", "--log-key", str(child_dir / "log.pub"),
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "child district-1 at http://127.0.0.1:9 added (log district.test/log)" in done.stdout
    again = cli(
        "chain", "add-child", "--data-dir", d, "--name", "district-2",
        "--url", "http://127.0.0.1:9", "--log-key", str(child_dir / "log.pub"),
    )  # fmt: skip
    assert again.returncode == 1 and "already recorded" in again.stderr
    listed = cli("chain", "list", "--data-dir", d, "--json")
    assert listed.returncode == 0
    [child] = json.loads(listed.stdout)
    assert child["name"] == "district-1" and child["size"] is None
    assert child["log_key"] == (child_dir / "log.pub").read_text().strip()
    table = cli("chain", "list", "--data-dir", d)
    assert "district-1" in table.stdout
