"""Ledger benchmark: group commit vs plain inserts; a generated ledger's export and its offline
verification, in one process vs on every core; proof checks.

    python -P bench/ledger.py [--entries 1000000] [--appends 20000] [--threads 64]
    python -P bench/ledger.py --generate N --data-dir D [--checkpoint-every 100000]

The first form prints, in one run:
- durable appends/s through the ledger's group commit vs plain SQLite inserts of the same rows,
  one durable transaction each (WAL, synchronous=FULL, the same file system), and the ratio;
- the latency of an occasional write beside a writer committing back to back, through the
  control engine (writers of one process take turns) vs plain connections meeting in SQLite's
  busy handler;
- then, for a ledger of --entries generated entries in a fresh data directory, what the second
  form prints.

The second form fills D, a data directory made by ``zonex init``, with N plausible entries
(catalog reads, computations with their receipts' digests, denials, refusals, consents,
snapshots: the kinds and shapes the exchange writes, digests and never data) through the
ledger's own batch append, whatever storage the ledger uses, signing a checkpoint every
--checkpoint-every entries and one at the end (``--generate 0`` measures D as it is). Nothing
else in D changes. It prints:
- entries/s generated;
- seconds and MB to export the ledger (``zonex ledger export``);
- seconds to verify the export offline in one process and on every core (``zonex audit
  verify --jobs 1`` vs the default), and the ratio; each in a fresh process, whose peak RSS
  (and its workers') is printed alongside;
- a fresh worker's start (ready and a first proof served) and the p50/p99 of random
  inclusion proofs it serves from tiles with a cold cache;
- microseconds per inclusion-proof check and proof bytes at that size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from crypto.merkle import MerkleTree, leaf_hash, verify_inclusion
from exchange.errors import ZonexError
from exchange.server.ledger import PARALLEL_EXPORT_MIN, EntryDraft, write_export
from exchange.server.runtime import Exchange, init_data_dir
from exchange.server.storage import WRITE, create_control_engine
from exchange.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


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


# -- a generated ledger ----------------------------------------------------------------------


def _hex(*parts: object) -> str:
    return hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


CONSUMERS = [_hex("consumer", n) for n in range(40)]
PROVIDERS = [_hex("provider", n) for n in range(8)]
ZONES = ["tax", "social", "health", "transport", "energy", "credit", "customs", "housing"]
DATASETS = [f"{zone}-{name}" for zone in ZONES for name in ("companies", "payments", "filings")]
PURPOSES = ["credit-assessment", "risk-control", "statistics", "planning", "supervision"]
LEVELS = ["L2", "L3", "L4"]


def plausible(i: int) -> EntryDraft:
    """The ``i``-th generated entry: of the kinds and shapes the exchange writes (mostly
    catalog reads and computations, some denials, refusals, consents and snapshots), with
    digests in place of every value, as on a real ledger."""
    consumer = CONSUMERS[i % len(CONSUMERS)]
    zone = ZONES[i % len(ZONES)]
    dataset = DATASETS[i % len(DATASETS)]
    level = LEVELS[i % len(LEVELS)]
    purpose = PURPOSES[i % len(PURPOSES)]
    policy = f"v{1 + i // 50_000}"
    rule = f"p, {consumer[:8]}, {zone}, aggregate, {purpose}"
    decision: dict[str, str | int] = {
        "rule": rule,
        "policy_version": policy,
        "level": level,
        "operation": "aggregate",
        "purpose": purpose,
    }
    kind = i % 20
    if kind < 8:
        return EntryDraft(
            kind="catalog.read",
            actor=consumer,
            digests={"catalog": _hex("catalog", i // 100)},
            attrs={"registry_version": i // 100},
        )
    if kind < 14:
        return EntryDraft(
            kind="computation.aggregate",
            actor=consumer,
            refs={"zone": zone, "dataset": dataset},
            digests={"statement": _hex("statement", i), "result": _hex("result", i)},
            attrs={**decision, "groups": i % 17, "k": 10, "epsilon": "0.5", "delta": "0"},
        )
    if kind == 14:
        return EntryDraft(
            kind="computation.psi_cardinality",
            actor=consumer,
            refs={"zone": zone, "dataset": dataset, "session": f"psi-{i}"},
            digests={"statement": _hex("statement", i), "result": _hex("result", i)},
            attrs={**decision, "operation": "psi_cardinality", "x_count": 1000 + i % 9000},
        )
    if kind == 15:
        return EntryDraft(
            kind="access.denied",
            actor=consumer,
            refs={"zone": zone, "dataset": dataset},
            attrs={**decision, "rule": "", "reason": "no_grant"},
        )
    if kind == 16:
        return EntryDraft(
            kind="request.refused",
            actor=consumer,
            digests={"query": _hex("query", i)},
            attrs={
                "route": "POST /v1/zones/{zone}/aggregate",
                "code": "query_rejected",
                "reason": "row_level_output",
                "status": 422,
            },
        )
    if kind in (17, 18):
        provider = PROVIDERS[i % len(PROVIDERS)]
        return EntryDraft(
            kind="consent.recorded",
            actor=provider,
            refs={"consent": f"consent-{i}", "zone": zone, "consumer": consumer},
            digests={"subject": _hex("subject", i)},
            attrs={"purpose": purpose, "expires": "2027-12-31T00:00:00+00:00", "digest_version": 1},
        )
    return EntryDraft(
        kind="dataset.snapshot_published",
        actor=PROVIDERS[i % len(PROVIDERS)],
        refs={"zone": zone, "dataset": dataset},
        digests={"snapshot": _hex("snapshot", i), "previous": _hex("snapshot", i - 20)},
        attrs={"level": level, "rows_band": "10000-100000"},
    )


@dataclass(frozen=True)
class Generated:
    entries: int
    checkpoints: int
    seconds: float


def generate(data_dir: Path, count: int, checkpoint_every: int, batch: int) -> Generated:
    """Append ``count`` plausible entries to the ledger of an initialized data directory, in
    batches of ``batch``, signing a checkpoint every ``checkpoint_every`` entries and at the end.
    Raises :class:`ZonexError` for a directory that was not initialized."""
    ex = Exchange(Settings.from_data_dir(data_dir))
    checkpoints = 0
    try:
        ledger = ex.ledger
        start = time.perf_counter()
        done = 0
        while done < count:
            n = min(batch, count - done, checkpoint_every - done % checkpoint_every)
            ledger.append_batch_sync([plausible(done + i) for i in range(n)])
            done += n
            if done % checkpoint_every == 0 or done == count:
                ledger.checkpoint()
                checkpoints += 1
            print(f"\r  generated {done:,} of {count:,}", end="", file=sys.stderr, flush=True)
        print(file=sys.stderr)
        return Generated(count, checkpoints, time.perf_counter() - start)
    finally:
        ex.close()


# -- export and verification -----------------------------------------------------------------

#: one verification in a fresh interpreter, so that its peak RSS is its own
VERIFY = """
import json, resource, sys, time
from crypto.note import NoteVerifier
from exchange.audit import check_bundle, read_bundle_lines
bundle, key, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3])
log = NoteVerifier.from_verifier_key(open(key, encoding="utf-8").read().strip())
lines = read_bundle_lines(bundle) if jobs else open(bundle, "rb")
start = time.perf_counter()
report = check_bundle(lines, log, jobs=max(jobs, 1))
seconds = time.perf_counter() - start
assert report.ok, report.fault
# VmHWM: this interpreter's own peak (ru_maxrss would count the parent's before exec)
status = open("/proc/self/status", encoding="ascii").read()
rss = int(status.split("VmHWM:")[1].split()[0])
print(json.dumps({
    "seconds": seconds,
    "entries": report.entries,
    "rss": rss,
    "workers_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
}))
"""


def verify_in_fresh_process(bundle: Path, log_pub: Path, jobs: int) -> dict[str, float]:
    """``jobs`` 0: the lines of an open file (one pass keeping 32 bytes per entry, as every
    verification did before bundle files were read streaming)."""
    done = subprocess.run(
        [sys.executable, "-P", "-c", VERIFY, str(bundle), str(log_pub), str(jobs)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, float] = json.loads(done.stdout)
    return result


def proof_checks(bundle: Path, size: int) -> tuple[float, int]:
    """Median microseconds per inclusion-proof check (1,000 entries spread over the ledger)
    and the longest proof's bytes; proofs from a tree over the bundle's own entries."""
    tree = MerkleTree()
    with bundle.open("rb") as f:
        for raw in islice(f, size):
            tree.append(leaf_hash(raw[:-1]))
    root = tree.root()
    step = max(size // 1000, 1)
    timings, longest = [], 0
    for seq in range(0, size, step):
        leaf, proof = tree.leaf_hash(seq), tree.inclusion_proof(seq, size)
        t0 = time.perf_counter()
        verify_inclusion(seq, size, leaf, proof, root)
        timings.append(time.perf_counter() - t0)
        longest = max(longest, 32 * len(proof))
    return statistics.median(timings) * 1e6, longest


#: run in a fresh process: a worker's start and the proofs it serves, nothing cached
_SERVE_PROOFS = """
import json, random, sys, time
from pathlib import Path
from exchange.server.runtime import Exchange
from exchange.settings import Settings
start = time.perf_counter()
ex = Exchange(Settings.from_data_dir(Path(sys.argv[1]))).start()
size = ex.ledger.size()
ex.ledger.inclusion_proof(size // 2, size)
ready = time.perf_counter() - start
rng = random.Random(int(sys.argv[3]))
times = []
for _ in range(int(sys.argv[2])):
    seq = rng.randrange(size)
    t0 = time.perf_counter()
    ex.ledger.inclusion_proof(seq, size)
    times.append(time.perf_counter() - t0)
reads = ex.ledger.tiles.reads
ex.close()
print(json.dumps({"ready": ready, "times": times, "reads": reads, "size": size}))
"""


def serve_proofs(data_dir: Path, proofs: int = 2000, rounds: int = 3) -> None:
    """A worker's start (open, start the ledger, serve a first proof) and random inclusion
    proofs from a cold cache, each round in a fresh process; print the medians of the rounds."""
    results = []
    for seed in range(rounds):
        done = subprocess.run(
            [sys.executable, "-P", "-c", _SERVE_PROOFS, str(data_dir), str(proofs), str(seed)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    ready = statistics.median(r["ready"] for r in results)
    p50 = statistics.median(statistics.quantiles(r["times"], n=100)[49] for r in results)
    p99 = statistics.median(statistics.quantiles(r["times"], n=100)[98] for r in results)
    reads = statistics.median(r["reads"] / proofs for r in results)
    print(
        f"a fresh worker at {results[0]['size']:,} entries: ready and first proof in "
        f"{ready * 1e3:.0f} ms (goal <= 1 s whatever the size); {proofs} random inclusion "
        f"proofs from a cold cache: p50 {p50 * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms (goal "
        f"<= 5 ms), {reads:.2f} tile reads per proof (median of {rounds} processes)"
    )


def report_ledger(data_dir: Path, bundle: Path, rounds: int) -> None:
    """Export the data directory's ledger to ``bundle`` and print the size-dependent figures."""
    serve_proofs(data_dir)
    cores = len(os.sched_getaffinity(0))
    ex = Exchange(Settings.from_data_dir(data_dir))
    seconds: dict[int, float] = {}
    try:
        final = ex.ledger.checkpoint()
        for jobs in (1, cores):  # the same final checkpoint: the same bytes
            start = time.perf_counter()
            write_export(ex.ledger, bundle, final, jobs=jobs)
            seconds[jobs] = time.perf_counter() - start
    finally:
        ex.close()
    megabytes = bundle.stat().st_size / 1e6
    print(
        f"export of {final.size:,} entries, {megabytes:,.0f} MB "
        f"({megabytes * 1e6 / max(final.size, 1):.0f} bytes per entry): {seconds[1]:.1f} s in "
        f"one process, {seconds[cores]:.1f} s on {cores} cores "
        f"({seconds[1] / seconds[cores]:.2f}x; one process below "
        f"{PARALLEL_EXPORT_MIN:,} entries)"
    )
    log_pub = data_dir / "log.pub"
    runs: dict[int, list[dict[str, float]]] = {1: [], cores: [], 0: []}
    for _ in range(rounds):  # alternating, so that a noisy neighbour hits both alike
        for jobs in runs:
            runs[jobs].append(verify_in_fresh_process(bundle, log_pub, jobs))
    best = {jobs: min(results, key=lambda r: r["seconds"]) for jobs, results in runs.items()}
    one, every, before = best[1], best[cores], best[0]
    print(
        f"offline verification of {final.size:,} entries (best of {rounds}): "
        f"{one['seconds']:.1f} s in one process, {every['seconds']:.1f} s on {cores} cores "
        f"({one['seconds'] / every['seconds']:.2f}x)"
    )
    print(
        f"  per entry: {one['seconds'] / final.size * 1e6:.1f} us in one process, "
        f"{every['seconds'] / final.size * 1e6:.1f} us on {cores} cores"
    )
    workers = (
        f" + at most {every['workers_rss'] / 1024:.0f} MB per worker"
        if every["workers_rss"]
        else " (no workers: the bundle is below the parallel threshold)"
    )
    print(
        f"peak RSS of the verifier: {one['rss'] / 1024:.0f} MB in one process; on {cores} cores "
        f"{every['rss'] / 1024:.0f} MB{workers}; before (32 bytes per entry): "
        f"{before['rss'] / 1024:.0f} MB, {before['seconds']:.1f} s"
    )
    proof_us, proof_bytes = proof_checks(bundle, final.size)
    print(f"inclusion proof check: {proof_us:.1f} us median")
    print(
        f"proof bytes at n={final.size:,}: {proof_bytes} "
        f"(32 * ceil(log2 n) = {32 * math.ceil(math.log2(max(final.size, 2)))})"
    )


def occasional_writes(
    path: Path, through_engine: bool, writes: int = 300, budget: float = 15.0
) -> tuple[list[float], int, int]:
    """Seconds per occasional write (one row, then 2 ms idle) while another thread commits
    back to back, the writes that gave up (SQLite's ``database is locked`` after 5 s), and the
    other thread's commits: through the control engine (writers of one process take turns on
    a lock) or through plain ``sqlite3`` connections meeting in SQLite's busy handler (sleeps
    of 1, 2, 5, 10 ... ms). Stops after ``writes`` writes or ``budget`` seconds."""
    engine = create_control_engine(f"sqlite:///{path}")
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE busy (x INTEGER)")
        conn.exec_driver_sql("CREATE TABLE occasional (x INTEGER)")
    writer = engine.execution_options(**WRITE)

    def write(table: str) -> Callable[[], None]:
        if through_engine:

            def run() -> None:
                with writer.begin() as conn:
                    conn.exec_driver_sql(f"INSERT INTO {table} VALUES (1)")

            return run
        raw = sqlite3.connect(path, timeout=5, isolation_level=None, check_same_thread=False)
        raw.execute("PRAGMA synchronous=FULL")

        def run_raw() -> None:
            raw.execute("BEGIN IMMEDIATE")
            raw.execute(f"INSERT INTO {table} VALUES (1)")
            raw.execute("COMMIT")

        return run_raw

    stop = threading.Event()
    busy, commits = write("busy"), [0]

    def keep_busy() -> None:
        while not stop.is_set():
            busy()
            commits[0] += 1

    thread = threading.Thread(target=keep_busy)
    thread.start()
    occasional, times, gave_up = write("occasional"), [], 0
    end = time.perf_counter() + budget
    try:
        while len(times) + gave_up < writes and time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                occasional()
            except sqlite3.OperationalError:
                gave_up += 1
                continue
            times.append(time.perf_counter() - t0)
            time.sleep(0.002)
    finally:
        stop.set()
        thread.join()
        engine.dispose()
    return times, gave_up, commits[0]


def print_occasional(root: Path) -> None:
    for label, through_engine in (("process lock", True), ("busy handler", False)):
        times, gave_up, commits = occasional_writes(root / f"w-{through_engine}.db", through_engine)
        cuts = statistics.quantiles(times, n=100) if len(times) > 1 else [math.nan] * 99
        print(
            f"an occasional write beside a busy writer, {label}: {len(times)} writes, p50 "
            f"{cuts[49] * 1e3:.2f} ms, p99 {cuts[98] * 1e3:.2f} ms, {gave_up} gave up after 5 s "
            f"(the busy writer committed {commits:,} times)"
        )


def print_generated(done: Generated) -> None:
    print(
        f"generated {done.entries:,} entries and {done.checkpoints} checkpoints in "
        f"{done.seconds:.1f} s: {done.entries / done.seconds:,.0f} entries/s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--appends", type=int, default=20_000)
    parser.add_argument("--plain", type=int, default=2_000, help="rows for the plain baseline")
    parser.add_argument("--threads", type=int, default=64)
    parser.add_argument("--generate", type=int, metavar="N", help="fill --data-dir with N entries")
    parser.add_argument("--data-dir", type=Path, help="a data directory made by zonex init")
    parser.add_argument("--checkpoint-every", type=int, default=100_000, metavar="N")
    parser.add_argument("--batch", type=int, default=20_000, help="entries per batch append")
    parser.add_argument("--rounds", type=int, default=1, help="verifications of each kind")
    parser.add_argument("--bundle", type=Path, help="keep the export here (default: deleted)")
    args = parser.parse_args()
    if min(args.checkpoint_every, args.batch, args.rounds) < 1:
        parser.error("--checkpoint-every, --batch and --rounds must be at least 1")
    if (args.generate is None) != (args.data_dir is None):
        parser.error("--generate N and --data-dir D go together")
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp).resolve()  # the verifiers run in ROOT: absolute paths only
        bundle = (args.bundle or root / "ledger.jsonl").resolve()
        if args.generate is not None:
            try:
                done = generate(args.data_dir, args.generate, args.checkpoint_every, args.batch)
            except ZonexError as exc:
                sys.exit(f"bench/ledger.py: {exc}")
            print_generated(done)
            report_ledger(args.data_dir, bundle, args.rounds)
            return
        gc = bench_group_commit(root, args.appends, args.threads)
        plain = bench_plain_sqlite(root, args.plain)
        print(f"durable appends/s, group commit ({args.threads} writers): {gc:,.0f}")
        print(f"durable appends/s, plain SQLite insert per transaction:  {plain:,.0f}")
        print(f"ratio group commit / plain: {gc / plain:.1f}x   (goal: >= 10,000/s)")
        print_occasional(root)
        data = root / "big"
        init_data_dir(data)
        print_generated(generate(data, args.entries, args.checkpoint_every, args.batch))
        report_ledger(data, bundle, args.rounds)


if __name__ == "__main__":
    main()
