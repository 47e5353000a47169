"""Zone storage engine benchmark: DuckDB vs SQLite on GROUP BY aggregates, import, digest.

    python bench/zone_engine.py [--rows 10000000] [--repeats 7] [--python-digest-rows 1000000]

Generates --rows rows of a company tax table (deterministic), writes them as CSV and Parquet,
then prints, in one run:
- seconds to import the CSV and the Parquet file through ``ZoneStore`` (native DuckDB readers,
  including the snapshot digest) and to bulk-load the same rows into a SQLite file;
- median seconds of the same aggregate queries on DuckDB (its own Python API on the dataset
  file), on DuckDB through ``ZoneStore.engine`` (SQLAlchemy, what zonex pushes queries to), on
  SQLite (``sqlite3``), and on SQLite with an index on ``year``; the ratios SQLite / DuckDB and
  zonex engine / DuckDB;
- snapshot digest seconds per 1M rows: inside DuckDB (``ZoneStore.describe``) and the streaming
  Python implementation over the attached SQLite table (``AttachedTable.describe``) on the
  first --python-digest-rows rows; and whether the two digests agree.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
from sqlalchemy import text

from exchange.node.store import ZoneStore, attach

QUERIES = {
    "Q1 filter+group": (
        "SELECT district, COUNT(*), AVG(tax_paid), SUM(x) FROM t WHERE year = 2025 "
        "GROUP BY district ORDER BY district"
    ),
    "Q2 two-key group": (
        "SELECT industry, year, COUNT(*), SUM(tax_paid), MIN(employees), MAX(employees) "
        "FROM t GROUP BY industry, year ORDER BY industry, year"
    ),
}

GENERATE = """
SELECT
    'C' || lpad(CAST(i AS VARCHAR), 10, '0') AS company_id,
    (['huangpu', 'xuhui', 'changning', 'jingan', 'putuo', 'hongkou', 'yangpu', 'minhang',
      'baoshan', 'jiading', 'pudong', 'jinshan', 'songjiang', 'qingpu', 'fengxian',
      'chongming'])[1 + CAST(hash(i, 1) % 16 AS INTEGER)] AS district,
    (['finance', 'software', 'catering', 'construction', 'retail', 'logistics',
      'manufacturing', 'education'])[1 + CAST(hash(i, 2) % 8 AS INTEGER)] AS industry,
    CAST(2016 + hash(i, 3) % 10 AS BIGINT) AS year,
    CAST(hash(i, 4) % 5000 AS BIGINT) AS employees,
    round(CAST(hash(i, 5) % 100000000 AS DOUBLE) / 100, 2) AS tax_paid,
    CAST(hash(i, 6) % 1000000 AS DOUBLE) / 1000000 AS x
