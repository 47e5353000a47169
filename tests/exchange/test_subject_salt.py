"""A zone's subject salt is created once, whole, however many threads ask for it first."""

from __future__ import annotations

import threading
from pathlib import Path

from exchange.subjects import SALT_FILE, read_salt


def _read(zone_dir: Path, start: threading.Barrier, got: list[bytes | BaseException]) -> None:
    start.wait()
    try:
        got.append(read_salt(zone_dir))
    except BaseException as exc:  # collected and asserted on by the test
        got.append(exc)


def test_concurrent_first_reads_get_one_whole_salt(tmp_path: Path) -> None:
    for round_ in range(20):
        zone_dir = tmp_path / f"zone-{round_}"
        start = threading.Barrier(8)
        got: list[bytes | BaseException] = []
        threads = [threading.Thread(target=_read, args=(zone_dir, start, got)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert all(isinstance(g, bytes) for g in got), got
        assert len(set(got)) == 1 and len(got[0]) == 32  # type: ignore[arg-type]
        assert (zone_dir / SALT_FILE).read_bytes() == got[0]
        assert (zone_dir / SALT_FILE).stat().st_mode & 0o777 == 0o600
        assert [p.name for p in zone_dir.iterdir()] == [SALT_FILE]  # no temporary file left
