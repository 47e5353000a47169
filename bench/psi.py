"""PSI benchmark: the group (ristretto255 vs the edwards25519 subgroup vs X25519), crypto.psi
against bare loops over its primitives, multi-core speedup, and openmined-psi when installed.

    python -P bench/psi.py [--items 10000] [--repeat 5]

Prints, in one run (every figure is the best of --repeat runs, microseconds per item):
- each primitive on one core: RFC 9380 expand_message_xmd (two SHA-512), ristretto255's
  one-way map and scalar multiplication through rbcl (libsodium); for comparison the
  edwards25519-subgroup construction through PyNaCl (two Elligator maps, an addition, and a
  scalar multiplication that checks subgroup membership) and X25519 through cryptography
  (OpenSSL) and libsodium, with the share of hashed u-coordinates that lie on the twist;
- crypto.psi.blind and reblind on one thread next to a bare loop over the same calls, and the
  ratio (goal: at most 1.2);
- whether each primitive releases the GIL (two threads vs one), X25519 on two processes, and
  crypto.psi's speedup with every core by batch size;
- the private join of DESIGN.md with --items ids on each side, per party;
- openmined-psi (P-256 on BoringSSL, the RAW setup) on the same items, if importable.

With ``--service N`` (``--million`` for 1,000,000) it also runs, side by side, a whole
``psi_cardinality`` session of N × N ids through the exchange's service functions (in-process,
a real SQLite control database and DuckDB zone store), the same sizes through openmined-psi
(client request, server setup and response, client intersection), and the primitive limit: two
hashes into the group and four scalar multiplications per id pair at the single-core rates
measured in the same run, divided by the cores.
``--aggregate-rows R`` runs ``psi_aggregate`` (one sum column) against R provider rows and
splits its time into homomorphic work (encrypting R values, the masked sum, decryption) and the
rest (the PSI). The dataset is L3 without the provider's opt-out, so sessions are
differentially private (ε = 1).

``--checks N`` (100,000 by default when given alone) prices the privacy checks of a session on
N × N ids: a whole ``psi_aggregate`` session with every check next to the same session with the
whole-upload checks switched off and the k gate exact (as before those checks existed), run
alternately, best of ``--repeat``; then each check alone against the work around it (the
whole-upload check of A and B^c at upload and again before matching, the matching itself; the
noisy gate next to the exact comparison and the noisy count drawn before).

``--epoch`` compares epoch mode with the per-session protocol through the service (the
preparation timed whole, reading the ids included, per 10^5 ids next to the limit).
``--prepare 100000,1000000`` (``--epoch-ten-million`` adds 10^7) times the preparation's kernel
alone on generated ids (the keyed order, the blinding on crypto.psi's helper processes into
synced chunks, the sort) per 10^5 ids, next to the primitive limit (hash + multiplication) ×
|Y| ÷ cores with both rates measured again before each size, and next to the bare primitive
run on every core at once just before (what the cores give while other load runs).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_from_uniform,
    crypto_scalarmult,
    crypto_scalarmult_ed25519_noclamp,
)
from rbcl import (
    crypto_core_ristretto255_from_hash,
    crypto_core_ristretto255_is_valid_point,
    crypto_scalarmult_ristretto255,
)

import crypto.psi as psi
from crypto.psi import (
    PsiKey,
    blind,
    expand_message_xmd,
    intersection_mask,
    intersection_size,
    reblind,
    session_domain,
    shuffled,
)

FIELD_PRIME = 2**255 - 19


def best(repeat: int, n: int, run: Callable[[], object]) -> float:
    """Microseconds per item: the best of ``repeat`` runs of ``run`` over ``n`` items."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times) / n * 1e6


def row(label: str, us: float, note: str = "") -> None:
    print(f"  {label:<58} {us:8.2f} us{('   ' + note) if note else ''}")


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# -- bare loops over the primitives -----------------------------------------------------------


def bare_blind(scalar: bytes, domain: bytes, items: Sequence[bytes]) -> list[bytes]:
    """RFC 9380 hash_to_ristretto255 written out, then the multiplication."""
    dst = domain if len(domain) <= 255 else hashlib.sha512(b"H2C-OVERSIZE-DST-" + domain).digest()
    dst_prime = dst + bytes((len(dst),))
    suffix = b"\x00\x40\x00" + dst_prime
    tail = b"\x01" + dst_prime
    sha512 = hashlib.sha512
    z_pad = bytes(128)
    from_hash = crypto_core_ristretto255_from_hash
    mult = crypto_scalarmult_ristretto255
    out = []
    for x in items:
        b0 = sha512(z_pad + x + suffix).digest()
        out.append(mult(scalar, from_hash(sha512(b0 + tail).digest())))
    return out


def bare_reblind(scalar: bytes, points: Sequence[bytes]) -> list[bytes]:
    mult = crypto_scalarmult_ristretto255
    return [mult(scalar, p) for p in points]


def x25519_u(item: bytes) -> bytes:
    u = bytearray(hashlib.sha512(b"bench" + item).digest()[:32])
    u[31] &= 0x7F
    return bytes(u)


def x25519_chunk(args: tuple[bytes, list[bytes]]) -> list[bytes]:
    """X25519 over a chunk (top level, so a process pool can run it)."""
    raw, us = args
    key = X25519PrivateKey.from_private_bytes(raw)
    return [key.exchange(X25519PublicKey.from_public_bytes(u)) for u in us]


