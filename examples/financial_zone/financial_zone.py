"""The city's financial public-data zone, end to end, on a real server on loopback.

    python examples/financial_zone/financial_zone.py --data-dir demo-data [--port 8421]

The operator registers the parties; the market-regulation, tax and social-insurance bureaus
and three district statistics offices open zones and register generated (not real) datasets
with a classification level per column; a bank is granted ``psi_aggregate`` and ``he_score``
on the tax records for credit assessment, joins its applicant list privately against them,
commits its secret credit model and scores consented applicants under encryption (an
unconsented applicant makes the whole request fail, by digest); the statistics bureau sums
the three districts' figures under homomorphic encryption and checks every district's signed
contribution; unauthorized calls are denied, a grant is revoked; the auditor exports the
ledger and verifies it, a pinned checkpoint and three receipts offline.

Every step checks its outcome against the plaintext answer computed from the generated data;
the script exits 1 with one line naming the step if anything is off. See README.md here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import partial
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))

import citydata
from citydata import City

from crypto import he
from crypto.encoding import b64url_decode, b64url_encode
from crypto.envelope import Envelope, verify_envelope
from crypto.keys import SigningKey, VerifyKey
from crypto.note import NoteVerifier
from crypto.receipt import verify_receipt
from exchange.audit import check_bundle, read_bundle_lines
from exchange.audit.report import parse_period, report_from_bundle
from exchange.audit.report_render import write_report
from exchange.audit.rules import check_rules
from exchange.client import he as he_client
from exchange.client.sdk import ApiError, Client
from exchange.keyfile import load_private_key, write_private_key
from exchange.node.datasets import register_on_node
from exchange.node.home import NodeHome, init_node_dir
from exchange.server.compute.secure_sum import CONTRIBUTION_TYPE
from exchange.server.ledger import write_export
from exchange.server.runtime import Exchange, init_data_dir
from exchange.settings import Settings

CREDIT = "credit-assessment"
STATS = "statistics"
#: the bank's ε for one private join (split between the count and the tax sum)
PSI_EPSILON = Decimal(2)
#: the statistics bureau's aggregate on the node-hosted social-insurance zone
NODE_EPSILON = Decimal(1)
#: a noisy value further than this many noise scales from the truth fails the run
#: (probability at most 2·e^-22 = 5.6e-10 per value for a correct release)
NOISE_SCALES = 22

REGISTRY, REGISTRY_SET = "company-registry", "companies"
TAX, TAX_SET = "tax", "tax_records"
SOCIAL, SOCIAL_SET = "social-insurance", "contributions"
DISTRICT_ZONES = {d: f"district-{d}" for d in citydata.DISTRICTS}
DISTRICT_SET = "enterprises"

#: key file name -> (principal name, kind)
PARTIES = {
    "market-bureau": ("Market Regulation Bureau", "agency"),
    "tax-bureau": ("Tax Bureau", "agency"),
    "social-bureau": ("Social Insurance Bureau", "agency"),
    **{
        f"{d}-office": (f"{d.capitalize()} District Statistics Office", "agency")
        for d in citydata.DISTRICTS
    },
    "city-bank": ("City Commercial Bank", "enterprise"),
    "stats-bureau": ("Municipal Statistics Bureau", "agency"),
    "auditor": ("City Audit Office", "auditor"),
}

REGISTRY_LEVELS = {
    "company_id": "L1",
    "name": "L1",
    "district": "L1",
    "industry": "L1",
    "founded_year": "L1",
    "registered_capital": "L1",
}
TAX_LEVELS = {
    "company_id": "L3",
    "district": "L1",
    "tax_paid_2025": "L3",
    "employees": "L3",
    "arrears_days": "L4",  # tax arrears: highly sensitive
}
SOCIAL_LEVELS = {
    "company_id": "L3",
    "district": "L1",
    "insured_staff": "L3",
    "contributions_2025": "L3",
}
DISTRICT_LEVELS = {"enterprise_id": "L2", "industry": "L1", "employees": "L2", "revenue_10k": "L3"}


def _bounds(pairs: dict[str, tuple[int, int]]) -> dict[str, dict[str, str]]:
    return {
        c: {"disclosure": "after_aggregate", "lower": str(lo), "upper": str(hi)}
        for c, (lo, hi) in pairs.items()
    }


SOCIAL_BOUNDS = {"insured_staff": (0, 2_500), "contributions_2025": (0, 9_000_000)}
TAX_RULES = {
    "min_group_size": 10,
    "dp_required": True,  # an L4 column: every release is differentially private
    "epsilon_budget": "10",
    "refresh_seconds": 3600,
    "columns": {
        "company_id": {"disclosure": "join_only"},
        "district": {"disclosure": "plaintext"},
        **_bounds(citydata.TAX_BOUNDS),
    },
}
#: social insurance is hosted on the social bureau's own node: its rows never reach the exchange
SOCIAL_RULES = {
    "min_group_size": 10,
    "epsilon_budget": "5",
    "refresh_seconds": 3600,
    "columns": {
        "company_id": {"disclosure": "join_only"},
        "district": {"disclosure": "plaintext"},
        **_bounds(SOCIAL_BOUNDS),
    },
}
DISTRICT_RULES = {
    "min_group_size": citydata.DISTRICT_K,
    # the districts publish exact industry totals: an opt-out from DP by default at L3, ledgered
    # with the rules and shown in the catalog as "exact: differencing possible"
    "exact_release": True,
    "columns": {
        "enterprise_id": {"disclosure": "join_only"},
        "industry": {"disclosure": "plaintext"},
        **_bounds(citydata.DISTRICT_BOUNDS),
    },
}

#: the bank's secret credit model (logistic regression on the tax zone's features)
MODEL_FEATURES = ("tax_paid_2025", "employees", "arrears_days")
MODEL_WEIGHTS = (2.5e-6, 4.0e-4, -0.021)
MODEL_BIAS = -0.9

SUM_SQL = (
    "SELECT industry, COUNT(*) AS firms, SUM(employees) AS staff, SUM(revenue_10k) AS revenue "
    f"FROM {DISTRICT_SET} GROUP BY industry"
)

console = Console()
errors = Console(stderr=True)


class StoryError(Exception):
    """A step did not end the way the story says it must."""


def expect(condition: object, what: str) -> None:
    if not condition:
        raise StoryError(what)


@dataclass
class Story:
    data_dir: Path
    url: str
    city: City
    keys: dict[str, SigningKey]
    verifier: NoteVerifier
    step: str = "setup"
    started: float = field(default_factory=time.monotonic)
    #: what later steps need: zone keys, the tax grant, the model and its last score request
    state: dict[str, Any] = field(default_factory=dict)

    def client(self, who: str) -> Client:
        return Client(self.url, self.keys[who])

    def section(self, number: int, title: str) -> None:
        self.step = f"{number}. {title}"
        console.print()
        console.rule(f"[bold cyan]{self.step}[/]", align="left")

    def save(self, name: str, document: Any) -> Path:
        path = self.data_dir / "receipts" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(document, indent=2) + "\n", "utf-8")
        return path


# -- plumbing ---------------------------------------------------------------------------------


def identity(data_dir: Path, name: str) -> SigningKey:
    """The demo key NAME from DATA_DIR/keys, made on first run."""
    path = data_dir / "keys" / f"{name}.key"
    if not path.exists():
        path.parent.mkdir(exist_ok=True)
        write_private_key(path, SigningKey.generate())
    return load_private_key(path)


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "exchange.cli", "serve", "--data-dir", str(data_dir)]
    with (data_dir / "server.log").open("ab") as log:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StoryError(f"the server exited with status {proc.returncode} (see server.log)")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    proc.wait(timeout=30)
    raise StoryError("the server did not start within 60 s (see server.log)")


def node_dir(story: Story) -> Path:
    """The social bureau's node: its own directory, beside (not inside) the exchange's."""
    return story.data_dir.with_name(story.data_dir.name + "-social-node")


def host_on_node(
    story: Story,
    owner: str,
    dataset: str,
    levels: dict[str, str],
    subject: str,
    description: str,
    csv_path: Path,
) -> None:
    """The social bureau hosts its zone on its own node: register the node key (pending), the
    operator approves it, the rows are imported on the node and only metadata and the snapshot
    digest go to the exchange; then the node process dials out and serves."""
    home_dir = node_dir(story)
    if not (home_dir / "node.json").exists():
        key = SigningKey.generate()
        with story.client(owner) as p:
            log_key = p.log_key()
            p.request(
                "POST",
                "/v1/nodes",
                json={"zone": SOCIAL, "public_key": b64url_encode(key.public_key.raw)},
            )
        with Client(story.url, load_private_key(story.data_dir / "operator.key")) as op:
            op.request("POST", f"/v1/nodes/{key.key_id}/approve")
        init_node_dir(home_dir, zone=SOCIAL, exchange=story.url, log_key=log_key, key=key)
    home = NodeHome(home_dir)
    try:
        if dataset not in home.datasets():
            register_on_node(
                home,
                dataset,
                levels=levels,
                subject_column=subject,
                description=description,
                file=csv_path,
                url=story.url,
            )
        story.state["social_node"] = home.key_id
    finally:
        home.close()
    story.state["node_proc"] = start_node(home_dir, story.url)
    deadline = time.monotonic() + 30
    with story.client(owner) as p:
        while not p.request("GET", "/v1/availability").get(SOCIAL, {}).get("online"):
            if time.monotonic() > deadline:
                raise StoryError("the social bureau's node did not come online (see node.log)")
            time.sleep(0.1)
    console.print(
        f"  {SOCIAL}: hosted on the social bureau's node {home_dir.name} (key "
        f"{story.state['social_node'][:16]}…); its rows never reach the exchange"
    )


def start_node(home_dir: Path, url: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "exchange.cli", "node", "serve", "--data-dir", str(home_dir)]
    with (home_dir.parent / f"{home_dir.name}.log").open("ab") as log:
        return subprocess.Popen(
            [*cmd, "--url", url],
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def created(call: Callable[[], Any]) -> bool:
    """Run a create call; False when the thing exists already (a second run)."""
    try:
        call()
    except ApiError as exc:
        if exc.status != 409:
            raise
        return False
    return True


@contextmanager
def bars() -> Iterator[Progress]:
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description:<34}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        yield progress


def phase_hook(progress: Progress) -> Callable[[str, int, int], None]:
    """One bar per phase (the private join reports phases: blind, send A, zone, ...)."""
    tasks: dict[str, Any] = {}

    def hook(phase: str, done: int, total: int) -> None:
        if phase not in tasks:
            tasks[phase] = progress.add_task(f"  {phase}", total=max(total, 1))
        progress.update(tasks[phase], completed=done, total=max(total, 1))

    return hook


class StepBar:
    """One bar whose description follows the step (the HE clients count steps)."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.label = progress, label
        self.task = progress.add_task(f"  {label}", total=1)
        self.total = 1

    def __call__(self, step: str, done: int, total: int) -> None:
        self.total = total
        self.progress.update(
            self.task, description=f"  {self.label}: {step}", completed=done, total=total
        )

    def stop(self, step: str) -> None:
        self(step, self.total, self.total)


