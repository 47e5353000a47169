"""Zone node benchmark: the same aggregate on a zone hosted in the exchange vs on a zone node.

    python -P bench/node.py [--rows 1000000] [--runs 20] [--requests 300] [--witness 150]
                            [--json]

Builds, in a temporary directory, an exchange (``zonex serve`` on loopback, SQLite control
plane, one worker) with two zones holding the same generated rows: ``hosted`` (registered by
upload: the exchange runs its queries in-process) and ``noded`` (``zonex node init``, ``zonex
node approve``, ``zonex dataset register --node``: the rows stay in the node's directory and
``zonex node serve`` runs each query as a dispatched task). Each zone holds ``tax`` (--rows
rows: company id, one of 16 districts, an industry, employees, tax paid) and ``tiny`` (100 of
those rows). A consumer is granted ``aggregate`` on both zones; the rules bound the numeric
columns and keep tax paid at L3, so every release is differentially private.

Measured side by side, requests alternating between the zones (the order flipped every round):

1. **heavy**: ``SELECT district, COUNT(*), SUM(tax_paid) FROM tax GROUP BY district`` (ε 0.25),
   --runs per zone; median and p95 per host and node / in-process (goal <= 1.15);
2. **tiny**: ``SELECT COUNT(*), SUM(tax_paid) FROM tiny`` (ε 0.02), --requests per zone;
   p50/p99 per host and of the node's overhead, which is dispatch (the ``task.authorized``
   entry, the queue, the node's long poll, the bundle's proofs), the node's verification,
   check and signature, and the exchange's verification of the answer (goal: p99 <= 50 ms).
   The overhead is given both as the difference of the percentiles and as the percentiles of
   the paired differences (each node request minus the in-process request next to it).

``--witness N`` then adds a witness (``zonex witness serve`` on loopback, ``zonex ledger witness
add``) and pins a 1-of-1 witness policy on the node (``zonex node witness-policy``): each task's
checkpoint must now carry the witness's cosignature, so dispatch stores a checkpoint covering the
task and has it cosigned before the node gets it. N more tiny requests per zone are timed the
same way, and the node's paired overhead is printed for both phases side by side: the difference
is the latency a witnessed checkpoint adds per task.

``--epoch N`` prepares an epoch of ``tax`` in each zone (in the exchange for ``hosted``, on the
node for ``noded``: k_e stays there and it uploads the fingerprints) and times epoch-mode
``psi_cardinality`` sessions of N consumer ids, where the node answers A_e = k_e·A as a task.

Latency is the consumer's: ``exchange.client.sdk.Client.aggregate`` (one kept-alive connection,
the request's signature and the answer's decoding included) timed in this process. A consumer may
spend at most ε 10 per dataset and window, which bounds --runs and --requests at the ε above.
The exchange, the node and this client share the machine's cores; the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import httpx

from crypto.keys import SigningKey
from exchange.client.sdk import Client
from exchange.keyfile import load_private_key, write_private_key
from exchange.server.runtime import init_data_dir

ROOT = Path(__file__).resolve().parents[1]
HOSTED, NODED = "hosted", "noded"
PURPOSE = "credit-assessment"
HEAVY_SQL = "SELECT district, COUNT(*), SUM(tax_paid) FROM tax GROUP BY district"
TINY_SQL = "SELECT COUNT(*), SUM(tax_paid) FROM tiny"
HEAVY_EPSILON = "0.25"
TINY_EPSILON = "0.02"
TINY_ROWS = 100
HEAVY_WARMUP, TINY_WARMUP = 2, 10
#: the most a rule's epsilon_budget may be (exchange.node.dp.MAX_EPSILON)
BUDGET = Decimal(10)

GENERATE = """
COPY (
SELECT
    'C' || lpad(CAST(i AS VARCHAR), 10, '0') AS company_id,
    (['huangpu', 'xuhui', 'changning', 'jingan', 'putuo', 'hongkou', 'yangpu', 'minhang',
      'baoshan', 'jiading', 'pudong', 'jinshan', 'songjiang', 'qingpu', 'fengxian',
      'chongming'])[1 + CAST(hash(i, 1) % 16 AS INTEGER)] AS district,
    (['finance', 'software', 'catering', 'construction', 'retail', 'logistics',
      'manufacturing', 'education'])[1 + CAST(hash(i, 2) % 8 AS INTEGER)] AS industry,
    CAST(hash(i, 4) % 5000 AS BIGINT) AS employees,
    CAST(hash(i, 5) % 2000000 AS BIGINT) AS tax_paid
FROM range({rows}) r(i)
) TO '{path}' (FORMAT csv, HEADER)
"""
LEVELS = {
    "company_id": "L2",
    "district": "L1",
    "industry": "L1",
    "employees": "L2",
    "tax_paid": "L3",
}
RULES = {
    "min_group_size": 10,
    "epsilon_budget": str(BUDGET),
    "columns": {
        "company_id": {"disclosure": "join_only"},
        "district": {"disclosure": "plaintext"},
        "industry": {"disclosure": "plaintext"},
        "employees": {"disclosure": "plaintext", "lower": "0", "upper": "5000"},
        "tax_paid": {"disclosure": "after_aggregate", "lower": "0", "upper": "2000000"},
    },
}


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """A subprocess in its own session (Ctrl-C in the terminal reaches only this script, which
    then stops it); output to ``log``."""

    def __init__(self, command: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.log.name}: exited {self.proc.returncode}\n"
                + self.log.read_text("utf-8", "replace")[-3000:]
            )

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@contextmanager
def running(command: list[str], env: dict[str, str], log: Path) -> Iterator[Process]:
    process = Process(command, env, log)
    try:
        yield process
    finally:
        process.stop()


def zonex(env: dict[str, str], *args: str) -> str:
    """One ``zonex`` CLI command, as a provider or operator types it."""
    done = subprocess.run(
        [sys.executable, "-m", "exchange.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"zonex {' '.join(args[:3])}: {done.stdout}{done.stderr}")
    return done.stdout


def wait_for(what: str, ready: Callable[[], bool], process: Process, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.check()
        try:
            if ready():
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what} not ready after {timeout:.0f} s")


# -- set-up ------------------------------------------------------------------------------------


def generate(work: Path, rows: int) -> tuple[Path, Path]:
    big, tiny = work / "tax.csv", work / "tiny.csv"
    start = time.perf_counter()
    con = duckdb.connect()
    con.execute(GENERATE.format(rows=rows, path=big))
    con.execute(GENERATE.format(rows=TINY_ROWS, path=tiny))
    con.close()
    print(
        f"generated {rows:,} rows ({big.stat().st_size / 1e6:.0f} MB CSV) in "
        f"{time.perf_counter() - start:.1f} s",
        flush=True,
    )
    return big, tiny


def level_flags() -> list[str]:
    return [f"--level={column}={level}" for column, level in LEVELS.items()]


def set_up(
    stack: ExitStack, work: Path, env: dict[str, str], files: dict[str, Path], consented: int = 0
) -> tuple[str, SigningKey, SigningKey]:
    """Start the exchange and the node; return the exchange's URL, the granted consumer and the
    zones' provider."""
    data_dir = work / "exchange"
    init_data_dir(data_dir)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = [sys.executable, "-m", "exchange.cli", "serve", "--data-dir", str(data_dir)]
    server = stack.enter_context(
        running(
            [*serve, "--port", str(port)],
            env,
            work / "exchange.log",
        )
    )
    wait_for(
        "the exchange",
        lambda: httpx.get(url + "/v1/health", timeout=1).status_code == 200,
        server,
        120,
    )
    operator = load_private_key(data_dir / "operator.key")
    provider, consumer = SigningKey.generate(), SigningKey.generate()
    provider_key = work / "provider.key"
    write_private_key(provider_key, provider)
    with Client(url, operator) as op:
        op.register_principal("Tax Bureau", "agency", provider.public_key)
        op.register_principal("City Bank", "enterprise", consumer.public_key)
    with Client(url, provider) as p:
        p.create_zone(HOSTED, "in the exchange")
        p.create_zone(NODED, "on the tax bureau's node")

        # (a) in-process: uploaded into the exchange's zone store
        start = time.perf_counter()
        for name, path in files.items():
            p.register_dataset(HOSTED, name, levels=LEVELS, subject_column="company_id", file=path)
        print(f"uploaded to zone {HOSTED} in {time.perf_counter() - start:.1f} s", flush=True)

        # (b) on a node: registered, approved, then the rows imported on the node
        node_dir = work / "node"
        out = zonex(
            env, "node", "init", "--data-dir", str(node_dir), "--zone", NODED,
            "--url", url, "--key", str(provider_key),
        )  # fmt: skip
        node_key = out.split()[1]
        operator_key = str(data_dir / "operator.key")
        zonex(env, "node", "approve", node_key, "--url", url, "--key", operator_key)
        start = time.perf_counter()
        for name, path in files.items():
            zonex(
                env, "dataset", "register", NODED, name, "--node", str(node_dir),
                "--file", str(path), "--subject-column", "company_id", *level_flags(),
            )  # fmt: skip
        print(f"imported on the node in {time.perf_counter() - start:.1f} s", flush=True)

        for zone in (HOSTED, NODED):
            for name in files:
                p.set_analysis_rules(zone, name, RULES)
        for zone in (HOSTED, NODED):
            with Client(url, consumer) as c:
                req = c.request_access(
                    zone,
                    list(files),
                    ["aggregate", "psi_cardinality", "he_score"],
                    PURPOSE,
                    duration_seconds=86400,
                    justification="benchmark",
                )
            p.approve(req["id"])
            if consented:
                # he_score scores consented subjects only: the first --score ids of the table
                until = (datetime.now(UTC) + timedelta(days=1)).isoformat()
                p.import_consents(
                    zone,
                    [
                        {
                            "subject": subject,
                            "consumer": consumer.key_id,
                            "purpose": PURPOSE,
                            "expires_at": until,
                        }
                        for subject in company_ids(consented)
                    ],
                )

    node = stack.enter_context(
        running(
            [sys.executable, "-m", "exchange.cli", "node", "serve", "--data-dir", str(node_dir)],
            {**env, "PYTHONUNBUFFERED": "1"},
            work / "node.log",
        )
    )
    with Client(url, consumer) as c:
        wait_for(
            "the node",
            lambda: bool(c.request("GET", "/v1/availability").get(NODED, {}).get("online")),
            node,
            60,
        )
    return url, consumer, provider