def on_twist(u: int) -> bool:
    """Whether u is the u-coordinate of a point on the quadratic twist of Curve25519."""
    rhs = (u * u * u + 486662 * u * u + u) % FIELD_PRIME
    return rhs != 0 and pow(rhs, (FIELD_PRIME - 1) // 2, FIELD_PRIME) != 1


def two_threads(run: Callable[[Sequence[Any]], object], data: Sequence[Any]) -> float:
    """Speedup of two threads, each on half of ``data``, over one thread on all of it."""
    start = time.perf_counter()
    run(data)
    one = time.perf_counter() - start
    with ThreadPoolExecutor(2) as pool:
        start = time.perf_counter()
        list(pool.map(run, [data[0::2], data[1::2]]))
        two = time.perf_counter() - start
    return one / two


# -- sections ---------------------------------------------------------------------------------


def primitives(n: int, repeat: int) -> dict[str, float]:
    print(f"primitives, one core ({n:,} items):")
    items = [f"user-{i}@example.org".encode() for i in range(n)]
    domain = session_domain("bench", "ids")
    uniform = [expand_message_xmd(x, domain, 64) for x in items]
    points = [crypto_core_ristretto255_from_hash(h) for h in uniform]
    scalar = PsiKey.generate().to_bytes()
    from_hash, mult = crypto_core_ristretto255_from_hash, crypto_scalarmult_ristretto255
    r: dict[str, float] = {}
    r["xmd"] = best(repeat, n, lambda: [expand_message_xmd(x, domain, 64) for x in items])
    r["sha512"] = best(repeat, n, lambda: [hashlib.sha512(b"d" + x).digest() for x in items])
    r["from_hash"] = best(repeat, n, lambda: [from_hash(h) for h in uniform])
    r["mult"] = best(repeat, n, lambda: [mult(scalar, p) for p in points])
    r["valid"] = best(
        repeat, n, lambda: [crypto_core_ristretto255_is_valid_point(p) for p in points]
    )
    row("expand_message_xmd, SHA-512, 64 bytes (2 hashes, Python)", r["xmd"])
    row("SHA-512 of a short item", r["sha512"])
    row("ristretto255 from_hash (2 maps + add + encode), rbcl", r["from_hash"])
    row("ristretto255 scalar mult (decode = the check), rbcl", r["mult"])
    row("ristretto255 is_valid_point (the check alone)", r["valid"])

    halves = [h[:32] for h in uniform]
    ed_points = [crypto_core_ed25519_from_uniform(h) for h in halves]
    fu, add = crypto_core_ed25519_from_uniform, crypto_core_ed25519_add
    ed_mult = crypto_scalarmult_ed25519_noclamp
    r["ed_h2p"] = best(repeat, n, lambda: [add(fu(h[:32]), fu(h[32:])) for h in uniform])
    r["ed_mult"] = best(repeat, n, lambda: [ed_mult(scalar, p) for p in ed_points])
    row("edwards25519 hash to group (2 Elligator maps + add), PyNaCl", r["ed_h2p"])
    row("edwards25519 scalar mult, noclamp, subgroup check, PyNaCl", r["ed_mult"])

    us = [x25519_u(x) for x in items]
    raw = os.urandom(32)
    r["x25519"] = best(repeat, n, lambda: x25519_chunk((raw, us)))
    r["x25519_sodium"] = best(repeat, n, lambda: [crypto_scalarmult(raw, u) for u in us])
    twist = sum(on_twist(int.from_bytes(u, "little")) for u in us[:5000]) / min(n, 5000)
    row("X25519 exchange, cryptography (OpenSSL), incl. key objects", r["x25519"])
    row("X25519 crypto_scalarmult, libsodium (PyNaCl)", r["x25519_sodium"])
    print(f"  hashed u-coordinates on the twist: {twist:.1%}")

    print("per item, one core, by construction:")
    r_blind = r["xmd"] + r["from_hash"] + r["mult"]
    ed_blind = r["xmd"] + r["ed_h2p"] + r["ed_mult"]
    x_blind = r["sha512"] + r["x25519"]
    row("ristretto255: blind = xmd + from_hash + mult", r_blind)
    row("ristretto255: reblind = mult (decoding is the check)", r["mult"])
    row("edwards25519 subgroup: blind = xmd + 2 maps + add + mult", ed_blind)
    row("edwards25519 subgroup: reblind = mult (subgroup check)", r["ed_mult"])
    row("X25519, hashed u: blind = hash + exchange", x_blind)
    row("X25519, hashed u: reblind = exchange (no subgroup check)", r["x25519"])
    print(
        f"  ristretto255 / X25519: blind {r_blind / x_blind:.2f}x, "
        f"reblind {r['mult'] / r['x25519']:.2f}x;  ristretto255 / edwards25519 subgroup: "
        f"blind {r_blind / ed_blind:.2f}x, reblind {r['mult'] / r['ed_mult']:.2f}x"
    )
    return r


def overhead(n: int, repeat: int) -> None:
    print(f"crypto.psi vs a bare loop over the same calls, one thread ({n:,} items):")
    key = PsiKey.generate()
    scalar = key.to_bytes()
    domain = session_domain("bench", "ids")
    items = [f"user-{i}@example.org".encode() for i in range(n)]
    points = blind(key, domain, items, workers=1)
    assert bare_blind(scalar, domain, items) == points
    b_psi = b_bare = r_psi = r_bare = float("inf")
    for _ in range(repeat):  # interleaved, so both see the same machine
        b_bare = min(b_bare, best(1, n, lambda: bare_blind(scalar, domain, items)))
        b_psi = min(b_psi, best(1, n, lambda: blind(key, domain, items, workers=1)))
        r_bare = min(r_bare, best(1, n, lambda: bare_reblind(scalar, points)))
        r_psi = min(r_psi, best(1, n, lambda: reblind(key, points, workers=1)))
    row("bare loop: 2 x sha512, from_hash, scalarmult", b_bare)
    row("crypto.psi.blind(workers=1)", b_psi, f"ratio {b_psi / b_bare:.3f} (goal <= 1.2)")
    row("bare loop: scalarmult_ristretto255", r_bare)
    row("crypto.psi.reblind(workers=1)", r_psi, f"ratio {r_psi / r_bare:.3f} (goal <= 1.2)")


def parallel(n: int, repeat: int) -> None:
    c = cores()
    print(f"parallelism ({c} cores available):")
    domain = session_domain("bench", "par")
    points = blind(PsiKey.generate(), domain, [os.urandom(16) for _ in range(n)])
    uniform = [os.urandom(64) for _ in range(n)]
    scalar = PsiKey.generate().to_bytes()
    us = [x25519_u(os.urandom(16)) for _ in range(n)]
    raw = os.urandom(32)
    s_r = two_threads(lambda ps: bare_reblind(scalar, ps), points)
    s_map = two_threads(lambda hs: [crypto_core_ristretto255_from_hash(h) for h in hs], uniform)
    s_x = two_threads(lambda xs: x25519_chunk((raw, list(xs))), us)
    s_xs = two_threads(lambda xs: [crypto_scalarmult(raw, u) for u in xs], us)
    print(f"  2 threads / 1, ristretto255 scalar mult (rbcl, ctypes):  {s_r:.2f}x")
    print(f"  2 threads / 1, ristretto255 from_hash (rbcl, ctypes):    {s_map:.2f}x")
    print(f"  2 threads / 1, X25519 (cryptography, OpenSSL via pyo3):  {s_x:.2f}x")
    print(f"  2 threads / 1, X25519 (PyNaCl, cffi):                    {s_xs:.2f}x")
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(x25519_chunk, [(raw, us[:10])] * 2))  # start the workers
        start = time.perf_counter()
        x25519_chunk((raw, us))
        one = time.perf_counter() - start
        start = time.perf_counter()
        list(pool.map(x25519_chunk, [(raw, us[0::2]), (raw, us[1::2])]))
        two = time.perf_counter() - start
    print(f"  2 processes / 1, X25519 (cryptography), warm pool:      {one / two:.2f}x")

    key = PsiKey.generate()
    default = psi.PARALLEL_MIN_BATCH
    print(f"  crypto.psi with every core vs one thread, by batch size (threshold {default}):")

    def scan(size: int) -> None:
        items = [f"user-{i}".encode() for i in range(size)]
        pts = blind(key, domain, items, workers=1)
        rep = max(repeat, 4096 // size)
        b1 = best(rep, size, lambda: blind(key, domain, items, workers=1))
        bc = best(rep, size, lambda: blind(key, domain, items, workers=c))
        r1 = best(rep, size, lambda: reblind(key, pts, workers=1))
        rc = best(rep, size, lambda: reblind(key, pts, workers=c))
        print(
            f"    {size:>6,} items: blind {b1:6.1f} -> {bc:6.1f} us ({b1 / bc:.2f}x)   "
            f"reblind {r1:6.1f} -> {rc:6.1f} us ({r1 / rc:.2f}x)"
        )

    try:
        psi.PARALLEL_MIN_BATCH = 1  # measure below the threshold too
        for size in (16, 64, 256, 1024, 4096, n):
            scan(size)
    finally:
        psi.PARALLEL_MIN_BATCH = default


def join(n: int, repeat: int) -> None:
    print(f"private join, {n:,} ids on each side, half in common, every core (best of {repeat}):")
    domain = session_domain("bench-join", "ids")
    xs = [f"user-{i}".encode() for i in range(n)]
    ys = [(f"user-{i + n // 2}".encode(), i) for i in range(n)]
    steps = [float("inf")] * 4
    for _ in range(repeat):
        t0 = time.perf_counter()
        c = PsiKey.generate()
        a = blind(c, domain, xs)
        t1 = time.perf_counter()
        p = PsiKey.generate()
        a_p = reblind(p, a)
        order = shuffled(range(n))
        b = blind(p, domain, [ys[i][0] for i in order])
        t2 = time.perf_counter()
        b_c = reblind(c, b)
        t3 = time.perf_counter()
        mask = intersection_mask(a_p, b_c)
        size = intersection_size(a_p, b_c)
        t4 = time.perf_counter()
        assert size == n - n // 2 and sum(mask) == size
        steps = [
            min(s, t) for s, t in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True)
        ]
    print(f"  consumer: blind X            {steps[0]:7.2f} s")
    print(f"  provider: reblind A, blind Y {steps[1]:7.2f} s   (incl. shuffling)")
    print(f"  consumer: reblind B          {steps[2]:7.2f} s")
    print(f"  exchange: match              {steps[3]:7.3f} s")
    total = sum(steps)
    print(f"  total {total:.2f} s, {total / (2 * n) * 1e6:.1f} us per id")