def problem(exc: ApiError) -> str:
    body = {k: exc.body[k] for k in ("status", "code", "reason", "zone") if k in exc.body}
    return json.dumps(body)


def expect_denied(call: Callable[[], Any], status: int, reasons: tuple[str, ...]) -> ApiError:
    try:
        call()
    except ApiError as exc:
        expect(
            exc.status == status and exc.body.get("reason") in reasons,
            f"expected {status} with reason {' or '.join(reasons)}, got {exc}",
        )
        return exc
    raise StoryError(f"expected a {status} refusal, the call succeeded")


def request_and_approve(
    story: Story,
    consumer: str,
    provider: str,
    zone: str,
    datasets: list[str],
    operations: list[str],
    purpose: str,
    justification: str,
) -> dict[str, Any]:
    with story.client(consumer) as c:
        req = c.request_access(
            zone,
            datasets,
            operations,
            purpose,
            duration_seconds=30 * 86400,
            justification=justification,
        )
    with story.client(provider) as p:
        approved = p.approve(req["id"])
    expect(approved["status"] == "approved" and approved.get("grant_id"), "no grant issued")
    return approved


# -- the story --------------------------------------------------------------------------------


def register_parties(story: Story) -> None:
    story.section(1, "The operator registers the parties")
    operator = load_private_key(story.data_dir / "operator.key")
    table = Table("principal", "kind", "key id")
    with Client(story.url, operator) as op:
        for name, (title, kind) in PARTIES.items():
            key = story.keys[name]
            new = created(partial(op.register_principal, title, kind, key.public_key))
            table.add_row(title, kind, key.key_id[:16] + "…" + ("" if new else " (existing)"))
        listed = {p["key_id"] for p in op.list_principals()}
    expect(all(k.key_id in listed for k in story.keys.values()), "a party is not registered")
    console.print(table)


