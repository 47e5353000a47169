"""The bank-vs-tax-bureau private join example runs end to end against a real server."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples" / "bank_tax"))

import bank_tax


def test_bank_tax_example_runs(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    assert bank_tax.main(["--data-dir", str(data_dir), "--port", str(free_port())]) == 0
    # nothing of the session is left behind
    assert not any((data_dir / "psi").iterdir())
