"""``zonex console`` in a real headless Chromium (Playwright, Debian's /usr/bin/chromium).

One live exchange on loopback (SQLite) with a tax bureau, a bank, an L2 dataset the bank
exported under a grant (a real receipt) and an IMPORTANT dataset whose requests await the
operator; its ledger exported over the API into a bundle, and a copy with one entry changed.
Two consoles serve them on loopback: the auditor's and operator's over the good bundle and the
exchange, and one over the tampered bundle. One browser for the module, one page reused.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import httpx
import pytest

from crypto.keys import SigningKey
from crypto.merkle import MerkleTree
from crypto.note import NoteVerifier
from exchange.audit.console import OperatorDesk, open_bundle
from exchange.client.sdk import Client
from tests.browser import CHROMIUM, Console, chromium, start_console
from tests.conftest import EXAMPLES, L2_LEVELS, LiveServer, live_exchange
from tests.conftest import tax_bureau_and_bank as register_parties

if not CHROMIUM.exists():
    pytest.skip("no /usr/bin/chromium (Debian's chromium package)", allow_module_level=True)

from playwright.sync_api import Browser, Page, expect

# one world for the module, its tests in order on one worker
pytestmark = pytest.mark.xdist_group(name="console-browser")

PURPOSE = "credit-assessment"
DAY = 24 * 3600
IMPORTANT_LEVELS = {**L2_LEVELS, "tax_paid_2025": "IMPORTANT"}


@dataclass
class World:
    live: LiveServer
    provider: SigningKey
    consumer: SigningKey
    log: NoteVerifier
    bundle: Path
    lines: list[bytes]  # the bundle's entry lines
    tampered_seq: int
    awaiting: list[str]  # request ids awaiting the operator
    incident: str
    receipt_output: Path  # the export's whole output: {"result": ..., "receipt": ...}
    console: Console
    tampered: Console
    desk: OperatorDesk


def entry_lines(data: bytes) -> list[bytes]:
    return [line for line in data.split(b"\n") if line and not line.startswith(b'{"checkpoint"')]


def ledger_lines(live: LiveServer) -> list[dict[str, Any]]:
    out = io.BytesIO()
    with live.client(live.operator) as op:
        op.export_ledger(out)
    return [json.loads(line) for line in entry_lines(out.getvalue())]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("console")
    data_dir = tmp / "exchange"
    with live_exchange(data_dir, origin="console.test.zonex/log") as live:
        yield _build(live, tmp)


def _build(live: LiveServer, tmp: Path) -> World:
    provider, consumer = register_parties(live, L2_LEVELS)
    with live.client(provider) as p:
        p.register_dataset(
            "tax",
            "strategic",
            levels=IMPORTANT_LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    awaiting = []
    with live.client(consumer) as c, live.client(provider) as p:
        req = c.request_access(
            "tax", ["companies"], ["export"], PURPOSE, duration_seconds=DAY, justification="x"
        )
        p.approve(req["id"])
        out = c.export("tax", "companies", PURPOSE)
        for why in ("<b>strategic</b> stock review", "second review"):
            req = c.request_access(
                "tax",
                ["strategic"],
                ["aggregate"],
                PURPOSE,
                duration_seconds=DAY,
                justification=why,
            )
            assert p.approve(req["id"])["status"] == "awaiting_operator"
            awaiting.append(req["id"])
    receipt_output = tmp / "export.json"
    receipt_output.write_text(json.dumps({"result": out.result, "receipt": out.receipt}))
    bundle = tmp / "ledger.jsonl"
    with live.client(live.operator) as op, bundle.open("wb") as f:
        op.export_ledger(f)
    data = bundle.read_bytes()
    lines = entry_lines(data)
    # the tampered copy: one entry's kind changed after the log signed it
    tampered_seq = 3
    changed = lines[tampered_seq].replace(b'"kind":"', b'"kind":"x', 1)
    tampered = tmp / "tampered.jsonl"
    tampered.write_bytes(data.replace(lines[tampered_seq], changed, 1))
    with live.client(live.operator) as op:
        incident = op.open_incident(
            "denial_ratio", "medium", "alert", 0, 3, principal=consumer.key_id, zone="tax"
        )
    log = live.log_verifier()
    desk = OperatorDesk(Client(live.url, live.operator))
    console = start_console(bundle=open_bundle(bundle, log), desk=desk)
    bad = start_console(bundle=open_bundle(tampered, log))
    return World(
        live,
        provider,
        consumer,
        log,
        bundle,
        lines,
        tampered_seq,
        awaiting,
        incident["id"],
        receipt_output,
        console,
        bad,
        desk,
    )


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with chromium() as launched:
        yield launched


@pytest.fixture(scope="module")
def page(browser: Browser, world: World) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    page = context.new_page()
    page.set_default_timeout(10_000)
    yield page
    context.close()
    world.console.stop()
    world.tampered.stop()
    world.desk.close()  # its HTTP client's connections to the exchange


def kinds_of(lines: list[bytes]) -> list[str]:
    return [json.loads(line)["kind"] for line in lines]


def test_the_overview_shows_a_verified_bundle(page: Page, world: World) -> None:
    page.goto(world.console.url + "/")
    expect(page.locator("#entry-count")).to_have_text(str(len(world.lines)))
    expect(page.locator("#verification")).to_have_text("verified")
    expect(page.locator("#bundle-fault")).to_have_count(0)
    kinds = kinds_of(world.lines)
    row = page.locator("#kinds tr", has_text="grant.created")
    expect(row.locator("td.num")).to_have_text(str(kinds.count("grant.created")))
    # every page of the console loads
    for path, heading in [
        ("/entries", "Ledger"),
        ("/receipt", "Receipt check"),
        ("/approvals", "Approvals awaiting the operator"),
        ("/principals", "Principals"),
        ("/zones", "Zones"),
        ("/reports", "Reports 月报季评"),
        ("/incidents", "Incidents 应急处置"),
    ]:
        page.goto(world.console.url + path)
        expect(page.locator("h1")).to_have_text(heading)


def test_the_explorer_filters_by_kind_and_zone(page: Page, world: World) -> None:
    page.goto(world.console.url + "/entries")
    expect(page.locator("#match-count")).to_contain_text(f"{len(world.lines)} entries")
    entries = [json.loads(line) for line in world.lines]
    page.select_option("#filter-kind", "access.requested")  # htmx swaps the table in
    wanted = [e for e in entries if e["kind"] == "access.requested"]
    expect(page.locator("#match-count")).to_contain_text(f"{len(wanted)} entries match")
    expect(page.locator("#entry-table tbody tr")).to_have_count(len(wanted))
    assert set(page.locator("#entry-table td.kind").all_inner_texts()) == {"access.requested"}
    assert "kind=access.requested" in page.url  # the filter is in the address, for a link
    page.select_option("#filter-kind", "")
    page.select_option("#filter-zone", "tax")
    in_tax = [e for e in entries if e["refs"].get("zone") == "tax"]
    expect(page.locator("#match-count")).to_contain_text(f"{len(in_tax)} entries match")
    seqs = [int(s) for s in page.locator("#entry-table td.num").all_inner_texts()]
    assert seqs == [e["seq"] for e in in_tax][:50]
    actor = world.consumer.key_id
    page.fill("#filter-actor", actor)
    page.click("#filters button[type=submit]")
    mine = [e for e in in_tax if e["actor"] == actor]
    expect(page.locator("#match-count")).to_contain_text(f"{len(mine)} entries match")
    expect(page.locator("#entry-table tbody tr")).to_have_count(len(mine))


def test_an_entry_shows_its_verified_inclusion_proof(page: Page, world: World) -> None:
    kinds = kinds_of(world.lines)
    seq = kinds.index("grant.created")
    page.goto(f"{world.console.url}/entries/{seq}")
    expect(page.locator("#proof-status")).to_contain_text("verified")
    expect(page.locator("#proof-status")).not_to_contain_text("NOT")
    leaf = sha256(b"\x00" + world.lines[seq]).digest()
    expect(page.locator("#leaf-hash")).to_have_text(leaf.hex())
    tree = MerkleTree()
    tree.extend(sha256(b"\x00" + line).digest() for line in world.lines)
    proof = tree.inclusion_proof(seq, len(world.lines))
    assert page.locator("#proof-path li").all_inner_texts() == [h.hex() for h in proof]
    expect(page.locator("#canonical")).to_have_text(world.lines[seq].decode())


def test_a_tampered_bundle_shows_its_fault_on_every_page(page: Page, world: World) -> None:
    url = world.tampered.url
    page.goto(url + "/")
    fault = page.locator("#bundle-fault")
    expect(fault).to_be_visible()
    expect(fault.locator(".fault-code")).to_have_text("prev_mismatch")
    # the changed entry is line tampered_seq + 1; the next entry's prev names it
    expect(fault.locator(".fault-line")).to_have_text(str(world.tampered_seq + 1))
    expect(page.locator("#verification")).to_have_text("FAILED")
    page.goto(f"{url}/entries/{world.tampered_seq}")
    expect(page.locator("#bundle-fault")).to_be_visible()
    expect(page.locator("#proof-status")).to_contain_text("NOT verified")
    page.goto(url + "/entries")
    expect(page.locator("#bundle-fault .fault-code")).to_have_text("prev_mismatch")


def drop_file(page: Page, zone: str, name: str, content: str) -> None:
    """Drop a file on a drop zone as a user dragging it from the desktop would."""
    transfer = page.evaluate_handle(
        """([name, content]) => {
            const dt = new DataTransfer();
            dt.items.add(new File([content], name, {type: "application/json"}));
            return dt;
        }""",
        [name, content],
    )
    page.dispatch_event(zone, "dragover", {"dataTransfer": transfer})
    page.dispatch_event(zone, "drop", {"dataTransfer": transfer})


def test_a_dropped_receipt_is_checked(page: Page, world: World) -> None:
    page.goto(world.console.url + "/receipt")
    drop_file(page, "#receipt-drop", "export.json", world.receipt_output.read_text())
    expect(page.locator("#receipt-chosen")).to_have_text("export.json")
    page.click("#receipt-submit")
    verdict = page.locator("#receipt-verdict")
    expect(verdict).to_contain_text("The receipt verifies")
    expect(verdict).to_contain_text("export by")
    expect(page.locator("#receipt-in-bundle")).to_contain_text("The bundle holds this entry")


def test_a_tampered_receipt_or_result_is_refused(page: Page, world: World, tmp_path: Path) -> None:
    output = json.loads(world.receipt_output.read_text())
    receipt, result = tmp_path / "export.receipt", tmp_path / "result.json"
    receipt.write_text(json.dumps(output["receipt"]))
    output["result"]["rows"] = output["result"]["rows"][1:]  # a row taken out
    result.write_text(json.dumps(output["result"]))
    page.goto(world.console.url + "/receipt")
    page.set_input_files("#receipt-file", str(receipt))
    page.set_input_files("#result-file", str(result))
    page.click("#receipt-submit")
    verdict = page.locator("#receipt-verdict")
    expect(verdict).to_contain_text("does not verify")
    expect(verdict).to_contain_text("the result does not match")
    # a statement changed after the log signed it, given by path this time
    forged = output["receipt"]
    forged["statement"]["payload"] = forged["statement"]["payload"][:-4] + "AAAA"
    receipt.write_text(json.dumps(forged))
    page.goto(world.console.url + "/receipt")
    page.click("summary")
    page.fill("#receipt-path", str(receipt))
    page.fill("#result-path", str(world.receipt_output))
    page.click("#receipt-submit")
    expect(verdict).to_contain_text("does not verify")
    expect(verdict).to_contain_text("signature")


def test_an_approval_in_the_console_appears_on_the_ledger(page: Page, world: World) -> None:
    request_id = world.awaiting[0]
    page.goto(world.console.url + "/approvals")
    row = page.locator(f"tr[data-request='{request_id}']")
    # the consumer's justification is shown as text, never as markup
    expect(row).to_contain_text("<b>strategic</b> stock review")
    row.locator("button.approve").click()
    expect(page.locator("#done")).to_contain_text(f"request {request_id} approved: grant")
    expect(page.locator(f"tr[data-request='{request_id}']")).to_have_count(0)
    created = [
        e
        for e in ledger_lines(world.live)
        if e["kind"] == "grant.created" and e["refs"].get("request") == request_id
    ]
    assert len(created) == 1
    # signed by the operator (second approver) after the provider: the grant names both
    with world.live.client(world.consumer) as c:
        grant = next(g for g in c.grants() if g["id"] == created[0]["refs"]["grant"])
    assert grant["approved_by"] == [world.provider.key_id, world.live.operator.key_id]


def test_a_form_without_the_token_or_from_another_origin_is_refused(
    page: Page, world: World
) -> None:
    request_id = world.awaiting[1]
    target = f"{world.console.url}/approvals/{request_id}/approve"
    # the console's own page, but no token: 403
    page.goto(world.console.url + "/approvals")
    status = page.evaluate(
        "url => fetch(url, {method: 'POST', body: new FormData()}).then(r => r.status)", target
    )
    assert status == 403
    # a page of another site (no CSP of the console's there), even with the right token: 403
    token = page.locator("input[name=csrf_token]").first.input_value()
    page.goto("about:blank")
    page.set_content(
        f'<form method="post" action="{target}">'
        f'<input name="csrf_token" value="{token}"><button id="go">win a prize</button></form>'
    )
    page.click("#go")
    expect(page.locator("p.problem")).to_contain_text("another origin")
    with world.live.client(world.live.operator) as op:
        assert op.get_request(request_id)["status"] == "awaiting_operator"


def test_the_operator_suspends_and_reinstates_a_principal(page: Page, world: World) -> None:
    bank = world.consumer.key_id
    page.goto(world.console.url + "/principals")
    row = page.locator(f"tr[data-key='{bank}']")
    row.locator("button", has_text="Suspend").click()
    expect(page.locator("#done")).to_contain_text("is suspended")
    expect(page.locator(f"tr[data-key='{bank}'] td.status")).to_have_text("suspended")
    with world.live.client(world.live.operator) as op:
        assert {p.key_id: p.status for p in op.list_principals()}[bank] == "suspended"
    page.locator(f"tr[data-key='{bank}']").locator("button", has_text="Reinstate").click()
    expect(page.locator(f"tr[data-key='{bank}'] td.status")).to_have_text("active")
    page.goto(world.console.url + "/zones")
    page.locator("tr[data-zone='tax']").locator("button", has_text="Suspend").click()
    expect(page.locator("tr[data-zone='tax'] td.status")).to_have_text("suspended")
    page.locator("tr[data-zone='tax']").locator("button", has_text="Reinstate").click()
    expect(page.locator("tr[data-zone='tax'] td.status")).to_have_text("active")
    kinds = [e["kind"] for e in ledger_lines(world.live)]
    for kind in ("principal.suspended", "principal.reinstated", "zone.suspended"):
        assert kind in kinds


def test_a_report_shows_its_charts(page: Page, world: World) -> None:
    # the month of the bank's export (the one computation)
    (month,) = {
        e["time"][:7] for e in map(json.loads, world.lines) if e["kind"] == "computation.export"
    }
    page.goto(world.console.url + "/reports")
    page.fill("#report-period", month)
    page.click("#report-submit")
    expect(page.locator("#report-title")).to_contain_text(month)
    chart = page.locator("#chart-computations svg")
    expect(chart).to_be_visible()
    # bars drawn: the one export the bank made
    assert chart.locator(".mark-rect path").count() >= 1
    row = page.locator("#report-summary tr", has_text="export")
    expect(row.first.locator("td.num")).to_have_text("1")
    page.fill("#report-period", "2026-13")
    page.click("#report-submit")
    expect(page.locator("#report-problem")).to_contain_text("2026-13")
    # the whole report, as its own page, with its charts
    page.goto(f"{world.console.url}/reports/{month}.html")
    expect(page.locator("svg").first).to_be_visible()
    # never from a bundle that does not verify
    page.goto(f"{world.tampered.url}/reports?period={month}")
    expect(page.locator("#report-problem")).to_contain_text("only from a bundle that verifies")


def test_the_operator_labels_an_incident(page: Page, world: World) -> None:
    page.goto(world.console.url + "/incidents")
    row = page.locator(f"tr[data-incident='{world.incident}']")
    expect(row).to_contain_text("denial_ratio")
    row.locator("button", has_text="False positive").click()
    expect(page.locator("#done")).to_contain_text("labelled false positive")
    expect(page.locator(f"tr[data-incident='{world.incident}'] td.label")).to_have_text("false")
    labelled = [
        e
        for e in ledger_lines(world.live)
        if e["kind"] == "incident.labelled" and e["refs"].get("incident") == world.incident
    ]
    assert len(labelled) == 1 and labelled[0]["attrs"]["label"] == "false"


# -- without a browser: what a client other than the console's pages gets ----------------


def test_requests_under_another_host_name_are_refused(world: World) -> None:
    with httpx.Client(base_url=world.console.url) as http:
        assert http.get("/").status_code == 200
        # a name that resolves to loopback (DNS rebinding) is not one of the console's names
        assert http.get("/", headers={"host": "attacker.example"}).status_code == 400
        page = http.get("/entries/999999")
        assert page.status_code == 404 and "the bundle has no entry 999999" in page.text
        assert "default-src 'none'" in page.headers["content-security-policy"]
        refused = http.post(
            f"/approvals/{world.awaiting[1]}/approve",
            data={"csrf_token": "x"},
            headers={"origin": world.console.url},
        )
        assert refused.status_code == 403 and "token" in refused.text
        no_origin = http.post("/receipt", data={"csrf_token": "x"})
        assert no_origin.status_code == 403 and "without Origin" in no_origin.text


def test_a_receipt_without_its_result_is_a_readable_refusal(world: World) -> None:
    with httpx.Client(base_url=world.console.url) as http:
        token = re.search(r'name="csrf_token" value="([^"]+)"', http.get("/receipt").text)
        assert token is not None
        receipt = json.loads(world.receipt_output.read_text())["receipt"]
        answer = http.post(
            "/receipt",
            data={"csrf_token": token.group(1)},
            files={"receipt": ("r.json", json.dumps(receipt).encode(), "application/json")},
            headers={"origin": world.console.url},
        )
    assert answer.status_code == 422
    assert "checked with its result" in answer.text