def add_witness(stack: ExitStack, work: Path, env: dict[str, str]) -> Path:
    """Start a witness that trusts the exchange's log, configure it on the exchange and pin a
    1-of-1 policy naming it on the node (a running node applies it from its next task)."""
    data_dir, node_dir, witness_dir = work / "exchange", work / "node", work / "witness"
    zonex(env, "witness", "init", "--data-dir", str(witness_dir), "--name", "bench.test/witness")
    zonex(
        env, "witness", "trust", "--data-dir", str(witness_dir),
        "--log-key", str(data_dir / "log.pub"),
    )  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    witness = stack.enter_context(
        running(
            [
                sys.executable, "-m", "exchange.cli", "witness", "serve",
                "--data-dir", str(witness_dir), "--port", str(port),
            ],
            env,
            work / "witness.log",
        )
    )  # fmt: skip
    wait_for(
        "the witness",
        lambda: httpx.get(url + "/add-checkpoint", timeout=1).status_code == 405,
        witness,
        60,
    )
    zonex(
        env, "ledger", "witness", "add", "--data-dir", str(data_dir),
        "--url", url, "--key", str(witness_dir / "witness.pub"),
    )  # fmt: skip
    policy = work / "witness.policy"
    policy.write_text(
        f"log {(data_dir / 'log.pub').read_text().strip()}\n"
        f"witness bench {(witness_dir / 'witness.pub').read_text().strip()}\n"
        "quorum bench\n",
        "utf-8",
    )
    zonex(env, "node", "witness-policy", "--data-dir", str(node_dir), str(policy))
    return policy