def open_zones(story: Story) -> None:
    story.section(2, "Providers open zones and register classified datasets")
    city, gen = story.city, story.data_dir / "generated"
    plan = [
        (
            "market-bureau",
            REGISTRY,
            REGISTRY_SET,
            REGISTRY_LEVELS,
            city.registry,
            "the company registry (publishable)",
            None,
        ),
        (
            "tax-bureau",
            TAX,
            TAX_SET,
            TAX_LEVELS,
            city.tax,
            "2025 tax filings and arrears",
            TAX_RULES,
        ),
        (
            "social-bureau",
            SOCIAL,
            SOCIAL_SET,
            SOCIAL_LEVELS,
            city.social,
            "insured staff and 2025 contributions",
            SOCIAL_RULES,
        ),
    ] + [
        (
            f"{d}-office",
            DISTRICT_ZONES[d],
            DISTRICT_SET,
            DISTRICT_LEVELS,
            city.districts[d],
            f"{d} enterprise statistics",
            DISTRICT_RULES,
        )
        for d in citydata.DISTRICTS
    ]
    for owner, zone, dataset, levels, rows, description, rules in plan:
        csv_path = citydata.write_csv(gen / f"{zone}.csv", rows)
        with story.client(owner) as p:
            created(partial(p.create_zone, zone, description))
            subject = next(iter(levels))  # the first column names the subject
            if zone == SOCIAL:
                host_on_node(story, owner, dataset, levels, subject, description, csv_path)
            else:
                created(
                    partial(
                        p.register_dataset,
                        zone,
                        dataset,
                        levels=levels,
                        subject_column=subject,
                        description=description,
                        file=csv_path,
                    )
                )
            if rules is not None and p.analysis_rules(zone, dataset)["version"] == 0:
                p.set_analysis_rules(zone, dataset, rules)

    console.print("  What the bank sees in the catalog: metadata and levels, never a row")
    with story.client("city-bank") as c:
        catalog = c.catalog()
    table = Table("zone (owner)", "dataset", "level", "rows", "columns and their levels")
    ours = {z for _, z, *_ in plan}
    seen = set()
    for z in catalog["zones"]:
        if z["name"] not in ours:
            continue
        for d in z["datasets"]:
            seen.add(z["name"])
            cols = ", ".join(f"{c['name']} {c['level']}" for c in d["columns"])
            owner = f"{z['name']}\n[dim]{z['owner_name']}[/]"
            table.add_row(owner, d["name"], d["level"], d["row_count_band"], cols)
    console.print(table)
    expect(seen == ours, f"the catalog lacks zones {sorted(ours - seen)}")
    tax = next(z for z in catalog["zones"] if z["name"] == TAX)["datasets"][0]
    expect(tax["level"] == "L4", "the tax dataset should be L4 (its highest column)")
    story.state["zone_keys"] = {
        z["name"]: b64url_decode(z["public_key"]) for z in catalog["zones"] if z["name"] in ours
    }


