"""Checkpoints signed by several processes on one database at once."""

from __future__ import annotations

from pathlib import Path

from exchange.server.ledger import EntryDraft
from exchange.server.runtime import Exchange
from tests.conftest import settings_for


def test_a_larger_checkpoint_stored_by_another_process_mid_sign_is_no_error(
    data_dir: Path,
) -> None:
    """Process A reads the ledger size, process B appends and stores a larger checkpoint, then A
    looks for the last checkpoint: A must sign (or reuse) one, not call its ledger short."""
    a = Exchange(settings_for(data_dir, checkpoint_interval_seconds=3600)).start()
    b = Exchange(settings_for(data_dir, checkpoint_interval_seconds=3600)).start()
    try:
        a.ledger.append(EntryDraft(kind="test.a"))
        synced = a.ledger.size

        def sync_then_race() -> int:
            size = synced()
            b.ledger.append(EntryDraft(kind="test.b"))
            b.ledger.checkpoint()
            return size

        a.ledger.size = sync_then_race  # type: ignore[method-assign]
        first = a.ledger.checkpoint()
        a.ledger.size = synced  # type: ignore[method-assign]
        final = a.ledger.checkpoint()
        assert first.size <= final.size == a.ledger.size()
    finally:
        a.close()
        b.close()