def witnessed_checkpoint(work: Path, policy: Path) -> str:
    """How the node's last accepted checkpoint meets the policy (a proof the witnessed phase
    ran witnessed: the node refuses anything less)."""
    from crypto.note import NoteVerifier
    from crypto.tlogpolicy import check_quorum, parse_policy

    state = json.loads((work / "node" / "state.json").read_text("utf-8"))
    log = NoteVerifier.from_verifier_key((work / "exchange" / "log.pub").read_text().strip())
    report = check_quorum(state["checkpoint"], parse_policy(policy.read_bytes()), log)
    if not report.ok:
        raise SystemExit(f"the node accepted an unwitnessed checkpoint: {report.explain()}")
    return report.explain()


# -- measuring ---------------------------------------------------------------------------------


def interleaved(
    c: Client, sql: str, epsilon: str, count: int, warmup: int
) -> dict[str, list[float]]:
    """Seconds per request for each zone, alternating (order flipped every round)."""
    times: dict[str, list[float]] = {HOSTED: [], NODED: []}
    for i in range(warmup + count):
        order = (HOSTED, NODED) if i % 2 == 0 else (NODED, HOSTED)
        for zone in order:
            start = time.perf_counter()
            out = c.aggregate(zone, sql, PURPOSE, epsilon=epsilon)
            elapsed = time.perf_counter() - start
            assert out.result.get("epsilon") == epsilon, out.result
            if i >= warmup:
                times[zone].append(elapsed)
    return times