def bank_is_granted(story: Story) -> None:
    story.section(3, "The bank asks for access for credit assessment; providers sign approvals")
    table = Table("zone", "operations", "approved by", "grant", title=f"purpose {CREDIT}")
    registry = request_and_approve(
        story,
        "city-bank",
        "market-bureau",
        REGISTRY,
        [REGISTRY_SET],
        ["export"],
        CREDIT,
        "check loan applicants are registered companies",
    )
    table.add_row(REGISTRY, "export", "Market Regulation Bureau", registry["grant_id"][:20] + "…")
    tax = request_and_approve(
        story,
        "city-bank",
        "tax-bureau",
        TAX,
        [TAX_SET],
        ["psi_aggregate", "he_score"],
        CREDIT,
        "tax standing of loan applicants; encrypted credit scoring of consenting applicants",
    )
    table.add_row(TAX, "psi_aggregate, he_score", "Tax Bureau", tax["grant_id"][:20] + "…")
    console.print(table)
    story.state["tax_grant"] = tax["grant_id"]

    console.print("  The registry is L1 (publishable): the bank exports it and checks its list")
    with story.client("city-bank") as c:
        out = c.export(REGISTRY, REGISTRY_SET, CREDIT)
    result = out["result"]
    statement, _ = verify_receipt(out["receipt"], result, story.verifier)
    index = result["columns"].index("company_id")
    registered = {row[index] for row in result["rows"]}
    ours = {cid.strip() for _, cid in story.city.applicants}
    truth = citydata.psi_truth(story.city)
    expect(result["masked"] == [], "an L1 export should not be masked")
    expect(len(ours & registered) == truth["registered"], "registry check disagrees")
    console.print(
        f"  {len(result['rows'])} registry rows, receipt verified (ledger entry "
        f"{statement['ledger_index']}); {len(ours & registered)} of {len(ours)} applicants "
        "are registered companies"
    )


def private_join(story: Story) -> None:
    story.section(4, "The bank joins its applicants privately with the tax records (PSI)")
    ids = [cid for _, cid in story.city.applicants]
    with story.client("city-bank") as c:
        budget = next((b for b in c.budgets(TAX) if b["dataset"] == TAX_SET), None)
        if budget is not None and Decimal(budget["remaining"]) < PSI_EPSILON:
            raise StoryError(
                f"the bank's ε budget on {TAX}/{TAX_SET} is spent until {budget['window_end']}; "
                "run again later or with a fresh --data-dir"
            )
        with bars() as progress:
            out = c.psi_join(
                TAX,
                TAX_SET,
                "aggregate",
                ids,
                CREDIT,
                sums=["tax_paid_2025"],
                epsilon=PSI_EPSILON,
                progress=phase_hook(progress),
            )
    result, local = out["result"], out["local"]
    verify_receipt(out["receipt"], result, story.verifier)
    story.save("psi-aggregate.result.json", result)
    story.save("psi-aggregate.receipt.json", out["receipt"])

    truth = citydata.psi_truth(story.city)
    # under DP the k gate reads the noisy count: a closed gate releases nothing but that fact
    expect(not result["suppressed"], "the private join was suppressed (noisy count below k)")
    share = PSI_EPSILON / 2  # ε split between COUNT and one SUM
    lo, hi = citydata.TAX_BOUNDS["tax_paid_2025"]
    count_scale = 1 / share
    sum_scale = Decimal(max(abs(lo), abs(hi))) / share
    count, total = int(local["count"]), int(local["sums"]["tax_paid_2025"])
    table = Table(
        "",
        "released to the bank",
        "plaintext (demo only)",
        "noise scale",
        title=f"k = {result['k']}, ε = {result['epsilon']}, tax clipped to [{lo}, {hi}]",
    )
    table.add_row("applicants sent", str(local["distinct"]), str(len(ids)), "")
    table.add_row(
        "tax bureau's distinct companies", str(result["y_count"]), str(citydata.N_TAX), ""
    )
    table.add_row("matched companies (noised)", str(count), str(truth["count"]), f"{count_scale}")
    table.add_row("sum of tax paid", f"{total:,}", f"{truth['tax_sum']:,}", f"{sum_scale:,}")
    table.add_row(
        "average tax paid",
        f"{Decimal(local['averages']['tax_paid_2025']):,.0f}",
        f"{truth['tax_sum'] / truth['count']:,.0f}",
        "",
    )
    console.print(table)
    expect(result["noised"] and result["epsilon"] == str(PSI_EPSILON), "the join was not noised")
    expect(result["y_count"] == citydata.N_TAX, "the tax zone's size is off")
    expect(abs(count - truth["count"]) <= NOISE_SCALES * count_scale, "the count is off")
    # + 1: the sum's noise is rounded to an integer inside the ciphertext
    expect(abs(total - truth["tax_sum"]) <= NOISE_SCALES * sum_scale + 1, "the tax sum is off")
    console.print(
        f"  within {NOISE_SCALES} noise scales of the plaintext; the bank never saw which "
        "applicants matched, the bureau never saw the applicant list; receipt saved"
    )


