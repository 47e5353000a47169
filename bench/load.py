"""Load benchmark: signed, authorized catalog reads and aggregates vs a bare FastAPI endpoint.

    python -P bench/load.py --database-url postgresql+psycopg://USER@HOST:PORT/DB [--seconds 60]
        [--workers 1,2,4] [--concurrency 8] [--loads catalog,aggregate]

PostgreSQL only (``--database-url`` or ``ZONEX_TEST_DATABASE_URL``; nothing is started for you).
A fresh database is created on that server for the run and dropped afterwards. An exchange is
set up on it (a zone, the 240-company table, analysis rules, a consumer with an ``aggregate``
grant); then, for each worker count, ``zonex serve --workers N`` on loopback takes, for
``--seconds`` each:

- **catalog**: ``GET /v1/catalog``, RFC 9421-signed by the consumer: signature and skew checks,
  the nonce recorded (a group-committed database write that also reads the registry version),
  key status as of that version, the catalog (cached per registry version) and its evidence:
  the first read per interval a ``catalog.read`` ledger entry (group-committed, durable before
  the answer), every later one counted for the interval's ``catalog.read.summary``;
- **aggregate**: ``POST /v1/zones/tax/aggregate`` with a grouped ``COUNT(*)``: the above plus
  the SQL check, the policy decision, the query, k suppression, a ledger entry (group-committed)
  and a signed receipt with its inclusion proof;

and the same requests (signed, the signature unused) go to a **bare** FastAPI endpoint under
uvicorn with the same worker count that answers a fixed catalog-sized JSON document and does
nothing else. The load comes from this process (asyncio, one httpx connection per in-flight
request) on the same machine; its CPU use is printed for every run: a generator near 100 % of
a core is the ceiling of that run, not the server. Prints throughput and p50/p99 latency per
run and the ratios signed catalog / bare (goal >= 0.5) with p99 <= 50 ms.

The default of 8 requests in flight keeps the generator below saturation on the bare runs, so
latencies are the servers'; from about 16 up the generator itself queues requests (on a
2-core machine the bare endpoint's p99 is then 20 ms at 16 and about 90 ms at 32).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from crypto.httpsig import sign_request
from crypto.keys import SigningKey
from exchange.client.sdk import Client
from exchange.keyfile import load_private_key
from exchange.server.runtime import init_data_dir

ROOT = Path(__file__).resolve().parents[1]
COMPANIES = ROOT / "examples" / "data" / "companies.csv"
LEVELS = {
    "company_id": "L2",
    "district": "L1",
    "industry": "L1",
    "founded_year": "L1",
    "employees": "L2",
    "registered_capital": "L2",
    "tax_paid_2025": "L3",
}
PURPOSE = "credit-assessment"
SQL = "SELECT industry, COUNT(*) AS n FROM companies GROUP BY industry"
RULES = {
    "min_group_size": 10,
    "columns": {
        "company_id": {"disclosure": "join_only"},
        "district": {"disclosure": "plaintext"},
        "industry": {"disclosure": "plaintext"},
        "founded_year": {"disclosure": "plaintext"},
        "employees": {"disclosure": "plaintext", "lower": "0", "upper": "5000"},
        "registered_capital": {"disclosure": "after_aggregate"},
        "tax_paid_2025": {"disclosure": "after_aggregate", "lower": "0", "upper": "2000000"},
    },
}
WARMUP_SECONDS = 1.5


# -- the bare baseline -------------------------------------------------------------------------

#: the bare app, written to a module of its own so uvicorn's worker processes import only it
BARE_MODULE = """
import os
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import Response


def create():
    document = Path(os.environ["ZONEX_BENCH_BARE_DOC"]).read_bytes()
    app = FastAPI()

    @app.api_route("/v1/catalog", methods=["GET", "POST"])
    def catalog():
        return Response(document, media_type="application/json")

    return app