def company_ids(count: int) -> list[str]:
    """The first ``count`` subject ids of the generated table."""
    return [f"C{i:010d}" for i in range(count)]


#: the bank's model in the scoring benchmark (the table's numeric columns)
SCORE_FEATURES = ("employees", "tax_paid")


def score_sessions(c: Client, ids: int, runs: int) -> dict[str, list[float]]:
    """Seconds per he_score of ``ids`` consented subjects under one committed model (the
    consumer's encryption of the weights and decryption included), alternating zones."""
    from exchange.client import he as he_client

    model = he_client.new_model(SCORE_FEATURES, [0.001, 0.000001], bias=-1.0, link="identity")
    c.commit_model(model.document())
    mine = company_ids(ids)
    times: dict[str, list[float]] = {HOSTED: [], NODED: []}
    for run in range(runs):
        for zone in (HOSTED, NODED) if run % 2 == 0 else (NODED, HOSTED):
            start = time.perf_counter()
            he_client.score(c, zone=zone, dataset="tax", purpose=PURPOSE, model=model, ids=mine)
            times[zone].append(time.perf_counter() - start)
            print(f"he_score {zone}: {times[zone][-1]:.1f} s", flush=True)
    return times


#: each private join's ε (the dataset is L3: its releases are differentially private)
PSI_EPSILON = "0.5"