def _application(story: Story) -> dict[str, str]:
    return {cid.strip(): app for app, cid in story.city.applicants}


def encrypted_scoring(story: Story) -> None:
    story.section(5, "The bank commits its secret model and scores consenting applicants (HE)")
    city, bank = story.city, story.keys["city-bank"]
    model_path = story.data_dir / "bank" / "credit-model.json"
    if model_path.exists():
        model, _ = he_client.load_model(model_path)
    else:
        model = he_client.new_model(MODEL_FEATURES, MODEL_WEIGHTS, bias=MODEL_BIAS, link="logistic")
        model_path.parent.mkdir(exist_ok=True)
        he_client.save_model(model_path, model)
    with story.client("city-bank") as c:
        stored = c.commit_model(model.document())
    expect(stored["commitment"] == model.commitment, "the exchange stored another commitment")
    console.print(
        f"  commitment {model.commitment[:16]}… on the ledger: features "
        f"{', '.join(model.features)}, link {model.link}; weights and bias stay at the bank"
    )
    story.state["model"] = model

    with story.client("tax-bureau") as p:
        active = [
            x for x in p.consents(TAX) if x["consumer"] == bank.key_id and x["status"] == "active"
        ]
        if len(active) < len(city.consented):
            until = datetime.now(UTC) + timedelta(days=90)
            for cid in city.consented:
                p.record_consent(TAX, cid, bank.key_id, CREDIT, until)
    console.print(
        f"  the tax bureau records {len(city.consented)} consents (subject, bank, {CREDIT}); "
        "only keyed digests are stored (a key for consents alone), never answered"
    )

    app_of = _application(story)
    console.print(f"  The bank sends its whole shortlist of {len(city.shortlist)} applicants:")
    with story.client("city-bank") as c, bars() as progress:
        bar = StepBar(progress, "scoring")
        refused = expect_denied(
            lambda: he_client.score(
                c,
                zone=TAX,
                dataset=TAX_SET,
                purpose=CREDIT,
                model=model,
                ids=city.shortlist,
                progress=bar,
            ),
            403,
            ("no_consent",),
        )
        bar.stop("refused")
    positions = [int(i) for i in refused.body["refused_positions"].split(",")]
    unconsented = [i for i, cid in enumerate(city.shortlist) if cid not in set(city.consented)]
    expect(positions == unconsented, "the refusal names other positions")
    expect(refused.body["refused_count"] == len(unconsented), "the refusal count is off")
    expect("refused" not in refused.body, "the refusal names subjects by digest")
    console.print(
        f"  {refused.status} {refused.code}, reason {refused.body['reason']}: nothing read or "
        "computed; the refusal names positions and a count, nothing derived from an id"
    )
    table = Table("position", "application")
    for pos in positions:
        table.add_row(str(pos), app_of[city.shortlist[pos]])
    console.print(table)

    ids = [cid for cid in city.shortlist if cid in set(city.consented)]
    console.print(f"  The bank drops them and scores the {len(ids)} consenting applicants:")
    with story.client("city-bank") as c, bars() as progress:
        out = he_client.score(
            c,
            zone=TAX,
            dataset=TAX_SET,
            purpose=CREDIT,
            model=model,
            ids=ids,
            progress=StepBar(progress, "scoring"),
        )
    (response,) = out.responses
    statement, _ = verify_receipt(response["receipt"], response["result"], story.verifier)
    expect(statement["model"] == model.commitment, "the receipt cites another model")
    story.save("he-score.result.json", response["result"])
    story.save("he-score.receipt.json", response["receipt"])
    story.state["score_request"] = {
        "zone": TAX,
        "dataset": TAX_SET,
        "purpose": CREDIT,
        "model": model.commitment,
        "context": response["result"]["context"],
        "weights": response["result"]["weights"],
        "ids": ids,
    }

    plain = citydata.linear_scores(city, ids, model.features, model.weights, model.bias)
    rows = {r["company_id"]: r for r in city.tax}
    # docs/he.md "Accuracy": per score, a bound on the CKKS error of the linear score derived
    # from the parameters (noise of each encrypted weight times its feature, rounding, decoding),
    # exceeded by some score of the request with probability below 1e-9
    bounds = he.score_error_bounds(
        he.PARAMETER_SETS[he_client.SCORE_PARAMETER_SET],
        model.weights,
        [[float(rows[cid][f]) for f in model.features] for cid in ids],
        bias=model.bias,
    )
    table = Table("application", "score (decrypted)", "plaintext model", "|difference|")
    worst, used = 0.0, 0.0
    for n, (cid, got, (linear, scale), bound) in enumerate(
        zip(ids, out.scores, plain, bounds, strict=True)
    ):
        want = model.apply(linear)
        diff = abs(got - want)
        # the sigmoid's slope is <= 1/4; the reference (fsum of rounded products, plus the
        # bias) is within 3u * (sum |w x| + |bias|) and each sigmoid within 4u, u = 2**-53
        limit = (float(bound) + 2.0**-51 * (scale + abs(model.bias))) / 4 + 2.0**-50
        worst, used = max(worst, diff), max(used, diff / limit)
        expect(diff <= limit, f"score of {app_of[cid]} is off by {diff:.3g} (bound {limit:.3g})")
        if n < 8:
            table.add_row(app_of[cid], f"{got:.6f}", f"{want:.6f}", f"{diff:.1e}")
    table.add_row("…", f"({len(ids) - 8} more)", "", "")
    console.print(table)
    console.print(
        f"  all {len(ids)} scores match the plaintext model (largest difference {worst:.1e}, "
        f"at most {used:.0%} of its derived error bound); receipt saved"
    )


