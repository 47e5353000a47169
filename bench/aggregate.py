"""Aggregate benchmark: the engine's own time vs the same query through zonex, and vs SQLite.

    python -P bench/aggregate.py [--rows 10000000] [--repeats 7] [--no-sqlite]

Builds an exchange in a temporary directory (SQLite control plane, the default), registers a
--rows company tax table in a zone (imported into the zone's embedded DuckDB store), grants a
consumer ``aggregate`` and sets analysis rules. Then, in one run, median seconds of:

- **engine**: the consumer's query exactly as written, on the zone's engine (``ZoneStore.engine``
  through SQLAlchemy: what zonex pushes queries down to), no checks;
- **engine, rewritten**: the statement zonex actually runs (clamping, the hidden distinct-subject
  count for k), on the same engine;
- **zonex**: :func:`exchange.server.compute.aggregate.run_aggregate`: parse and check with sqlglot,
  authorize against the live policy, push down, suppress, sign the receipt, ledger it;
- **sqlite**: the query as written on the same rows in a SQLite file (``sqlite3``), the engine a
  smaller deployment might pick;

and the ratios zonex / engine (goal ≤ 1.2) and sqlite / engine (goal ≥ 5). ``tax_paid`` is L3
and the rules do not opt out (no ``exact_release``), so the zonex run is differentially private,
as a consumer gets it by default. The engine and zonex runs are interleaved (one of each per
round, in turn), so load that comes and goes on a shared machine weighs on both alike; the fixed
cost zonex adds is also printed as the median over rounds of (zonex − engine) in the same round.

Then the cost of the noisy gate, side by side on the same raw rows in the same run: a query
whose groups are found in the data (``GROUP BY district, industry, year``) is run once;
:func:`exchange.node.sqlcheck.postprocess` releases its rows (a) exactly, with the exact k gate, and
(b) differentially privately, with :class:`exchange.node.dp.Gate` and the noise; and the gate
decisions alone are timed, exact comparison against ``Gate.opens`` (one draw per group) and
``Gate.opens_each`` (one draw for every group, as a release takes them). Ratios are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from sqlalchemy import text

from crypto.envelope import sign_envelope
from crypto.keys import SigningKey
from exchange.domain import APPROVAL_TYPE, approval_payload
from exchange.keyfile import load_private_key
from exchange.node.dp import DpMechanisms, Gate, parse_epsilon
from exchange.node.sqlcheck import postprocess
from exchange.server import access, services
from exchange.server.compute import aggregate, rules
from exchange.server.registry import registry_version
from exchange.server.runtime import Exchange, init_data_dir
from exchange.settings import Settings

SQL = (
    "SELECT district, COUNT(*), AVG(tax_paid), SUM(employees) FROM tax_records "
    "WHERE year = 2025 GROUP BY district"
)
#: groups found in the data (districts x industries x years present)
GATE_SQL = (
    "SELECT district, industry, year, COUNT(*), SUM(tax_paid) FROM tax_records "
    "GROUP BY district, industry, year"
)
GATE_EPSILON = "1"

GENERATE = """
COPY (
SELECT
    'C' || lpad(CAST(i AS VARCHAR), 10, '0') AS company_id,
    (['huangpu', 'xuhui', 'changning', 'jingan', 'putuo', 'hongkou', 'yangpu', 'minhang',
      'baoshan', 'jiading', 'pudong', 'jinshan', 'songjiang', 'qingpu', 'fengxian',
      'chongming'])[1 + CAST(hash(i, 1) % 16 AS INTEGER)] AS district,
    (['finance', 'software', 'catering', 'construction', 'retail', 'logistics',
      'manufacturing', 'education'])[1 + CAST(hash(i, 2) % 8 AS INTEGER)] AS industry,
    CAST(2016 + hash(i, 3) % 10 AS BIGINT) AS year,
    CAST(hash(i, 4) % 5000 AS BIGINT) AS employees,
    CAST(hash(i, 5) % 2000000 AS BIGINT) AS tax_paid
FROM range({rows}) r(i)
) TO '{path}' (FORMAT parquet)
"""

LEVELS = {
    "company_id": "L2",
    "district": "L1",
    "industry": "L1",
    "year": "L1",
    "employees": "L2",
    "tax_paid": "L3",
}
RULES = {
    "min_group_size": 10,
    # every zonex run below is a charged DP release (L3, no exact_release)
    "epsilon_budget": "10",
    "columns": {
        "company_id": {"disclosure": "join_only"},
        "district": {"disclosure": "plaintext"},
        "industry": {"disclosure": "plaintext"},
        "year": {"disclosure": "plaintext"},
        "employees": {"disclosure": "plaintext", "lower": "0", "upper": "5000"},
        "tax_paid": {"disclosure": "after_aggregate", "lower": "0", "upper": "2000000"},
    },
}
PURPOSE = "credit-assessment"


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm caches and connections
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(
    fns: dict[str, Callable[[], object]], repeats: int
) -> dict[str, list[float]]:
    """Seconds of every call of each of ``fns``, run once each per round (the first of a round
    rotating), after one warm-up call each."""
    for fn in fns.values():
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def setup(work: Path, rows: int) -> tuple[Exchange, object, Path]:
    data_dir = work / "exchange"
    init_data_dir(data_dir)
    ex = Exchange(Settings.from_data_dir(data_dir))
    ex.start()
    operator = services.get_principal(ex, load_private_key(data_dir / "operator.key").key_id)
    assert operator is not None
    provider_key, consumer_key = SigningKey.generate(), SigningKey.generate()
    provider = services.register_principal(
        ex, operator, "Tax Bureau", "agency", provider_key.public_key.raw
    )
    consumer = services.register_principal(
        ex, operator, "City Bank", "enterprise", consumer_key.public_key.raw
    )
    services.create_zone(ex, provider, "tax", "tax records")

    parquet = work / "tax.parquet"
    start = time.perf_counter()
    duckdb.connect().execute(GENERATE.format(rows=rows, path=parquet))
    print(
        f"generated {rows:,} rows ({parquet.stat().st_size / 1e6:.0f} MB Parquet) in "
        f"{time.perf_counter() - start:.1f} s"
    )
    start = time.perf_counter()
    upload = services.stage_upload(
        ex, provider, "tax", "application/vnd.apache.parquet", parquet.read_bytes()
    )
    services.register_dataset(
        ex,
        provider,
        "tax",
        services.DatasetSpec(
            name="tax_records",
            description="company tax records",
            subject_column="company_id",
            levels=LEVELS,
            upload_id=str(upload["upload_id"]),
        ),
    )
    print(f"imported into the zone store in {time.perf_counter() - start:.1f} s")
    rules.set_rules(ex, provider, "tax", "tax_records", RULES)

    req = access.file_request(
        ex, consumer, "tax", ["tax_records"], ["aggregate"], PURPOSE, 86400, "bench"
    )
    terms = {
        "id": req.id,
        "consumer": req.consumer,
        "zone": req.zone,
        "datasets": list(req.datasets),
        "operations": list(req.operations),
        "purpose": req.purpose,
    }
    payload = approval_payload(
        terms,
        approver=provider.key_id,
        not_after=datetime.now(UTC) + timedelta(hours=1),
    )
    access.approve_request(
        ex, provider, req.id, sign_envelope(APPROVAL_TYPE, payload, [provider_key])
    )
    return ex, consumer, parquet


def sqlite_copy(parquet: Path, path: Path) -> sqlite3.Connection:
    con = sqlite3.connect(path)
    con.execute(
        "CREATE TABLE tax_records (company_id TEXT, district TEXT, industry TEXT, year INTEGER, "
        "employees INTEGER, tax_paid INTEGER)"
    )
    reader = duckdb.connect().execute(f"SELECT * FROM read_parquet('{parquet}')")
    while batch := reader.fetchmany(200_000):
        con.executemany("INSERT INTO tax_records VALUES (?, ?, ?, ?, ?, ?)", batch)
    con.commit()
    return con


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-sqlite", action="store_true", help="skip the SQLite baseline")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ex, consumer, parquet = setup(work, args.rows)
        try:
            engine = ex.zone_store("tax").engine
            prepared = aggregate.prepare(ex, consumer, "tax", SQL, PURPOSE)  # type: ignore[arg-type]
            rewritten = prepared.checked

            def on_engine(sql: str, params: dict[str, object]) -> Callable[[], object]:
                def run() -> object:
                    with engine.connect() as conn:
                        return conn.execute(text(sql), params).fetchall()

                return run

            # a signed request learns the registry version from its nonce's batch at no extra
            # round trip (exchange.server.registry); nothing changes it during the runs
            with ex.engine.connect() as conn:
                version = registry_version(conn)

            def through_zonex() -> object:
                return aggregate.run_aggregate(
                    ex,
                    consumer,  # type: ignore[arg-type]
                    "tax",
                    SQL,
                    PURPOSE,
                    registry_version=version,
                )

            released = through_zonex()["result"]  # type: ignore[index]
            print(f"query: {SQL}")
            print(f"zonex runs: {rewritten.sql}")
            print(
                f"released {len(released['rows'])} groups, differentially private: "
                f"ε {released['epsilon']}, gate threshold {released['gate']['threshold']}"
            )

            times = interleaved_seconds(
                {
                    "engine (as written)": on_engine(SQL, {}),
                    "engine (rewritten)": on_engine(rewritten.sql, dict(rewritten.params)),
                    "zonex (end to end)": through_zonex,
                },
                args.repeats,
            )
            results = {name: statistics.median(t) for name, t in times.items()}
            added = statistics.median(
                z - e
                for z, e in zip(
                    times["zonex (end to end)"], times["engine (as written)"], strict=True
                )
            )
            if not args.no_sqlite:
                start = time.perf_counter()
                con = sqlite_copy(parquet, work / "tax.sqlite")
                print(f"loaded SQLite in {time.perf_counter() - start:.1f} s")
                results["sqlite (as written)"] = median_seconds(
                    lambda: con.execute(SQL).fetchall(), max(3, args.repeats // 2)
                )
                con.close()
            gate_figures = gate_cost(ex, consumer, args.repeats)
        finally:
            ex.close()

    base = results["engine (as written)"]
    print(f"\n{args.rows:,} rows, median of {args.repeats}")
    for name, seconds in results.items():
        print(f"  {name:<22} {seconds * 1000:9.1f} ms   {seconds / base:6.2f}x engine")
    zonex = results["zonex (end to end)"] / base
    print(f"\nzonex / engine = {zonex:.2f} (goal <= 1.2)")
    print(f"zonex - engine, median per round = {added * 1000:.1f} ms")
    if "sqlite (as written)" in results:
        print(f"sqlite / engine = {results['sqlite (as written)'] / base:.1f} (goal >= 5)")

    groups = gate_figures.pop("groups")
    print(f"\nthe noisy gate, {int(groups):,} groups found in the data, median of {args.repeats}")
    for name, seconds in gate_figures.items():
        print(f"  {name:<34} {seconds * 1000:9.3f} ms   {seconds / groups * 1e6:8.2f} µs/group")
    exact_gate = gate_figures["gate: exact count >= k"]
    print(
        f"\ngate decisions: dp.Gate.opens / exact = "
        f"{gate_figures['gate: dp.Gate.opens'] / exact_gate:.0f}, "
        f"dp.Gate.opens_each (one draw for every group) / exact = "
        f"{gate_figures['gate: dp.Gate.opens_each'] / exact_gate:.0f}"
    )
    private = gate_figures["postprocess, DP (gate + noise)"]
    print(
        "release: postprocess with dp.Gate and noise / with the exact gate = "
        f"{private / gate_figures['postprocess, exact']:.1f}"
    )


def gate_cost(ex: Exchange, consumer: object, repeats: int) -> dict[str, float]:
    """Median seconds to release the same raw rows exactly and under DP, and of the gate
    decisions alone (exact comparison vs :meth:`Gate.opens` and :meth:`Gate.opens_each`)."""
    prepared = aggregate.prepare(  # type: ignore[arg-type]
        ex, consumer, "tax", GATE_SQL, PURPOSE, with_dp=True
    )
    private = prepared.checked
    assert private.dp and private.delta is not None
    raw = aggregate.execute(ex, prepared)
    # the same rewrite read as an exact release (subjects are unique: one statement for both)
    exact = dataclasses.replace(private, dp=False, dp_required=False, contributions=0, delta=None)
    mechanisms = DpMechanisms(parse_epsilon(GATE_EPSILON))
    released = postprocess(private, raw, dp=mechanisms)
    assert released.gate is not None
    gate = Gate(private.k, released.gate.epsilon, private.contributions, private.delta)
    counts = [int(r[-1]) for r in raw]
    print(
        f"\ngate query: {GATE_SQL}\n{len(raw):,} groups; under DP (ε {GATE_EPSILON}) the gate's "
        f"threshold is {gate.threshold} (k {gate.k}, scale {float(gate.scale):g}, "
        f"δ {float(gate.delta or 0):g}); {len(released.rows):,} opened this time"
    )
    return {
        "groups": float(len(raw)),
        "gate: exact count >= k": median_seconds(lambda: [c >= private.k for c in counts], repeats),
        "gate: dp.Gate.opens": median_seconds(lambda: [gate.opens(c) for c in counts], repeats),
        "gate: dp.Gate.opens_each": median_seconds(lambda: gate.opens_each(counts), repeats),
        "postprocess, exact": median_seconds(lambda: postprocess(exact, raw), repeats),
        "postprocess, DP (gate + noise)": median_seconds(
            lambda: postprocess(private, raw, dp=mechanisms), repeats
        ),
    }


if __name__ == "__main__":
    main()