FROM range({rows}) r(i)
"""


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up: caches and query plans, as a long-running server would have them
    return statistics.median(timed(fn) for _ in range(repeats))


def generate(root: Path, rows: int) -> tuple[Path, Path]:
    csv_path, parquet_path = root / "companies.csv", root / "companies.parquet"
    con = duckdb.connect()
    con.execute(f"CREATE TABLE g AS {GENERATE.format(rows=int(rows))}")
    con.execute(f"COPY g TO '{csv_path}' (HEADER, DELIMITER ',')")
    con.execute(f"COPY g TO '{parquet_path}' (FORMAT parquet)")
    con.close()
    return csv_path, parquet_path


def load_sqlite(path: Path, parquet_path: Path) -> float:
    """Bulk load (no journal, no sync: the fastest SQLite can take rows), then ANALYZE."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute(
        "CREATE TABLE t (company_id TEXT, district TEXT, industry TEXT, year INTEGER, "
        "employees INTEGER, tax_paid REAL, x REAL)"
    )
    src = duckdb.connect()
    cur = src.execute(f"SELECT * FROM read_parquet('{parquet_path}')")
    start = time.perf_counter()
    db.execute("BEGIN")
    while batch := cur.fetchmany(100_000):
        db.executemany("INSERT INTO t VALUES (?, ?, ?, ?, ?, ?, ?)", batch)
    db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.execute("ANALYZE")
    db.close()
    src.close()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--python-digest-rows",
        type=int,
        default=1_000_000,
        help="rows for timing the Python digest over SQLite (0: all rows)",
    )
    parser.add_argument(
        "--dir", type=Path, default=None, help="scratch directory (default: system temp)"
    )
    args = parser.parse_args()
    rows = args.rows
    per_m = 1_000_000 / rows
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        print(
            f"rows: {rows:,}  repeats: {args.repeats} (median after one warm-up)  "
            f"DuckDB {duckdb.__version__}, SQLite {sqlite3.sqlite_version}, {os.cpu_count()} CPUs"
        )
        gen = timed(lambda: generate(root, rows))
        print(f"  (generated CSV and Parquet in {gen:.1f} s)")

        store = ZoneStore(root / "zone")
        csv_s = timed(lambda: store.import_csv("t", root / "companies.csv"))
        store.drop("t")
        parquet_s = timed(lambda: store.import_parquet("t", root / "companies.parquet"))
        sqlite_path = root / "attach" / "t.db"
        sqlite_path.parent.mkdir()
        sqlite_s = load_sqlite(sqlite_path, root / "companies.parquet")
        print("import (seconds, DuckDB including the snapshot digest):")
        print(f"  CSV -> DuckDB     {csv_s:8.2f}   ({csv_s * per_m:.2f} s per 1M rows)")
        print(f"  Parquet -> DuckDB {parquet_s:8.2f}   ({parquet_s * per_m:.2f} s per 1M rows)")
        print(f"  bulk load SQLite  {sqlite_s:8.2f}   ({sqlite_s * per_m:.2f} s per 1M rows)")

        duck = duckdb.connect(str(root / "zone" / "tables" / "t.duckdb"), read_only=True)
        lite = sqlite3.connect(sqlite_path)
        engine = store.engine
        print("query median seconds:")
        print(
            f"  {'query':18} {'duckdb':>8} {'zonex':>8} {'sqlite':>8} {'sqlite+ix':>9}"
            f" {'sqlite/duckdb':>13} {'zonex/duckdb':>12}"
        )
        results = {}
        for label, sql in QUERIES.items():
            expected = duck.execute(sql).fetchall()

            def via_engine(sql: str = sql) -> list[object]:
                with engine.connect() as conn:
                    return list(conn.execute(text(sql)).fetchall())

            assert len(via_engine()) == len(expected)
            assert len(lite.execute(sql).fetchall()) == len(expected)
            results[label] = (
                median_seconds(lambda sql=sql: duck.execute(sql).fetchall(), args.repeats),
                median_seconds(via_engine, args.repeats),
                median_seconds(lambda sql=sql: lite.execute(sql).fetchall(), args.repeats),
            )
        lite.execute("CREATE INDEX t_year ON t (year)")
        lite.execute("ANALYZE")
        for label, sql in QUERIES.items():
            d, z, s = results[label]
            ix = median_seconds(lambda sql=sql: lite.execute(sql).fetchall(), args.repeats)
            print(
                f"  {label:18} {d:8.3f} {z:8.3f} {s:8.3f} {ix:9.3f}"
                f" {s / d:12.1f}x {z / d:11.2f}x   (sqlite+ix / duckdb {ix / d:.1f}x)"
            )
        lite.close()
        duck.close()

        duck_digest = timed(lambda: store.describe("t"))
        info = store.describe("t")
        py_rows = rows if args.python_digest_rows <= 0 else min(rows, args.python_digest_rows)
        if py_rows < rows:
            db = sqlite3.connect(sqlite_path)
            db.execute(f"CREATE TABLE p AS SELECT * FROM t LIMIT {py_rows}")
            db.commit()
            db.close()
        attached = attach(
            f"sqlite:///{sqlite_path.resolve()}",
            "t" if py_rows == rows else "p",
            allowed_prefixes=[f"sqlite:///{sqlite_path.parent.resolve()}/"],
        )
        start = time.perf_counter()
        py_info = attached.describe()
        py_digest = time.perf_counter() - start
        attached.close()
        print("snapshot digest (count + digest, seconds per 1M rows):")
        print(f"  inside DuckDB          {duck_digest * per_m:6.2f}   ({duck_digest:.2f} s total)")
        print(
            f"  Python over SQLite     {py_digest * 1_000_000 / py_rows:6.2f}   "
            f"(on {py_rows:,} rows)"
        )
        if py_rows == rows:
            print(f"  digests agree: {py_info.digest == info.digest}")
        store.close()


if __name__ == "__main__":
    main()