def openmined(n: int, repeat: int, ours: dict[str, float]) -> None:
    try:
        import private_set_intersection.python as omp  # type: ignore[import-not-found]
    except ImportError:
        print("openmined-psi: not installed (pip install openmined-psi to compare)")
        return
    print(f"openmined-psi {getattr(omp, '__version__', '?')} (P-256, BoringSSL), {n:,} items:")
    xs = [f"user-{i}" for i in range(n)]
    ys = [f"user-{i + n // 2}" for i in range(n)]
    client = omp.client.CreateWithNewKey(True)
    server = omp.server.CreateWithNewKey(True)
    request = client.CreateRequest(xs)
    setup = server.CreateSetupMessage(1e-9, n, ys, omp.DataStructure.RAW)
    response = server.ProcessRequest(request)
    assert len(client.GetIntersection(setup, response)) == n - n // 2
    cpu0 = time.process_time()
    wall0 = time.perf_counter()
    c_req = best(repeat, n, lambda: client.CreateRequest(xs))
    s_setup = best(repeat, n, lambda: server.CreateSetupMessage(1e-9, n, ys, omp.DataStructure.RAW))
    s_proc = best(repeat, n, lambda: server.ProcessRequest(request))
    c_int = best(repeat, n, lambda: client.GetIntersection(setup, response))
    cpu = (time.process_time() - cpu0) / (time.perf_counter() - wall0)
    row(
        "client CreateRequest (hash + blind)",
        c_req,
        f"crypto.psi blind / this {ours['blind'] / c_req:.2f}x",
    )
    row("server CreateSetupMessage RAW (hash + blind)", s_setup)
    row(
        "server ProcessRequest (reblind)",
        s_proc,
        f"crypto.psi reblind / this {ours['reblind'] / s_proc:.2f}x",
    )
    row("client GetIntersection (unblind + match)", c_int)
    print(f"  CPU time / wall time while it ran: {cpu:.2f} (1.0 = one core)")
    print(
        f"  crypto.psi with every core: blind {ours['blind_all']:.2f} us "
        f"({ours['blind_all'] / c_req:.2f}x this), reblind {ours['reblind_all']:.2f} us "
        f"({ours['reblind_all'] / s_proc:.2f}x this)"
    )


