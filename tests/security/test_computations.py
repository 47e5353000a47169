"""Malformed inputs to the private joins (PSI) and the homomorphic computations (HE):
truncated, duplicate, identity and undecodable points, wrong-length batches, ciphertexts from
another context, oversized and truncated ciphertexts, contexts carrying secrets. Each gets its
exact refusal; the session or context stays as it was.

The PSI cases stay independent of the group: points come from :mod:`crypto.psi`'s public
functions and byte patterns any prime-order group encoding refuses."""

from __future__ import annotations

import csv
import secrets
from pathlib import Path
from typing import Any

import pytest
import tenseal as ts

from crypto import he
from crypto import psi as cpsi
from crypto.errors import CryptoError
from exchange.client.sdk import ApiError, Client
from exchange.server.compute.psi import LABEL
from tests.security._support import DAY, PURPOSE, World, state

N_ROWS = 30


def _refused(call: Any, status: int, code: str, reason: str | None = None) -> str:
    with pytest.raises(ApiError) as exc:
        call()
    body = exc.value.body
    assert (exc.value.status, exc.value.code) == (status, code), body
    assert body["type"] == f"urn:zonex:problem:{code}"
    if reason is not None:
        assert body["reason"] == reason, body
    return exc.value.detail


def _undecodable() -> bytes:
    """32 random bytes that are not a valid group element (most random strings are not)."""
    while True:
        candidate = secrets.token_bytes(cpsi.POINT_BYTES)
        try:
            cpsi.validate_point(candidate)
        except CryptoError:
            return candidate


@pytest.fixture
def joinable(parties: World, tmp_path: Path) -> World:
    server = parties.server
    path = tmp_path / "firms.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["company_id", "tax", "district"])
        for i in range(N_ROWS):
            w.writerow([f"C{i:04d}", 1000 + i, "north"])
    with server.client(parties.key("provider")) as p:
        p.register_dataset(
            "tax",
            "firms",
            levels={"company_id": "L3", "tax": "L3", "district": "L1"},
            subject_column="company_id",
            file=path,
        )
        # exact releases (the provider's L3 opt-out): these tests are about points, not noise
        p.set_analysis_rules("tax", "firms", {"min_group_size": 3, "exact_release": True})
    with server.client(parties.key("consumer")) as c:
        req = c.request_access(
            "tax", ["firms"], ["psi_cardinality"], PURPOSE, duration_seconds=DAY, justification="x"
        )
    with server.client(parties.key("provider")) as p:
        p.approve(req["id"])
    return parties


def _open(c: Client, x_count: int) -> tuple[str, cpsi.PsiKey, bytes]:
    s = c.psi_create(
        zone="tax", dataset="firms", mode="cardinality", purpose=PURPOSE, x_count=x_count
    )
    return s["session"], cpsi.PsiKey.generate(), cpsi.session_domain(s["session"], LABEL)


def test_malformed_psi_points_are_refused_and_the_session_survives(joinable: World) -> None:
    server = joinable.server
    ids = [f"C{i:04d}".encode() for i in range(4)] + [b"X1", b"X2", b"X3", b"X4"]
    with server.client(joinable.key("consumer")) as c:
        sid, key, domain = _open(c, len(ids))
        good = cpsi.blind(key, domain, ids)
        three = b"".join(good[:3])
        bad_batches: list[tuple[bytes, str]] = [
            (b"", "empty_batch"),
            (three[:-1], "bad_point"),  # truncated last point
            (three + b"\x00", "bad_point"),  # one byte over
            (three[:40], "bad_point"),
            (three + bytes(cpsi.POINT_BYTES), "bad_point"),  # all zero (an identity encoding)
            (three + b"\x01" + bytes(cpsi.POINT_BYTES - 1), "bad_point"),  # the other one
            (three + b"\xff" * cpsi.POINT_BYTES, "bad_point"),
            (three + _undecodable(), "bad_point"),
            (three + good[1], "duplicate_point"),
            (good[0] * 2, "duplicate_point"),
            # a point that is not blinded at all (H(x) itself) is accepted by the group check
            # but the batch is then too long for the announced count
            (b"".join(good) + cpsi.hash_to_point(domain, b"extra"), "too_many_ids"),
        ]
        for body, reason in bad_batches:
            detail = _refused(lambda b=body: c.psi_put_a(sid, 0, b), 422, "invalid_input", reason)
            assert "Traceback" not in detail
        # the index of the bad point is named, counted over the whole upload
        detail = _refused(
            lambda: c.psi_put_a(sid, 0, three + _undecodable()), 422, "invalid_input", "bad_point"
        )
        assert detail.startswith("point 3 ")
        # wrong media type and a negative offset never reach the protocol
        _refused(
            lambda: c.request(
                "POST",
                f"/v1/psi/sessions/{sid}/a/points",
                params={"offset": 0},
                content=three,
                headers={"content-type": "application/json"},
            ),
            415,
            "unsupported_media_type",
        )
        _refused(lambda: c.psi_put_a(sid, -1, three), 422, "invalid_input")
        _refused(lambda: c.psi_put_a(sid, 5, three), 409, "conflict", "out_of_order")
        assert c.psi_session(sid)["state"] not in ("failed", "done")
        # the session survived every refused batch
        assert c.psi_put_a(sid, 0, b"".join(good))["complete"]
        b = c.psi_get_b(sid, 0, 1000)
        assert len(b) % cpsi.POINT_BYTES == 0 and len(b) // cpsi.POINT_BYTES == N_ROWS
        bc = cpsi.reblind(key, [b[i : i + 32] for i in range(0, len(b), 32)])
        for body, reason in (
            (b"", "empty_batch"),
            (b"".join(bc)[:-1], "bad_point"),
            (b"".join(bc) + bc[0], "too_many_points"),
            (bc[0] + bc[0], "duplicate_point"),
        ):
            _refused(lambda b=body: c.psi_put_bc(sid, 0, b), 422, "invalid_input", reason)
        _refused(lambda: c.psi_get_b(sid, 0, 0), 422, "invalid_input")
        # another consumer cannot touch the session at all
        with server.client(joinable.key("bank2")) as o:
            _refused(lambda: o.psi_put_bc(sid, 0, b"".join(bc)), 404, "not_found")
            _refused(lambda: o.psi_session(sid), 404, "not_found")
        c.psi_put_bc(sid, 0, b"".join(bc))
        assert c.psi_result(sid)["result"]["intersection"] == 4