def secure_sum(story: Story) -> None:
    story.section(6, "The statistics bureau sums three districts under encryption")
    zones = [DISTRICT_ZONES[d] for d in citydata.DISTRICTS]
    for d in citydata.DISTRICTS:
        request_and_approve(
            story,
            "stats-bureau",
            f"{d}-office",
            DISTRICT_ZONES[d],
            [DISTRICT_SET],
            ["secure_sum"],
            STATS,
            "quarterly enterprise statistics by industry",
        )
    console.print(f"  each district office granted secure_sum for {STATS}: {', '.join(zones)}")
    cells = [[c] for c in citydata.SUM_CELLS]
    with story.client("stats-bureau") as c, bars() as progress:
        out = he_client.secure_sum(
            c,
            zones=zones,
            sql=SUM_SQL,
            cells=cells,
            purpose=STATS,
            progress=StepBar(progress, "secure sum (BFV)"),
        )
    result = out.response["result"]
    zone_keys = {z: story.state["zone_keys"][z] for z in zones}
    he_client.verify_contributions(out.response, zone_keys)
    verify_receipt(out.response["receipt"], result, story.verifier)
    story.save("secure-sum.result.json", result)
    story.save("secure-sum.receipt.json", out.response["receipt"])

    trusted: dict[str, tuple[str, VerifyKey]] = {
        VerifyKey(k).key_id: (z, VerifyKey(k)) for z, k in zone_keys.items()
    }
    table = Table("district zone", "signed by zone key", "k", "cells zeroed below k", "absent")
    for raw in out.response["contributions"]:
        envelope = Envelope.model_validate(raw)
        signer = next(s.keyid for s in envelope.signatures if s.keyid in trusted)
        zone, key = trusted[signer]
        payload = verify_envelope(envelope, CONTRIBUTION_TYPE, {key.key_id: key})
        table.add_row(
            zone,
            signer[:16] + "…",
            str(payload["k"]),
            str(payload["suppressed"]),
            str(payload["missing"]),
        )
    console.print(table)

    truth = citydata.secure_sum_truth(story.city, citydata.SUM_CELLS)
    expect(out.values == ["firms", "staff", "revenue"], f"unexpected outputs {out.values}")
    expect(result["epsilon"] == "0" and result["noise"] == [], "no DP noise was expected")
    table = Table(
        "industry",
        "firms",
        "staff",
        "revenue (10k yuan)",
        "= plaintext",
        title="decrypted totals over the three districts (exact: BFV, no DP noise)",
    )
    for (industry,), got, want in zip(cells, out.totals, truth, strict=True):
        table.add_row(industry, *(f"{int(v):,}" for v in got), "✓" if got == want else "✗")
    console.print(table)
    expect(out.totals == truth, "the decrypted totals differ from the plaintext totals")
    console.print(
        "  every district's contribution verified against its catalog key; the totals equal "
        "the plaintext sums exactly (groups under a district's k count as zero there)"
    )


