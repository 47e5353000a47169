"""Private joins on a real server: results against a plaintext computation, the protocol's
guards against a hostile consumer, and what stays out of the exchange's storage."""

from __future__ import annotations

import base64
import csv
import logging
import secrets
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from crypto import he
from crypto import psi as cpsi
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.compute.psi import LABEL, normalize_id
from exchange.models import BudgetRow, PsiSessionRow
from exchange.sdk import ApiError, Client
from tests.conftest import LiveServer

PURPOSE = "credit-assessment"
DAY = 24 * 3600
K = 3
UPPER = 10**7
LEVELS = {"company_id": "L3", "tax": "L3", "district": "L1"}


def _write(path: Path, rows: list[tuple[str, int]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["company_id", "tax", "district"])
        for cid, tax in rows:
            w.writerow([cid, tax, "north"])
    return path


def _company(i: int) -> str:
    return f"9131{i:06d}{secrets.token_hex(4).upper()}"


@pytest.fixture
def world(server: LiveServer, tmp_path: Path) -> dict[str, Any]:
    """A tax bureau zone with 40 companies (two with unicode and padded ids), a bank with a
    grant for all three private joins, and rules with k = 3 and bounds on ``tax``."""
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    rows = [(_company(i), 100_000 + secrets.randbelow(9_000_000)) for i in range(38)]
    rows.append(("Zürich-Ölwerke", 4_321_987))  # NFC in the provider's data
    rows.append(("  ACME Ltd\u00a0", 5_432_198))  # padded with spaces and a no-break space
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
        p.register_dataset(
            "tax",
            "companies",
            levels=LEVELS,
            subject_column="company_id",
            file=_write(tmp_path / "companies.csv", rows),
        )
        p.set_analysis_rules(
            "tax",
            "companies",
            {
                "min_group_size": K,
                "epsilon_budget": "2",
                "columns": {
                    "tax": {"disclosure": "after_aggregate", "lower": "0", "upper": "7000000"}
                },
            },
        )
    with server.client(keys["consumer"]) as c:
        req = c.request_access(
            "tax",
            ["companies"],
            ["psi_cardinality", "psi_members", "psi_aggregate"],
            PURPOSE,
            duration_seconds=DAY,
            justification="loan applicants",
        )
    with server.client(keys["provider"]) as p:
        approved = p.approve(req["id"])
    return {"keys": keys, "rows": rows, "grant": approved["grant_id"]}


def _consumer(server: LiveServer, world: dict[str, Any]) -> Client:
    return server.client(world["keys"]["consumer"])


def _applicants(world: dict[str, Any], hits: int, misses: int) -> list[str]:
    ids = [cid for cid, _ in world["rows"][:hits]]
    return ids + [f"NOPE-{secrets.token_hex(6)}" for _ in range(misses)]


def _plain(world: dict[str, Any], ids: list[str]) -> set[str]:
    ours = {normalize_id(i) for i in ids} - {None}
    theirs = {normalize_id(cid) for cid, _ in world["rows"]}
    return {i for i in ours if i in theirs}  # type: ignore[misc]


def test_cardinality_and_members_match_plaintext(server: LiveServer, world: dict[str, Any]) -> None:
    ids = _applicants(world, 12, 9)
    # the same company twice, padded, and a decomposed ü that NFC composes
    ids += [ids[0], f"\t{ids[1]} ", "Zu\u0308rich-Ölwerke", "ACME Ltd", "acme ltd", "", "   "]
    expected = _plain(world, ids)
    assert len(expected) == 14  # 12 + Zürich + ACME; "acme ltd" differs by case
    with _consumer(server, world) as c:
        card = c.psi_join("tax", "companies", "cardinality", ids, PURPOSE, batch_points=7)
        assert card["result"]["intersection"] == len(expected)
        assert card["result"]["x_count"] == 12 + 9 + 3
        statement, _ = verify_receipt(card["receipt"], card["result"], server.log_verifier())
        assert statement["kind"] == "psi_cardinality" and statement["grant"] == world["grant"]
        assert statement["k"] == K and statement["epsilon"] == "0"

        members = c.psi_join("tax", "companies", "members", ids, PURPOSE)
        local = members["local"]["members"]
        assert local == [normalize_id(i) in expected for i in ids]
        verify_receipt(members["receipt"], members["result"], server.log_verifier())

        # empty and full intersections
        none = c.psi_join("tax", "companies", "cardinality", _applicants(world, 0, 5), PURPOSE)
        assert none["result"]["intersection"] == 0
        everyone = [cid for cid, _ in world["rows"]]
        full = c.psi_join("tax", "companies", "members", everyone, PURPOSE)
        assert all(full["local"]["members"]) and full["result"]["members"] == 40

    # the zone's work and the release are timed in the metrics, by kind only
    metrics = httpx.get(server.url + "/metrics").text
    for kind in ("psi_reblind", "psi_result"):
        assert f'kind="{kind}",outcome="ok"' in metrics
    assert world["rows"][0][0] not in metrics


def test_aggregate_is_exact_and_dp_is_charged(server: LiveServer, world: dict[str, Any]) -> None:
    ids = [*_applicants(world, 20, 6), "Zürich-Ölwerke"]
    hit = _plain(world, ids)
    clipped = sum(min(tax, 7_000_000) for cid, tax in world["rows"] if normalize_id(cid) in hit)
    with _consumer(server, world) as c:
        out = c.psi_join("tax", "companies", "aggregate", ids, PURPOSE, sums=["tax"])
        assert out["result"]["count"] == len(hit) == 21
        assert out["local"]["sums"] == {"tax": clipped}
        assert Decimal(out["local"]["averages"]["tax"]) == Decimal(clipped) / 21
        statement, _ = verify_receipt(out["receipt"], out["result"], server.log_verifier())
        assert statement["he_context"] == out["result"]["he_context"]
        # one ciphertext per sum; no per-row value is readable by the exchange
        assert len(base64.b64decode(out["result"]["sums"]["tax"])) > 100_000

        noisy = c.psi_join("tax", "companies", "aggregate", ids, PURPOSE, sums=["tax"], epsilon="1")
        assert noisy["result"]["noised"] is True
        assert abs(noisy["local"]["count"] - 21) < 40
        assert abs(noisy["local"]["sums"]["tax"] - clipped) < 7_000_000 * 60
        with Session(server.exchange.engine) as s:
            spent = s.execute(select(BudgetRow.spent)).scalar_one()
        assert Decimal(spent) == 1
        with pytest.raises(ApiError) as exc:
            c.psi_join("tax", "companies", "aggregate", ids, PURPOSE, sums=["tax"], epsilon="1.5")
        assert exc.value.status == 429


def test_largest_bounds_times_rows_is_exact(server: LiveServer, tmp_path: Path) -> None:
    """576 rows at the largest bound the rules allow (10^15) sum to 5.76·10^17, just under the
    BFV capacity (t-1)/2; one row more is refused before any work."""
    keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
    top = 10**15
    rows = [(f"C{i:05d}", top) for i in range(577)]
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
        op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
    rules = {
        "min_group_size": 2,
        "columns": {"tax": {"disclosure": "after_aggregate", "lower": "0", "upper": str(top)}},
    }
    with server.client(keys["provider"]) as p:
        p.create_zone("tax", "tax records")
        for name, data in (("big", rows[:576]), ("bigger", rows)):
            p.register_dataset(
                "tax",
                name,
                levels=LEVELS,
                subject_column="company_id",
                file=_write(tmp_path / f"{name}.csv", data),
            )
            p.set_analysis_rules("tax", name, rules)
    with server.client(keys["consumer"]) as c:
        req = c.request_access(
            "tax",
            ["big", "bigger"],
            ["psi_aggregate"],
            PURPOSE,
            duration_seconds=DAY,
            justification="capacity",
        )
        with server.client(keys["provider"]) as p:
            p.approve(req["id"])
        ids = [cid for cid, _ in rows]
        out = c.psi_join("tax", "big", "aggregate", ids[:576], PURPOSE, sums=["tax"])
        assert out["local"]["sums"]["tax"] == 576 * top
        assert 576 * top <= he.bfv_capacity(he.BFV_DEFAULT) < 577 * top
        with pytest.raises(ApiError) as exc:
            c.psi_join("tax", "bigger", "aggregate", ids, PURPOSE, sums=["tax"])
        assert exc.value.status == 422 and exc.value.body["reason"] == "capacity"


# -- a hostile consumer ---------------------------------------------------------------------


def _open(c: Client, mode: str, x_count: int, **extra: Any) -> tuple[str, cpsi.PsiKey, bytes]:
    s = c.psi_create(
        zone="tax", dataset="companies", mode=mode, purpose=PURPOSE, x_count=x_count, **extra
    )
    return s["session"], cpsi.PsiKey.generate(), cpsi.session_domain(s["session"], LABEL)


def _a(key: cpsi.PsiKey, domain: bytes, ids: list[str]) -> bytes:
    return b"".join(cpsi.blind(key, domain, [i.encode() for i in ids]))


def _status(exc: pytest.ExceptionInfo[ApiError]) -> tuple[int, str]:
    return exc.value.status, str(exc.value.body.get("reason", exc.value.code))


def test_small_sets_repeats_and_crafted_points_are_refused(
    server: LiveServer, world: dict[str, Any]
) -> None:
    ids = _applicants(world, 4, 4)
    with _consumer(server, world) as c:
        with pytest.raises(ApiError) as exc:  # one id would make a count a membership test
            _open(c, "cardinality", 1)
        assert _status(exc) == (422, "below_minimum_ids")
        with pytest.raises(ApiError) as exc:
            _open(c, "cardinality", 0)
        assert _status(exc) == (422, "empty_input")
        with pytest.raises(ApiError) as exc:
            _open(c, "cardinality", 10**9)
        assert _status(exc) == (422, "too_many_ids")
        with pytest.raises(ApiError) as exc:
            _open(c, "aggregate", 8, sums=["district"], context="0" * 64)
        assert exc.value.status == 422

        # one id sent many times, within a batch
        sid, key, domain = _open(c, "cardinality", 8)
        same = _a(key, domain, [ids[0]]) * 8
        with pytest.raises(ApiError) as exc:
            c.psi_put_a(sid, 0, same)
        assert _status(exc) == (422, "duplicate_point")
        assert "point 1 repeats point 0" in exc.value.detail
        # crafted points: the identity, a non-canonical encoding, a string that decodes to no
        # element, and a second encoding of point 0 (top bit set: libsodium alone would accept
        # it as the same element, hiding a repeat); the index is named
        good = _a(key, domain, ids[:3])
        twin = good[:31] + bytes([good[31] | 0x80])
        crafted = (
            (bytes(32), "identity"),
            (b"\xff" * 31 + b"\x7f", "valid ristretto255"),
            (b"\x01" * 32, "valid ristretto255"),
            (twin, "valid ristretto255"),
        )
        for bad, why in crafted:
            with pytest.raises(ApiError) as exc:
                c.psi_put_a(sid, 0, good + bad)
            assert _status(exc) == (422, "bad_point")
            assert exc.value.detail.startswith("point 3 ") and why in exc.value.detail
        with pytest.raises(ApiError) as exc:
            c.psi_put_a(sid, 0, good[:40])
        assert _status(exc) == (422, "bad_point")
        # the session survived the refused batches; a repeat across batches closes it
        c.psi_put_a(sid, 0, good)
        with pytest.raises(ApiError) as exc:  # out of order
            c.psi_put_a(sid, 0, good)
        assert _status(exc) == (409, "out_of_order")
        with pytest.raises(ApiError) as exc:
            c.psi_put_a(sid, 3, _a(key, domain, [ids[3], ids[4], ids[5], ids[6], ids[0]]))
        assert _status(exc) == (422, "duplicate_point")
        assert "point 7 repeats point 0" in exc.value.detail
        assert c.psi_session(sid)["state"] == "failed"
        with pytest.raises(ApiError) as exc:
            c.psi_put_a(sid, 8, good)
        assert exc.value.status == 409
        assert not (server.data_dir / "psi" / sid).exists()


def test_replayed_and_out_of_order_steps_get_409(server: LiveServer, world: dict[str, Any]) -> None:
    ids = _applicants(world, 5, 3)
    with _consumer(server, world) as c:
        sid, key, domain = _open(c, "cardinality", len(ids))
        with pytest.raises(ApiError) as exc:
            c.psi_result(sid)
        assert _status(exc) == (409, "out_of_order")
        with pytest.raises(ApiError) as exc:
            c.psi_put_bc(sid, 0, b"\x00" * 32)
        assert _status(exc) == (409, "out_of_order")
        with pytest.raises(ApiError) as exc:
            c.psi_get_b(sid, 0, 10)
        assert _status(exc) == (409, "out_of_order")
        answer = c.psi_put_a(sid, 0, _a(key, domain, ids))
        assert answer["complete"] and answer["y_count"] == 40
        b = c.psi_get_b(sid, 0, 1000)
        bc = b"".join(cpsi.reblind(key, [b[i : i + 32] for i in range(0, len(b), 32)]))
        # points from this session are worthless in another: a second session over the same
        # ids, fed this session's B^c, matches nothing
        sid2, key2, domain2 = _open(c, "cardinality", len(ids))
        c.psi_put_a(sid2, 0, _a(key2, domain2, ids))
        c.psi_put_bc(sid2, 0, bc)
        assert c.psi_result(sid2)["result"]["intersection"] == 0

        c.psi_put_bc(sid, 0, bc[: 32 * 10])
        with pytest.raises(ApiError) as exc:  # replayed batch
            c.psi_put_bc(sid, 0, bc[: 32 * 10])
        assert _status(exc) == (409, "out_of_order")
        c.psi_put_bc(sid, 10, bc[32 * 10 :])
        assert c.psi_result(sid)["result"]["intersection"] == 5
        with pytest.raises(ApiError) as exc:  # the result is released once
            c.psi_result(sid)
        assert _status(exc) == (409, "session_over")
        # another consumer cannot see the session
        stranger = SigningKey.generate()
        with server.client(server.operator) as op:
            op.register_principal("Other Bank", "enterprise", stranger.public_key)
        with server.client(stranger) as o, pytest.raises(ApiError) as exc:
            o.psi_session(sid)
        assert exc.value.status == 404


def test_revocation_mid_session_stops_it(server: LiveServer, world: dict[str, Any]) -> None:
    ids = _applicants(world, 5, 3)
    with _consumer(server, world) as c:
        sid, key, domain = _open(c, "cardinality", len(ids))
        c.psi_put_a(sid, 0, _a(key, domain, ids))
        with server.client(world["keys"]["provider"]) as p:
            p.revoke(world["grant"], "applicant list under review")
        with pytest.raises(ApiError) as exc:
            c.psi_get_b(sid, 0, 100)
        assert exc.value.status == 403 and exc.value.code == "denied"
        info = c.psi_session(sid)
        assert info["state"] == "failed" and info["error"].startswith("denied:")
        assert not (server.data_dir / "psi" / sid).exists()
        assert not list((server.data_dir / "zones" / "tax" / "psi").glob(f"{sid}*"))


def test_expired_session_is_refused_and_deleted(server: LiveServer, world: dict[str, Any]) -> None:
    ids = _applicants(world, 5, 3)
    with _consumer(server, world) as c:
        sid, key, domain = _open(c, "members", len(ids))
        c.psi_put_a(sid, 0, _a(key, domain, ids))
        assert (server.data_dir / "psi" / sid / "b.bin").exists()
        with Session(server.exchange.engine) as s, s.begin():
            s.execute(
                update(PsiSessionRow)
                .where(PsiSessionRow.id == sid)
                .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
            )
        with pytest.raises(ApiError) as exc:
            c.psi_get_b(sid, 0, 100)
        assert _status(exc) == (409, "session_expired")
        assert c.psi_session(sid)["state"] == "expired"
        assert not (server.data_dir / "psi" / sid).exists()
        assert not (server.data_dir / "zones" / "tax" / "psi" / f"{sid}.key").exists()
        # a new session always starts
        again = c.psi_join("tax", "companies", "members", ids, PURPOSE)
        assert again["local"]["intersection"] == 5


def test_aggregate_below_k_is_refused(server: LiveServer, world: dict[str, Any]) -> None:
    with _consumer(server, world) as c:
        with pytest.raises(ApiError) as exc:
            c.psi_join(
                "tax",
                "companies",
                "aggregate",
                _applicants(world, K - 1, 10),
                PURPOSE,
                sums=["tax"],
            )
        assert _status(exc) == (422, "below_k")


# -- leakage --------------------------------------------------------------------------------


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def test_no_raw_ids_or_values_in_exchange_storage(
    server: LiveServer, world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    secret_ids = _applicants(world, 0, 12)  # the consumer's ids the provider does not hold
    ids = _applicants(world, 10, 0) + secret_ids
    with _consumer(server, world) as c:
        c.psi_join("tax", "companies", "cardinality", ids, PURPOSE)
        c.psi_join("tax", "companies", "members", ids, PURPOSE)
        c.psi_join("tax", "companies", "aggregate", ids, PURPOSE, sums=["tax"])
        # a session left half-way keeps only blinded points and ciphertexts
        sid, key, domain = _open(c, "members", len(ids))
        c.psi_put_a(sid, 0, _a(key, domain, ids))
    server.exchange.ledger.checkpoint()

    consumer_needles = [i.encode() for i in secret_ids]
    provider_needles = [str(tax).encode() for _, tax in world["rows"]] + [
        cid.encode() for cid, _ in world["rows"][:10]
    ]
    data = server.data_dir
    # everything on disk, the zone's directory included, holds none of the consumer's ids
    everything = _files(data)
    assert (data / "psi" / sid / "a_prime.bin").exists()
    # the exchange's own storage: control database (and its WAL), PSI artefacts, HE contexts
    exchange_owned = [p for p in everything if p.name.startswith("control.db")]
    exchange_owned += _files(data / "psi") + _files(data / "contexts")
    assert exchange_owned
    for path in everything:
        blob = path.read_bytes()
        for needle in consumer_needles:
            assert needle not in blob, f"a consumer id is in {path}"
    for path in exchange_owned:
        blob = path.read_bytes()
        for needle in provider_needles:
            assert needle not in blob, f"a provider value is in {path}"
    logs = caplog.text.encode()
    for needle in consumer_needles + provider_needles:
        assert needle not in logs
    if server.exchange.engine.dialect.name == "postgresql":
        with server.exchange.engine.connect() as conn:
            dump = "".join(
                str(r)
                for table in ("ledger_entries", "psi_sessions", "privacy_budgets")
                for r in conn.exec_driver_sql(f"SELECT * FROM {table}")
            ).encode()
        for needle in consumer_needles + provider_needles:
            assert needle not in dump
