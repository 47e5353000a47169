# ruff: noqa: E402  (imports follow the sys.path fix below)
"""Policy decision benchmark: zonex's decision point vs a plain pycasbin Enforcer.

    python bench/policy.py [--quick] [--samples 20000] [--threads 4]

For 100, 10,000 and 100,000 live grants (consumers x datasets over ten zones, plus role
memberships, suspensions and deny rows), the rows are written to a SQLite control database with
exchange.server.policystore; the decision point is loaded from it by a PolicyCache and a plain
``casbin.Enforcer`` through the Casbin adapter over the same table. Prints, in one run:

- decision latency p50 / p99 through the decision point and through the plain enforcer (fewer
  samples for the plain one at large sizes: it scans every row on every call), and the ratio;
- whether both gave the same allow/deny on every request the plain enforcer was asked;
- load time of each, how long another process's cache takes to pick up one revocation, and the
  decision point's throughput with several threads deciding at once.

``--quick`` runs 100 and 2,000 grants with few samples (a smoke test).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python bench/policy.py` puts bench/ first on sys.path, where this file would shadow the
# `policy` package it measures: drop that entry before importing anything of zonex.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import argparse
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from exchange.server.db import Base
from exchange.server.policystore import (
    PolicyAdapter,
    PolicyCache,
    PolicyChangeRow,
    PolicyRuleRow,
    PolicyStateRow,
    add_rules,
    remove_rules,
)
from exchange.server.storage import WRITE, create_control_engine
from policy import (
    DEFAULT_CEILINGS,
    DecisionRequest,
    Level,
    Operation,
    PolicyRow,
    create_enforcer,
    deny_row,
    grant_rows,
    role_row,
    suspend_principal_row,
    suspend_zone_row,
)

NOW = datetime.now(UTC).replace(microsecond=0)
ZONES = [f"zone-{i}" for i in range(10)]
PURPOSES = ["credit-assessment", "statistics", "financial-services", "public-health-research"]
OPS = [Operation.AGGREGATE, Operation.PSI_AGGREGATE, Operation.HE_SCORE, Operation.SECURE_SUM]
LEVELS = [Level.L1, Level.L2, Level.L3, Level.L4]


def consumer(i: int) -> str:
    return f"{i:064x}"


def shape(grants: int) -> tuple[int, int]:
    """(consumers, datasets) with consumers x datasets = grants, datasets at most 100."""
    datasets = min(100, max(1, int(grants**0.5)))
    return grants // datasets, datasets


def make_rows(grants: int, rng: random.Random) -> list[PolicyRow]:
    consumers, datasets = shape(grants)
    rows: list[PolicyRow] = []
    for c in range(consumers):
        for d in range(datasets):
            expires = NOW + timedelta(days=rng.choice([30, 90]))  # every grant is live
            rows.extend(
                grant_rows(
                    f"grant:{c}-{d}",
                    subject=consumer(c),
                    zone=ZONES[d % len(ZONES)],
                    datasets=[f"ds{d}"],
                    operations=[OPS[(c + d) % len(OPS)]],
                    purpose=PURPOSES[(c * 7 + d) % len(PURPOSES)],
                    expires=expires,
                )
            )
    # roles, suspensions and denies that every request has to be checked against
    for c in range(0, consumers, 50):
        rows.append(role_row(f"role:{c}", member=consumer(c), role="analysts", zone=ZONES[0]))
    rows.extend(
        grant_rows(
            "grant:analysts",
            subject="analysts",
            zone=ZONES[0],
            datasets=["ds0"],
            operations=list(OPS),
            purpose="statistics",
            expires=NOW + timedelta(days=30),
        )
    )
    rows.extend(suspend_principal_row(consumer(c)) for c in range(3, consumers, 97))
    rows.append(suspend_zone_row(ZONES[-1]))
    rows.append(deny_row("deny:no-he-on-ds1", dataset="ds1", operation=Operation.HE_SCORE))
    return rows


def make_requests(grants: int, count: int, rng: random.Random) -> list[DecisionRequest]:
    consumers, datasets = shape(grants)
    out = []
    for _ in range(count):
        c, d = rng.randrange(consumers), rng.randrange(datasets)
        hit = rng.random() < 0.7  # mostly calls a grant covers; the rest miss on something
        op = OPS[(c + d) % len(OPS)] if hit else rng.choice(OPS)
        purpose = PURPOSES[(c * 7 + d) % len(PURPOSES)] if hit else rng.choice(PURPOSES)
        if purpose == "financial-services":
            purpose = "credit-assessment"
        out.append(
            DecisionRequest(
                subject=consumer(c),
                zone=ZONES[d % len(ZONES)],
                dataset=f"ds{d}",
                operation=op,
                purpose=purpose,
                level=rng.choice(LEVELS),
                ceilings=DEFAULT_CEILINGS,
                now=datetime.now(UTC),
            )
        )
    return out


def percentiles(samples_ns: Sequence[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    p50 = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
    return p50 / 1000, p99 / 1000  # microseconds


def timed(fn: Callable[[Any], Any], items: Sequence[Any]) -> tuple[list[int], list[Any]]:
    lat, results = [], []
    clock = time.perf_counter_ns
    for item in items:
        start = clock()
        results.append(fn(item))
        lat.append(clock() - start)
    return lat, results


def new_database(root: Path, name: str) -> Engine:
    engine = create_control_engine(f"sqlite:///{root / name}")
    Base.metadata.create_all(
        engine,
        tables=[PolicyRuleRow.__table__, PolicyStateRow.__table__, PolicyChangeRow.__table__],
    )
    return engine


def fmt_us(us: float) -> str:
    return f"{us / 1000:,.1f} ms" if us >= 1000 else f"{us:,.0f} µs"


def bench_size(root: Path, grants: int, samples: int, plain_samples: int, threads: int) -> None:
    rng = random.Random(grants)
    rows = make_rows(grants, rng)
    engine = new_database(root, f"policy-{grants}.db")
    t = time.perf_counter()
    with Session(engine.execution_options(**WRITE)) as session, session.begin():
        add_rules(session, rows)
    stored_s = time.perf_counter() - t

    cache = PolicyCache(engine)
    t = time.perf_counter()
    cache.refresh()
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    plain = create_enforcer(adapter=PolicyAdapter(engine))
    plain_load_s = time.perf_counter() - t

    requests = make_requests(grants, samples, rng)
    point = cache.point
    timed(point.decide, requests[:1000])  # warm up
    lat, decisions = timed(point.decide, requests)
    p50, p99 = percentiles(lat)

    asked = requests[:plain_samples]
    plain_lat, plain_results = timed(lambda r: plain.enforce(*r.to_casbin_request()), asked)
    q50, q99 = percentiles(plain_lat)
    agree = sum(d.allowed == a for d, a in zip(decisions, plain_results, strict=False))
    allowed = sum(d.allowed for d in decisions)

    # revocation made by "another process": a second engine writes, this cache catches up
    writer = create_control_engine(f"sqlite:///{root / f'policy-{grants}.db'}")
    with Session(writer.execution_options(**WRITE)) as session, session.begin():
        remove_rules(session, "grant:0-0")
    t = time.perf_counter()
    cache.refresh()
    refresh_ms = (time.perf_counter() - t) * 1000
    writer.dispose()

    per_thread = max(1, samples // threads)
    chunks = [requests[i * per_thread : (i + 1) * per_thread] for i in range(threads)]
    workers = [threading.Thread(target=lambda c=c: [point.decide(r) for r in c]) for c in chunks]
    t = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    throughput = per_thread * threads / (time.perf_counter() - t)

    consumers, datasets = shape(grants)
    print(
        f"\n{consumers * datasets:,} live grants ({consumers:,} consumers x {datasets} datasets), "
        f"{len(rows):,} policy rows"
    )
    print(
        f"  store {stored_s:.2f} s · load: decision point {load_s:.2f} s, "
        f"plain enforcer {plain_load_s:.2f} s"
    )
    print(
        f"  decision point  p50 {fmt_us(p50):>9}  p99 {fmt_us(p99):>9}   "
        f"({len(requests):,} calls, {allowed / len(decisions):.0%} allowed)"
    )
    print(f"  plain Enforcer  p50 {fmt_us(q50):>9}  p99 {fmt_us(q99):>9}   ({len(asked):,} calls)")
    print(f"  ratio           p50 {q50 / p50:,.0f}x   p99 {q99 / p99:,.0f}x")
    print(f"  same decisions  {agree}/{len(asked)}")
    print(
        f"  revocation picked up by another process's cache in {refresh_ms:.1f} ms (+ ≤0.25 s poll)"
    )
    print(f"  {threads} threads: {throughput:,.0f} decisions/s")
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few samples")
    parser.add_argument("--samples", type=int, default=20_000, help="decision point calls per size")
    parser.add_argument("--threads", type=int, default=4)
    args = parser.parse_args()
    if args.quick:
        plan = [(100, 2000, 500), (2_500, 2000, 50)]
    else:
        plan = [(100, args.samples, 2000), (10_000, args.samples, 100), (100_000, args.samples, 20)]
    print("zonex policy decisions: decision point vs plain pycasbin Enforcer (same rows and model)")
    with tempfile.TemporaryDirectory() as tmp:
        for grants, samples, plain_samples in plan:
            bench_size(Path(tmp), grants, samples, plain_samples, args.threads)


if __name__ == "__main__":
    main()