def node_aggregate(story: Story) -> None:
    """The statistics bureau queries social insurance; the social bureau's node checks the
    query again, draws the noise and signs the result, which the receipt carries."""
    request_and_approve(
        story,
        "stats-bureau",
        "social-bureau",
        SOCIAL,
        [SOCIAL_SET],
        ["aggregate"],
        STATS,
        "insured staff by district",
    )
    sql = f"SELECT district, COUNT(*) AS n FROM {SOCIAL_SET} GROUP BY district"
    with story.client("stats-bureau") as c:
        out = c.aggregate(SOCIAL, sql, STATS, epsilon=str(NODE_EPSILON))
    statement, _ = verify_receipt(out.receipt, out.result, story.verifier)
    expect(
        statement.get("node", {}).get("key_id") == story.state["social_node"],
        "the receipt does not carry the social bureau's node signature",
    )
    truth: dict[str, int] = {}
    for row in story.city.social:
        truth[row["district"]] = truth.get(row["district"], 0) + 1
    released = {r[0]: r[1] for r in out.result["rows"]}
    # ε = 1 in two shares (count, gate): Laplace scale 2; P(|noise| >= 50) = e^-25 per group
    expect(
        set(released) == set(truth)
        and all(abs(Decimal(str(released[d])) - truth[d]) < 50 for d in truth),
        "the node's noisy counts are not near the truth",
    )
    story.save("node-aggregate.receipt.json", out.receipt)
    story.save("node-aggregate.result.json", out.result)
    console.print(
        f"  {SOCIAL} on its node: staff records by district (ε = {NODE_EPSILON}, noise drawn "
        f"on the node) {released}; receipt verified, signed by the node's own key"
    )


def denials(story: Story) -> None:
    story.section(7, "Unauthorized calls are denied, with a problem+json reason")
    with story.client("city-bank") as c:
        exc = expect_denied(lambda: c.export(TAX, TAX_SET, CREDIT), 403, ("level_ceiling",))
        console.print(f"  the bank exports L4 tax rows           → {problem(exc)}")
        exc = expect_denied(
            lambda: c.aggregate(
                SOCIAL,
                f"SELECT district, COUNT(*) AS n FROM {SOCIAL_SET} GROUP BY district",
                CREDIT,
            ),
            403,
            ("not_granted",),
        )
        console.print(f"  the bank queries social insurance      → {problem(exc)}")
    with story.client("stats-bureau") as c:
        exc = expect_denied(
            lambda: c.aggregate(
                TAX,
                f"SELECT district, COUNT(*) AS n FROM {TAX_SET} GROUP BY district",
                STATS,
                epsilon="0.1",
            ),
            403,
            ("not_granted",),
        )
        console.print(f"  the statistics bureau queries tax rows → {problem(exc)}")


def revocation(story: Story) -> None:
    story.section(8, "The tax bureau revokes the bank's grant; the bank is denied")
    with story.client("tax-bureau") as p:
        revoked = p.revoke(story.state["tax_grant"], "credit review closed")
    expect(revoked["status"] == "revoked", "the grant is not revoked")
    console.print(f"  grant {revoked['id']} revoked: {revoked.get('revoke_reason')}")
    with story.client("city-bank") as c:
        exc = expect_denied(
            lambda: c.he_score(**story.state["score_request"]), 403, ("not_granted", "revoked")
        )
    console.print(f"  the same scoring request again         → {problem(exc)}")


def pin_checkpoint(story: Story) -> None:
    """The auditor saves a checkpoint it trusts (later bundles must extend it)."""
    story.section(9, "The auditor verifies the ledger and the receipts offline")
    with story.client("auditor") as a:
        cp = a.checkpoint()
        document = a.model(story.state["model"].commitment)["document"]
    path = story.data_dir / "audit" / "trusted-checkpoint.txt"
    path.parent.mkdir(exist_ok=True)
    path.write_text(cp["note"], "utf-8")
    story.state["model_document"] = document
    console.print(f"  the auditor pins checkpoint size {cp['size']} ({path.name})")


