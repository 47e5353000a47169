"""Regenerate the console's screenshots in docs/console/ (1200x800 PNG).

Builds a small exchange in a temporary directory (SQLite) on loopback: a tax bureau with an L2
and an IMPORTANT dataset, a bank that exports under a grant and asks for the important data
(awaiting the operator), an incident; exports the ledger, serves ``zonex console`` over the
bundle and the exchange, and photographs its main pages in headless Chromium
(/usr/bin/chromium, Debian's package).

    .venv/bin/python scripts/console_screenshots.py [--out docs/console]
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import uvicorn

from crypto.keys import SigningKey
from crypto.note import NoteVerifier
from exchange.audit.console import OperatorDesk, create_console_app, open_bundle
from exchange.client.sdk import Client
from exchange.keyfile import load_private_key
from exchange.server.api.app import create_app
from exchange.server.runtime import Exchange, init_data_dir
from exchange.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
COMPANIES = ROOT / "examples" / "data" / "companies.csv"
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LEVELS = {
    "company_id": "L2",
    "district": "L1",
    "industry": "L1",
    "founded_year": "L1",
    "employees": "L2",
    "registered_capital": "L2",
    "tax_paid_2025": "L2",
}
PURPOSE = "credit-assessment"
DAY = 86400


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # running in a thread
        pass


@contextmanager
def served(app: object) -> Iterator[str]:
    """``app`` served by uvicorn on a free loopback port, in a thread; yields its URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    srv = _Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=20)
        sock.close()


def populate(url: str, operator: SigningKey) -> None:
    provider, bank, agency = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    with Client(url, operator) as op:
        op.register_principal("Tax Bureau", "agency", provider.public_key)
        op.register_principal("City Bank", "enterprise", bank.public_key)
        op.register_principal("Statistics Office", "agency", agency.public_key)
    with Client(url, provider) as p:
        p.create_zone("tax", "tax records")
        p.register_dataset(
            "tax", "companies", levels=LEVELS, subject_column="company_id", file=COMPANIES
        )
        important = {**LEVELS, "tax_paid_2025": "IMPORTANT"}
        p.register_dataset(
            "tax", "strategic", levels=important, subject_column="company_id", file=COMPANIES
        )
    with Client(url, bank) as c, Client(url, provider) as p:
        req = c.request_access(
            "tax", ["companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="KYC"
        )
        p.approve(req["id"])
        c.export("tax", "companies", PURPOSE)
        req = c.request_access(
            "tax",
            ["strategic"],
            ["aggregate"],
            PURPOSE,
            duration_seconds=30 * DAY,
            justification="credit line review for strategic industries",
        )
        p.approve(req["id"])
    with Client(url, agency) as a:
        a.request_access(
            "tax",
            ["companies"],
            ["aggregate"],
            "statistics",
            duration_seconds=DAY,
            justification="x",
        )
    with Client(url, operator) as op:
        op.open_incident("denial_ratio", "medium", "alert", 5, 12, principal=bank.key_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp) / "exchange"
        init_data_dir(data_dir, origin="city.example/log")
        ex = Exchange(Settings.from_data_dir(data_dir, checkpoint_interval_seconds=0.2))
        ex.start()
        try:
            with served(create_app(exchange=ex)) as url:
                operator = load_private_key(data_dir / "operator.key")
                populate(url, operator)
                bundle = Path(tmp) / "ledger.jsonl"
                with Client(url, operator) as op, bundle.open("wb") as f:
                    op.export_ledger(f)
                log = NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())
                opened = open_bundle(bundle, log)
                month = opened.entries[-1].time[:7]
                grant_seq = next(e.seq for e in opened.entries if e.kind == "grant.created")
                desk = OperatorDesk(Client(url, operator))
                console = create_console_app(bundle=opened, desk=desk)
                with served(console) as web, sync_playwright() as pw:
                    browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
                    page = browser.new_page(viewport={"width": 1200, "height": 800})
                    shots = [
                        ("overview", "/"),
                        ("explorer", "/entries?kind=&zone=tax"),
                        ("entry", f"/entries/{grant_seq}"),
                        ("approvals", "/approvals"),
                        ("report", f"/reports?period={month}"),
                        ("incidents", "/incidents"),
                    ]
                    for name, path in shots:
                        page.goto(web + path)
                        page.wait_for_load_state("networkidle")
                        page.screenshot(path=str(args.out / f"{name}.png"))
                        print(f"{args.out / (name + '.png')}")
                    browser.close()
                desk.close()
        finally:
            ex.close()


if __name__ == "__main__":
    main()
