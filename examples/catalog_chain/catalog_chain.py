"""The three-level catalog chain (市、区、街目录链) on loopback: a city and two districts.

    python examples/catalog_chain/catalog_chain.py --data-dir chain-demo

Three exchanges (the city, district-1, district-2), each with its own log and its own witness,
run as separate processes. The city's witness cosigns both districts' checkpoints and each
district's witness cosigns the city's. The city records its districts' checkpoints (checked
against each district's hash tiles) and lists the catalogs they publish. Then district-1 shows
two histories: a copy of its data directory, taken while it served, goes on with other entries
and is served under the same URL and log key. The city records the fork and refuses it, the
city's witness refuses to cosign it, and an auditor, from exported bundles alone, verifies the
city's ledger against a 2-of-2 witness policy and checks each district against what the city
recorded: ``zonex audit chain`` prints the two signed checkpoints that prove the fork.

Every step checks its outcome; the script exits 1 with one line naming the step if anything is
off. See README.md here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from crypto.keys import SigningKey
from crypto.note import NoteVerifier, verify_checkpoint
from exchange.cli import app as zonex_app
from exchange.client.sdk import Client
from exchange.keyfile import load_private_key
from exchange.server.backup import create_backup, restore_backup
from exchange.server.runtime import init_data_dir
from exchange.server.witness.protocol import origin_hash
from exchange.server.witness.store import WitnessStore
from exchange.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPANIES = ROOT / "examples" / "data" / "companies.csv"

CITY, D1, D2 = "city", "district-1", "district-2"
EXCHANGES = (CITY, D1, D2)
#: the copy of district-1's data directory that goes on with another history
COPY = "district-1-copy"
ORIGINS = {name: f"{name}.chain.example/log" for name in EXCHANGES}
WITNESS_NAMES = {name: f"witness.{name}.chain.example" for name in EXCHANGES}
#: on loopback: poll children, offer checkpoints to witnesses and retry after failures quickly
CONFIG = {
    "checkpoint_interval_seconds": 0.5,
    "chain_interval_seconds": 0.5,
    "chain_timeout_seconds": 2.0,
    "chain_backoff_max_seconds": 1.0,
    "witness_interval_seconds": 0.5,
    "witness_timeout_seconds": 3.0,
    "witness_backoff_max_seconds": 1.0,
    "chain_publish_catalog": True,
}
#: what each district publishes: zone, dataset, levels per column of companies.csv
PUBLISHES = {
    D1: (
        "enterprises",
        "firms",
        {
            "company_id": "L2",
            "district": "L1",
            "industry": "L1",
            "founded_year": "L1",
            "employees": "L2",
            "registered_capital": "L2",
            "tax_paid_2025": "L3",
        },
    ),
    D2: (
        "permits",
        "licensed_firms",
        {
            "company_id": "L1",
            "district": "L1",
            "industry": "L1",
            "founded_year": "L1",
            "employees": "L1",
            "registered_capital": "L2",
            "tax_paid_2025": "L2",
        },
    ),
}

console = Console(highlight=False)
errors = Console(stderr=True)


class StoryError(Exception):
    """A step did not end the way the story says it must."""


def expect(condition: object, what: str) -> None:
    if not condition:
        raise StoryError(what)


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0) -> Any:
    """Poll ``check`` until it returns something true (never a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise StoryError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def zonex(*args: str) -> None:
    """Run a ``zonex`` command in this process, showing it as an operator types it."""
    console.print(f"  [dim]$ zonex {' '.join(args)}[/]")
    code = zonex_app(list(args), standalone_mode=False, prog_name="zonex")
    expect(not code, f"zonex {' '.join(args[:2])} failed (exit {code})")


def zonex_process(*args: str) -> subprocess.CompletedProcess[str]:
    """Run a ``zonex`` command as its own process (the auditor's), output captured."""
    return subprocess.run(
        [sys.executable, "-m", "exchange.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


@dataclass
class Process:
    """An exchange or a witness serving on loopback."""

    name: str
    directory: Path
    port: int
    witness: bool
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.directory.parent / "logs" / f"{self.directory.name}.log"

    def start(self) -> None:
        command = "witness serve" if self.witness else "serve"
        args = [sys.executable, "-m", "exchange.cli", *command.split(), "--data-dir"]
        args += [str(self.directory), "--port", str(self.port), "--log-format", "text"]
        self.log.parent.mkdir(exist_ok=True)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip

    def ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise StoryError(f"{self.name} exited with {self.proc.returncode} (see {self.log})")
        path = "/add-checkpoint" if self.witness else "/v1/health"
        try:
            response = httpx.get(self.url + path, timeout=1)
        except httpx.HTTPError:
            return False
        return response.status_code == (405 if self.witness else 200)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


@dataclass
class Story:
    base: Path
    exchanges: dict[str, Process] = field(default_factory=dict)
    witnesses: dict[str, Process] = field(default_factory=dict)
    step: str = "setup"
    started: float = field(default_factory=time.monotonic)
    state: dict[str, Any] = field(default_factory=dict)

    def section(self, number: int, title: str) -> None:
        self.step = f"{number}. {title}"
        console.print()
        elapsed = time.monotonic() - self.started
        console.rule(f"[bold cyan]{self.step}[/] [dim]({elapsed:.1f} s)[/]", align="left")

    def exchange_dir(self, name: str) -> Path:
        return self.base / name

    def witness_dir(self, name: str) -> Path:
        return self.base / f"witness-{name}"

    def operator(self, name: str) -> Client:
        process = self.exchanges[name]
        return Client(process.url, load_private_key(process.directory / "operator.key"))

    def log_key(self, name: str) -> NoteVerifier:
        text = (self.exchange_dir(name) / "log.pub").read_text("utf-8")
        return NoteVerifier.from_verifier_key(text.strip())

    def checkpoint_size(self, name: str) -> int:
        """The size of the exchange's latest checkpoint (the unsigned tlog-tiles endpoint)."""
        note = httpx.get(self.exchanges[name].url + "/v1/log/checkpoint", timeout=5).text
        return verify_checkpoint(note, self.log_key(name)).size

    def children(self) -> dict[str, dict[str, Any]]:
        with self.operator(CITY) as city:
            return {c["name"]: c for c in city.request("GET", "/v1/chain/children")}

    def all_processes(self) -> list[Process]:
        return [*self.exchanges.values(), *self.witnesses.values()]


@contextmanager
def running(processes: list[Process]) -> Iterator[None]:
    try:
        for process in processes:
            process.start()
        for process in processes:
            wait_for(f"{process.name} to listen", process.ready, timeout=60)
        yield
    finally:
        for process in processes:
            process.stop()


# -- the story --------------------------------------------------------------------------------


def set_up(story: Story) -> None:
    story.section(1, "Three exchanges, three witnesses, one chain")
    for name in EXCHANGES:
        d = story.exchange_dir(name)
        init_data_dir(d, origin=ORIGINS[name])
        config = json.loads((d / "config.json").read_text("utf-8"))
        (d / "config.json").write_text(json.dumps({**config, **CONFIG}, indent=2) + "\n")
        story.exchanges[name] = Process(name, d, free_port(), witness=False)
        console.print(f"  {name}: exchange in {d.name}/, log {ORIGINS[name]}")
    for name in EXCHANGES:
        zonex("witness", "init", "--data-dir", str(story.witness_dir(name)),
              "--name", WITNESS_NAMES[name])  # fmt: skip
        story.witnesses[name] = Process(
            f"{name}'s witness", story.witness_dir(name), free_port(), witness=True
        )
    # the city's witness cosigns both districts; each district's witness cosigns the city
    city_pub, d1_pub, d2_pub = (str(story.exchange_dir(n) / "log.pub") for n in EXCHANGES)
    zonex("witness", "trust", "--data-dir", str(story.witness_dir(CITY)),
          "--log-key", d1_pub, "--log-key", d2_pub)  # fmt: skip
    for district in (D1, D2):
        zonex("witness", "trust", "--data-dir", str(story.witness_dir(district)),
              "--log-key", city_pub)  # fmt: skip
    for exchange, witness in ((D1, CITY), (D2, CITY), (CITY, D1), (CITY, D2)):
        zonex(
            "ledger", "witness", "add", "--data-dir", str(story.exchange_dir(exchange)),
            "--url", story.witnesses[witness].url,
            "--key", str(story.witness_dir(witness) / "witness.pub"), "--name", f"{witness}",
        )  # fmt: skip
    for district in (D1, D2):
        zonex(
            "chain", "add-child", "--data-dir", str(story.exchange_dir(CITY)),
            "--name", district, "--url", story.exchanges[district].url,
            "--log-key", str(story.exchange_dir(district) / "log.pub"),
        )  # fmt: skip


def districts_publish(story: Story) -> None:
    story.section(3, "The districts open zones and publish their catalogs")
    for district, (zone, dataset, levels) in PUBLISHES.items():
        office = SigningKey.generate()
        with story.operator(district) as op:
            op.register_principal(f"{district} statistics office", "agency", office.public_key)
        with Client(story.exchanges[district].url, office) as provider:
            provider.create_zone(zone, f"{district}'s {zone}")
            provider.register_dataset(
                zone, dataset, levels=levels, subject_column="company_id", file=COMPANIES
            )
        published = httpx.get(story.exchanges[district].url + "/v1/chain/published", timeout=5)
        expect(published.status_code == 200, f"{district} publishes no catalog")
        console.print(
            f"  {district}: zone {zone}, dataset {dataset} ({len(levels)} columns, "
            f"up to {max(levels.values())}); GET /v1/chain/published answers "
            f"{len(published.content)} bytes, signed by its log key"
        )


def city_records(story: Story) -> None:
    story.section(4, "The city records its districts' checkpoints and lists what they publish")
    sizes = {d: story.checkpoint_size(d) for d in (D1, D2)}

    def recorded() -> dict[str, dict[str, Any]] | None:
        children = story.children()
        for district, size in sizes.items():
            child = children[district]
            if child["checkpoint"] is None or child["checkpoint"]["size"] < size:
                return None
            published = child["published"]
            if published is None or not any(
                z["name"] == PUBLISHES[district][0] for z in published["catalog"]["zones"]
            ):
                return None  # not yet the catalog published since the zone was opened
        return children

    children = wait_for("the city to record both districts", recorded)
    table = Table("child", "recorded size", "entry", "published zones (dataset: levels)")
    for district in (D1, D2):
        child = children[district]
        zones = child["published"]["catalog"]["zones"]
        listed = "; ".join(
            f"{z['name']} ({d['name']}: {', '.join(sorted({c['level'] for c in d['columns']}))}, "
            f"{d['row_count_band']} rows)"
            for z in zones
            for d in z["datasets"]
        )
        expect(zones[0]["name"] == PUBLISHES[district][0], f"{district}'s catalog is not listed")
        table.add_row(
            district, str(child["checkpoint"]["size"]), str(child["checkpoint"]["seq"]), listed
        )
    console.print(table)
    console.print(
        "  each recorded checkpoint extends the one before: the city computed the consistency "
        "proof from the district's unsigned hash tiles and verified it against both signed roots"
    )


def cosigned_latest(story: Story, name: str) -> bool:
    size = story.checkpoint_size(name)
    with story.operator(name) as op:
        witnesses = op.request("GET", "/v1/log/witnesses")
    return bool(witnesses) and all(w["cosigned_size"] == size for w in witnesses)


def witnesses_cosign(story: Story) -> None:
    story.section(5, "Each level's witness cosigns its neighbours' checkpoints")
    for name in EXCHANGES:
        wait_for(
            f"{name}'s witnesses to cosign its latest checkpoint",
            lambda name=name: cosigned_latest(story, name),  # type: ignore[misc]
        )
        witnesses = "the districts' witnesses" if name == CITY else "the city's witness"
        console.print(f"  {name}: latest checkpoint cosigned by {witnesses}")


def witness_size(story: Story, witness: str, log: str) -> int | None:
    """The size of the latest checkpoint of ``log`` the witness cosigned (its monitoring
    endpoint), or None."""
    response = httpx.get(
        f"{story.witnesses[witness].url}/{origin_hash(ORIGINS[log])}/checkpoint", timeout=5
    )
    if response.status_code != 200:
        return None
    return int(response.text.split("\n")[1])


def two_histories(story: Story) -> None:
    story.section(6, "district-1 shows two histories")
    d1 = story.exchanges[D1]
    # a copy of the data directory taken while it serves (zonex backup / zonex restore)
    archive = story.base / "district-1.tar.gz"
    backup = create_backup(Settings.from_data_dir(d1.directory), archive)
    restore_backup(archive, story.exchange_dir(COPY))
    console.print(
        f"  a copy of district-1's directory, taken at ledger size {backup.ledger_size} "
        f"(zonex backup, zonex restore --data-dir {COPY})"
    )
    # the original goes on and the city records it beyond the copy
    with story.operator(D1) as op:
        for n in range(3):
            key = SigningKey.generate()
            op.register_principal(f"district-1 firm {n}", "enterprise", key.public_key)

    def recorded_beyond_copy() -> int | None:
        size = story.checkpoint_size(D1)
        child = story.children()[D1]
        cosigned = witness_size(story, CITY, D1)
        if size < backup.ledger_size + 3 or child["checkpoint"]["size"] != size:
            return None
        return size if cosigned == size else None

    size = wait_for("the city to record district-1 past the copy", recorded_beyond_copy)
    story.state["recorded"] = size
    console.print(
        f"  the original registers 3 firms; the city records its checkpoint {size} and the "
        f"city's witness cosigns it"
    )
    d1.stop()
    zonex("ledger", "export", "--data-dir", str(d1.directory),
          "--out", str(story.base / "audit" / "district-1.jsonl"))  # fmt: skip
    # the copy answers under the same URL, with the same log key, and goes on differently
    copy = Process(COPY, story.exchange_dir(COPY), d1.port, witness=False)
    story.exchanges[D1] = copy
    copy.start()
    wait_for("the copy to listen", copy.ready, timeout=60)
    with story.operator(D1) as op:
        for n in range(6):
            key = SigningKey.generate()
            op.register_principal(f"another firm {n}", "enterprise", key.public_key)
    console.print(
        f"  district-1 stops; the copy serves at {copy.url} with the same log key and "
        "registers 6 other firms"
    )

    def forked() -> dict[str, Any] | None:
        fork: dict[str, Any] | None = story.children()[D1]["fork"]
        return fork

    fork = wait_for("the city to record the fork", forked)
    child = story.children()[D1]
    expect(child["checkpoint"]["size"] == size, "the city accepted the other history")
    console.print(
        f"  the city: chain.fork (entry {fork['seq']}): the copy's checkpoint {fork['size']} "
        f"does not extend the recorded {size}; district-1's state stays at {size}"
    )
    store = WitnessStore(story.witness_dir(CITY) / "witness.db")
    refused = wait_for(
        "the city's witness to refuse the copy's checkpoint", lambda: store.evidence(ORIGINS[D1])
    )
    expect(witness_size(story, CITY, D1) == size, "the city's witness cosigned the copy")
    console.print(
        f"  the city's witness refuses the copy's checkpoint ({refused[-1][1]}); the latest "
        f"it cosigned for district-1 is still {size}"
    )


def export_and_audit(story: Story) -> None:
    story.section(7, "The auditor checks the chain from bundles alone")
    audit = story.base / "audit"
    for name in (CITY, D2, D1):
        story.exchanges[name].stop()
    # exported offline while the witnesses still serve: each export ends with a checkpoint
    # the exchange's witnesses cosigned (the copy's witness refuses it)
    for name, target in ((CITY, "city"), (D2, "district-2"), (D1, COPY)):
        directory = story.exchanges[name].directory
        zonex("ledger", "export", "--data-dir", str(directory),
              "--out", str(audit / f"{target}.jsonl"))  # fmt: skip
    for witness in story.witnesses.values():
        witness.stop()

    vkey = {n: (story.witness_dir(n) / "witness.pub").read_text("utf-8").strip() for n in EXCHANGES}
    log = {n: (story.exchange_dir(n) / "log.pub").read_text("utf-8").strip() for n in EXCHANGES}
    (audit / "city.policy").write_text(
        "# the city's log and the districts' witnesses: both must have cosigned\n"
        f"log {log[CITY]}\nwitness d1 {vkey[D1]}\nwitness d2 {vkey[D2]}\n"
        "group districts 2 d1 d2\nquorum districts\n"
    )
    (audit / "district-2.policy").write_text(
        f"log {log[D2]}\nwitness city {vkey[CITY]}\nquorum city\n"
    )
    keys = {n: str(story.exchange_dir(n) / "log.pub") for n in EXCHANGES}

    def run(*args: str, code: int) -> str:
        console.print(f"  [dim]$ zonex {' '.join(args)}[/]")
        done = zonex_process(*args)
        for line in (done.stdout + done.stderr).splitlines():
            console.print(f"    {line}", markup=False, soft_wrap=True)
        expect(done.returncode == code, f"zonex {args[0]} {args[1]} exited {done.returncode}")
        return done.stdout + done.stderr

    run("audit", "verify", str(audit / "city.jsonl"), "--log-key", keys[CITY],
        "--policy", str(audit / "city.policy"), code=0)  # fmt: skip
    run("audit", "verify", str(audit / "district-2.jsonl"), "--log-key", keys[D2],
        "--policy", str(audit / "district-2.policy"), code=0)  # fmt: skip
    chain = ["--parent-bundle", str(audit / "city.jsonl"), "--parent-key", keys[CITY]]
    run("audit", "chain", str(audit / "district-2.jsonl"), "--log-key", keys[D2], *chain,
        "--child-name", D2, code=0)  # fmt: skip
    shown = run("audit", "chain", str(audit / f"{COPY}.jsonl"), "--log-key", keys[D1], *chain,
                "--child-name", D1, code=1)  # fmt: skip
    expect(": fork:" in shown and shown.count("— district-1.chain.example/log ") >= 2,
           "zonex audit chain did not show the two signed checkpoints")  # fmt: skip
    shown = run("audit", "chain", str(audit / "district-1.jsonl"), "--log-key", keys[D1], *chain,
                "--child-name", D1, code=1)  # fmt: skip
    expect("recorded_fork" in shown and "proven" in shown, "the recorded fork is not shown")
    recorded = story.state["recorded"]
    console.print(
        f"  the city holds district-1's signed checkpoint of size {recorded}; the copy's bundle "
        f"holds a later checkpoint signed by the same key whose tree has another root at size "
        f"{recorded} (its entries and the consistency proof printed show it): one log key, two "
        "histories. The original's bundle matches every checkpoint the city recorded, and the "
        "city's chain.fork entry is shown to whoever audits district-1."
    )


def run(base: Path) -> int:
    story = Story(base)
    console.rule("[bold]zonex: the city / district catalog chain")
    try:
        if base.exists() and any(base.iterdir()):
            raise StoryError(f"{base} is not empty: give a new directory")
        base.mkdir(parents=True, exist_ok=True)
        (base / "audit").mkdir()
        set_up(story)
        story.section(2, "Six processes on loopback")
        with running(story.all_processes()):
            for process in story.all_processes():
                console.print(f"  {process.name}: {process.url}")
            districts_publish(story)
            city_records(story)
            witnesses_cosign(story)
            two_histories(story)
            export_and_audit(story)
    except Exception as exc:  # one readable line, whatever went wrong
        what = f"{exc}" if isinstance(exc, StoryError) else f"{type(exc).__name__}: {exc}"
        errors.print(f"[bold red]✗ step {story.step}: {what}[/]", soft_wrap=True)
        return 1
    finally:
        for process in story.all_processes():
            process.stop()
    console.print(
        f"[bold green]✓ all steps verified in {time.monotonic() - story.started:.1f} s[/]"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("chain-demo"))
    args = parser.parse_args(argv)
    return run(args.data_dir.resolve())


if __name__ == "__main__":
    sys.exit(main())
