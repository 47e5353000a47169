"""``zonex console`` without a browser: its command line's refusals, the bundle's pages and
hostile entry text served escaped."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from exchange.audit.console import open_bundle
from exchange.audit.console.bundle import Filter
from exchange.cli import app
from tests.exchange.ledger_bundles import build_bundle
from tests.exchange.test_console_browser import start_console

HOSTILE = '<script>alert("x")</script>'


@pytest.mark.parametrize(
    ("args", "said"),
    [
        ([], "give --bundle B --log-key log.pub"),
        (["--bundle", "b.jsonl"], "--bundle needs --log-key"),
        (["--exchange", "http://127.0.0.1:9"], "--exchange and --key go together"),
        (
            ["--exchange", "http://127.0.0.1:9", "--key", "k", "--host", "0.0.0.0"],
            "serves only loopback with --exchange",
        ),
        (["--bundle", "missing.jsonl", "--log-key", "missing.pub"], "--log-key missing.pub"),
    ],
)
def test_the_command_refuses_in_one_line(args: list[str], said: str) -> None:
    result = CliRunner().invoke(app, ["console", *args])
    assert result.exit_code == 1
    assert said in result.output and "Traceback" not in result.output


def test_pages_filters_and_hostile_text(tmp_path: Path) -> None:
    built = build_bundle(120, overrides={7: {"kind": HOSTILE, "attrs": {"note": HOSTILE}}})
    path = tmp_path / "ledger.jsonl"
    path.write_bytes(built.data())
    bundle = open_bundle(path, built.verifier())
    assert bundle.ok and len(bundle.entries) == 120
    first, last = bundle.page(Filter(), 1), bundle.page(Filter(), 99)
    assert (first.pages, len(first.entries), last.number, len(last.entries)) == (3, 50, 3, 20)
    computations = bundle.page(Filter(kind="computation."), 1)
    assert computations.total == sum(e.kind.startswith("computation.") for e in bundle.entries)
    assert computations.total > 0
    assert all(e.kind == "computation.aggregate" for e in computations.entries)
    proof = bundle.detail(119).proof
    assert proof is not None and proof.verified and proof.size == 120
    console = start_console(bundle=bundle)
    try:
        with httpx.Client(base_url=console.url) as http:
            for url in ("/", "/entries", "/entries/7"):
                page = http.get(url)
                assert page.status_code == 200
                assert HOSTILE not in page.text
                assert "&lt;script&gt;alert(" in page.text
            assert http.get("/entries/120").status_code == 404
            assert http.get("/approvals").status_code == 404  # no exchange given
    finally:
        console.stop()
