"""Homomorphic-encryption benchmark: sizes, timings and accuracy of crypto.he, with baselines.

    python -P bench/he.py [--rows 1000000] [--entities 100000] [--features 32] [--zones 3]
                          [--only parameters,psi,scores,sums,service-scores,service-sums]

Prints, in one run:
- per parameter set: security level, context creation time, public context bytes as sent
  (public key only) next to the same context with relinearization and with Galois keys, and
  fresh ciphertext bytes;
- psi_aggregate over --rows rows with |v| <= 1e9: provider encryption, exchange masked total,
  consumer decryption, bytes moved and noise budget left, next to a rotation-based slot sum
  (what the zero-sum mask replaces: Galois keys, half the slots per ciphertext) and a plain
  numpy masked sum, with ratios;
- he_score for --entities entities x --features features: timings, bytes, accuracy against
  numpy (error over sum_j |w_j x_ij|), and the systematic bias of TenSEAL's default scale next
  to the scale-p encoding, each beside the bias the parameters predict;
- secure_sum of --zones zones' vectors, BFV and CKKS.
- the services end to end, in-process on a temporary exchange (SQLite control plane, DuckDB
  zone store): ``he_score`` of --entities consented entities x --features features through
  :func:`exchange.server.compute.score.run_score` (authorization, consent check, feature read,
  packed scoring, receipt) next to a one-ciphertext-per-entity baseline (TenSEAL ``dot`` with Galois
  keys, run on --sample entities and extrapolated) and plain numpy; each step of its data path
  (digests, consent lookup, feature read, encrypted scoring) and run_score itself are timed
  against the unbatched path they replaced (kept below), alternating --repeats times, with the
  load average; and ``secure_sum`` of --zones zones' --cells-cell vectors through
  :func:`exchange.server.compute.secure_sum.run_secure_sum` with total time and bytes on the wire.

``--only service-scores`` (comma-separated sections; ``services`` for both service sections)
runs part of it.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import tenseal as ts
import tenseal.sealapi as seal
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

import crypto.he as he
from crypto.encoding import b64url_decode
from crypto.envelope import sign_envelope
from crypto.kdf import derive_key, encode_parts
from crypto.keys import SigningKey
from exchange import subjects
from exchange.client import he as he_client
from exchange.domain import APPROVAL_TYPE, Principal, approval_payload
from exchange.keyfile import load_private_key
from exchange.server import access, services
from exchange.server.compute import contexts
from exchange.server.compute import rules as rules_service
from exchange.server.compute import score as score_service
from exchange.server.compute import secure_sum as secure_sum_service
from exchange.server.compute.source import open_source
from exchange.server.models import ConsentRow, DatasetRow
from exchange.server.runtime import Exchange, init_data_dir
from exchange.settings import Settings

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB"


def bench_parameters() -> None:
    print("== parameter sets")
    for name, params in he.PARAMETER_SETS.items():
        ctx, made = timed(lambda params=params: he.new_context(params))
        public = he.public_context_bytes(ctx)
        relin = ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=False,
            save_relin_keys=True,
        )
        _, galois_time = timed(ctx.generate_galois_keys)
        galois = ctx.serialize(
            save_public_key=True,
            save_secret_key=False,
            save_galois_keys=True,
            save_relin_keys=False,
        )
        if params.scheme == "bfv":
            ct = he.encrypt_vector(ctx, [10**9] * he.slot_count(params))
        else:
            ct = he.encrypt_vector(ctx, [1e6] * he.slot_count(params))
        print(
            f"{name}: n={params.poly_modulus_degree}, log2 q={params.total_bits} "
            f"{params.coeff_mod_bit_sizes}, {he.security_level(params)}-bit, "
            f"{he.slot_count(params)} slots"
        )
        print(
            f"  context {made * 1e3:.0f} ms; public context {mb(len(public))} "
            f"(+relin keys {mb(len(relin))}, +Galois keys {mb(len(galois))}: "
            f"{len(galois) / len(public):.0f}x, {galois_time:.2f} s to generate)"
        )
        print(
            f"  fresh ciphertext {mb(len(ct))} (bound {mb(he.max_ciphertext_bytes(params))}); "
            f"public context bound {mb(he.max_public_context_bytes(params))}"
        )


def rotation_total(
    secret: Any, values: list[int], mask: list[int], noise: int
) -> tuple[int, float, float, int, int]:
    """The alternative to zero-sum masking: pack n/2 rows per ciphertext (TenSEAL rotates BFV
    slots within one row only), mask, add, then rotate-and-sum so every slot holds the total.
    Returns (total, provider s, exchange s, public context bytes, ciphertexts)."""
    secret.generate_galois_keys()
    public_bytes = secret.serialize(
        save_public_key=True, save_secret_key=False, save_galois_keys=True, save_relin_keys=False
    )
    public = ts.context_from(public_bytes, n_threads=1)
    half = he.slot_count(he.BFV_DEFAULT) // 2

    def provide() -> list[bytes]:
        return [
            ts.bfv_vector(
                public, values[i : i + half] + [0] * (half - len(values[i : i + half]))
            ).serialize()
            for i in range(0, len(values), half)
        ]

    chunks, provider = timed(provide)

    def exchange() -> bytes:
        acc = None
        for k, blob in enumerate(chunks):
            part = mask[k * half : (k + 1) * half]
            vector = ts.bfv_vector_from(public, blob)
            vector.mul_(part + [0] * (half - len(part)))
            acc = vector if acc is None else acc.add_(vector)
        assert acc is not None
        acc.add_([noise] + [0] * (half - 1))
        return bytes(acc.sum().serialize())

    result, exchange_time = timed(exchange)
    total = int(ts.bfv_vector_from(secret, result).decrypt()[0])
    return total, provider, exchange_time, len(public_bytes), len(chunks)


def bench_psi_aggregate(rows: int) -> None:
    print(f"\n== psi_aggregate: {rows:,} rows, values in [-1e9, 1e9], half of them matched")
    params = he.BFV_DEFAULT
    bound = 10**9
    he.verify_capacity(params, lo=-bound, hi=bound, max_rows=rows, noise_bound=10**6)
    rng = random.Random(1)
    values = [rng.randint(-bound, bound) for _ in range(rows)]
    mask = [rng.randint(0, 1) for _ in range(rows)]
    noise = 4242
    secret = he.new_context(params)
    public_bytes = he.public_context_bytes(secret)
    public = he.load_public_context(
        public_bytes, max_bytes=he.max_public_context_bytes(params), expected=params
    )
    slots = he.slot_count(params)
    masks = [mask[i : i + slots] for i in range(0, rows, slots)]
    chunks, provider = timed(
        lambda: he.encrypt_column_chunks(public, values, bounds=(-bound, bound))
    )
    result, exchange = timed(
        lambda: he.masked_total(public, chunks, masks, noise, bounds=(-bound, bound))
    )
    total, consumer = timed(lambda: he.decrypt_total(secret, result))
    budget = he.bfv_noise_budget(secret, result)
    x, m = np.array(values, dtype=np.int64), np.array(mask, dtype=np.int64)
    plain_total, plain = timed(lambda: int(x @ m) + noise)
    assert total == plain_total, (total, plain_total)
    moved = sum(len(c) for c in chunks)
    print(f"exact: {total == plain_total} (total {total:,}); capacity {he.bfv_capacity(params):,}")
    print(
        f"provider encrypts {len(chunks)} ciphertexts in {provider:.2f} s "
        f"({provider / len(chunks) * 1e3:.1f} ms each), uploads {mb(moved)}"
    )
    print(
        f"exchange masked total {exchange:.2f} s ({exchange / len(chunks) * 1e3:.1f} ms/chunk); "
        f"result {mb(len(result))}; noise budget left {budget} bits"
    )
    print(f"consumer decrypts in {consumer * 1e3:.1f} ms; public context {mb(len(public_bytes))}")
    rot_total, rot_provider, rot_exchange, rot_public, rot_chunks = rotation_total(
        he.new_context(params), values, mask, noise
    )
    assert rot_total == plain_total
    print(
        f"rotation sum instead: {rot_chunks} ciphertexts, provider {rot_provider:.2f} s, "
        f"exchange {rot_exchange:.2f} s, public context {mb(rot_public)}"
    )
    print(
        f"ratios zero-sum / rotation: provider {provider / rot_provider:.2f}x, "
        f"exchange {exchange / rot_exchange:.2f}x, upload {len(chunks) / rot_chunks:.2f}x, "
        f"public context {len(public_bytes) / rot_public:.3f}x"
    )
    print(
        f"plain numpy masked sum {plain * 1e3:.2f} ms: HE end to end is "
        f"{(provider + exchange + consumer) / plain:,.0f}x"
    )


def bench_scores(entities: int, features: int) -> None:
    print(f"\n== he_score: {entities:,} entities x {features} features, |x| <= 1e6")
    params = he.CKKS_DEFAULT
    rng = np.random.default_rng(7)
    x = rng.uniform(-1e6, 1e6, (entities, features))
    w = rng.choice([-1.0, 1.0], features) * 10.0 ** rng.uniform(-5, 3, features)
    bias = 0.75
    secret = he.new_context(params)
    public = he.load_public_context(
        he.public_context_bytes(secret), max_bytes=he.max_public_context_bytes(params)
    )
    enc, encrypt = timed(lambda: he.encrypt_model(secret, w.tolist()))
    rows = x.tolist()
    chunks, score = timed(lambda: he.encrypted_scores(public, enc, rows))
    got, decrypt = timed(lambda: he.decrypt_scores(secret, chunks, entities, bias=bias))
    expected, plain = timed(lambda: x @ w + bias)
    magnitude = np.abs(x) @ np.abs(w) + abs(bias)
    rel = (np.array(got) - expected) / magnitude
    plain_rel = np.abs((np.array(got) - expected) / expected)
    print(
        f"consumer encrypts {features} weights in {encrypt:.2f} s, sends "
        f"{mb(sum(len(e) for e in enc))}"
    )
    print(
        f"provider scores {len(chunks)} ciphertexts in {score:.2f} s "
        f"({score / entities * 1e6:.1f} us/entity), returns {mb(sum(len(c) for c in chunks))}"
    )
    print(f"consumer decrypts in {decrypt:.2f} s; numpy X @ w {plain * 1e3:.2f} ms")
    print(
        f"error / sum_j |w_j x_ij|: max {np.max(np.abs(rel)):.2e}, mean (bias) "
        f"{np.mean(rel):+.2e}; plain relative error median {np.median(plain_rel):.2e}, "
        f"99th percentile {np.percentile(plain_rel, 99):.2e}"
    )
    for label, chain, bits in (
        ("ckks-8192 (60,50,50,58)", params, 50),
        (
            "40-bit chain (60,40,40,60)",
            he.ParameterSet("ckks", 8192, (60, 40, 40, 60), None, 40),
            40,
        ),
    ):
        measured, fixed = default_scale_bias(chain, bits)
        print(
            f"scale bias, {label}: TenSEAL default scale {measured:+.4e} "
            f"(predicted 2^{bits}/p - 1 = {he.scale_bias(chain):+.4e}); scale p {fixed:+.1e}"
        )


def default_scale_bias(params: he.ParameterSet, bits: int) -> tuple[float, float]:
    """Mean relative error of positive scores with both operands at 2**bits vs weights at p."""
    ctx = he.new_context(params)
    slots = he.slot_count(params)
    p = float(seal.CoeffModulus.Create(8192, list(params.coeff_mod_bit_sizes))[-2].value())
    rng = np.random.default_rng(3)
    x = rng.uniform(1, 1000, (slots, 4))
    w = rng.uniform(1, 10, 4)
    exact = x @ w
    out = []
    for scale in (2.0**bits, p):
        acc = None
        for j in range(4):
            term = ts.ckks_vector(ctx, [float(w[j])] * slots, scale).mul(x[:, j].tolist())
            acc = term if acc is None else acc.add_(term)
        assert acc is not None
        out.append(float(np.mean(np.array(acc.decrypt()) / exact - 1)))
    return out[0], out[1]


def bench_secure_sum(zones: int) -> None:
    print(f"\n== secure_sum: {zones} zones")
    for params in (he.BFV_DEFAULT, he.CKKS_DEFAULT):
        secure_sum_once(params, zones, 1000)


def secure_sum_once(params: he.ParameterSet, zones: int, length: int) -> None:
    secret = he.new_context(params)
    public = he.load_public_context(
        he.public_context_bytes(secret), max_bytes=he.max_public_context_bytes(params)
    )
    rng = np.random.default_rng(5)
    if params.scheme == "bfv":
        parts: list[Any] = [rng.integers(-(10**12), 10**12, length).tolist() for _ in range(zones)]
        noise: list[Any] = rng.integers(-100, 100, length).tolist()
    else:
        parts = [rng.uniform(-1e6, 1e6, length).tolist() for _ in range(zones)]
        noise = rng.laplace(0, 10, length).tolist()
    times = []
    blobs = []
    for part in parts:
        start = time.perf_counter()
        blobs.append(he.encrypt_vector(public, part))
        times.append(time.perf_counter() - start)
    total, add = timed(lambda: he.sum_ciphertexts(public, blobs, noise))
    got, decrypt = timed(lambda: he.decrypt_vector(secret, total, length))
    if params.scheme == "bfv":
        expected = [sum(column) + n for *column, n in zip(*parts, noise, strict=True)]
        quality = f"exact: {list(got) == expected}"
    else:
        err = np.max(np.abs(np.array(got) - (np.sum(parts, axis=0) + np.array(noise))))
        quality = f"max abs error {err:.1e}"
    print(
        f"{params.scheme}: {length} values/zone, encrypt {statistics.median(times) * 1e3:.1f} "
        f"ms per zone ({mb(len(blobs[0]))}), sum {add * 1e3:.1f} ms, decrypt "
        f"{decrypt * 1e3:.1f} ms; {quality}"
    )


# -- the services, end to end in-process ---------------------------------------------------

SCORE_PURPOSE = "credit-assessment"
SUM_PURPOSE = "statistics"


def _exchange(work: Path) -> tuple[Exchange, Principal]:
    data_dir = work / "exchange"
    init_data_dir(data_dir)
    ex = Exchange(Settings.from_data_dir(data_dir))
    ex.start()
    operator = services.get_principal(ex, load_private_key(data_dir / "operator.key").key_id)
    assert operator is not None
    return ex, operator


def _principal(ex: Exchange, operator: Principal, name: str, kind: str) -> tuple[Principal, Any]:
    key = SigningKey.generate()
    return services.register_principal(ex, operator, name, kind, key.public_key.raw), key


def _grant(
    ex: Exchange,
    consumer: Principal,
    provider: Principal,
    provider_key: SigningKey,
    zone: str,
    dataset: str,
    operation: str,
    purpose: str,
) -> None:
    req = access.file_request(ex, consumer, zone, [dataset], [operation], purpose, 86400, "bench")
    terms = {
        "id": req.id,
        "consumer": req.consumer,
        "zone": req.zone,
        "datasets": list(req.datasets),
        "operations": list(req.operations),
        "purpose": req.purpose,
    }
    payload = approval_payload(
        terms, approver=provider.key_id, not_after=datetime.now(UTC) + timedelta(hours=1)
    )
    access.approve_request(
        ex, provider, req.id, sign_envelope(APPROVAL_TYPE, payload, [provider_key])
    )


def _dataset(
    ex: Exchange, provider: Principal, zone: str, name: str, path: Path, levels: dict[str, str]
) -> None:
    upload = services.stage_upload(
        ex, provider, zone, "application/vnd.apache.parquet", path.read_bytes()
    )
    services.register_dataset(
        ex,
        provider,
        zone,
        services.DatasetSpec(
            name=name,
            description="bench",
            subject_column="company_id",
            levels=levels,
            upload_id=str(upload["upload_id"]),
        ),
    )


@dataclass
class ScoreFixture:
    """A temporary exchange with a tax zone of ``entities`` firms x ``features`` features, all
    consented for a bank that holds a committed model, its context and uploaded weights."""

    ex: Exchange
    bank: Principal
    ids: list[str]
    x: np.ndarray
    w: np.ndarray
    secret: Any
    public: bytes
    packed: bytes
    model: he_client.Model
    context: str
    weights: str
    keygen: float
    encrypt: float

    def run(self) -> dict[str, Any]:
        return score_service.run_score(
            self.ex,
            self.bank,
            zone="tax",
            dataset="firms",
            purpose=SCORE_PURPOSE,
            model=self.model.commitment,
            context=self.context,
            weights=self.weights,
            ids=self.ids,
        )


def score_fixture(work: Path, entities: int, features: int) -> ScoreFixture:
    """Set up :class:`ScoreFixture`; the caller closes ``fixture.ex``."""
    ex, operator = _exchange(work)
    provider, provider_key = _principal(ex, operator, "Tax Bureau", "agency")
    bank, _ = _principal(ex, operator, "City Bank", "enterprise")
    services.create_zone(ex, provider, "tax", "tax records")
    names = [f"f{j:02d}" for j in range(features)]
    rng = np.random.default_rng(11)
    x = np.round(rng.uniform(0, 1e6, (entities, features)), 2)
    ids = [f"C{i:010d}" for i in range(entities)]
    table = {"company_id": ids, **{n: x[:, j] for j, n in enumerate(names)}}
    path = work / "firms.parquet"
    con = duckdb.connect()
    con.register("firms_df", pa.table(table))
    con.execute(f"COPY firms_df TO '{path}' (FORMAT parquet)")
    _dataset(ex, provider, "tax", "firms", path, {"company_id": "L3", **dict.fromkeys(names, "L3")})
    _grant(ex, bank, provider, provider_key, "tax", "firms", "he_score", SCORE_PURPOSE)
    # consents recorded in bulk for the benchmark (one ledgered call each in real use)
    until = datetime.now(UTC) + timedelta(days=1)
    digests = subjects.ZoneSubjects.of(ex.zones_dir / "tax").consent_digests(ids)
    with Session(ex.engine) as session:
        session.execute(
            insert(ConsentRow),
            [
                {
                    "id": f"consent-b{i}",
                    "zone": "tax",
                    "subject_digest": d,
                    "consumer": bank.key_id,
                    "purpose": SCORE_PURPOSE,
                    "expires_at": until,
                    "status": "active",
                    "recorded_by": provider.key_id,
                    "created_at": datetime.now(UTC),
                }
                for i, d in enumerate(digests)
            ],
        )
        session.commit()

    w = rng.choice([-1.0, 1.0], features) * 10.0 ** rng.uniform(-5, 3, features)
    model = he_client.new_model(names, w.tolist(), bias=0.5)
    score_service.commit_model(ex, bank, model.document())
    secret, keygen = timed(lambda: he.new_context(he.CKKS_DEFAULT))
    public = he.public_context_bytes(secret)
    context = contexts.register_context(ex, bank, public).digest
    packed, encrypt = timed(lambda: he.pack_ciphertexts(he.encrypt_model(secret, w.tolist())))
    weights = contexts.store_ciphertexts(ex, bank, context, packed).digest
    return ScoreFixture(
        ex, bank, ids, x, w, secret, public, packed, model, context, weights, keygen, encrypt
    )


# -- he_score before its batching, kept as the baseline for run_score's own overhead ----------
#
# The code below is run_score's data path as it was before the feature read, the digests, the
# consent lookup and the scoring input were batched: per-id HMAC objects, an ORM lookup in
# chunks of 2,000 digests with a per-row expiry check, the features read in chunks of 5,000 ids
# as Python rows and a matrix of Python floats, and per-row checks and transposes in Python
# before each TenSEAL multiply. bench_service_scores times it beside the current path.


def digests_before(ex: Exchange, zone: str, ids: Sequence[str]) -> list[str]:
    """The consent digests as one HMAC object per id (today's key and encoding)."""
    key = derive_key(access._salt(ex.zones_dir / zone), subjects.LABELS["consent-digest"])
    return [hmac.new(key, encode_parts(i.encode()), hashlib.sha256).hexdigest() for i in ids]


def live_consents_before(
    ex: Exchange, zone: str, ids: Sequence[str], consumer: str, purpose: str
) -> list[str | None]:
    """access.live_consents on the path above (the digest stands in for the consent id)."""
    digests = digests_before(ex, zone, ids)
    found = has_live_consent_before(ex, zone, digests, consumer, purpose)
    return [d if found[d] else None for d in digests]


def has_live_consent_before(
    ex: Exchange,
    zone: str,
    digests: Iterable[str],
    consumer: str,
    purpose: str,
    now: datetime | None = None,
) -> dict[str, bool]:
    moment = now or datetime.now(UTC)
    wanted = list(dict.fromkeys(digests))
    vocabulary = ex.policy.point.vocabulary
    found = dict.fromkeys(wanted, False)
    covers: dict[str, bool] = {}
    with Session(ex.engine) as session:
        for i in range(0, len(wanted), 2000):
            chunk = wanted[i : i + 2000]
            rows = session.execute(
                select(ConsentRow.subject_digest, ConsentRow.purpose, ConsentRow.expires_at).where(
                    ConsentRow.zone == zone,
                    ConsentRow.consumer == consumer,
                    ConsentRow.status == "active",
                    ConsentRow.subject_digest.in_(chunk),
                    ConsentRow.expires_at > moment,
                )
            )
            for digest, granted_purpose, expires_at in rows:
                ok = covers.get(granted_purpose)
                if ok is None:
                    ok = covers[granted_purpose] = vocabulary.is_within(purpose, granted_purpose)
                if ok and moment < expires_at:
                    found[digest] = True
    return found


def read_features_before(
    ex: Exchange, row: DatasetRow, features: Sequence[str], ids: Sequence[str], id_type: str
) -> tuple[list[list[float]], list[int]]:
    found: dict[str, list[Any] | None] = {}
    with open_source(ex, row) as src, src.engine.connect() as conn:
        subject = src.relation.c[row.subject_column]
        columns = [src.relation.c[f] for f in features]
        for start in range(0, len(ids), 5_000):
            chunk: list[Any] = list(ids[start : start + 5_000])
            if id_type == "integer":
                chunk = [int(i) for i in chunk if i.lstrip("-").isdigit()]
            for record in conn.execute(select(subject, *columns).where(subject.in_(chunk))):
                key = str(record[0])
                found[key] = None if key in found else list(record[1:])
    matrix: list[list[float]] = []
    unscorable: list[int] = []
    for k, entity in enumerate(ids):
        values = found.get(entity)
        if values is None or any(v is None for v in values):
            unscorable.append(k)
            continue
        matrix.append([float(v) for v in values])
    return matrix, unscorable


def encrypted_scores_before(
    ctx_public: Any, enc_weights: Sequence[bytes], features: Sequence[Sequence[float]]
) -> list[bytes]:
    params = he.CKKS_DEFAULT
    d = len(enc_weights)
    scale = float(he._rescale_prime(params))
    weights = [
        he._load_fresh(ctx_public, params, b, f"weight {j}") for j, b in enumerate(enc_weights)
    ]
    capacity = he.ckks_capacity(params)
    slots = he.slot_count(params)
    out: list[bytes] = []
    for start in range(0, len(features), slots):
        rows = features[start : start + slots]
        matrix = [he._feature_row(row, d, i, capacity) for i, row in enumerate(rows, start)]
        pad = [0.0] * (slots - len(matrix))
        acc: Any = None
        for weight, values in zip(weights, zip(*matrix, strict=True), strict=True):
            term = weight.mul([*values, *pad])
            acc = term if acc is None else acc.add_(term)
        acc.add_(he._encrypt_zero(ctx_public, params, scale))
        out.append(bytes(acc.serialize()))
    return out


@contextmanager
def path_before() -> Iterator[None]:
    """run_score with the data path above in place of the current one."""
    saved = (access.live_consents, score_service._read_features, he.encrypted_scores)
    access.live_consents = live_consents_before  # type: ignore[assignment]
    score_service._read_features = read_features_before  # type: ignore[assignment]
    he.encrypted_scores = encrypted_scores_before  # type: ignore[assignment]
    try:
        yield
    finally:
        access.live_consents, score_service._read_features, he.encrypted_scores = saved


def best_of(fn: Callable[[], T], repeats: int) -> tuple[T, float, float]:
    """The last result, the fastest and the median time of ``repeats`` calls."""
    times = []
    for _ in range(repeats):
        result, took = timed(fn)
        times.append(took)
    return result, min(times), statistics.median(times)


def compare_score_paths(fx: ScoreFixture, repeats: int) -> float:
    """Each step of run_score's data path, before and after, alternating on the same inputs,
    then run_score itself both ways. Returns the fastest current run_score."""
    ex, bank, ids = fx.ex, fx.bank, fx.ids
    with Session(ex.engine) as session:
        row = access._dataset(session, "tax", "firms")
        session.expunge(row)
    features = list(fx.model.features)
    ctx = contexts.load_context(ex, fx.context, expected=he.CKKS_DEFAULT)
    enc = contexts.load_ciphertexts(ex, bank, fx.context, fx.weights)
    keys = subjects.ZoneSubjects.of(ex.zones_dir / "tax")
    assert keys.consent_digests(ids) == digests_before(ex, "tax", ids)
    live = access.live_consents(ex, "tax", ids, bank.key_id, SCORE_PURPOSE)
    before = live_consents_before(ex, "tax", ids, bank.key_id, SCORE_PURPOSE)
    assert None not in live and None not in before
    matrix, unscorable = score_service._read_features(ex, row, features, ids, "text")
    rows, unscorable_before = read_features_before(ex, row, features, ids, "text")
    assert unscorable == unscorable_before == [] and np.array_equal(matrix, np.array(rows))
    steps: list[tuple[str, Callable[[], object], Callable[[], object]]] = [
        (
            f"{len(ids):,} subject digests",
            lambda: digests_before(ex, "tax", ids),
            lambda: subjects.ZoneSubjects.of(ex.zones_dir / "tax").consent_digests(ids),
        ),
        (
            "consent lookup + digests",
            lambda: live_consents_before(ex, "tax", ids, bank.key_id, SCORE_PURPOSE),
            lambda: access.live_consents(ex, "tax", ids, bank.key_id, SCORE_PURPOSE),
        ),
        (
            "feature read + matrix",
            lambda: read_features_before(ex, row, features, ids, "text"),
            lambda: score_service._read_features(ex, row, features, ids, "text"),
        ),
        (
            "encrypted scoring",
            lambda: encrypted_scores_before(ctx, enc, rows),
            lambda: he.encrypted_scores(ctx, enc, matrix),
        ),
    ]

    def run_before() -> dict[str, Any]:
        with path_before():
            return fx.run()

    steps.append(("run_score end to end", run_before, fx.run))
    print(f"  {'step':<26} {'before':>17} {'after':>17}  before/after (min of {repeats})")
    fastest = 0.0
    for label, before, after in steps:
        times: dict[str, list[float]] = {"before": [], "after": []}
        for _ in range(repeats):  # alternate, so load spikes hit both alike
            times["before"].append(timed(before)[1])
            times["after"].append(timed(after)[1])
        b, a = min(times["before"]), min(times["after"])
        med_b, med_a = statistics.median(times["before"]), statistics.median(times["after"])
        print(
            f"  {label:<26} {b:6.3f} s (med {med_b:5.2f}) {a:6.3f} s (med {med_a:5.2f})  "
            f"{b / a:5.1f}x"
        )
        fastest = a
    # TenSEAL holds the GIL while it multiplies: two threads on two halves gain nothing
    half = len(matrix) // 2 // he.slot_count(he.CKKS_DEFAULT) * he.slot_count(he.CKKS_DEFAULT)
    parts = [matrix[:half], matrix[half:]]

    def one_thread() -> object:
        return [he.encrypted_scores(ctx, enc, part) for part in parts]

    def two_threads() -> object:
        with ThreadPoolExecutor(2) as pool:
            return list(pool.map(lambda part: he.encrypted_scores(ctx, enc, part), parts))

    _, one, _ = best_of(one_thread, repeats)
    _, two, _ = best_of(two_threads, repeats)
    print(
        f"  encrypted scoring in two threads {two:.3f} s, in one {one:.3f} s: "
        f"{one / two:.2f}x (min of {repeats})"
    )
    return fastest


def bench_service_scores(
    work: Path, entities: int, features: int, sample: int, repeats: int
) -> None:
    print(
        f"\n== he_score service: {entities:,} consented entities x {features} features, in-process"
    )
    fx = score_fixture(work, entities, features)
    ex, x, w, secret, public = fx.ex, fx.x, fx.w, fx.secret, fx.public
    try:
        run = fx.run
        run()  # warm the context cache, the zone store and the policy cache
        print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        service = compare_score_paths(fx, repeats)
        print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
        response = run()
        chunks = [b64url_decode(c) for c in response["ciphertexts"]]
        got, decrypt = timed(lambda: he.decrypt_scores(secret, chunks, entities, bias=0.5))
        expected, plain = timed(lambda: x @ w + 0.5)
        rel = np.abs(np.array(got) - expected) / (np.abs(x) @ np.abs(w) + 0.5)

        # baseline: one ciphertext per entity (weights packed in one ciphertext, dot product
        # per entity with rotations: Galois keys), timed on a sample and extrapolated
        base_ctx = ts.context(
            ts.SCHEME_TYPE.CKKS, 8192, coeff_mod_bit_sizes=list(he.CKKS_DEFAULT.coeff_mod_bit_sizes)
        )
        base_ctx.global_scale = 2.0**50
        base_ctx.generate_galois_keys()
        enc_w = ts.ckks_vector(base_ctx, w.tolist())
        rows = x[:sample].tolist()
        outs, per_entity = timed(lambda: [enc_w.dot(r).serialize() for r in rows])
        per_entity_total = per_entity / sample * entities
        response_bytes = len(json.dumps(response))
        print(
            f"consumer: context {fx.keygen * 1e3:.0f} ms ({mb(len(public))}), encrypts "
            f"{features} weights in {fx.encrypt:.2f} s (upload {mb(len(fx.packed))}), decrypts "
            f"in {decrypt:.2f} s"
        )
        print(
            f"zonex run_score (authorize, {entities:,} digests + consent check, feature read, "
            f"{len(chunks)} ciphertexts, receipt): {service:.2f} s "
            f"({service / entities * 1e6:.1f} us/entity), response {mb(response_bytes)}"
        )
        print(
            f"per-entity baseline: {per_entity / sample * 1e3:.1f} ms/entity on {sample}, "
            f"extrapolated {per_entity_total:.0f} s and {mb(len(outs[0]) * entities)} "
            f"-> zonex is {per_entity_total / service:.0f}x faster"
        )
        print(
            f"numpy X @ w: {plain * 1e3:.1f} ms -> zonex costs {service / plain:.0f}x plaintext; "
            f"error / sum|w x|: max {np.max(rel):.1e}"
        )
    finally:
        ex.close()


def bench_service_secure_sum(work: Path, zones: int, cells: int) -> None:
    print(f"\n== secure_sum service: {zones} zones x {cells:,}-cell vectors, in-process")
    ex, operator = _exchange(work)
    try:
        bureau, _ = _principal(ex, operator, "Statistics Bureau", "agency")
        rng = np.random.default_rng(13)
        names = []
        truth = np.zeros(cells, dtype=np.int64)
        for z in range(zones):
            zone = f"district{z}"
            names.append(zone)
            provider, provider_key = _principal(ex, operator, f"District {z}", "agency")
            services.create_zone(ex, provider, zone, "district")
            per_cell = 3
            cell_ids = np.repeat(np.arange(cells), per_cell)
            staff = rng.integers(1, 5000, cells * per_cell)
            table = {
                "company_id": [f"{zone}-{i}" for i in range(cells * per_cell)],
                "cell": [f"c{c:05d}" for c in cell_ids],
                "staff": staff,
            }
            np.add.at(truth, cell_ids, staff)
            path = work / f"{zone}.parquet"
            con = duckdb.connect()
            con.register("t", pa.table(table))
            con.execute(f"COPY t TO '{path}' (FORMAT parquet)")
            levels = {"company_id": "L3", "cell": "L1", "staff": "L3"}
            _dataset(ex, provider, zone, "firms", path, levels)
            rules_service.set_rules(
                ex,
                provider,
                zone,
                "firms",
                {
                    "min_group_size": 2,
                    "columns": {
                        "company_id": {"disclosure": "join_only"},
                        "cell": {"disclosure": "plaintext"},
                        "staff": {"disclosure": "after_aggregate", "lower": "0", "upper": "5000"},
                    },
                },
            )
            _grant(ex, bureau, provider, provider_key, zone, "firms", "secure_sum", SUM_PURPOSE)
        secret = he.new_context(he.BFV_DEFAULT)
        public = he.public_context_bytes(secret)
        context = contexts.register_context(ex, bureau, public).digest
        sql = "SELECT cell, SUM(staff) AS staff FROM firms GROUP BY cell"
        wanted = [[f"c{c:05d}"] for c in range(cells)]
        request = {"zones": names, "sql": sql, "purpose": SUM_PURPOSE, "context": context}
        request["cells"] = wanted

        def run() -> dict[str, Any]:
            return secure_sum_service.run_secure_sum(
                ex,
                bureau,
                zones=names,
                sql=sql,
                purpose=SUM_PURPOSE,
                context=context,
                cells=wanted,
            )

        run()
        response, total = timed(run)
        got, decrypt = timed(
            lambda: he.decrypt_vector(
                secret, b64url_decode(response["ciphertext"]), response["result"]["length"]
            )
        )
        contribution = len(b64url_decode(response["ciphertext"]))
        print(
            f"run_secure_sum ({zones} zones: check, authorize, query, encrypt, sign; verify, "
            f"add, receipt): {total:.2f} s; decrypt {decrypt * 1e3:.1f} ms; "
            f"exact: {list(got) == truth.tolist()}"
        )
        print(
            f"on the wire: public context {mb(len(public))} (once), request "
            f"{mb(len(json.dumps(request)))}, response {mb(len(json.dumps(response)))}; "
            f"zone -> exchange {zones} x {mb(contribution)} if zones run as separate nodes"
        )
    finally:
        ex.close()


#: --only choices: one section each, plus "services" for both service sections
SECTIONS = ("parameters", "psi", "scores", "sums", "service-scores", "service-sums")


def _sections(text: str) -> set[str]:
    chosen = set()
    for name in text.split(","):
        name = name.strip()
        if name == "services":
            chosen |= {"service-scores", "service-sums"}
        elif name in SECTIONS:
            chosen.add(name)
        else:
            raise argparse.ArgumentTypeError(
                f"unknown section {name!r}; choose from {', '.join(SECTIONS)} or services"
            )
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--features", type=int, default=32)
    parser.add_argument("--zones", type=int, default=3)
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--cells", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="runs per side in comparisons")
    parser.add_argument(
        "--only",
        type=_sections,
        default=set(SECTIONS),
        help=f"comma-separated sections to run: {', '.join(SECTIONS)}, services (default: all)",
    )
    parser.add_argument("--services-only", action="store_true", help="same as --only services")
    args = parser.parse_args()
    only: set[str] = _sections("services") if args.services_only else args.only
    print(f"tenseal {ts.__version__}, numpy {np.__version__}, one process")
    if "parameters" in only:
        bench_parameters()
    if "psi" in only:
        bench_psi_aggregate(args.rows)
    if "scores" in only:
        bench_scores(args.entities, args.features)
    if "sums" in only:
        bench_secure_sum(args.zones)
    with tempfile.TemporaryDirectory() as tmp:
        if "service-scores" in only:
            bench_service_scores(
                Path(tmp) / "score", args.entities, args.features, args.sample, args.repeats
            )
        if "service-sums" in only:
            bench_service_secure_sum(Path(tmp) / "sum", args.zones, args.cells)


if __name__ == "__main__":
    main()
