"""A node attaches the provider's own PostgreSQL table: the rows stay in the provider's database,
the database URL stays on the node, and the exchange computes nothing from them itself."""

from __future__ import annotations

import csv
import json
from decimal import Decimal
from pathlib import Path

from sqlalchemy import BigInteger, Column, MetaData, Table, Text, create_engine, select
from sqlalchemy.orm import Session

from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.keyfile import write_private_key
from exchange.server.models import DatasetRow
from tests.conftest import EXAMPLES, L3_LEVELS, LiveServer, fresh_postgres_database
from tests.exchange.test_access import granted
from tests.exchange.test_aggregate import _rules
from tests.node.test_node_flow import SQL, cli, node_process, wait_online

INTEGERS = {"founded_year", "employees", "registered_capital", "tax_paid_2025"}


def _provider_table(url: str) -> int:
    """The provider's own table, loaded from the example CSV; returns its row count."""
    with (EXAMPLES / "companies.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    engine = create_engine(url)
    meta = MetaData()
    table = Table(
        "companies",
        meta,
        *(Column(n, BigInteger if n in INTEGERS else Text) for n in rows[0]),
    )
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            table.insert(),
            [{k: int(v) if k in INTEGERS else v for k, v in r.items()} for r in rows],
        )
    engine.dispose()
    return len(rows)


def test_a_node_attaches_the_providers_postgresql_table(server: LiveServer, tmp_path: Path) -> None:
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
    provider_key = tmp_path / "provider.key"
    write_private_key(provider_key, keys["provider"])
    node_dir = tmp_path / "tax-node"
    with fresh_postgres_database("zonex_provider_") as provider_db:
        count = _provider_table(provider_db)
        out = cli(
            "node", "init", "--data-dir", str(node_dir), "--zone", "tax",
            "--url", server.url, "--key", str(provider_key),
        )  # fmt: skip
        key_id = out.split()[1]
        cli(
            "node", "approve", key_id, "--url", server.url,
            "--key", str(server.data_dir / "operator.key"),
        )  # fmt: skip
        cli(
            "dataset", "register", "tax", "companies", "--node", str(node_dir),
            "--attach-url", provider_db, "--attach-table", "companies",
            "--subject-column", "company_id",
            *(f"--level={c}={lv}" for c, lv in L3_LEVELS.items()),
        )  # fmt: skip
        with server.client(keys["provider"]) as p:
            p.set_analysis_rules("tax", "companies", _rules())
        granted(server, keys, ["companies"], ["aggregate"])
        # the exchange knows the dataset by its metadata only: no URL, no table name
        with Session(server.exchange.engine) as s:
            row = s.execute(select(DatasetRow)).scalar_one()
        assert (row.source, row.attach_url, row.attach_table) == ("node", None, None)
        assert row.row_count == count
        assert "postgresql" not in json.dumps(row.columns)
        # the URL is in the node's own catalog only
        assert provider_db in (node_dir / "catalog.json").read_text()
        with node_process(node_dir):
            wait_online(server, keys["consumer"])
            with server.client(keys["consumer"]) as c:
                result = c.aggregate("tax", SQL, "credit-assessment", epsilon="1")
    statement, _ = verify_receipt(result.receipt, result.result, server.log_verifier())
    assert statement["node"]["key_id"] == key_id
    ((n, _),) = result.result["rows"]
    # ε = 1 in three shares: the count's Laplace scale is 3; P(|noise| >= 70) < 1e-10
    assert abs(Decimal(str(n)) - count) < 70