def psi_sessions(c: Client, ids: int, rows: int, runs: int) -> dict[str, list[float]]:
    """Seconds per whole psi_cardinality session (the consumer's blinding and re-blinding
    included, as `zonex psi` runs it), alternating between the zones."""
    inside = company_ids(min(rows, ids // 2))
    outside = [f"X{i:010d}" for i in range(ids - len(inside))]
    mine = inside + outside
    times: dict[str, list[float]] = {HOSTED: [], NODED: []}
    for run in range(runs):
        for zone in (HOSTED, NODED) if run % 2 == 0 else (NODED, HOSTED):
            start = time.perf_counter()
            c.psi_join(zone, "tax", "cardinality", mine, PURPOSE, epsilon=PSI_EPSILON)
            times[zone].append(time.perf_counter() - start)
            print(f"psi {zone}: {times[zone][-1]:.1f} s", flush=True)
    return times


def epoch_ready(provider: Client, zone: str) -> float:
    """Ask for an epoch of ``tax`` in ``zone`` and wait until it serves (the exchange prepares
    a hosted zone's on a thread; a node prepares its own after a ``psi_epoch_prepare`` task and
    uploads it); seconds from the request to the first status that shows it current."""
    start = time.perf_counter()
    status = provider.psi_prepare_epoch(zone, "tax")
    while status["current"] is None:
        time.sleep(0.2)
        status = provider.psi_epochs(zone, "tax")
    return time.perf_counter() - start


def epoch_sessions(c: Client, ids: int, rows: int, runs: int) -> dict[str, list[float]]:
    """Seconds per whole psi_cardinality session in epoch mode, alternating between the zones
    (each zone's epoch prepared before)."""
    inside = company_ids(min(rows, ids // 2))
    mine = inside + [f"X{i:010d}" for i in range(ids - len(inside))]
    times: dict[str, list[float]] = {HOSTED: [], NODED: []}
    for run in range(runs):
        for zone in (HOSTED, NODED) if run % 2 == 0 else (NODED, HOSTED):
            start = time.perf_counter()
            out = c.psi_join(
                zone, "tax", "cardinality", mine, PURPOSE, epsilon=PSI_EPSILON, protocol="epoch"
            )
            times[zone].append(time.perf_counter() - start)
            assert out["result"]["y_count"] == rows, out["result"]
            print(f"epoch psi {zone}: {times[zone][-1]:.2f} s", flush=True)
    return times


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile, in milliseconds."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def heavy_rows(times: list[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(times) * 1000,
        "p95_ms": pct(times, 0.95),
        "min_ms": min(times) * 1000,
    }


def tiny_rows(times: list[float]) -> dict[str, float]:
    return {"p50_ms": pct(times, 0.5), "p99_ms": pct(times, 0.99), "max_ms": max(times) * 1000}


def _overhead(times: dict[str, list[float]]) -> dict[str, float]:
    """The node's p50/p99 and its paired overhead over the in-process zone (ms)."""
    paired = [a - b for a, b in zip(times[NODED], times[HOSTED], strict=True)]
    return {
        "node_p50_ms": pct(times[NODED], 0.5),
        "node_p99_ms": pct(times[NODED], 0.99),
        "paired_p50_ms": pct(paired, 0.5),
        "paired_p99_ms": pct(paired, 0.99),
    }


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


# -- main --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows of the heavy table")
    parser.add_argument("--runs", type=int, default=20, help="heavy aggregates per zone")
    parser.add_argument("--requests", type=int, default=300, help="tiny aggregates per zone")
    parser.add_argument(
        "--psi",
        type=int,
        default=0,
        help="also time psi_cardinality sessions of this many consumer ids (half of them in the "
        "zone's --rows ids) against each zone (0: skip)",
    )
    parser.add_argument("--psi-runs", type=int, default=2, help="private joins per zone")
    parser.add_argument(
        "--score",
        type=int,
        default=0,
        help="also time he_score of this many consented subjects against each zone (0: skip)",
    )
    parser.add_argument("--score-runs", type=int, default=3, help="scorings per zone")
    parser.add_argument(
        "--epoch",
        type=int,
        default=0,
        help="also prepare an epoch of each zone's --rows subjects (the node's on the node) and "
        "time epoch-mode psi_cardinality sessions of this many consumer ids (0: skip)",
    )
    parser.add_argument("--epoch-runs", type=int, default=5, help="epoch sessions per zone")
    parser.add_argument(
        "--witness",
        type=int,
        default=0,
        help="then add a witness and a 1-of-1 witness policy on the node and time this many more "
        "tiny requests per zone (0: skip)",
    )
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    for count, warmup, eps, flag in (
        (args.runs, HEAVY_WARMUP, HEAVY_EPSILON, "--runs"),
        (args.requests, TINY_WARMUP, TINY_EPSILON, "--requests"),
    ):
        if count < 1 or (count + warmup) * Decimal(eps) > BUDGET:
            parser.error(f"{flag}: 1 to {int(BUDGET / Decimal(eps)) - warmup} (ε {eps} each)")
    if args.witness:
        # the tiny requests of both phases spend the same dataset's budget
        most = int(BUDGET / Decimal(TINY_EPSILON)) - args.requests - 2 * TINY_WARMUP
        if not 1 <= args.witness <= most:
            parser.error(f"--witness: 1 to {most} with --requests {args.requests}")
    if args.requests < 200:
        print("note: fewer than 200 tiny requests: the p99 is a maximum", file=sys.stderr)

    # Ctrl-C and SIGTERM unwind through the ExitStack, which stops the exchange and the node
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        work = Path(tmp)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("ZONEX_DATABASE_URL", "ZONEX_PROFILE", "ZONEX_URL", "ZONEX_KEY")
        }
        env["XDG_CONFIG_HOME"] = str(work / "xdg")  # no user CLI profiles
        big, tiny = generate(work, args.rows)
        url, consumer, provider = set_up(stack, work, env, {"tax": big, "tiny": tiny}, args.score)
        load_before = load_average()
        with Client(url, consumer) as c:
            start = time.perf_counter()
            heavy = interleaved(c, HEAVY_SQL, HEAVY_EPSILON, args.runs, HEAVY_WARMUP)
            print(f"heavy: {time.perf_counter() - start:.0f} s", flush=True)
            start = time.perf_counter()
            tiny_times = interleaved(c, TINY_SQL, TINY_EPSILON, args.requests, TINY_WARMUP)
            print(f"tiny: {time.perf_counter() - start:.0f} s", flush=True)
            witness_times: dict[str, list[float]] | None = None
            witnessed = ""
            if args.witness:
                policy = add_witness(stack, work, env)
                start = time.perf_counter()
                witness_times = interleaved(c, TINY_SQL, TINY_EPSILON, args.witness, TINY_WARMUP)
                print(f"tiny, witnessed: {time.perf_counter() - start:.0f} s", flush=True)
                witnessed = witnessed_checkpoint(work, policy)
            psi_times = psi_sessions(c, args.psi, args.rows, args.psi_runs) if args.psi else None
            score_times = score_sessions(c, args.score, args.score_runs) if args.score else None
            epoch: dict[str, Any] | None = None
            if args.epoch:
                with Client(url, provider) as p:
                    prepared = {zone: epoch_ready(p, zone) for zone in (HOSTED, NODED)}
                for zone, seconds in prepared.items():
                    print(f"epoch of {zone} ready in {seconds:.1f} s", flush=True)
                epoch = {
                    "prepared": prepared,
                    "times": epoch_sessions(c, args.epoch, args.rows, args.epoch_runs),
                }
        load_after = load_average()

    figures: dict[str, Any] = {
        "rows": args.rows,
        "cpus": os.cpu_count(),
        "load_average": {"before": load_before, "after": load_after},
        "heavy": {
            "sql": HEAVY_SQL,
            "epsilon": HEAVY_EPSILON,
            "runs": args.runs,
            HOSTED: heavy_rows(heavy[HOSTED]),
            NODED: heavy_rows(heavy[NODED]),
        },
        "tiny": {
            "sql": TINY_SQL,
            "epsilon": TINY_EPSILON,
            "rows": TINY_ROWS,
            "requests": args.requests,
            HOSTED: tiny_rows(tiny_times[HOSTED]),
            NODED: tiny_rows(tiny_times[NODED]),
        },
    }
    if witness_times is not None:
        figures["witness"] = {
            "requests": args.witness,
            "last_checkpoint": witnessed,
            "before": _overhead(tiny_times),
            "after": _overhead(witness_times),
        }
        before, after = figures["witness"]["before"], figures["witness"]["after"]
        figures["witness"]["added_p50_ms"] = after["paired_p50_ms"] - before["paired_p50_ms"]
        figures["witness"]["added_p99_ms"] = after["paired_p99_ms"] - before["paired_p99_ms"]
    if psi_times is not None:
        figures["psi"] = {
            "ids": args.psi,
            "rows": args.rows,
            "epsilon": PSI_EPSILON,
            HOSTED: statistics.median(psi_times[HOSTED]),
            NODED: statistics.median(psi_times[NODED]),
        }
        figures["psi"]["ratio_median"] = figures["psi"][NODED] / figures["psi"][HOSTED]
    if epoch is not None:
        figures["epoch"] = {
            "ids": args.epoch,
            "rows": args.rows,
            "epsilon": PSI_EPSILON,
            "uploaded_bytes": args.rows * 16,  # 96-bit fingerprints and 32-bit positions
            "prepared_s": epoch["prepared"],
            HOSTED: statistics.median(epoch["times"][HOSTED]),
            NODED: statistics.median(epoch["times"][NODED]),
        }
        figures["epoch"]["ratio_median"] = figures["epoch"][NODED] / figures["epoch"][HOSTED]
    if score_times is not None:
        figures["he_score"] = {
            "ids": args.score,
            "features": list(SCORE_FEATURES),
            HOSTED: statistics.median(score_times[HOSTED]),
            NODED: statistics.median(score_times[NODED]),
        }
        figures["he_score"]["ratio_median"] = (
            figures["he_score"][NODED] / figures["he_score"][HOSTED]
        )
    h, n = figures["heavy"][HOSTED], figures["heavy"][NODED]
    figures["heavy"]["ratio_median"] = n["median_ms"] / h["median_ms"]
    figures["heavy"]["ratio_p95"] = n["p95_ms"] / h["p95_ms"]
    th, tn = figures["tiny"][HOSTED], figures["tiny"][NODED]
    paired = [a - b for a, b in zip(tiny_times[NODED], tiny_times[HOSTED], strict=True)]
    figures["tiny"]["overhead"] = {
        "p50_diff_ms": tn["p50_ms"] - th["p50_ms"],
        "p99_diff_ms": tn["p99_ms"] - th["p99_ms"],
        "paired_p50_ms": pct(paired, 0.5),
        "paired_p99_ms": pct(paired, 0.99),
    }

    print(
        f"\n{os.cpu_count()} CPUs shared by the exchange, the node and this client; "
        f"load average {load_before} before, {load_after} after"
    )
    print(f"\nheavy: {HEAVY_SQL}\n  {args.rows:,} rows, ε {HEAVY_EPSILON}, {args.runs} runs each")
    print(f"  {'zone':<22}{'median ms':>11}{'p95 ms':>10}{'min ms':>10}")
    for label, key in (("in-process", HOSTED), ("node", NODED)):
        row = figures["heavy"][key]
        print(f"  {label:<22}{row['median_ms']:>11.1f}{row['p95_ms']:>10.1f}{row['min_ms']:>10.1f}")
    print(
        f"  node / in-process: median {figures['heavy']['ratio_median']:.2f}, "
        f"p95 {figures['heavy']['ratio_p95']:.2f} (goal <= 1.15)"
    )
    print(
        f"\ntiny: {TINY_SQL}\n  {TINY_ROWS} rows, ε {TINY_EPSILON}, {args.requests} requests each"
    )
    print(f"  {'zone':<22}{'p50 ms':>11}{'p99 ms':>10}{'max ms':>10}")
    for label, key in (("in-process", HOSTED), ("node", NODED)):
        row = figures["tiny"][key]
        print(f"  {label:<22}{row['p50_ms']:>11.1f}{row['p99_ms']:>10.1f}{row['max_ms']:>10.1f}")
    o = figures["tiny"]["overhead"]
    print(f"  {'overhead (difference)':<22}{o['p50_diff_ms']:>11.1f}{o['p99_diff_ms']:>10.1f}")
    print(f"  {'overhead (paired)':<22}{o['paired_p50_ms']:>11.1f}{o['paired_p99_ms']:>10.1f}")
    print("  goal: p99 overhead <= 50 ms")
    if "witness" in figures:
        f = figures["witness"]
        print(
            f"\ntiny with a witness on loopback (1-of-1 policy on the node), "
            f"{args.witness} requests each after the {args.requests} above"
        )
        print(f"  {'phase':<22}{'node p50':>11}{'node p99':>10}{'ovh p50':>10}{'ovh p99':>10}")
        for label, key in (("no witness", "before"), ("witnessed", "after")):
            row = f[key]
            print(
                f"  {label:<22}{row['node_p50_ms']:>11.1f}{row['node_p99_ms']:>10.1f}"
                f"{row['paired_p50_ms']:>10.1f}{row['paired_p99_ms']:>10.1f}"
            )
        print(
            f"  added per task by the witnessed checkpoint: p50 {f['added_p50_ms']:.1f} ms, "
            f"p99 {f['added_p99_ms']:.1f} ms (overhead = node minus the in-process request "
            "next to it)"
        )
        print(f"  the node's last checkpoint: {f['last_checkpoint']}")
    if "psi" in figures:
        f = figures["psi"]
        print(
            f"\npsi_cardinality: {args.psi:,} consumer ids against {args.rows:,} rows, "
            f"ε {PSI_EPSILON}, {args.psi_runs} sessions each (whole session, consumer included)"
        )
        print(f"  in-process {f[HOSTED]:.1f} s, node {f[NODED]:.1f} s (median)")
        print(f"  node / in-process: {f['ratio_median']:.2f} (goal <= 1.15)")
    if "epoch" in figures:
        f = figures["epoch"]
        print(
            f"\nepoch mode: an epoch of {args.rows:,} subjects ({f['uploaded_bytes']:,} bytes of "
            f"fingerprints and positions), then psi_cardinality of {args.epoch:,} consumer ids, "
            f"ε {PSI_EPSILON}, {args.epoch_runs} sessions each"
        )
        prepared = f["prepared_s"]
        print(
            f"  preparation (request to current): in-process {prepared[HOSTED]:.1f} s, "
            f"node {prepared[NODED]:.1f} s (its upload included)"
        )
        print(f"  session: in-process {f[HOSTED]:.2f} s, node {f[NODED]:.2f} s (median)")
        print(f"  node / in-process: {f['ratio_median']:.2f}")
    if "he_score" in figures:
        f = figures["he_score"]
        print(
            f"\nhe_score: {args.score:,} consented subjects, features {', '.join(SCORE_FEATURES)}, "
            f"{args.score_runs} scorings each (the consumer's encryption and decryption included)"
        )
        print(f"  in-process {f[HOSTED]:.2f} s, node {f[NODED]:.2f} s (median)")
        print(f"  node / in-process: {f['ratio_median']:.2f} (goal <= 1.15)")
    if args.json:
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