"""
BARE_SERVE = (
    "import sys, uvicorn; uvicorn.run('zonex_bench_bare:create', factory=True, "
    "app_dir=sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), workers=int(sys.argv[3]), "
    "log_level='warning', access_log=False)"
)


# -- servers -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """A server subprocess in its own process group (so every worker stops with it). Its output
    goes to ``log`` (a pipe nobody reads would fill up and stall the server)."""

    def __init__(self, command: list[str], port: int, env: dict[str, str], log: Path) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        with log.open("ab") as out:
            self.proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )

    def wait_ready(self, path: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text("utf-8", "replace")[-3000:])
            try:
                if httpx.get(self.url + path, timeout=1).status_code < 500:
                    return
            except httpx.HTTPError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.url} did not start")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def zonex_server(data_dir: Path, database_url: str, workers: int) -> Server:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "ZONEX_DATABASE_URL"}
    command = [sys.executable, "-m", "exchange.cli", "serve", "--data-dir", str(data_dir)]
    command += ["--port", str(port), "--workers", str(workers), "--database-url", database_url]
    server = Server(command, port, env, data_dir.parent / "server.log")
    server.wait_ready("/v1/health")
    return server


def bare_server(workers: int, document: Path) -> Server:
    """uvicorn serving ``document`` at ``/v1/catalog``: no signing, policy, database or ledger."""
    module_dir = document.parent / "bare"
    module_dir.mkdir(exist_ok=True)
    (module_dir / "zonex_bench_bare.py").write_text(BARE_MODULE, "utf-8")
    port = free_port()
    env = {**os.environ, "ZONEX_BENCH_BARE_DOC": str(document)}
    command = [sys.executable, "-c", BARE_SERVE, str(module_dir), str(port), str(workers)]
    server = Server(command, port, env, document.parent / "bare.log")
    server.wait_ready("/v1/catalog")
    return server


# -- the exchange ------------------------------------------------------------------------------


def set_up(data_dir: Path, database_url: str) -> SigningKey:
    """Principals, a zone with the company table and rules, a consumer granted ``aggregate``."""
    init_data_dir(data_dir, database_url=database_url)
    server = zonex_server(data_dir, database_url, 1)
    try:
        operator = load_private_key(data_dir / "operator.key")
        provider, consumer = SigningKey.generate(), SigningKey.generate()
        with Client(server.url, operator) as op:
            op.register_principal("Tax Bureau", "agency", provider.public_key)
            op.register_principal("City Bank", "enterprise", consumer.public_key)
        with Client(server.url, provider) as p:
            p.create_zone("tax", "tax records")
            p.register_dataset(
                "tax", "companies", levels=LEVELS, subject_column="company_id", file=COMPANIES
            )
            p.set_analysis_rules("tax", "companies", RULES)
            with Client(server.url, consumer) as c:
                req = c.request_access(
                    "tax",
                    ["companies"],
                    ["aggregate"],
                    PURPOSE,
                    duration_seconds=30 * 24 * 3600,
                    justification="load test",
                )
            p.approve(req["id"])
    finally:
        server.stop()
    return consumer


# -- the load generator ------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    name: str
    workers: int
    requests: int
    errors: int
    seconds: float
    latencies: list[float]
    client_cpu: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _drive(
    url: str,
    method: str,
    body: bytes,
    key: SigningKey,
    concurrency: int,
    seconds: float,
    latencies: list[float] | None,
) -> tuple[int, int]:
    ok = errors = 0
    stop_at = time.monotonic() + seconds
    headers = {"content-type": "application/json"} if body else {}

    async def worker() -> None:
        nonlocal ok, errors
        async with httpx.AsyncClient(timeout=10) as http:
            while time.monotonic() < stop_at:
                signed = sign_request(
                    method,
                    url,
                    headers,
                    body,
                    key,
                    created=int(time.time()),
                    nonce=secrets.token_urlsafe(18),
                )
                started = time.perf_counter()
                try:
                    response = await http.request(
                        method, url, headers={**headers, **signed}, content=body
                    )
                except httpx.HTTPError as exc:
                    errors += 1
                    if errors <= 3:
                        print(f"  {exc!r}", file=sys.stderr)
                    continue
                elapsed = time.perf_counter() - started
                if response.status_code == 200:
                    ok += 1
                    if latencies is not None:
                        latencies.append(elapsed)
                else:
                    errors += 1
                    if errors <= 3:
                        print(f"  {response.status_code}: {response.text[:300]}", file=sys.stderr)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, errors


def measure(
    name: str,
    workers: int,
    url: str,
    method: str,
    body: bytes,
    key: SigningKey,
    concurrency: int,
    seconds: float,
) -> Run:
    asyncio.run(_drive(url, method, body, key, concurrency, WARMUP_SECONDS, None))
    latencies: list[float] = []
    cpu, wall = time.process_time(), time.perf_counter()
    ok, errors = asyncio.run(_drive(url, method, body, key, concurrency, seconds, latencies))
    wall = time.perf_counter() - wall
    cpu = time.process_time() - cpu
    return Run(name, workers, ok, errors, wall, latencies, cpu / wall)


# -- main --------------------------------------------------------------------------------------


def fresh_database(admin_url: str) -> tuple[str, str]:
    name = "zonex_bench_" + secrets.token_hex(6)
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return name, make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, name: str) -> None:
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--database-url", default=os.environ.get("ZONEX_TEST_DATABASE_URL"))
    parser.add_argument("--seconds", type=float, default=60.0, help="per measured run")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument(
        "--loads", default="catalog,aggregate", help="comma-separated: catalog, aggregate"
    )
    args = parser.parse_args()
    if not args.database_url:
        parser.error("give --database-url (a PostgreSQL server) or set ZONEX_TEST_DATABASE_URL")
    if make_url(args.database_url).get_backend_name() != "postgresql":
        parser.error("the load benchmark runs on PostgreSQL")
    counts = [int(n) for n in args.workers.split(",")]
    loads = set(args.loads.split(","))
    if not loads <= {"catalog", "aggregate"}:
        parser.error("--loads takes catalog and/or aggregate")

    name, url = fresh_database(args.database_url)
    runs: list[Run] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            consumer = set_up(work / "exchange", url)
            aggregate = json.dumps({"sql": SQL, "purpose": PURPOSE}).encode()
            for workers in counts:
                server = zonex_server(work / "exchange", url, workers)
                try:
                    with Client(server.url, consumer) as c:
                        document = json.dumps(c.catalog()).encode()
                    for label, method, path, body in (
                        ("signed catalog", "GET", "/v1/catalog", b""),
                        ("signed aggregate", "POST", "/v1/zones/tax/aggregate", aggregate),
                    ):
                        if label.split()[-1] not in loads:
                            continue
                        runs.append(
                            measure(
                                label,
                                workers,
                                server.url + path,
                                method,
                                body,
                                consumer,
                                args.concurrency,
                                args.seconds,
                            )
                        )
                        print(_row(runs[-1]), flush=True)
                finally:
                    server.stop()
                (work / "catalog.json").write_bytes(document)
                bare = bare_server(workers, work / "catalog.json")
                try:
                    runs.append(
                        measure(
                            "bare",
                            workers,
                            bare.url + "/v1/catalog",
                            "GET",
                            b"",
                            consumer,
                            args.concurrency,
                            args.seconds,
                        )
                    )
                    print(_row(runs[-1]), flush=True)
                finally:
                    bare.stop()
    finally:
        drop_database(args.database_url, name)

    print(
        f"\n{args.seconds:.0f} s per run, {args.concurrency} requests in flight, "
        f"{os.cpu_count()} CPUs (server workers and this load generator share them)"
    )
    print(
        f"{'workers':>7}  {'load':<17}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'client CPU':>12}"
    )
    for run in runs:
        print(_row(run))
    print("\nsigned catalog / bare (goal >= 0.50), p99 (goal <= 50 ms)")
    for workers in counts:
        by = {r.name: r for r in runs if r.workers == workers}
        base = by["bare"].throughput
        parts = [
            f"{name.split()[-1]} {by[name].throughput / base:.2f} "
            f"(p99 {by[name].percentile(0.99):.1f} ms)"
            for name in ("signed catalog", "signed aggregate")
            if name in by
        ]
        print(f"  {workers} worker(s): " + ", ".join(parts))
    ceiling = max(r.client_cpu for r in runs if r.name == "bare")
    print(
        f"load generator CPU on the bare runs: up to {ceiling:.0%} of one core"
        + (" (it is the bare ceiling: ratios understate the gap)" if ceiling > 0.85 else "")
    )


def _row(run: Run) -> str:
    return (
        f"{run.workers:>7}  {run.name:<17}{run.throughput:>9.0f}{run.percentile(0.5):>9.1f}"
        f"{run.percentile(0.99):>9.1f}{run.errors:>8}{run.client_cpu:>11.0%}"
    )


if __name__ == "__main__":
    main()