def test_psi_sessions_refuse_hostile_parameters(joinable: World) -> None:
    server = joinable.server
    before = state(server)
    with server.client(joinable.key("consumer")) as c:
        for body, status, reason in (
            ({"x_count": 1}, 422, "below_minimum_ids"),
            ({"x_count": 0}, 422, "empty_input"),
            ({"x_count": -5}, 422, None),
            ({"x_count": 10**12}, 422, "too_many_ids"),
            ({"x_count": 8, "mode": "members"}, 403, None),  # not granted
            ({"x_count": 8, "dataset": "../firms"}, 404, None),
            ({"x_count": 8, "mode": "teleport"}, 422, None),
            ({"x_count": 8, "sums": ["tax"]}, 422, None),
            ({"x_count": 8, "epsilon": "-1"}, 422, None),
            ({"x_count": 8, "epsilon": "NaN"}, 422, None),
        ):
            full = {
                "zone": "tax",
                "dataset": "firms",
                "mode": "cardinality",
                "purpose": PURPOSE,
                **body,
            }
            with pytest.raises(ApiError) as exc:
                c.psi_create(**full)
            assert exc.value.status == status, (body, exc.value.body)
            assert exc.value.body["type"].startswith("urn:zonex:problem:")
            if reason is not None:
                assert exc.value.body["reason"] == reason
    assert state(server) == before


@pytest.mark.slow
def test_malformed_he_contexts_and_ciphertexts_are_refused(parties: World) -> None:
    server = parties.server
    with server.client(parties.key("consumer")) as c:
        ckks = he.new_context(he.CKKS_DEFAULT)
        public = he.public_context_bytes(ckks)
        context = c.upload_context(public)["digest"]
        contexts_dir = server.data_dir / "contexts"
        stored = {p.name for p in contexts_dir.iterdir()}
        # garbage, truncated, oversized, and a context that still holds its secret key
        for blob in (
            b"",
            secrets.token_bytes(4096),
            public[: len(public) // 2],
            public + b"\x00" * 16,
            ckks.serialize(save_secret_key=True),
        ):
            with pytest.raises(ApiError) as exc:
                c.upload_context(blob)
            assert exc.value.status in (413, 422), exc.value.body
            if exc.value.status == 422:
                assert exc.value.body["reason"] == "bad_context", exc.value.body
        assert {p.name for p in contexts_dir.iterdir()} == stored
        # ciphertexts: another scheme, another context's parameters, truncated, oversized,
        # bad framing
        bfv = he.new_context(he.BFV_DEFAULT)
        other = he.new_context(he.ParameterSet("ckks", 8192, (60, 40, 40, 60), None, 40))
        genuine = he.encrypt_model(ckks, [1.0, 2.0])[0]
        limit = he.max_ciphertext_bytes(he.CKKS_DEFAULT)
        for blob in (
            he.pack_ciphertexts([he.encrypt_vector(bfv, [1, 2, 3])]),
            he.pack_ciphertexts([ts.ckks_vector(other, [1.0] * 8).serialize()]),
            he.pack_ciphertexts([genuine[: len(genuine) // 2]]),
            he.pack_ciphertexts([secrets.token_bytes(2048)]),
            he.pack_ciphertexts([b"\x00" * (limit + 1)]),
            he.pack_ciphertexts([genuine])[:-1],  # a truncated frame
            he.pack_ciphertexts([genuine]) + b"\x00",  # trailing bytes
            (1 << 31).to_bytes(4, "big") + genuine,  # a frame longer than the body
        ):
            with pytest.raises(ApiError) as exc:
                c.upload_ciphertexts(context, blob)
            assert exc.value.status == 422, exc.value.body
            assert exc.value.body["reason"] in ("bad_ciphertext", "too_large"), exc.value.body
        # an unknown context, and a digest that is not one
        _refused(
            lambda: c.upload_ciphertexts("0" * 64, he.pack_ciphertexts([genuine])),
            404,
            "not_found",
        )
        _refused(lambda: c.upload_ciphertexts("..%2e" * 12 + "abcd", b"\x00"), 422, "invalid_input")
        assert c.upload_ciphertexts(context, he.pack_ciphertexts([genuine]))["count"] == 1
