"""The data path of ``he_score`` before anything is encrypted: consent digests, the consent
lookup (index probes or one pass over the zone, each digest version under its own key) and the
feature read (one DuckDB join or chunked ``IN`` lists), each held to the simple definition it
replaces."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import insert
from sqlalchemy.orm import Session

from crypto.kdf import derive_key, encode_parts
from crypto.keys import SigningKey
from exchange import subjects
from exchange.keyfile import load_private_key
from exchange.node import score as node_score
from exchange.server import access, services
from exchange.server.compute.source import open_source
from exchange.server.models import ConsentRow, DatasetRow
from exchange.server.runtime import Exchange

PURPOSE = "credit-assessment"


def _dataset(
    ex: Exchange, tmp_path: Path, name: str, csv: str, types: dict[str, str]
) -> DatasetRow:
    path = tmp_path / f"{name}.csv"
    path.write_text(csv)
    ex.zone_store("tax").import_csv(name, path)
    subject = next(iter(types))
    return DatasetRow(
        zone="tax",
        name=name,
        subject_column=subject,
        columns=[{"name": c, "type": t, "level": "L1"} for c, t in types.items()],
        source="import",
    )


def _both_reads(
    ex: Exchange, row: DatasetRow, features: list[str], ids: list[str], id_type: str
) -> tuple[np.ndarray, list[int]]:
    """The joined read, after checking the chunked read gives the same answer (both are the
    zone's code, exchange.node.score, run here on the exchange-hosted store)."""
    with open_source(ex, row) as src:
        matrix, unscorable = node_score.read_features(
            src.engine, src.relation, src.dialect, row.subject_column, features, ids, id_type
        )
        with src.engine.connect() as conn:
            chunked, unscorable_chunked = node_score._read_features_chunked(
                conn, src.relation, row.subject_column, features, ids, id_type
            )
    assert unscorable == unscorable_chunked
    assert np.array_equal(matrix, chunked)
    return matrix, unscorable


def test_text_subjects_match_exactly_and_bad_rows_are_unscorable(
    exchange: Exchange, tmp_path: Path
) -> None:
    csv = "company_id,x,y\nA1,1.5,2\nA2,2.5,\nA3,3.0,4\nA3,3.0,4\n0007,7.25,7\n"
    row = _dataset(
        exchange, tmp_path, "firms", csv, {"company_id": "text", "x": "decimal", "y": "integer"}
    )
    ids = ["A3", "A1", "missing", "A2", "0007", "a1", "7"]
    matrix, unscorable = _both_reads(exchange, row, ["y", "x"], ids, "text")
    # several rows, no row, a NULL value, no row (case matters), no row (text, not 7)
    assert unscorable == [0, 2, 3, 5, 6]
    assert matrix[1].tolist() == [2.0, 1.5]
    assert matrix[4].tolist() == [7.0, 7.25]


def test_integer_subjects_match_their_canonical_text(exchange: Exchange, tmp_path: Path) -> None:
    csv = "company_id,x\n7,1.25\n-5,2.5\n12,3\n12,3\n3,\n"
    row = _dataset(exchange, tmp_path, "firms", csv, {"company_id": "integer", "x": "decimal"})
    ids = ["7", "007", "-5", "12", "+7", "3", "x", "--5", " 7", "٧"]
    matrix, unscorable = _both_reads(exchange, row, ["x"], ids, "integer")
    assert unscorable == [1, 3, 4, 5, 6, 7, 8, 9]
    assert matrix[[0, 2], 0].tolist() == [1.25, 2.5]


def test_nothing_found_and_nothing_asked(exchange: Exchange, tmp_path: Path) -> None:
    types = {"company_id": "text", "x": "integer"}
    row = _dataset(exchange, tmp_path, "firms", "company_id,x\nA,1\n", types)
    matrix, unscorable = _both_reads(exchange, row, ["x"], ["B", "C"], "text")
    assert unscorable == [0, 1] and matrix.shape == (2, 1)


def test_consent_digests_are_keyed_by_the_derived_consent_key(exchange: Exchange) -> None:
    ids = ["91310885617X0AEH7Y", "x", "税务-001", "y" * 512]
    keys = subjects.ZoneSubjects.of(exchange.zones_dir / "tax")
    salt = access._salt(exchange.zones_dir / "tax")
    key = derive_key(salt, subjects.LABELS["consent-digest"])
    expected = [hmac.new(key, encode_parts(i.encode()), hashlib.sha256).hexdigest() for i in ids]
    assert keys.consent_digests(ids) == expected
    assert [access.subject_digest(exchange, "tax", i) for i in ids] == expected
    legacy = [hmac.new(salt, i.encode(), hashlib.sha256).hexdigest() for i in ids]
    assert keys.legacy_consent_digests(ids) == legacy
    assert not set(legacy) & set(expected)


@pytest.mark.parametrize("scan_factor", [0, 1_000_000], ids=["probes", "zone_pass"])
def test_both_consent_lookups_give_one_answer(
    exchange: Exchange, monkeypatch: pytest.MonkeyPatch, scan_factor: int
) -> None:
    monkeypatch.setattr(access, "_CONSENT_SCAN_FACTOR", scan_factor)
    operator = services.get_principal(
        exchange, load_private_key(exchange.settings.data_dir / "operator.key").key_id
    )
    assert operator is not None
    provider, bank, other = (
        services.register_principal(
            exchange, operator, name, kind, SigningKey.generate().public_key.raw
        )
        for name, kind in (("Tax", "agency"), ("Bank", "enterprise"), ("Other", "enterprise"))
    )
    services.create_zone(exchange, provider, "tax", "tax records")
    now = datetime.now(UTC)
    day = timedelta(days=1)
    cases = {  # subject -> (consumer, purpose, expires, status) or None for no consent
        "live": (bank, PURPOSE, now + day, "active"),
        "legacy": (bank, PURPOSE, now + day, "active"),
        "legacy-withdrawn": (bank, PURPOSE, now + day, "withdrawn"),
        "parent": (bank, "financial-services", now + day, "active"),
        "sibling": (bank, "public-administration", now + day, "active"),
        "expired": (bank, PURPOSE, now - day, "active"),
        "withdrawn": (bank, PURPOSE, now + day, "withdrawn"),
        "other": (other, PURPOSE, now + day, "active"),
        "none": None,
    }
    keys = subjects.ZoneSubjects.of(exchange.zones_dir / "tax")
    current, legacy = keys.consent_digests(list(cases)), keys.legacy_consent_digests(list(cases))
    with Session(exchange.engine) as session:
        session.execute(
            insert(ConsentRow),
            [
                {
                    "id": f"c{k}",
                    "zone": "tax",
                    "subject_digest": (legacy if subject.startswith("legacy") else current)[k],
                    "digest_version": 0 if subject.startswith("legacy") else 1,
                    "consumer": consumer.key_id,
                    "purpose": purpose,
                    "expires_at": expires,
                    "status": status,
                    "recorded_by": provider.key_id,
                    "created_at": now,
                }
                for k, (subject, case) in enumerate(cases.items())
                if case is not None
                for consumer, purpose, expires, status in [case]
            ],
        )
        session.commit()
    live = access.has_live_consent(exchange, "tax", list(cases), bank.key_id, PURPOSE)
    assert live == {k: k in ("live", "parent", "legacy") for k in cases}
    assert access.has_live_consent(exchange, "tax", [], bank.key_id, PURPOSE) == {}
    found = access.live_consents(exchange, "tax", ["none", "legacy", "live"], bank.key_id, PURPOSE)
    assert found == [None, "c1", "c0"]
