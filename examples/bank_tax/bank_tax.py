"""A bank and a tax bureau join privately: how many loan applicants the bureau knows, and the
(noised) total and average tax of those companies, without either side seeing the other's ids.

    python examples/bank_tax/bank_tax.py --data-dir ./bank-tax-demo [--port 8421]

Generated data: the bureau's zone holds tax records of 3,000 companies (company id, district,
employees, tax paid); the bank holds 400 applicants' company ids, 240 of which the bureau knows,
typed with stray spaces. The demo starts a real server on loopback, registers both parties,
the bureau classifies and registers its dataset and sets its analysis rules (k = 10, clamping
bounds), the bank files an access request for the private joins and the bureau approves it;
then the bank runs ``psi_cardinality`` (ε = 0.5) and ``psi_aggregate`` (ε = 1) from its own
machine and checks both receipts offline. The company ids are L3, so both releases are
differentially private (the bureau has not opted out), and the count the bank sees is noised.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from crypto.keys import SigningKey
from crypto.note import NoteVerifier
from crypto.receipt import verify_receipt
from exchange.client.psi import read_ids
from exchange.client.sdk import ApiError, Client
from exchange.keyfile import load_private_key, write_private_key
from exchange.server.runtime import init_data_dir

PURPOSE = "credit-assessment"
ZONE, DATASET = "tax-bureau", "tax_records"
LEVELS = {"company_id": "L3", "district": "L1", "employees": "L2", "tax_paid_2025": "L3"}
TAX_BOUNDS = (0, 5_000_000)
RULES = {
    "min_group_size": 10,
    "epsilon_budget": "3",
    "columns": {
        "tax_paid_2025": {"disclosure": "after_aggregate", "lower": "0", "upper": "5000000"},
        "employees": {"disclosure": "after_aggregate", "lower": "0", "upper": "20000"},
    },
}

#: ε per release; the budget above holds two runs of the demo per window
CARD_EPSILON, AGG_EPSILON = Decimal("0.5"), Decimal(1)
#: |released − true| allowed for the noised count: discrete Laplace of scale b = 1/ε = 2 gives
#: P(|Z| >= 44) <= 2·e^(-44/b) = 5.6e-10, so a correct run fails this check less than once in
#: a billion
CARD_TOLERANCE = 44

console = Console()


def generate(folder: Path, seed: int = 2025) -> tuple[Path, Path]:
    """The bureau's records and the bank's applicant list (deterministic, not real data)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    companies = [f"91310{rng.randrange(10**12):012d}X" for _ in range(3000)]
    records = folder / "tax_records.csv"
    with records.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["company_id", "district", "employees", "tax_paid_2025"])
        for cid in companies:
            tax = int(rng.lognormvariate(12, 1.2))  # a few exceed the declared bound
            w.writerow(
                [cid, rng.choice(["huangpu", "jingan", "putuo"]), rng.randrange(5, 3000), tax]
            )
    applicants = folder / "applicants.csv"
    known = rng.sample(companies, 240)
    unknown = [f"91320{rng.randrange(10**12):012d}Y" for _ in range(160)]
    pool = known + unknown
    rng.shuffle(pool)
    with applicants.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["application", "company_id"])
        for i, cid in enumerate(pool):
            w.writerow([f"L-{i:05d}", f" {cid}\t" if i % 7 == 0 else cid])
    return records, applicants


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "exchange.cli", "serve", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)], env={**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise SystemExit("the server did not start within 60 s")


def identity(data_dir: Path, name: str) -> SigningKey:
    path = data_dir / "keys" / f"{name}.key"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        write_private_key(path, SigningKey.generate())
    return load_private_key(path)


def setup(url: str, data_dir: Path, records: Path) -> tuple[SigningKey, SigningKey]:
    operator = load_private_key(data_dir / "operator.key")
    bureau, bank = identity(data_dir, "tax-bureau"), identity(data_dir, "city-bank")
    with Client(url, operator) as op:
        for key, name, kind in (
            (bureau, "Tax Bureau", "agency"),
            (bank, "City Bank", "enterprise"),
        ):
            try:
                op.register_principal(name, kind, key.public_key)
            except ApiError as exc:
                if exc.status != 409:
                    raise
    with Client(url, bureau) as p:
        try:
            p.create_zone(ZONE, "company tax records")
            p.register_dataset(
                ZONE, DATASET, levels=LEVELS, subject_column="company_id", file=records
            )
        except ApiError as exc:
            if exc.status != 409:
                raise
        p.set_analysis_rules(ZONE, DATASET, RULES)
    with Client(url, bank) as c:
        req = c.request_access(
            ZONE,
            [DATASET],
            ["psi_cardinality", "psi_aggregate"],
            PURPOSE,
            duration_seconds=7 * 86400,
            justification="assess loan applicants' tax standing",
        )
    with Client(url, bureau) as p:
        p.approve(req["id"])
    return bureau, bank


def truth(records: Path, applicants: Path) -> tuple[int, int]:
    """What a trusted third party would compute in the clear (the demo made both files)."""
    ours = {i.strip() for i in read_ids(applicants, "company_id")}
    with records.open(encoding="utf-8") as f:
        hits = [r for r in csv.DictReader(f) if r["company_id"] in ours]
    return len(hits), sum(min(int(r["tax_paid_2025"]), TAX_BOUNDS[1]) for r in hits)


def run(data_dir: Path, port: int) -> int:
    if not (data_dir / "config.json").exists():
        init_data_dir(data_dir, origin="bank-tax.zonex/log")
    records, applicants = generate(data_dir / "generated")
    server = start_server(data_dir, port)
    url = f"http://127.0.0.1:{port}"
    try:
        _, bank = setup(url, data_dir, records)
        verifier = NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())
        ids = read_ids(applicants, "company_id")
        with Client(url, bank) as c:
            console.print("[bold cyan]▶ psi_cardinality[/]: how many applicants the bureau knows")
            card = c.psi_join(ZONE, DATASET, "cardinality", ids, PURPOSE, epsilon=CARD_EPSILON)
            verify_receipt(card["receipt"], card["result"], verifier)
            console.print(
                f"  about {card['result']['intersection']} of {len(ids)} (noised, "
                f"ε = {card['result']['epsilon']}); receipt verified"
            )

            console.print("[bold cyan]▶ psi_aggregate[/]: their tax, decrypted on the bank's side")
            agg = c.psi_join(
                ZONE,
                DATASET,
                "aggregate",
                ids,
                PURPOSE,
                sums=["tax_paid_2025", "employees"],
                epsilon=AGG_EPSILON,
            )
            verify_receipt(agg["receipt"], agg["result"], verifier)
        count, total = truth(records, applicants)
        local = agg["local"]
        if local["suppressed"]:
            # the noisy count fell below k (about e^-77 likely with 240 matches)
            console.print("[red]the aggregate was suppressed: its noisy count fell below k[/]")
            return 1
        table = Table(
            title=f"bank's view (ε = {CARD_EPSILON} and {AGG_EPSILON}, values clipped to the "
            "declared bounds)"
        )
        table.add_column("")
        table.add_column("released", justify="right")
        table.add_column("in the clear (demo only)", justify="right")
        table.add_row("applicants known (noised)", str(card["result"]["intersection"]), str(count))
        table.add_row("count (noised)", str(local["count"]), str(count))
        table.add_row("sum(tax_paid_2025)", str(local["sums"]["tax_paid_2025"]), str(total))
        avg = Decimal(local["averages"]["tax_paid_2025"]).quantize(Decimal(1))
        table.add_row("avg(tax_paid_2025)", str(avg), str(total // count))
        console.print(table)
        ok = abs(card["result"]["intersection"] - count) < CARD_TOLERANCE
        # the sum's noise has scale 5e6 / (ε/3) = 1.5e7: 100 bounds are 33 scales (e^-33)
        ok = ok and abs(local["sums"]["tax_paid_2025"] - total) < 100 * TAX_BOUNDS[1]
        console.print("[green]done[/]" if ok else "[red]unexpected result[/]")
        return 0 if ok else 1
    finally:
        server.terminate()
        server.wait(timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("bank-tax-demo"))
    parser.add_argument("--port", type=int, default=8421)
    args = parser.parse_args(argv)
    return run(args.data_dir.resolve(), args.port)


if __name__ == "__main__":
    sys.exit(main())
