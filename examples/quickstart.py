"""zonex quickstart: the foundation flow end to end against a real server on loopback.

    python examples/quickstart.py --data-dir ./demo-data [--url http://127.0.0.1:8421]

The operator registers a provider (a tax bureau) and a consumer (a bank); the provider creates
a zone and registers datasets from examples/data/companies.csv with a classification level per
column; the consumer browses the catalog (metadata only, never rows); an unsigned and a replayed
call are rejected; the consumer is denied, files an access request, the provider signs an
approval, the call succeeds with a receipt verified offline, the provider revokes, the call is
denied again; aggregates run under analysis rules (exact at L1/L2, differentially private by
default at L3, groups released through a noisy gate); the ledger is exported and verified
offline, as an auditor would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from crypto.keys import SigningKey
from crypto.note import NoteVerifier
from crypto.receipt import verify_receipt
from exchange.audit import check_bundle, read_bundle_lines
from exchange.client.sdk import ApiError, Client
from exchange.keyfile import load_private_key, write_private_key
from exchange.server.ledger import write_export
from exchange.server.runtime import Exchange, init_data_dir
from exchange.settings import Settings

HERE = Path(__file__).resolve().parent
COMPANIES = HERE / "data" / "companies.csv"
LEVELS = {
    "company_id": "L2",
    "district": "L1",
    "industry": "L1",
    "founded_year": "L1",
    "employees": "L2",
    "registered_capital": "L2",
    "tax_paid_2025": "L3",
}
#: the same registry without the tax column's sensitivity: internal (L2), exportable under a grant
REGISTRY_LEVELS = {**LEVELS, "tax_paid_2025": "L2"}
PURPOSE = "credit-assessment"

console = Console()


def step(text: str) -> None:
    console.print(f"\n[bold cyan]▶ {text}[/]")


def identity(data_dir: Path, name: str) -> SigningKey:
    """Load the demo key NAME from DATA_DIR/keys, creating it on first run."""
    keys = data_dir / "keys"
    keys.mkdir(exist_ok=True)
    path = keys / f"{name}.key"
    if not path.exists():
        write_private_key(path, SigningKey.generate())
    return load_private_key(path)


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "exchange.cli",
        "serve",
        "--data-dir",
        str(data_dir),
        "--port",
        str(port),
    ]
    proc = subprocess.Popen(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
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


def ensure_principal(op: Client, key: SigningKey, name: str, kind: str) -> None:
    try:
        op.register_principal(name, kind, key.public_key)
        console.print(f"  registered [bold]{name}[/] ({kind}) key id {key.key_id[:16]}…")
    except ApiError as exc:
        if exc.status != 409:
            raise
        console.print(f"  {name} is already registered")


def access_flow(url: str, tax: SigningKey, bank: SigningKey, data_dir: Path) -> bool:
    """Denied → request → signed approval → allowed (with a receipt) → revoked → denied."""
    step("The bank asks for rows without a grant: denied, with a reason code")
    with Client(url, bank) as consumer, Client(url, tax) as provider:
        try:
            consumer.export("market-registry", "registry", PURPOSE)
            console.print("[red]expected a denial[/]")
            return False
        except ApiError as exc:
            console.print(f"  {exc.status} {exc.code}: reason [bold]{exc.body['reason']}[/]")

        step("The bank files an access request; the tax bureau signs an approval")
        req = consumer.request_access(
            "market-registry",
            ["registry"],
            ["export"],
            PURPOSE,
            duration_seconds=7 * 86400,
            justification="verify registration details of loan applicants",
        )
        console.print(f"  request {req['id']} ({req['status']})")
        approved = provider.approve(req["id"])
        grant = approved["grant_id"]
        console.print(f"  approved: grant {grant}, signed by the provider's key")

        step("The bank exports again: allowed, subject ids pseudonymized (L2), with a receipt")
        response = consumer.export("market-registry", "registry", PURPOSE)
        result, receipt = response["result"], response["receipt"]
        console.print(
            f"  {len(result['rows'])} rows, masked columns {result['masked']}, "
            f"first pseudonym {result['rows'][0][0][:12]}…"
        )
        out = data_dir / "export-result.json"
        out.write_text(json.dumps(result, indent=2) + "\n", "utf-8")
        (data_dir / "export-receipt.json").write_text(json.dumps(receipt, indent=2) + "\n")
        verifier = NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())
        statement, cp = verify_receipt(receipt, result, verifier)
        console.print(
            f"  receipt verified offline: ledger entry {statement['ledger_index']} in "
            f"checkpoint {cp.size}, grant {statement['grant']}"
        )

        step("The tax bureau revokes the grant; the next call is denied")
        provider.revoke(grant, "loan review finished")
        try:
            consumer.export("market-registry", "registry", PURPOSE)
            console.print("[red]expected a denial after revocation[/]")
            return False
        except ApiError as exc:
            console.print(f"  {exc.status} {exc.code}: reason [bold]{exc.body['reason']}[/]")
    return True


AGGREGATE_RULES = {
    "min_group_size": 10,
    "epsilon_budget": "10",
    "refresh_seconds": 86400,
    "columns": {
        "company_id": {"disclosure": "join_only"},
        "district": {"disclosure": "plaintext"},
        "industry": {"disclosure": "plaintext"},
        "founded_year": {"disclosure": "plaintext"},
        "employees": {"disclosure": "plaintext", "lower": "0", "upper": "5000"},
        "tax_paid_2025": {"disclosure": "after_aggregate", "lower": "0", "upper": "1000000"},
    },
}


def _cell(value: Any) -> str:
    """Noisy averages come back as long decimal strings; show two places."""
    if isinstance(value, str) and "." in value:
        try:
            return f"{float(value):,.2f}"
        except ValueError:
            return value
    return str(value)


def _result_table(result: dict[str, Any]) -> Table:
    table = Table(*result["columns"])
    for row in result["rows"]:
        table.add_row(*(_cell(v) for v in row))
    return table


def _gate(result: dict[str, Any]) -> str:
    gate = result["gate"]
    delta = "no δ (groups fixed in advance)" if gate["delta"] is None else f"δ {gate['delta']}"
    return (
        f"noisy gate: a group opens when its noisy company count reaches {gate['threshold']} "
        f"(k = {gate['k']}; noise scale {float(gate['scale']):g}, ε {float(gate['epsilon']):g}, "
        f"{delta})"
    )


def _show_private(answer: dict[str, Any]) -> bool:
    """Print a differentially private release; False if it is not one."""
    console.print(_result_table(answer))
    if not answer["rows"]:
        console.print("  the gate stayed shut: nothing released, ε charged all the same")
    console.print(f"  {_gate(answer)}")
    for n in answer["noise"]:
        console.print(
            f"  {n['value']}: {n['mechanism']} noise, scale {float(n['scale']):,.1f} "
            f"(ε {float(n['epsilon']):g})"
        )
    console.print(
        f"  ε {answer['epsilon']} and δ {answer['delta']} charged; how many groups the gate "
        "kept shut is not released"
    )
    if answer["suppressed"] is not None or answer["epsilon"] == "0":
        console.print("[red]expected a differentially private release[/]")
        return False
    return True


def aggregate_flow(url: str, tax: SigningKey, bank: SigningKey, data_dir: Path) -> bool:
    """Analysis rules → an exact L2 count → DP by default at L3 → a noisy gate → receipt."""
    step("The tax bureau sets analysis rules on the L3 companies dataset (k = 10, bounds)")
    with Client(url, bank) as consumer, Client(url, tax) as provider:
        rules = provider.set_analysis_rules("market-registry", "companies", AGGREGATE_RULES)
        console.print(
            f"  rules v{rules['version']}: tax_paid_2025 after_aggregate in [0, 1000000], "
            "company_id join_only; no exact_release, so L3 releases are differentially private"
        )
        req = consumer.request_access(
            "market-registry",
            ["companies"],
            ["aggregate"],
            PURPOSE,
            duration_seconds=86400,
            justification="district-level credit risk statistics",
        )
        provider.approve(req["id"])
        console.print("  the bank is granted aggregate on companies")

        step("The bank counts companies by industry in two districts (L1/L2 only: exact)")
        cells = consumer.aggregate(
            "market-registry",
            "SELECT industry, COUNT(*) AS companies FROM companies "
            "WHERE district IN ('huangpu', 'jingan') GROUP BY industry ORDER BY companies DESC",
            PURPOSE,
        )["result"]
        console.print(_result_table(cells))
        console.print(
            f"  {cells['suppressed']} industry group(s) had fewer than k = {cells['k']} "
            "companies and were suppressed (shown only as a count); nothing was charged"
        )
        if cells["suppressed"] == 0 or cells["epsilon"] != "0":
            console.print("[red]expected an exact release with suppressed groups[/]")
            return False

        step("The bank asks for the average tax in one district: L3, so DP by default")
        try:
            one = consumer.aggregate(
                "market-registry",
                "SELECT AVG(tax_paid_2025) AS avg_tax FROM companies WHERE district = 'huangpu'",
                PURPOSE,
                epsilon="1",
            )
            if not _show_private(one["result"]):
                return False
            step("... and by district: groups found in the data raise the gate's threshold")
            response = consumer.aggregate(
                "market-registry",
                "SELECT district, AVG(tax_paid_2025) AS avg_tax FROM companies GROUP BY district",
                PURPOSE,
                epsilon="3",
            )
            if not _show_private(response["result"]):
                return False
        except ApiError as exc:
            if exc.status != 429:
                raise
            console.print(f"  {exc.status} {exc.code}: {exc.detail}")
            return True
        result, receipt = response["result"], response["receipt"]
        (data_dir / "aggregate-result.json").write_text(json.dumps(result, indent=2) + "\n")
        (data_dir / "aggregate-receipt.json").write_text(json.dumps(receipt, indent=2) + "\n")
        verifier = NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())
        statement, _ = verify_receipt(receipt, result, verifier)
        console.print(
            f"  receipt verified offline: ε {statement['epsilon']} and δ {statement['delta']} "
            f"charged, k {statement['k']}, rules {statement['rules_version']}, ledger entry "
            f"{statement['ledger_index']}"
        )
        (left,) = consumer.budgets("market-registry")
        console.print(f"  privacy budget left today: ε {left['remaining']} of {left['budget']}")
    return True


def run(data_dir: Path, url: str | None, port: int) -> int:
    if not (data_dir / "config.json").exists():
        step(f"zonex init --data-dir {data_dir}")
        info = init_data_dir(data_dir, origin="quickstart.zonex/log")
        console.print(f"  operator key id {info['operator'][:16]}…, log key in {data_dir}/log.pub")
    proc = None
    if url is None:
        step(f"zonex serve --data-dir {data_dir} --port {port}")
        proc = start_server(data_dir, port)
        url = f"http://127.0.0.1:{port}"
        console.print(f"  serving on {url}")
    try:
        operator = load_private_key(data_dir / "operator.key")
        tax = identity(data_dir, "tax-bureau")
        bank = identity(data_dir, "city-bank")

        step("The operator registers a provider and a consumer")
        with Client(url, operator) as op:
            ensure_principal(op, tax, "City Tax Bureau", "agency")
            ensure_principal(op, bank, "City Commercial Bank", "enterprise")

        step("The tax bureau creates a zone and registers a dataset with column levels")
        with Client(url, tax) as provider:
            try:
                provider.create_zone("market-registry", "registered companies and their taxes")
                console.print("  zone [bold]market-registry[/] created")
            except ApiError as exc:
                if exc.status != 409:
                    raise
                console.print("  zone market-registry exists")
            try:
                provider.register_dataset(
                    "market-registry",
                    "registry",
                    levels=REGISTRY_LEVELS,
                    subject_column="company_id",
                    description="the public business registry (internal grade)",
                    file=COMPANIES,
                )
            except ApiError as exc:
                if exc.status != 409:
                    raise
            try:
                d = provider.register_dataset(
                    "market-registry",
                    "companies",
                    levels=LEVELS,
                    subject_column="company_id",
                    description="companies registered in the city, with 2025 tax paid",
                    file=COMPANIES,
                )
                console.print(
                    f"  dataset companies: level {d['level']}, snapshot {d['digest'][:16]}…"
                )
            except ApiError as exc:
                if exc.status != 409:
                    raise
                console.print("  dataset companies exists")

        step("The bank browses the catalog: metadata, levels and a row-count band, never a row")
        with Client(url, bank) as consumer:
            catalog = consumer.catalog()
        table = Table("zone", "dataset", "level", "rows", "release", "columns")
        for z in catalog["zones"]:
            for d in z["datasets"]:
                cols = ", ".join(f"{c['name']}:{c['level']}" for c in d["columns"])
                # a provider's opt-out from DP by default at L3 would show here
                release = d["release_note"] or "-"
                table.add_row(z["name"], d["name"], d["level"], d["row_count_band"], release, cols)
        console.print(table)

        step("An unsigned call and a replayed call are rejected")
        unsigned = httpx.get(f"{url}/v1/catalog")
        console.print(f"  unsigned: {unsigned.status_code} {unsigned.json()['code']}")
        captured: list[httpx.Request] = []
        with Client(url, bank) as consumer:
            consumer._http.event_hooks["request"].append(captured.append)
            consumer.whoami()
        replay = captured[0]
        replayed = httpx.request(
            replay.method, str(replay.url), headers=dict(replay.headers), content=replay.content
        )
        console.print(f"  replayed: {replayed.status_code} {replayed.json()['code']}")
        if unsigned.status_code != 401 or replayed.status_code != 401:
            console.print("[red]expected both to be rejected with 401[/]")
            return 1

        if not access_flow(url, tax, bank, data_dir):
            return 1
        if not aggregate_flow(url, tax, bank, data_dir):
            return 1
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)

    step("The auditor exports the ledger and verifies it offline")
    bundle = data_dir / "ledger-export.jsonl"
    ex = Exchange(Settings.from_data_dir(data_dir))
    try:
        final = write_export(ex.ledger, bundle)
    finally:
        ex.close()
    verifier = NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())
    report = check_bundle(read_bundle_lines(bundle), verifier)
    if not report.ok:
        console.print(f"[red]audit failed: {report.fault}[/]")
        return 1
    console.print(
        Panel(
            f"{report.entries} entries and {report.checkpoints} checkpoints verified "
            f"(tree size {final.size}).\nSame check from a shell:\n"
            f"  zonex audit verify {bundle} --log-key {data_dir / 'log.pub'}",
            title="audit OK",
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("demo-data"))
    parser.add_argument("--url", help="reuse a running server for this data dir")
    parser.add_argument("--port", type=int, default=8421)
    args = parser.parse_args(argv)
    return run(args.data_dir.resolve(), args.url, args.port)


if __name__ == "__main__":
    sys.exit(main())
