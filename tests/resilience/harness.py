"""Shared pieces of the resilience tests: ``zonex serve`` as a killable subprocess, a small
exchange to load (principals, zones, a DP dataset, grants), client threads that record every
acknowledged answer, and an offline audit of a data directory against those answers."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto.encoding import b64url_decode
from crypto.keys import SigningKey
from crypto.merkle import MerkleTree, leaf_hash
from crypto.note import NoteVerifier
from crypto.receipt import verify_receipt
from exchange.audit import check_bundle, read_bundle_lines
from exchange.client.sdk import ApiError, Client
from exchange.server.ledger import write_export
from exchange.server.models import AccessRequestRow, BudgetRow, DatasetRow, GrantRow, ZoneRow
from exchange.server.policystore import PolicyRuleRow
from exchange.server.runtime import Exchange
from exchange.settings import Settings
from tests.conftest import EXAMPLES, L3_LEVELS, free_port

TINY_LEVELS = {"id": "L2", "district": "L1", "amount": "L2"}
PURPOSE = "credit-assessment"
SQL = "SELECT industry, COUNT(*) FROM companies GROUP BY industry"
EPSILON = "0.01"
#: long enough that no run crosses a window boundary, so spend per window is spend in total
REFRESH_SECONDS = 366 * 24 * 3600
DAY = 24 * 3600


def _rules(budget: str) -> dict[str, Any]:
    return {
        "min_group_size": 10,
        "dp_required": True,
        "epsilon_budget": budget,
        "refresh_seconds": REFRESH_SECONDS,
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


# -- the server process ---------------------------------------------------------------------


#: a zygote: imports the application once, then forks one ``zonex serve`` per line on stdin
#: (the same entry point and argv as the command line) in a new session and answers its pid.
#: A restart then measures opening the crashed data directory, not Python's import time.
_ZYGOTE = """
import json, os, signal, sys
import exchange.server.api.app
import exchange.cli
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped as they die
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.setsid()
        log = os.open(job["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        code = 0
        try:
            sys.argv = ["zonex", *job["argv"]]
            exchange.cli.main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        finally:
            os._exit(code)
    print(pid, flush=True)
"""


class Zygote:
    """A pre-imported parent that forks ``zonex serve`` processes on demand."""

    def __init__(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "ZONEX_DATABASE_URL"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _ZYGOTE],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
            text=True,
        )
        self.children: list[int] = []
        self._lock = threading.Lock()
        self._ready = False

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        if self._ready:
            return
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the zygote did not start")
        self._ready = True

    def fork(self, argv: list[str], log_path: Path) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        with self._lock:
            self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log_path)}) + "\n")
            self.proc.stdin.flush()
            pid = int(self.proc.stdout.readline())
            self.children.append(pid)
            return pid

    def close(self) -> None:
        for pid in self.children:
            _kill_group(pid)
        if self.proc.poll() is None:
            _kill_group(self.proc.pid)
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie still answers kill(0); its state in /proc says it is dead
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] in "ZX"
    except (OSError, IndexError):
        return True


class ServerProcess:
    """One ``zonex serve`` in its own process group, so a kill takes every worker with it.

    Started cold (``python -m exchange.cli serve ...``) or forked from a :class:`Zygote`."""

    def __init__(
        self,
        data_dir: Path,
        database_url: str | None,
        log_path: Path,
        *,
        workers: int = 1,
        zygote: Zygote | None = None,
    ) -> None:
        self.log_path = log_path
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = ["serve", "--data-dir", str(data_dir), "--port", str(self.port)]
        argv += ["--workers", str(workers)]
        if database_url:
            argv += ["--database-url", database_url]
        self._started_at = time.monotonic()
        self.proc: subprocess.Popen[bytes] | None = None
        if zygote is not None:
            self.pid = zygote.fork(argv, log_path)
            return
        env = {k: v for k, v in os.environ.items() if k != "ZONEX_DATABASE_URL"}
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "exchange.cli", *argv],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return not _gone(self.pid)

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Seconds from start until ``/v1/health`` answers."""
        deadline = self._started_at + timeout
        with httpx.Client(timeout=2.0) as http:
            while True:
                if not self.alive():
                    raise RuntimeError(f"server exited:\n{self.log_tail()}")
                try:
                    if http.get(self.url + "/v1/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start:\n{self.log_tail()}")
                time.sleep(0.01)
        return time.monotonic() - self._started_at

    def kill(self) -> None:
        """SIGKILL the whole process group and wait until it is gone (idempotent)."""
        _kill_group(self.pid)
        if self.proc is not None:
            self.proc.wait()
            return
        deadline = time.monotonic() + 10
        while not _gone(self.pid):
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {self.pid} survived SIGKILL")
            time.sleep(0.002)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (graceful shutdown), SIGKILL if it takes too long."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.kill()

    def log_tail(self, size: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-size:].decode("utf-8", "replace")
        except OSError:
            return ""


# -- the exchange under load ----------------------------------------------------------------


@dataclass
class Cast:
    """Keys of everyone taking part."""

    operator: SigningKey
    provider: SigningKey = field(default_factory=SigningKey.generate)
    consumers: list[SigningKey] = field(default_factory=list)
    grantees: list[SigningKey] = field(default_factory=list)
    stranger: SigningKey = field(default_factory=SigningKey.generate)


def set_up(url: str, operator: SigningKey, *, consumers: int, grantees: int, budget: str) -> Cast:
    """Principals, a zone with a DP-only dataset, a long grant per consumer, an upload zone."""
    cast = Cast(operator)
    cast.consumers = [SigningKey.generate() for _ in range(consumers)]
    cast.grantees = [SigningKey.generate() for _ in range(grantees)]
    with Client(url, operator) as op:
        op.register_principal("Tax Bureau", "agency", cast.provider.public_key)
        op.register_principal("Stranger Bank", "enterprise", cast.stranger.public_key)
        for i, key in enumerate(cast.consumers):
            op.register_principal(f"Bank {i}", "enterprise", key.public_key)
        for i, key in enumerate(cast.grantees):
            op.register_principal(f"Grantee {i}", "enterprise", key.public_key)
    with Client(url, cast.provider) as p:
        p.create_zone("tax", "tax records")
        p.create_zone("uploads", "small registrations")
        p.register_dataset(
            "tax",
            "companies",
            levels=L3_LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
        p.set_analysis_rules("tax", "companies", _rules(budget))
        for key in cast.consumers:
            with Client(url, key) as c:
                req = c.request_access(
                    "tax",
                    ["companies"],
                    ["aggregate"],
                    PURPOSE,
                    duration_seconds=30 * DAY,
                    justification="load",
                )
            p.approve(req["id"])
    return cast


class Servers:
    """Starts servers on one data directory and kills every one left at the end."""

    def __init__(self, data_dir: Path, database_url: str | None, log_path: Path) -> None:
        self.data_dir = data_dir
        self.database_url = database_url
        self.log_path = log_path
        self.started: list[ServerProcess] = []
        self._zygote: Zygote | None = None

    def warm_up(self) -> None:
        """Start the zygote now (it imports in the background)."""
        if self._zygote is None:
            self._zygote = Zygote()

    def start(self, *, workers: int = 1, forked: bool = False) -> ServerProcess:
        """A new server; ``forked`` ones come from the pre-imported zygote."""
        zygote = None
        if forked:
            if self._zygote is None:
                self.warm_up()
            zygote = self._zygote
            assert zygote is not None
            zygote.wait_ready()
        server = ServerProcess(
            self.data_dir, self.database_url, self.log_path, workers=workers, zygote=zygote
        )
        self.started.append(server)
        return server

    def close(self) -> None:
        for server in self.started:
            server.kill()
        if self._zygote is not None:
            self._zygote.close()


@dataclass
class Acks:
    """Every answer a client got back. Only 2xx answers (and ledgered denials) are promises."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    #: (receipt bundle, result) of every released aggregate
    receipts: list[tuple[dict[str, Any], Any]] = field(default_factory=list)
    zones: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    grants: list[str] = field(default_factory=list)
    revoked: list[str] = field(default_factory=list)
    #: principal key id -> 403 denials answered (each ledgered before the answer)
    denials: Counter[str] = field(default_factory=Counter)
    #: principal key id -> 429 budget refusals
    exhausted: Counter[str] = field(default_factory=Counter)
    catalog_reads: int = 0
    #: anything unexpected (a 5xx, a denial where a grant was live, ...)
    errors: list[str] = field(default_factory=list)

    def add(self, what: str, value: Any) -> None:
        with self.lock:
            getattr(self, what).append(value)

    def count(self, what: str, key: str) -> None:
        with self.lock:
            getattr(self, what)[key] += 1


class Load:
    """Client threads doing mixed work against ``url`` until stopped or the server vanishes."""

    def __init__(
        self,
        url: str,
        cast: Cast,
        acks: Acks,
        tag: str,
        tiny_csv: Path,
        *,
        aggregators: int = 2,
        granters: int = 1,
        appenders: int = 1,
        registrars: int = 1,
        fresh_connections: bool = False,
    ) -> None:
        self.url = url
        self.cast = cast
        self.acks = acks
        self.tag = tag
        self.tiny_csv = tiny_csv
        self.fresh = fresh_connections
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self._rng = random.Random(tag)
        plan: list[tuple[str, Callable[[int, dict[str, Client]], None]]] = []
        plan += [(f"agg{i}", self._aggregates) for i in range(aggregators)]
        plan += [(f"grant{i}", self._grants) for i in range(granters)]
        plan += [(f"append{i}", self._appends) for i in range(appenders)]
        plan += [(f"register{i}", self._registrations) for i in range(registrars)]
        for index, (name, target) in enumerate(plan):
            self.threads.append(
                threading.Thread(target=self._run, args=(target, index), name=name, daemon=True)
            )
        self._indexes: dict[str, int] = defaultdict(int)

    def start(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def finish(self, timeout: float = 30.0) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), f"client thread {t.name} is stuck"

    def _run(self, target: Callable[[int, dict[str, Client]], None], index: int) -> None:
        cache: dict[str, Client] = {}
        try:
            while not self.stop.is_set():
                target(index, cache)
                if self.fresh:  # the next call opens new connections (any worker may answer)
                    self._close(cache)
        except httpx.TransportError:
            pass  # the server is gone: whatever was in flight is not acknowledged
        except Exception as exc:  # recorded; the test fails on it
            self.acks.add("errors", f"{threading.current_thread().name}: {exc!r}")
        finally:
            self._close(cache)

    @staticmethod
    def _close(cache: dict[str, Client]) -> None:
        for client in cache.values():
            client.close()
        cache.clear()

    def _client(self, key: SigningKey, cache: dict[str, Client]) -> Client:
        client = cache.get(key.key_id)
        if client is None:
            client = cache[key.key_id] = Client(self.url, key, timeout=30)
        return client

    def _name(self, prefix: str) -> str:
        with self.acks.lock:
            self._indexes[prefix] += 1
            return f"{prefix}{self.tag}x{self._indexes[prefix]}"

    def _release(self, key: SigningKey, cache: dict[str, Client]) -> None:
        """One DP aggregate; a 403 answer is a ledgered denial, a 429 an exhausted budget."""
        try:
            out = self._client(key, cache).aggregate("tax", SQL, PURPOSE, epsilon=EPSILON)
            self.acks.add("receipts", (out["receipt"], out["result"]))
        except ApiError as exc:
            if exc.status == 429:
                self.acks.count("exhausted", key.key_id)
            elif exc.status == 403:
                self.acks.count("denials", key.key_id)
            else:
                raise

    def _aggregates(self, index: int, cache: dict[str, Client]) -> None:
        key = self.cast.consumers[index % len(self.cast.consumers)]
        self._release(key, cache)
        if self.acks.exhausted[key.key_id]:
            time.sleep(0.02)

    def _grants(self, index: int, cache: dict[str, Client]) -> None:
        """Request, approve, use, revoke, use again (must be denied by the ledger's order)."""
        key = self.cast.grantees[index % len(self.cast.grantees)]
        req = self._client(key, cache).request_access(
            "tax",
            ["companies"],
            ["aggregate"],
            PURPOSE,
            duration_seconds=DAY,
            justification="a short look",
        )
        self.acks.add("requests", req["id"])
        grant = self._client(self.cast.provider, cache).approve(req["id"])["grant_id"]
        self.acks.add("grants", grant)
        self._release(key, cache)
        self._client(self.cast.provider, cache).revoke(grant, "done")
        self.acks.add("revoked", grant)
        self._release(key, cache)

    def _appends(self, index: int, cache: dict[str, Client]) -> None:
        choice = self._rng.random()
        if choice < 0.4:
            name = self._name("z")
            self._client(self.cast.provider, cache).create_zone(name, "load")
            self.acks.add("zones", name)
        elif choice < 0.8:
            try:
                self._client(self.cast.stranger, cache).aggregate(
                    "tax", SQL, PURPOSE, epsilon=EPSILON
                )
                self.acks.add("errors", "the stranger was allowed")
            except ApiError as exc:
                if exc.status != 403:
                    raise
                self.acks.count("denials", self.cast.stranger.key_id)
        else:
            self._client(self.cast.consumers[0], cache).catalog()
            with self.acks.lock:
                self.acks.catalog_reads += 1

    def _registrations(self, index: int, cache: dict[str, Client]) -> None:
        name = self._name("d")
        self._client(self.cast.provider, cache).register_dataset(
            "uploads", name, levels=TINY_LEVELS, subject_column="id", file=self.tiny_csv
        )
        self.acks.add("datasets", name)


def write_tiny_csv(path: Path, rows: int = 30) -> Path:
    lines = ["id,district,amount"] + [f"c{i:04d},d{i % 3},{i * 7}" for i in range(rows)]
    path.write_text("\n".join(lines) + "\n", "utf-8")
    return path


# -- the offline audit ----------------------------------------------------------------------


@dataclass
class Audit:
    size: int
    entries: list[dict[str, Any]]
    tree: MerkleTree


def verifier_of(data_dir: Path) -> NoteVerifier:
    return NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())


def audit(data_dir: Path, acks: Acks, work: Path, *, budget: Decimal) -> Audit:
    """Everything the exchange promised is on a verifiable ledger and the state agrees with it.

    Runs on the data directory alone (an export through the library, then the offline bundle
    check), the way an auditor with the data directory would; no server is consulted.
    """
    verifier = verifier_of(data_dir)
    ex = Exchange(Settings.from_data_dir(data_dir))
    try:
        bundle = work / "ledger.jsonl"
        final = write_export(ex.ledger, bundle)
        report = check_bundle(read_bundle_lines(bundle), verifier)
        assert report.ok, f"ledger does not verify offline: {report.fault}"
        bodies = list(read_bundle_lines(bundle))[: final.size]
        with Session(ex.engine) as s:
            zones = set(s.scalars(select(ZoneRow.name)))
            datasets = {(d.zone, d.name) for d in s.scalars(select(DatasetRow))}
            grants = {g.id: g for g in s.scalars(select(GrantRow))}
            requests = {r.id: r for r in s.scalars(select(AccessRequestRow))}
            rules = set(s.scalars(select(PolicyRuleRow.rule)))
            budgets = list(s.scalars(select(BudgetRow)))
            s.expunge_all()
    finally:
        ex.close()

    entries = [json.loads(b) for b in bodies]
    # gap-free and in order: seq is the position (check_bundle holds this too)
    assert [e["seq"] for e in entries] == list(range(final.size))
    tree = MerkleTree()
    tree.extend(leaf_hash(b) for b in bodies)
    assert tree.root(final.size) == final.root

    by_kind: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for e in entries:
        by_kind[e["kind"]].append(e)

    with acks.lock:
        receipts = list(acks.receipts)
        acked_zones = list(acks.zones)
        acked_datasets = list(acks.datasets)
        acked_requests = list(acks.requests)
        acked_grants = list(acks.grants)
        acked_revoked = list(acks.revoked)
        denials = Counter(acks.denials)

    # every released result: its entry is on the ledger at its index, byte for byte, and the
    # checkpoint it was released under is a prefix of today's ledger
    for receipt, result in receipts:
        _, cp = verify_receipt(receipt, result, verifier)
        index = receipt["inclusion"]["index"]
        assert index < final.size, f"released computation {index} is not on the ledger"
        assert bodies[index] == b64url_decode(receipt["entry"]), f"entry {index} differs"
        assert cp.size <= final.size, f"receipt checkpoint {cp.size} beyond the ledger"
        assert tree.root(cp.size) == cp.root, f"ledger forked under receipt checkpoint {cp.size}"

    # acknowledged state changes: entry and state both present
    created = {e["refs"]["zone"] for e in by_kind["zone.created"]}
    assert created == zones, "zones and zone.created entries disagree"
    assert set(acked_zones) <= created
    registered = {(e["refs"]["zone"], e["refs"]["dataset"]) for e in by_kind["dataset.registered"]}
    assert registered == datasets, "datasets and dataset.registered entries disagree"
    assert {("uploads", d) for d in acked_datasets} <= registered
    for zone, name in datasets:  # published before the row that names it was committed
        assert (data_dir / "zones" / zone / "tables" / f"{name}.duckdb").exists(), name

    requested = {e["refs"]["request"] for e in by_kind["access.requested"]}
    assert requested == set(requests), "access requests and their entries disagree"
    assert set(acked_requests) <= requested

    # grants: never half applied
    grant_created = {e["refs"]["grant"]: e["seq"] for e in by_kind["grant.created"]}
    grant_revoked = {e["refs"]["grant"]: e["seq"] for e in by_kind["grant.revoked"]}
    assert set(grant_created) == set(grants), "grant rows and grant.created entries disagree"
    assert set(acked_grants) <= set(grant_created)
    assert set(acked_revoked) <= set(grant_revoked)
    for gid, grant in grants.items():
        request = requests[grant.request_id]
        assert request.status == "approved" and request.grant_id == gid, gid
        if grant.status == "revoked":
            assert gid in grant_revoked, f"{gid} revoked without its entry"
            assert gid not in rules, f"{gid} revoked but its policy rows remain"
        else:
            assert grant.status == "active", gid
            assert gid not in grant_revoked, f"{gid} has a revocation entry but is active"
            assert gid in rules, f"{gid} active without policy rows"
    for r in requests.values():
        if r.status == "approved":
            assert r.grant_id in grants, r.id

    # computations: none after its grant's revocation, and the budget is the ledger's sum
    charged: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for e in by_kind["computation.aggregate"]:
        rule = str(e["attrs"].get("rule", ""))
        if rule in grant_revoked:
            assert e["seq"] < grant_revoked[rule], (
                f"computation {e['seq']} used {rule} after its revocation at {grant_revoked[rule]}"
            )
        for dataset in e["refs"]["dataset"].split(","):
            charged[(e["actor"], e["refs"]["zone"], dataset)] += Decimal(e["attrs"]["epsilon"])
    spent: dict[tuple[str, str, str], Decimal] = defaultdict(Decimal)
    for row in budgets:
        value = Decimal(row.spent)
        assert Decimal(0) <= value <= budget, f"budget row {row.consumer[:8]} spent {value}"
        spent[(row.consumer, row.zone, row.dataset)] += value
    assert {k: v for k, v in spent.items() if v} == {k: v for k, v in charged.items() if v}, (
        "privacy budget spend differs from the charges on the ledger"
    )

    # every answered denial was ledgered before it was answered
    denied = Counter(e["actor"] for e in by_kind["access.denied"])
    for key_id, count in denials.items():
        assert denied[key_id] >= count, f"{count} denials answered, {denied[key_id]} ledgered"
    return Audit(final.size, entries, tree)