def audit(story: Story) -> None:
    model = story.state["model"]
    he.verify_model_commitment(
        model.commitment,
        story.state["model_document"],
        features=model.features,
        weights=model.weights,
        bias=model.bias,
        nonce=model.nonce,
        link=model.link,
    )
    console.print("  the bank reveals its model to the auditor: it matches the ledgered commitment")

    bundle = story.data_dir / "audit" / "ledger.jsonl"
    ex = Exchange(Settings.from_data_dir(story.data_dir))
    try:
        final = write_export(ex.ledger, bundle)
    finally:
        ex.close()
    trusted = (story.data_dir / "audit" / "trusted-checkpoint.txt").read_text("utf-8")
    report = check_bundle(read_bundle_lines(bundle), story.verifier, trusted)
    expect(report.ok, f"the ledger export does not verify: {report.fault}")
    console.print(
        f"  ledger exported offline ({final.size} entries): every leaf, root, signature and "
        "the hash chain verify, and it extends the pinned checkpoint"
    )
    lines = bundle.read_bytes().splitlines()
    middle = final.size // 2
    report = check_bundle([*lines[:middle], *lines[middle + 1 :]], story.verifier, trusted)
    expect(not report.ok and report.fault is not None, "a bundle missing an entry verified")
    assert report.fault is not None
    console.print(f"  (the same bundle with entry {middle} deleted: {report.fault})")
    rules = check_rules(read_bundle_lines(bundle))
    expect(rules.ok, f"the ledger breaks a compliance rule: {rules.faults[:1]}")
    console.print(
        f"  compliance rules hold over all {rules.entries} entries: every computation under a "
        "live grant, ε within budget and equal to the releases, scores on live consents"
    )
    # the month's report (月报) for the review meeting, from the verified bundle
    month = json.loads(lines[final.size - 1])["time"][:7]
    monthly = report_from_bundle(bundle, story.verifier, parse_period(month), trusted=trusted)
    story.state["report_dir"] = folder = story.data_dir / "audit" / f"report-{month}"
    written = write_report(monthly, folder)
    console.print(
        f"  report {month}: {len(monthly.rows)} measures, {', '.join(written)} in {folder}"
    )

    table = Table("receipt", "kind", "ledger entry", "checkpoint", "ε", "grant")
    for name in ("psi-aggregate", "he-score", "secure-sum"):
        folder = story.data_dir / "receipts"
        receipt = json.loads((folder / f"{name}.receipt.json").read_text("utf-8"))
        result = json.loads((folder / f"{name}.result.json").read_text("utf-8"))
        statement, cp = verify_receipt(receipt, result, story.verifier)
        expect(statement["ledger_index"] < final.size, f"{name} is not in the exported ledger")
        grant = statement["grant"] or ""
        table.add_row(
            name,
            statement["kind"],
            str(statement["ledger_index"]),
            str(cp.size),
            statement["epsilon"],
            grant[:20] + ("…" if len(grant) > 20 else ""),
        )
    console.print(table)
    d = story.data_dir
    console.print(
        Panel(
            "The same checks from a shell, with no server:\n"
            f"  zonex audit verify {bundle} --log-key {d / 'log.pub'} "
            f"--trusted {d / 'audit' / 'trusted-checkpoint.txt'}\n"
            f"  zonex receipt verify {d / 'receipts' / 'psi-aggregate.receipt.json'} "
            f"--result {d / 'receipts' / 'psi-aggregate.result.json'} --log-key {d / 'log.pub'}\n"
            f"  zonex audit verify {bundle} --log-key {d / 'log.pub'} --rules\n"
            f"  zonex console --bundle {bundle} --log-key {d / 'log.pub'}",
            title="audit OK",
        )
    )


def run(data_dir: Path, port: int) -> int:
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "config.json").exists():
        init_data_dir(data_dir, origin="financial-zone.zonex/log")
    city = citydata.generate()
    citydata.write_applicants(data_dir / "bank" / "applicants.csv", city.applicants)
    story = Story(
        data_dir=data_dir,
        url=f"http://127.0.0.1:{port}",
        city=city,
        keys={name: identity(data_dir, name) for name in PARTIES},
        verifier=NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip()),
    )
    console.rule("[bold]zonex: the city's financial public-data zone")
    console.print(f"  data directory {data_dir}; server on {story.url} (log: server.log)")
    try:
        server = start_server(data_dir, port)
        try:
            register_parties(story)
            open_zones(story)
            bank_is_granted(story)
            private_join(story)
            encrypted_scoring(story)
            secure_sum(story)
            node_aggregate(story)
            denials(story)
            revocation(story)
            pin_checkpoint(story)
        finally:
            node = story.state.get("node_proc")
            if node is not None:
                node.terminate()
                node.wait(timeout=30)
            server.terminate()
            server.wait(timeout=30)
        audit(story)
    except Exception as exc:  # one readable line, whatever went wrong
        what = (
            f"{exc}" if isinstance(exc, StoryError | ApiError) else f"{type(exc).__name__}: {exc}"
        )
        errors.print(f"[bold red]✗ step {story.step}: {what}[/]", soft_wrap=True)
        return 1
    console.print(
        f"[bold green]✓ all steps verified in {time.monotonic() - story.started:.1f} s[/]"
    )
    return 0


def port_problem(port: int) -> str | None:
    """Why the server could not listen on 127.0.0.1:``port``, in one line (None: it can)."""
    import errno
    import socket

    other = port + 1 if 1 <= port < 65535 else 8421
    pick = f"pick another: scripts/demo.sh DATA_DIR PORT (or --port PORT), e.g. {other}"
    if not 1 <= port <= 65535:
        return f"port {port} is not a TCP port (1-65535); {pick}"
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} on 127.0.0.1 is busy (something is listening there); {pick}"
            return f"port {port} on 127.0.0.1 cannot be used ({exc.strerror}); {pick}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("demo-data"))
    parser.add_argument("--port", type=int, default=8421)
    args = parser.parse_args(argv)
    # said before anything starts: a busy port is a server that exits, or worse another
    # exchange answering the health check
    problem = port_problem(args.port)
    if problem is not None:
        errors.print(f"[bold red]✗ {problem}[/]", soft_wrap=True, highlight=False)
        return 2
    return run(args.data_dir.resolve(), args.port)


if __name__ == "__main__":
    sys.exit(main())