# -- the service, side by side -------------------------------------------------------------------


class _Live:
    """An exchange in a temporary data directory, served by uvicorn on loopback (for setup
    through the signed API); the protocol itself is then driven through the service functions."""

    def __init__(self, root: Any, **overrides: Any) -> None:
        import threading

        import uvicorn

        from exchange.keyfile import load_private_key
        from exchange.server.api.app import create_app
        from exchange.server.runtime import Exchange, init_data_dir
        from exchange.settings import Settings

        self.data_dir = root / "exchange"
        init_data_dir(self.data_dir, origin="bench.zonex/log")
        self.ex = Exchange(Settings.from_data_dir(self.data_dir, **overrides)).start()
        self.operator = load_private_key(self.data_dir / "operator.key")
        with socket_bound() as port:
            self.port = port
        config = uvicorn.Config(
            create_app(exchange=self.ex), host="127.0.0.1", port=self.port, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.ex.close()


class socket_bound:
    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def _world(live: _Live, root: Any, rows: int, bound: int) -> tuple[Any, list[str]]:
    """A zone with ``rows`` companies (id, tax), a consumer granted the three private joins;
    returns the consumer's principal and the provider's ids."""
    import csv

    from crypto.keys import SigningKey
    from exchange.client.sdk import Client
    from exchange.server import services

    provider, consumer = SigningKey.generate(), SigningKey.generate()
    ids = [f"C{i:09d}" for i in range(rows)]
    path = root / "companies.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["company_id", "tax"])
        for i, cid in enumerate(ids):
            w.writerow([cid, (i * 7919) % bound])
    with Client(live.url, live.operator, timeout=3600) as op:
        op.register_principal("Tax Bureau", "agency", provider.public_key)
        op.register_principal("City Bank", "enterprise", consumer.public_key)
    with Client(live.url, provider, timeout=3600) as p:
        p.create_zone("tax", "")
        p.register_dataset(
            "tax",
            "companies",
            levels={"company_id": "L3", "tax": "L3"},
            subject_column="company_id",
            file=path,
        )
        p.set_analysis_rules(
            "tax",
            "companies",
            {
                "epsilon_budget": "10",  # L3, no opt-out: every session spends ε = 1
                "columns": {
                    "tax": {"disclosure": "after_aggregate", "lower": "0", "upper": str(bound)}
                },
            },
        )
    with Client(live.url, consumer) as c:
        req = c.request_access(
            "tax",
            ["companies"],
            ["psi_cardinality", "psi_aggregate"],
            "credit-assessment",
            duration_seconds=86400,
            justification="bench",
        )
    with Client(live.url, provider) as p:
        p.approve(req["id"])
    principal = services.get_principal(live.ex, consumer.public_key.key_id)
    return principal, ids


def _session(
    live: _Live,
    actor: Any,
    xs: list[str],
    mode: str,
    sums: list[str],
    ctx: Any = None,
    epsilon: str | None = "1",
) -> tuple[dict[str, Any], dict[str, float]]:
    """One session through the service functions, the consumer's work done here; seconds per
    phase."""
    from crypto import he
    from exchange.server.compute import contexts
    from exchange.server.compute import psi as service

    t: dict[str, float] = {}
    start = time.perf_counter()
    digest = None
    if ctx is not None:
        digest = contexts.register_context(live.ex, actor, he.public_context_bytes(ctx)).digest
    s = service.create_session(
        live.ex, actor, zone="tax", dataset="companies", mode=mode,
        purpose="credit-assessment", x_count=len(xs), sums=sums, context=digest, epsilon=epsilon,
        protocol="session",
    )  # fmt: skip
    sid = s["session"]
    batch = 1 << 16
    key = PsiKey.generate()
    domain = session_domain(sid, "ids")
    order = shuffled(range(len(xs)))
    t0 = time.perf_counter()
    a = blind(key, domain, [xs[i].encode() for i in order])
    t["consumer: blind X"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    answer: dict[str, Any] = {}
    # the last point alone in the last batch, so the zone's answer is timed on its own
    starts = [*range(0, len(a) - 1, batch), len(a) - 1]
    for i, end in zip(starts, [*starts[1:], len(a)], strict=True):
        if end == len(a):
            t["zone: reblind A"] = time.perf_counter() - t0
            t0 = time.perf_counter()
        answer = service.put_a_points(live.ex, actor, sid, i, b"".join(a[i:end]))
    t["zone: read, blind Y (+ encrypt)"] = time.perf_counter() - t0
    y = int(answer["y_count"])
    t0 = time.perf_counter()
    for i in range(0, y, batch):
        data = service.get_b_points(live.ex, actor, sid, i, batch)
        b = [data[j : j + 32] for j in range(0, len(data), 32)]
        service.put_bc_points(live.ex, actor, sid, i, b"".join(reblind(key, b)))
    t["consumer: reblind B"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = service.finish_session(live.ex, actor, sid)
    t["exchange: match, release, receipt"] = time.perf_counter() - t0
    t["total"] = time.perf_counter() - start
    return out, t


def _openmined_join(n: int) -> float | None:
    try:
        import private_set_intersection.python as omp  # type: ignore[import-not-found]
    except ImportError:
        return None
    xs = [f"C{i:09d}" for i in range(n // 2, n + n // 2)]
    ys = [f"C{i:09d}" for i in range(n)]
    start = time.perf_counter()
    client = omp.client.CreateWithNewKey(True)
    server = omp.server.CreateWithNewKey(True)
    request = client.CreateRequest(xs)
    setup = server.CreateSetupMessage(1e-9, n, ys, omp.DataStructure.RAW)
    response = server.ProcessRequest(request)
    size = client.GetIntersectionSize(setup, response)
    elapsed = time.perf_counter() - start
    assert size == n - n // 2, size
    return elapsed


def _mult_rate() -> float:
    """Seconds per ristretto255 scalar multiplication on one core, best of 3 over 2,000: the
    bare loop of ``bare_reblind`` (no checks around the call)."""
    key = PsiKey.generate()
    pts = blind(key, session_domain("bench", "rate"), [b"%d" % i for i in range(2000)], workers=1)
    return best(3, len(pts), lambda: bare_reblind(key.to_bytes(), pts)) / 1e6


def run_service(sizes: list[int], aggregate_rows: int, aggregate_ids: int) -> None:
    import tempfile
    from pathlib import Path

    from crypto import he

    rate, hash_s = _mult_rate(), _hash_rate()
    n_cores = cores()
    print(
        f"service runs on {n_cores} cores; one hash into the group {hash_s * 1e6:.1f} us, one "
        f"scalar multiplication {rate * 1e6:.1f} us (one core, this run)"
    )
    for n in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            live = _Live(Path(tmp))
            try:
                actor, ids = _world(live, Path(tmp), n, 1000)
                xs = ids[n // 2 :] + [f"X{i:09d}" for i in range(n // 2)]
                out, t = _session(live, actor, xs, "cardinality", [])
                # discrete Laplace of scale 1: off by 40 or more with probability 2e-17
                assert abs(out["result"]["intersection"] - (n - n // 2)) < 40
            finally:
                live.close()
        om = _openmined_join(n)
        # every pair costs two hashes into the group (x and y) and four multiplications
        # (c·H(x), p·A, p·H(y), c·B)
        limit = (2 * hash_s + 4 * rate) * n / n_cores
        print(f"psi_cardinality {n:,} x {n:,}:")
        for phase, secs in t.items():
            print(f"  zonex {phase:<40} {secs:8.2f} s")
        print(f"  primitive limit ((2 hash + 4 mult) x n / {n_cores})   {limit:8.2f} s")
        if om is not None:
            print(f"  openmined-psi (one core, whole protocol)       {om:8.2f} s")
            print(f"  openmined-psi / zonex   {om / t['total']:.2f}x")
        else:
            print("  openmined-psi not importable (pip install openmined.psi)")
        print(f"  zonex / primitive limit {t['total'] / limit:.2f}x   (goal <= 1.15)")
    if aggregate_rows:
        with tempfile.TemporaryDirectory() as tmp:
            live = _Live(Path(tmp))
            try:
                actor, ids = _world(live, Path(tmp), aggregate_rows, 10**6)
                xs = ids[: aggregate_ids // 2] + [f"X{i:09d}" for i in range(aggregate_ids // 2)]
                ctx = he.new_context(he.BFV_DEFAULT)
                out, t = _session(live, actor, xs, "aggregate", ["tax"], ctx)
                # ε = 1 split in two: discrete Laplace of scale 2, off by 80 or more: 4e-18
                assert abs(out["result"]["count"] - aggregate_ids // 2) < 80
            finally:
                live.close()
        values = [(i * 7919) % 10**6 for i in range(aggregate_rows)]
        public = he.load_public_context(
            he.public_context_bytes(ctx), max_bytes=he.max_public_context_bytes(he.BFV_DEFAULT)
        )
        t0 = time.perf_counter()
        chunks = he.encrypt_column_chunks(public, values, bounds=(0, 10**6))
        t_enc = time.perf_counter() - t0
        slots = he.slot_count(he.BFV_DEFAULT)
        masks = [[1] * min(slots, aggregate_rows - i) for i in range(0, aggregate_rows, slots)]
        t0 = time.perf_counter()
        total = he.masked_total(public, chunks, masks, 0, bounds=(0, 10**6))
        t_sum = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert he.decrypt_total(ctx, total) == sum(values)
        t_dec = time.perf_counter() - t0
        t_he = t_enc + t_sum + t_dec
        t_psi = t["total"] - t_he
        print(f"psi_aggregate, {aggregate_ids:,} ids x {aggregate_rows:,} provider rows, one sum:")
        for phase, secs in t.items():
            print(f"  zonex {phase:<40} {secs:8.2f} s")
        print(
            f"  HE: encrypt {len(chunks)} chunks {t_enc:.2f} s, masked sum {t_sum:.2f} s, "
            f"decrypt {t_dec:.3f} s; total {t_he:.2f} s"
        )
        print(
            f"  PSI (session total - HE) {t_psi:.2f} s;  HE / PSI {t_he / t_psi:.2f} (goal <= 0.25)"
        )


def _hash_rate() -> float:
    """Seconds per hash into the group on one core (RFC 9380 expand_message_xmd and
    ristretto255's one-way map), best of 3 over 2,000 items: the bare loop of ``bare_blind``
    without its multiplication, the cheapest way to call them from Python (not the generic
    ``expand_message_xmd``, whose loop and checks would make the limit easier to meet)."""
    domain = session_domain("bench", "hash")
    dst_prime = domain + bytes((len(domain),))
    suffix, tail = b"\x00\x40\x00" + dst_prime, b"\x01" + dst_prime
    items = [b"C%09d" % i for i in range(2000)]
    sha512, z_pad, from_hash = hashlib.sha512, bytes(128), crypto_core_ristretto255_from_hash

    def run() -> object:
        return [
            from_hash(sha512(sha512(z_pad + x + suffix).digest() + tail).digest()) for x in items
        ]

    return best(3, len(items), run) / 1e6


def _epoch_session(
    live: _Live, actor: Any, xs: list[str], mode: str, sums: list[str], ctx: Any = None
) -> tuple[dict[str, Any], dict[str, float], int]:
    """One epoch-mode session through the service functions, the consumer's work done here;
    seconds per phase and the bytes of points the consumer downloaded."""
    from crypto import he
    from crypto.psi import unblind
    from exchange.psi_epoch import epoch_domain
    from exchange.server.compute import contexts, psi_epoch
    from exchange.server.compute import psi as service

    t: dict[str, float] = {}
    start = time.perf_counter()
    digest = None
    if ctx is not None:
        digest = contexts.register_context(live.ex, actor, he.public_context_bytes(ctx)).digest
    s = service.create_session(
        live.ex, actor, zone="tax", dataset="companies", mode=mode, purpose="credit-assessment",
        x_count=len(xs), sums=sums, context=digest, epsilon="1", protocol="epoch",
    )  # fmt: skip
    sid = s["session"]
    key = PsiKey.generate()
    order = shuffled(range(len(xs)))
    t0 = time.perf_counter()
    a = blind(key, epoch_domain(s["epoch"]), [xs[i].encode() for i in order])
    service.put_a_points(live.ex, actor, sid, 0, b"".join(a))
    t["consumer blind + zone A_e (+ encrypt)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = psi_epoch.get_ae_points(live.ex, actor, sid, 0, len(xs))
    a_e = [data[j : j + 32] for j in range(0, len(data), 32)]
    psi_epoch.put_f_points(live.ex, actor, sid, 0, b"".join(unblind(key, a_e)))
    t["consumer: unblind A_e, send F"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    folder = live.ex.settings.data_dir / "psi" / sid
    ct_bytes = sum(f.stat().st_size for f in folder.glob("sum*.ct"))
    out = service.finish_session(live.ex, actor, sid)
    t["exchange: match, release, receipt"] = time.perf_counter() - t0
    t["total"] = time.perf_counter() - start
    t["ciphertext bytes (zone -> exchange)"] = ct_bytes
    return out, t, len(data)


def run_epoch(sizes: list[int], x_count: int, aggregate: int, session_max: int) -> None:
    """Epoch mode against the per-session protocol: |X| = ``x_count`` against each |Y| (the
    per-session protocol only up to ``session_max``: at 10^7 it alone takes many minutes)."""
    import tempfile
    from pathlib import Path

    from crypto import he
    from exchange.server.compute import psi_epoch

    n_cores = cores()
    hash_s, mult_s = _hash_rate(), _mult_rate()
    print(
        f"epoch mode on {n_cores} cores; one hash into the group {hash_s * 1e6:.1f} us, one "
        f"scalar multiplication {mult_s * 1e6:.1f} us (one core, this run)"
    )
    for y in sizes:
        with tempfile.TemporaryDirectory() as tmp:
            live = _Live(Path(tmp), psi_max_items=max(y, 2_000_000))
            try:
                actor, ids = _world(live, Path(tmp), y, 1000)
                xs = ids[: x_count // 2] + [f"X{i:09d}" for i in range(x_count - x_count // 2)]
                t0 = time.perf_counter()
                epoch = psi_epoch.prepare(live.ex, "tax", "companies")
                t_prep = time.perf_counter() - t0
                assert epoch["state"] == "ready" and epoch["y_count"] == y
                out, te, down = _epoch_session(live, actor, xs, "cardinality", [])
                # discrete Laplace of scale 1: off by 40 or more with probability 2e-17
                assert abs(out["result"]["intersection"] - x_count // 2) < 40
                ts = None
                if y <= session_max:
                    out, ts = _session(live, actor, xs, "cardinality", [])
                    assert abs(out["result"]["intersection"] - x_count // 2) < 40
                ta = None
                if y <= aggregate:
                    ctx = he.new_context(he.BFV_DEFAULT)
                    out, ta, _ = _epoch_session(live, actor, xs, "aggregate", ["tax"], ctx)
                    # ε = 1 split in two: discrete Laplace of scale 2, off by 80: 4e-18
                    assert abs(out["result"]["count"] - x_count // 2) < 80
            finally:
                live.close()
        limit = (hash_s + mult_s) * y / n_cores
        print(f"psi_cardinality, |X| = {x_count:,} against |Y| = {y:,}:")
        print(f"  epoch preparation (once per epoch)           {t_prep:8.2f} s")
        print(f"  primitive limit ((hash + mult) x |Y| / {n_cores})     {limit:8.2f} s")
        print(f"  preparation / primitive limit                {t_prep / limit:8.2f}x")
        print(
            f"  per 10^5 ids: preparation {t_prep * 1e5 / y:.3f} s, limit {limit * 1e5 / y:.3f} s"
        )
        for phase, secs in te.items():
            if phase.startswith("ciphertext"):
                continue
            print(f"  epoch session: {phase:<37} {secs:8.3f} s")
        print(f"  epoch session: consumer downloads           {down:10,} bytes")
        if ts is not None:
            print(f"  per-session protocol: total                  {ts['total']:8.2f} s")
        else:
            print("  per-session protocol: not run (|Y| above --epoch-session-max)")
        print(f"  per-session protocol: consumer downloads    {32 * y:10,} bytes")
        if ta is not None:
            print(
                f"  epoch psi_aggregate (one sum): total {ta['total']:.2f} s, ciphertexts in "
                f"I's order {int(ta['ciphertext bytes (zone -> exchange)']):,} bytes "
                f"({-(-y // he.slot_count(he.BFV_DEFAULT))} chunks)"
            )


def _bare_blind_batch(n: int) -> int:
    """``bare_blind`` over ``n`` fresh items in this process (for :func:`_parallel_rate`)."""
    key = PsiKey.generate()
    return len(bare_blind(key.to_bytes(), b"bench-parallel", [b"C%09d" % i for i in range(n)]))


def _parallel_rate(n_cores: int, n: int = 20_000) -> float:
    """Seconds per item of the bare hash + multiplication on ``n_cores`` processes at once, over
    ``n`` items each: what the cores actually give while the machine's other load runs (the
    process start is left out by a first, empty round)."""
    with ProcessPoolExecutor(n_cores) as pool:
        list(pool.map(_bare_blind_batch, [1] * n_cores))
        start = time.perf_counter()
        assert sum(pool.map(_bare_blind_batch, [n] * n_cores)) == n * n_cores
        return (time.perf_counter() - start) / (n * n_cores)


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and crypto.psi's helper processes (Linux: read
    from /proc; elsewhere this process only)."""
    from crypto import psi as cpsi

    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for proc in cpsi._helpers.procs if cpsi._helpers is not None else []:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _cpu_rate() -> float:
    """CPU seconds (not wall: unaffected by other load) per bare hash + multiplication on one
    core, best of 3 over 2,000 items."""
    key, domain = PsiKey.generate().to_bytes(), session_domain("bench", "cpu")
    items = [b"C%09d" % i for i in range(2000)]
    times = []
    for _ in range(3):
        start = time.process_time()
        bare_blind(key, domain, items)
        times.append(time.process_time() - start)
    return min(times) / len(items)


def run_prepare(sizes: list[int], repeat: int) -> None:
    """The epoch preparation's kernel (exchange.psi_epoch) on generated ids: the keyed order,
    the blinding into fingerprints (chunks written and synced as a preparation does), the sort
    for lookup; per 10^5 ids next to the primitive limit, both measured in this run (the rates
    again before each size: the machine's other load changes)."""
    import tempfile
    from pathlib import Path

    from exchange import psi_epoch as kernel

    n_cores = cores()
    print(f"epoch preparation kernel on {n_cores} cores (generated ids C000000000...)")
    print(
        f"  {'|Y|':>12} {'hash us':>8} {'mult us':>8} {'limit s':>9} {'prep s':>9} "
        f"{'order':>7} {'blind':>8} {'sort':>6} {'limit/1e5':>10} {'prep/1e5':>9} {'ratio':>6}"
    )
    for y in sizes:
        ids = [f"C{i:09d}" for i in range(y)]
        hash_s, mult_s = _hash_rate(), _mult_rate()
        limit = (hash_s + mult_s) * y / n_cores
        shared = _parallel_rate(n_cores) * y  # the same primitive on every core, now
        cpu_limit = _cpu_rate() * y
        best_t: tuple[float, float, float, float, float] | None = None
        for _ in range(repeat if y <= 1_000_000 else 1):
            key, seed = PsiKey.generate(), secrets.token_bytes(32)
            t0 = time.perf_counter()
            kernel._keyed_rank(seed, ids)  # apart: blind_image computes the order itself
            t_order = time.perf_counter() - t0
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "image.fp"
                cpu0, t1 = _cpu_seconds(), time.perf_counter()
                assert kernel.blind_image(key, seed, "ep_bench", ids, path)
                t2 = time.perf_counter()
                fp, _ = kernel.sort_image(path)
                t3, cpu = time.perf_counter(), _cpu_seconds() - cpu0
                assert len(fp) == y
            if best_t is None or t3 - t1 < best_t[0]:
                best_t = (t3 - t1, t_order, t2 - t1, t3 - t2, cpu)
        assert best_t is not None
        total, t_order, t_blind, t_sort, cpu = best_t
        per = 1e5 / y
        print(
            f"  {y:>12,} {hash_s * 1e6:8.1f} {mult_s * 1e6:8.1f} {limit:9.2f} {total:9.2f} "
            f"{t_order:7.2f} {t_blind:8.2f} {t_sort:6.2f} {limit * per:10.3f} {total * per:9.3f} "
            f"{total / limit:5.2f}x"
        )
        print(
            f"  {'':>12} the bare primitive on {n_cores} processes at once, this minute: "
            f"{shared:.2f} s ({total / shared:.2f}x of it); CPU seconds used {cpu:.2f} against "
            f"the primitive's {cpu_limit:.2f} ({cpu / cpu_limit:.2f}x)"
        )
    print("  (goal: prep/limit <= 1.2 at 10^7; prep per 10^5 ids flat across |Y|)")


class _ExactGate:
    """The k gate as it was: the exact intersection compared with k (the noisy count drawn
    beside it, as the release drew it), for the side-by-side run only."""

    def __init__(self, k: int, epsilon: Any, sensitivity: int = 1, delta: Any = None) -> None:
        self.threshold = k
        self.epsilon = epsilon

    def noisy(self, true: int) -> int:
        from exchange.node import dp

        dp.laplace_count(true, self.epsilon)
        return true


def run_checks(n: int, repeat: int) -> None:
    """The privacy checks of one session on ``n`` × ``n`` ids, side by side with a session
    without them, and each check alone."""
    import contextlib
    import tempfile
    from pathlib import Path
    from unittest import mock

    from crypto import he
    from exchange.node import dp
    from exchange.server.compute import psi as service

    print(f"privacy checks of a psi_aggregate session, {n:,} x {n:,} ids, one sum, ε = 1:")
    with tempfile.TemporaryDirectory() as tmp:
        live = _Live(Path(tmp))
        try:
            actor, ids = _world(live, Path(tmp), n, 10**6)
            xs = ids[: n // 2] + [f"X{i:09d}" for i in range(n - n // 2)]
            ctx = he.new_context(he.BFV_DEFAULT)
            check_whole, gate = service._check_whole, dp.Gate
            runs: dict[str, list[dict[str, float]]] = {"before": [], "after": []}
            _session(live, actor, xs[:1000], "aggregate", ["tax"], ctx)  # warm-up, not counted
            for _ in range(repeat):
                for label in ("before", "after"):
                    with contextlib.ExitStack() as undo:
                        if label == "before":
                            undo.enter_context(
                                mock.patch.object(service, "_check_whole", lambda *a, **k: None)
                            )
                            undo.enter_context(mock.patch.object(dp, "Gate", _ExactGate))
                        out, t = _session(live, actor, xs, "aggregate", ["tax"], ctx)
                    assert out["result"]["suppressed"] is False
                    runs[label].append(t)
        finally:
            live.close()
    best_of = {label: {k: min(t[k] for t in ts) for k in ts[0]} for label, ts in runs.items()}
    before, after = best_of["before"], best_of["after"]
    print(f"  {'phase (best of ' + str(repeat) + ')':<44} {'before':>9} {'after':>9} {'ratio':>7}")
    for phase in after:
        print(
            f"  {phase:<44} {before[phase]:8.2f}s {after[phase]:8.2f}s "
            f"{after[phase] / before[phase]:6.3f}x"
        )

    # each check alone, on lists of the session's size
    key = PsiKey.generate()
    domain = session_domain("bench", "ids")
    a_prime = blind(key, domain, [f"a{i}".encode() for i in range(n)])
    bc = a_prime[: n // 2] + blind(key, domain, [f"b{i}".encode() for i in range(n - n // 2)])
    whole = best(repeat, 1, lambda: (check_whole(a_prime, n, "A"), check_whole(bc, n, "B^c")))

    def match() -> None:
        in_a = set(a_prime)
        sum(1 if p in in_a else 0 for p in bc)

    matching = best(repeat, 1, match)
    share = dp.split_epsilon(dp.parse_epsilon("1"), 2)
    rounds = 200
    noisy_gate = best(
        repeat, rounds, lambda: [gate(10, share).noisy(n // 2) for _ in range(rounds)]
    )
    old_count = best(
        repeat, rounds, lambda: [dp.laplace_count(n // 2, share) for _ in range(rounds)]
    )
    exact = best(repeat, rounds, lambda: [n // 2 < 10 for _ in range(rounds)])
    total = after["total"]
    # the session runs the whole-list check twice per list: at upload and before matching
    print(
        f"  whole-upload check of A and B^c ({n:,} points each)   {whole / 1e3:8.1f} ms"
        f"   x2 per session = {2 * whole / 1e6 / total:.2%} of the session;"
        f" {whole / matching:.2f}x the matching ({matching / 1e3:.1f} ms)"
    )
    print(
        f"  noisy gate (dp.Gate: build + draw)            {noisy_gate:8.1f} us"
        f"   vs exact compare {exact:.3f} us + the count's noise drawn before {old_count:.1f} us"
        f" = {noisy_gate / (exact + old_count):.2f}x; {noisy_gate / 1e6 / total:.5%} of the session"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--service", type=int, default=0, help="N x N ids through the service")
    parser.add_argument("--million", action="store_true", help="also 1,000,000 x 1,000,000")
    parser.add_argument("--aggregate-rows", type=int, default=0, help="psi_aggregate rows")
    parser.add_argument("--aggregate-ids", type=int, default=100_000)
    parser.add_argument("--only-service", action="store_true", help="skip the primitives")
    parser.add_argument("--checks", type=int, default=0, help="price the privacy checks, N x N")
    parser.add_argument("--epoch", action="store_true", help="epoch mode vs per session")
    parser.add_argument("--epoch-x", type=int, default=1000, help="|X| of the epoch runs")
    parser.add_argument(
        "--epoch-sizes", default="100000,1000000", help="comma-separated |Y| of the epoch runs"
    )
    parser.add_argument("--epoch-ten-million", action="store_true", help="add |Y| = 10^7")
    parser.add_argument(
        "--prepare",
        default="",
        help="the preparation kernel alone on generated ids, comma-separated |Y| "
        "(with --epoch-ten-million also 10^7)",
    )
    parser.add_argument(
        "--epoch-aggregate", type=int, default=100_000, help="psi_aggregate up to this |Y|"
    )
    parser.add_argument(
        "--epoch-session-max",
        type=int,
        default=1_000_000,
        help="the per-session protocol beside epoch mode up to this |Y|",
    )
    args = parser.parse_args()
    n, repeat = args.items, args.repeat
    if args.prepare:
        sizes = [int(s) for s in args.prepare.split(",") if s]
        run_prepare([*sizes, *([10_000_000] if args.epoch_ten_million else [])], min(repeat, 3))
        return
    if args.epoch:
        sizes = [int(s) for s in args.epoch_sizes.split(",") if s]
        run_epoch(
            [*sizes, *([10_000_000] if args.epoch_ten_million else [])],
            args.epoch_x,
            args.epoch_aggregate,
            args.epoch_session_max,
        )
        return
    if args.checks:
        run_checks(args.checks, min(repeat, 3))
        if not (args.service or args.million or args.aggregate_rows):
            return
    if args.service or args.million or args.aggregate_rows:
        run_service(
            sizes=[s for s in (args.service, 1_000_000 if args.million else 0) if s],
            aggregate_rows=args.aggregate_rows,
            aggregate_ids=args.aggregate_ids,
        )
        if args.only_service:
            return
    primitives(n, repeat)
    overhead(n, repeat)
    parallel(n, repeat)
    join(n, min(repeat, 3))
    key = PsiKey.generate()
    domain = session_domain("bench", "ids")
    items = [f"user-{i}".encode() for i in range(n)]
    pts = blind(key, domain, items, workers=1)
    ours = {
        "blind": best(repeat, n, lambda: blind(key, domain, items, workers=1)),
        "reblind": best(repeat, n, lambda: reblind(key, pts, workers=1)),
        "blind_all": best(repeat, n, lambda: blind(key, domain, items)),
        "reblind_all": best(repeat, n, lambda: reblind(key, pts)),
    }
    openmined(n, repeat, ours)


if __name__ == "__main__":
    main()
