"""The quickstart runs end to end against a real server it starts on loopback."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.conftest import free_port

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import quickstart


def test_quickstart_runs_and_is_rerunnable(tmp_path: Path) -> None:
    data_dir = tmp_path / "demo"
    assert quickstart.main(["--data-dir", str(data_dir), "--port", str(free_port())]) == 0
    assert (data_dir / "ledger-export.jsonl").exists()
    # a second run on the same data directory reuses what exists and still verifies
    assert quickstart.main(["--data-dir", str(data_dir), "--port", str(free_port())]) == 0
