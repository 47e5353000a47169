"""Private joins on a real server: results against a plaintext computation, the protocol's
guards against a hostile consumer, and what stays out of the exchange's storage."""

from __future__ import annotations

import csv
import json
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
from crypto.encoding import b64url_decode
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange.client.psi import prepare_ids
from exchange.client.sdk import ApiError, Client
from exchange.node import dp
from exchange.server.compute.psi import LABEL, normalize_id
from exchange.server.models import BudgetRow, LedgerEntryRow, PsiSessionRow
from tests.conftest import LiveServer

PURPOSE = "credit-assessment"
DAY = 24 * 3600
K = 3
UPPER = 10**7
LEVELS = {"company_id": "L3", "tax": "L3", "district": "L1"}
#: the world's rules: k = 3, bounds on ``tax`` and the provider's opt-out from DP by default at
#: L3 (exact releases, differencing possible); tests that need the default drop it
RULES: dict[str, Any] = {
    "min_group_size": K,
    "epsilon_budget": "2",
    "exact_release": True,
    "columns": {"tax": {"disclosure": "after_aggregate", "lower": "0", "upper": "7000000"}},
}


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
    grant for all three private joins, and :data:`RULES` (exact releases allowed at L3)."""
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
        p.set_analysis_rules("tax", "companies", RULES)
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
        assert len(b64url_decode(out["result"]["sums"]["tax"])) > 100_000

        # every company, ε = 2: COUNT and SUM get ε = 1 each (discrete Laplace of scale 1 on
        # the count, Laplace of scale 7e6 on the sum). False failures: P(|Z| >= 22) <= 2e^-22
        # = 5.6e-10 for the count, P(|L| >= 25 scales) = e^-25 = 1.4e-11 for the sum, and the
        # gate closing (noisy count < 3, Z <= -38) e^-38: below 1e-9 per run in all
        everyone = [cid for cid, _ in world["rows"]]
        total = sum(min(tax, 7_000_000) for _, tax in world["rows"])
        noisy = c.psi_join(
            "tax", "companies", "aggregate", everyone, PURPOSE, sums=["tax"], epsilon="2"
        )
        assert noisy["result"]["noised"] is True and noisy["result"]["suppressed"] is False
        assert abs(noisy["local"]["count"] - 40) < 22
        assert abs(noisy["local"]["sums"]["tax"] - total) < 7_000_000 * 25 + 1
        with Session(server.exchange.engine) as s:
            spent = s.execute(select(BudgetRow.spent)).scalar_one()
        assert Decimal(spent) == 2
        with pytest.raises(ApiError) as exc:
            c.psi_join("tax", "companies", "aggregate", ids, PURPOSE, sums=["tax"], epsilon="0.5")
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
        "exact_release": True,  # the exact sum is what this test checks
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


def test_exact_aggregate_below_k_is_refused(server: LiveServer, world: dict[str, Any]) -> None:
    """On the exact path (the provider's opt-out) the k gate is exact, as documented."""
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


# -- DP by default: releases over an id list the consumer chooses --------------------------


def _set_rules(server: LiveServer, world: dict[str, Any], **changes: Any) -> None:
    """The provider replaces the world's rules by :data:`RULES` with ``changes`` (``None``
    drops a key)."""
    rules = {k: v for k, v in {**RULES, **changes}.items() if v is not None}
    with server.client(world["keys"]["provider"]) as p:
        p.set_analysis_rules("tax", "companies", rules)


def _entries(server: LiveServer, kind: str) -> list[dict[str, Any]]:
    with Session(server.exchange.engine) as s:
        bodies = s.execute(select(LedgerEntryRow.body).order_by(LedgerEntryRow.seq)).scalars()
        return [e for e in (json.loads(b) for b in bodies) if e["kind"] == kind]


def _spent(server: LiveServer) -> Decimal:
    with Session(server.exchange.engine) as s:
        return sum((Decimal(v) for v in s.execute(select(BudgetRow.spent)).scalars()), Decimal(0))


def _last_session(server: LiveServer) -> PsiSessionRow:
    with Session(server.exchange.engine) as s:
        row = s.execute(
            select(PsiSessionRow).order_by(PsiSessionRow.created_at.desc()).limit(1)
        ).scalar_one()
        s.expunge(row)
        return row


def test_id_list_releases_at_l3_are_dp_by_default(
    server: LiveServer, world: dict[str, Any]
) -> None:
    """Two sessions whose id lists differ by one company tell, released exactly, whether it is
    in the dataset (cardinality, members) or its tax (aggregate). At L3 without the provider's
    opt-out each such release needs ε, is noised and is charged."""
    _set_rules(server, world, exact_release=None, epsilon_budget="10")
    target = world["rows"][0][0]
    ids = _applicants(world, 0, 8)
    with _consumer(server, world) as c:
        for mode, extra in (
            ("cardinality", {}),
            ("members", {}),
            ("aggregate", {"sums": ["tax"]}),
        ):
            with pytest.raises(ApiError) as exc:
                c.psi_join("tax", "companies", mode, [*ids, target], PURPOSE, **extra)
            assert _status(exc) == (422, "dp_required"), mode
        with pytest.raises(ApiError) as exc:  # membership has no noisy form: never at L3 by default
            c.psi_join("tax", "companies", "members", ids, PURPOSE, epsilon="1")
        assert _status(exc) == (422, "dp_required")
        assert _spent(server) == 0 and not _entries(server, "psi.session_opened")

        pair = [
            c.psi_join("tax", "companies", "cardinality", x, PURPOSE, epsilon="1")
            for x in (ids, [*ids, target])
        ]
    for out in pair:
        assert out["result"]["noised"] is True and out["result"]["epsilon"] == "1"
        statement, _ = verify_receipt(out["receipt"], out["result"], server.log_verifier())
        assert statement["epsilon"] == "1" and statement["output_level"] == "L3"
    assert _spent(server) == 2


def test_l4_is_never_exact(server: LiveServer, world: dict[str, Any], tmp_path: Path) -> None:
    levels = {**LEVELS, "tax": "L4"}
    with server.client(world["keys"]["provider"]) as p:
        p.register_dataset(
            "tax",
            "sensitive",
            levels=levels,
            subject_column="company_id",
            file=_write(tmp_path / "sensitive.csv", world["rows"]),
        )
        with pytest.raises(ApiError) as exc:  # the opt-out does not exist at L4
            p.set_analysis_rules("tax", "sensitive", {**RULES, "dp_required": False})
        assert exc.value.status == 422
    with _consumer(server, world) as c:
        req = c.request_access(
            "tax", ["sensitive"], ["psi_aggregate"], PURPOSE, duration_seconds=DAY,
            justification="x",
        )  # fmt: skip
        with server.client(world["keys"]["provider"]) as p:
            p.approve(req["id"])
        with pytest.raises(ApiError) as exc:
            c.psi_create(
                zone="tax", dataset="sensitive", mode="aggregate", purpose=PURPOSE, x_count=5,
                context="0" * 64,
            )  # fmt: skip
        assert _status(exc) == (422, "dp_required")


# -- noisy gates --------------------------------------------------------------------------------


def test_below_k_under_dp_is_a_charged_release_not_a_free_refusal(
    server: LiveServer, world: dict[str, Any]
) -> None:
    """An exact refusal below k, free of charge, answers "are at least k of these ids in the
    dataset?" as often as asked. Under DP the gate reads the noisy count: whatever it decides,
    the consumer gets a receipt and pays ε."""
    _set_rules(server, world, exact_release=None, epsilon_budget="10")
    with _consumer(server, world) as c:
        out = c.psi_join(
            "tax", "companies", "aggregate", _applicants(world, K - 1, 6), PURPOSE,
            sums=["tax"], epsilon="1",
        )  # fmt: skip
    result = out["result"]
    statement, _ = verify_receipt(out["receipt"], result, server.log_verifier())
    assert statement["epsilon"] == "1" and statement["k"] == K
    assert _spent(server) == 1
    if result["suppressed"]:
        assert result["count"] is None and result["sums"] == {}
        assert out["local"]["suppressed"] is True and out["local"]["sums"] == {}
    else:
        assert result["count"] >= K and set(result["sums"]) == {"tax"}


@pytest.mark.parametrize(("hits", "noisy"), [(0, K + 4), (20, K - 1)])
def test_the_gate_decides_on_the_released_noisy_count(
    server: LiveServer,
    world: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    hits: int,
    noisy: int,
) -> None:
    """The noise is fixed here so the decision is deterministic: an empty intersection whose
    noisy count reads k + 4 is released (the count released is that noisy count: no second
    draw, no extra ε); 20 companies whose noisy count reads k - 1 are suppressed, charged and
    receipted."""
    _set_rules(server, world, exact_release=None, epsilon_budget="10")
    seen: list[int] = []

    def fixed(gate: dp.Gate, true: int) -> int:
        seen.append(true)
        return noisy

    monkeypatch.setattr(dp.Gate, "noisy", fixed)
    with _consumer(server, world) as c:
        out = c.psi_join(
            "tax", "companies", "aggregate", _applicants(world, hits, 5), PURPOSE,
            sums=["tax"], epsilon="2",
        )  # fmt: skip
    result, local = out["result"], out["local"]
    verify_receipt(out["receipt"], result, server.log_verifier())
    assert seen == [hits]
    assert _spent(server) == 2
    if noisy >= K:
        assert result["suppressed"] is False and result["count"] == noisy == local["count"]
        assert set(local["sums"]) == {"tax"}
    else:
        assert result["suppressed"] is True and result["count"] is None
        assert result["sums"] == {} and local["suppressed"] is True and local["sums"] == {}
        assert local["averages"] == {}


# -- every uploaded list is checked whole ----------------------------------------------------


def _aggregate_session(c: Client, ids: list[str]) -> tuple[str, cpsi.PsiKey, bytes, int]:
    ctx = he.new_context(he.BFV_DEFAULT)
    digest = c.upload_context(he.public_context_bytes(ctx))["digest"]
    sid, key, domain = _open(c, "aggregate", len(ids), sums=["tax"], context=digest)
    answer = c.psi_put_a(sid, 0, _a(key, domain, ids))
    return sid, key, domain, int(answer["y_count"])


def test_a_bc_point_repeated_across_batches_fails_the_session(
    server: LiveServer, world: dict[str, Any]
) -> None:
    """The attack: one id in X, and the B^c point that matches it copied into every position,
    one point per batch (no batch holds a repeat). Unchecked, every position matches: COUNT =
    |Y| >= k from a single id (k bypassed, membership told) and SUM = every subject's value;
    with two such sessions, one position left out, one value exactly. The whole upload is
    checked before anything is matched; the session fails and the failure is ledgered."""
    target = world["rows"][5][0]
    with _consumer(server, world) as c:
        sid, key, domain, y = _aggregate_session(c, [target])
        b = c.psi_get_b(sid, 0, y)
        points = [b[i : i + 32] for i in range(0, len(b), 32)]
        # the test finds the matching position at once with the zone's key; a consumer finds
        # it by trying positions, one session each
        zone_key = (server.data_dir / "zones" / "tax" / "psi" / f"{sid}.key").read_bytes()
        mine = cpsi.blind(cpsi.PsiKey.from_bytes(zone_key), domain, [target.encode()])[0]
        copied = cpsi.reblind(key, [points[points.index(mine)]])[0]
        for offset in range(y - 1):
            c.psi_put_bc(sid, offset, copied)
        with pytest.raises(ApiError) as exc:
            c.psi_put_bc(sid, y - 1, copied)
        assert _status(exc) == (422, "duplicate_point")
        assert "point 1 repeats point 0" in exc.value.detail
        info = c.psi_session(sid)
        assert info["state"] == "failed" and info["error"] == "duplicate_point"
        with pytest.raises(ApiError) as exc:
            c.psi_result(sid)
        assert _status(exc) == (409, "session_over")
    assert not (server.data_dir / "psi" / sid).exists()
    failed = [e for e in _entries(server, "psi.session_failed") if e["refs"]["session"] == sid]
    assert [e["attrs"]["reason"] for e in failed] == ["duplicate_point"]
    assert not _entries(server, "computation.psi_aggregate")


def test_lists_are_checked_again_before_matching(server: LiveServer, world: dict[str, Any]) -> None:
    """The matcher checks both lists whole itself (a stored list altered between upload and
    result is never matched)."""
    ids = _applicants(world, 5, 3)
    with _consumer(server, world) as c:
        sid, key, domain = _open(c, "cardinality", len(ids))
        c.psi_put_a(sid, 0, _a(key, domain, ids))
        b = c.psi_get_b(sid, 0, 1000)
        c.psi_put_bc(
            sid, 0, b"".join(cpsi.reblind(key, [b[i : i + 32] for i in range(0, len(b), 32)]))
        )
        stored = server.data_dir / "psi" / sid / "bc.bin"
        data = stored.read_bytes()
        stored.write_bytes(data[:32] + data[:32] + data[64:])
        with pytest.raises(ApiError) as exc:
            c.psi_result(sid)
        assert _status(exc) == (422, "duplicate_point")
        assert c.psi_session(sid)["state"] == "failed"


# -- the rules in force apply at every step ---------------------------------------------------

_TIGHTER: dict[str, tuple[dict[str, Any], str]] = {
    "k raised": ({"min_group_size": 30}, "below_k"),
    "exact release withdrawn": ({"exact_release": None}, "dp_required"),
    "dp required": ({"exact_release": None, "dp_required": True}, "dp_required"),
    "bounds changed": (
        {"columns": {"tax": {"disclosure": "after_aggregate", "lower": "0", "upper": "6000000"}}},
        "rules_changed",
    ),
    "no longer summable": ({"columns": {"tax": {"disclosure": "none"}}}, "not_summable"),
}


@pytest.mark.parametrize("change", list(_TIGHTER))
def test_rules_tightened_before_release_apply(
    server: LiveServer, world: dict[str, Any], change: str
) -> None:
    """An exact session (no ε, opened under the opt-out, k = 3, tax in [0, 7e6]) whose provider
    tightens the rules after B^c is complete: the release applies the stricter rules or, where
    the session cannot comply, fails it (ledgered, artefacts deleted); nothing is released."""
    rules, reason = _TIGHTER[change]

    def tighten(phase: str, done: int, total: int) -> None:
        if phase == "send B^c" and done == total:
            _set_rules(server, world, **rules)

    with _consumer(server, world) as c, pytest.raises(ApiError) as exc:
        c.psi_join(
            "tax", "companies", "aggregate", _applicants(world, 20, 6), PURPOSE,
            sums=["tax"], progress=tighten,
        )  # fmt: skip
    assert _status(exc) == (422, reason)
    row = _last_session(server)
    assert row.state == "failed" and row.error == reason
    assert not (server.data_dir / "psi" / row.id).exists()
    assert not (server.data_dir / "zones" / "tax" / "psi" / f"{row.id}.key").exists()
    failed = [e for e in _entries(server, "psi.session_failed") if e["refs"]["session"] == row.id]
    assert [e["attrs"]["reason"] for e in failed] == [reason]
    assert not _entries(server, "computation.psi_aggregate")


@pytest.mark.parametrize(
    ("mode", "rules", "reason"),
    [
        ("cardinality", {"exact_release": None}, "dp_required"),
        ("cardinality", {"min_group_size": 20}, "below_minimum_ids"),
        ("members", {"exact_release": None}, "dp_required"),
    ],
)
def test_rules_tightened_mid_session_stop_the_next_step(
    server: LiveServer, world: dict[str, Any], mode: str, rules: dict[str, Any], reason: str
) -> None:
    """Tightened after A: the very next step (downloading B) refuses and fails the session."""

    def tighten(phase: str, done: int, total: int) -> None:
        if phase == "zone" and done == 1:
            _set_rules(server, world, **rules)

    with _consumer(server, world) as c, pytest.raises(ApiError) as exc:
        c.psi_join("tax", "companies", mode, _applicants(world, 8, 4), PURPOSE, progress=tighten)
    assert _status(exc) == (422, reason)
    row = _last_session(server)
    assert row.state == "failed" and row.error == reason and row.step == "b_ready"
    assert not (server.data_dir / "psi" / row.id).exists()


def test_a_raised_k_gates_a_dp_release(
    server: LiveServer, world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under DP the gate uses the larger of the session's k and the k in force at release."""
    _set_rules(server, world, exact_release=None, epsilon_budget="10")
    monkeypatch.setattr(dp.Gate, "noisy", lambda gate, true: 25)

    def tighten(phase: str, done: int, total: int) -> None:
        if phase == "send B^c" and done == total:
            _set_rules(server, world, exact_release=None, epsilon_budget="10", min_group_size=30)

    with _consumer(server, world) as c:
        out = c.psi_join(
            "tax", "companies", "aggregate", _applicants(world, 20, 6), PURPOSE,
            sums=["tax"], epsilon="1", progress=tighten,
        )  # fmt: skip
    assert out["result"]["suppressed"] is True and out["result"]["k"] == 30
    statement, _ = verify_receipt(out["receipt"], out["result"], server.log_verifier())
    assert statement["k"] == 30


# -- one ε parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epsilon", "reason"),
    [
        ("1e-30", "bad_epsilon"),
        ("0.0000000001", "bad_epsilon"),
        ("1E+400", "bad_epsilon"),
        ("Infinity", "bad_epsilon"),
        ("11", "bad_epsilon"),
        (" ", "bad_epsilon"),
        ("0.009", "epsilon_below_floor"),
        ("0", "epsilon_below_floor"),
    ],
)
def test_extreme_epsilons_are_422_naming_epsilon(
    server: LiveServer, world: dict[str, Any], epsilon: str, reason: str
) -> None:
    _set_rules(server, world, exact_release=None)
    with _consumer(server, world) as c:
        for mode in ("cardinality", "aggregate"):
            with pytest.raises(ApiError) as exc:
                _open(c, mode, 8, epsilon=epsilon)
            assert _status(exc) == (422, reason), (mode, exc.value.body)
            assert "epsilon" in exc.value.detail
    assert not _entries(server, "psi.session_opened")


# -- ids with control characters ----------------------------------------------------------------


def test_consumer_ids_with_control_characters_are_refused_naming_the_row() -> None:
    # C0, C1 and DEL controls; a zero-width space and a right-to-left override (format
    # characters: one printed id that would hash as another)
    for bad in ("ACME\x00Ltd", "AC\x1b[2JME", "AC\u0085ME", "A\x7f", "AC\u200bME", "AC\u202eME"):
        with pytest.raises(ValueError) as exc:
            prepare_ids(["C1", "", bad, "C2"])
        message = str(exc.value)
        assert message.startswith("row 3: ") and "control or format character" in message
        assert "ACME" not in message and len(message.splitlines()) == 1
    with pytest.raises(ValueError) as exc:
        prepare_ids(["C1", "x" * 513])
    assert str(exc.value).startswith("row 2: ")
    # surrounding whitespace (tabs included) is trimmed, not refused
    assert prepare_ids(["\tC1 \n"]).distinct == ["C1"]


def test_provider_ids_with_control_characters_are_skipped_and_never_echoed(
    server: LiveServer, world: dict[str, Any], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    dirty = ["BELL\x07COMPANY", "WIPE\x1b[2JCOMPANY", "HIDDEN\u200bCOMPANY"]
    with server.client(world["keys"]["provider"]) as p:
        p.register_dataset(
            "tax",
            "dirty",
            levels=LEVELS,
            subject_column="company_id",
            file=_write(tmp_path / "dirty.csv", [*world["rows"][:10], *((d, 1) for d in dirty)]),
        )
        p.set_analysis_rules("tax", "dirty", RULES)
    with _consumer(server, world) as c:
        req = c.request_access(
            "tax", ["dirty"], ["psi_cardinality"], PURPOSE, duration_seconds=DAY,
            justification="x",
        )  # fmt: skip
        with server.client(world["keys"]["provider"]) as p:
            p.approve(req["id"])
        ids = [cid for cid, _ in world["rows"][:10]] + ["BELLCOMPANY", "HIDDENCOMPANY"]
        out = c.psi_join("tax", "dirty", "cardinality", ids, PURPOSE)
    assert out["result"]["y_count"] == 10 and out["result"]["intersection"] == 10
    (entry,) = _entries(server, "computation.psi_cardinality")
    assert entry["attrs"]["y_skipped"] == 3
    with Session(server.exchange.engine) as s:
        ledger = b"".join(s.execute(select(LedgerEntryRow.body)).scalars())
    for needle in ("BELL", "WIPE", "HIDDEN"):
        assert needle.encode() not in ledger and needle not in caplog.text
        assert needle not in json.dumps(out)


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
