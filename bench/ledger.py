"""Ledger benchmark: group commit vs plain inserts, offline verification, proof checks.

    python -P bench/ledger.py [--entries 1000000] [--appends 20000] [--threads 64]

Prints, in one run:
- durable appends/s through the ledger's group commit vs plain SQLite inserts of the same rows,
  one durable transaction each (WAL, synchronous=FULL, the same file system), and the ratio;
- seconds to verify an exported ledger of --entries entries offline (one core);
- microseconds per inclusion-proof check and proof bytes at that size.
"""

from __future__ import annotations

import argparse
import math
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

from crypto.merkle import leaf_hash, verify_inclusion
from crypto.note import NoteVerifier
from exchange.audit import check_bundle, read_bundle_lines
from exchange.server.ledger import EntryDraft, write_export
from exchange.server.runtime import Exchange, init_data_dir
from exchange.settings import Settings


def draft(i: int) -> EntryDraft:
    return EntryDraft(
        kind="computation.aggregate",
        actor="ab" * 32,
        refs={"zone": "tax", "dataset": "companies", "grant": f"g-{i % 977}"},
        digests={"query": f"{i:064x}"},
        attrs={"k": 10, "rows": i % 1000},
    )


def bench_group_commit(root: Path, appends: int, threads: int) -> float:
    data = root / "gc"
    init_data_dir(data)
    ex = Exchange(Settings.from_data_dir(data, checkpoint_interval_seconds=1.0)).start()
    per = appends // threads

    def worker(t: int) -> None:
        for i in range(per):
            ex.ledger.append(draft(t * per + i))

    workers = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    ex.close()
    return per * threads / elapsed


def bench_plain_sqlite(root: Path, appends: int) -> float:
    """The baseline: the same canonical rows, one durable INSERT transaction each."""
    from crypto.canonical import canonicalize

    db = sqlite3.connect(root / "plain.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE entries (seq INTEGER PRIMARY KEY, body BLOB, leaf_hash BLOB)")
    start = time.perf_counter()
    for i in range(appends):
        d = draft(i)
        body = canonicalize(
            {
                "seq": i,
                "kind": d.kind,
                "actor": d.actor,
                "refs": d.refs,
                "digests": d.digests,
                "attrs": d.attrs,
                "time": "2026-11-25T00:00:00.000Z",
                "prev": "0" * 64,
            }
        )
        db.execute("BEGIN")
        db.execute("INSERT INTO entries VALUES (?, ?, ?)", (i, body, leaf_hash(body)))
        db.execute("COMMIT")
    elapsed = time.perf_counter() - start
    db.close()
    return appends / elapsed


def bench_verify(root: Path, entries: int) -> tuple[float, float, int]:
    data = root / "big"
    init_data_dir(data)
    ex = Exchange(Settings.from_data_dir(data))
    from exchange.server.ledger import ensure_head

    ensure_head(ex.engine)
    batch = 20_000
    done = 1
    fill_start = time.perf_counter()
    while done < entries:
        n = min(batch, entries - done)
        ex.ledger.append_batch_sync([draft(done + i) for i in range(n)])
        done += n
    fill = time.perf_counter() - fill_start
    bundle = root / "big.jsonl"
    final = write_export(ex.ledger, bundle)
    proofs = [
        ex.ledger.inclusion_proof(i, final.size) for i in range(0, final.size, final.size // 1000)
    ]
    leaves = [leaf_hash(ex.ledger.entry(i)) for i in range(0, final.size, final.size // 1000)]
    ex.close()
    print(
        f"  (filled {entries:,} entries in {fill:.1f} s with batch_sync: {entries / fill:,.0f}/s)"
    )
    verifier = NoteVerifier.from_verifier_key((data / "log.pub").read_text().strip())
    start = time.process_time()
    report = check_bundle(read_bundle_lines(bundle), verifier)
    verify_seconds = time.process_time() - start
    assert report.ok, report.fault
    timings = []
    for i, (proof, leaf) in enumerate(zip(proofs, leaves, strict=True)):
        seq = i * (final.size // 1000)
        t0 = time.perf_counter()
        verify_inclusion(seq, final.size, leaf, proof, final.root)
        timings.append(time.perf_counter() - t0)
    return verify_seconds, statistics.median(timings) * 1e6, max(32 * len(p) for p in proofs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--appends", type=int, default=20_000)
    parser.add_argument("--plain", type=int, default=2_000, help="rows for the plain baseline")
    parser.add_argument("--threads", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        gc = bench_group_commit(root, args.appends, args.threads)
        plain = bench_plain_sqlite(root, args.plain)
        print(f"durable appends/s, group commit ({args.threads} writers): {gc:,.0f}")
        print(f"durable appends/s, plain SQLite insert per transaction:  {plain:,.0f}")
        print(f"ratio group commit / plain: {gc / plain:.1f}x   (goal: >= 10,000/s)")
        seconds, proof_us, proof_bytes = bench_verify(root, args.entries)
        print(
            f"offline verification of {args.entries:,} entries: {seconds:.1f} s CPU (goal <= 15 s)"
        )
        print(f"inclusion proof check: {proof_us:.1f} us median")
        print(
            f"proof bytes at n={args.entries:,}: {proof_bytes} "
            f"(32 * ceil(log2 n) = {32 * math.ceil(math.log2(args.entries))})"
        )


if __name__ == "__main__":
    main()
