"""Migration 0010 builds the tiles of a ledger written before tiles, and refuses a ledger whose
entries no longer hash to its latest signed checkpoint; the tiles survive a crash mid-batch."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from alembic import command
from sqlalchemy import Engine, func, select, text, update
from sqlalchemy.orm import Session

from crypto.merkle import MerkleTree, leaf_hash
from crypto.note import verify_checkpoint
from exchange.server.ledger import EntryDraft
from exchange.server.models import LedgerEntryRow, LedgerTileRow
from exchange.server.runtime import Exchange
from exchange.server.storage import alembic_config, create_control_engine, migrate
from tests.conftest import LiveServer, settings_for

ENTRIES = 3 * 256 + 41


def _ledger_before_tiles(data_dir: Path, extra_after_checkpoint: int = 5) -> int:
    """A ledger as revision 0009 left it: entries and checkpoints, no tiles table."""
    with Exchange(settings_for(data_dir)) as ex:
        ex.ledger.append_batch_sync(
            [EntryDraft(kind="test.old", attrs={"i": i}) for i in range(ENTRIES)]
        )
        ex.ledger.checkpoint()
        ex.ledger.append_batch_sync(
            [EntryDraft(kind="test.later") for _ in range(extra_after_checkpoint)]
        )
        size = ex.ledger.size()
    engine = _engine(data_dir)
    command.downgrade(alembic_config(engine), "0009")
    engine.dispose()
    return size


def _engine(data_dir: Path) -> Engine:
    return create_control_engine(settings_for(data_dir).resolved_database_url)


def _revision(engine: Engine) -> str:
    with engine.connect() as conn:
        return str(conn.execute(text("SELECT version_num FROM alembic_version")).scalar_one())


def test_the_upgrade_builds_the_tiles_of_an_existing_ledger(data_dir: Path) -> None:
    size = _ledger_before_tiles(data_dir)
    engine = _engine(data_dir)
    migrate(engine)
    with Session(engine) as s:
        hashes = list(s.scalars(select(LedgerEntryRow.leaf_hash).order_by(LedgerEntryRow.seq)))
        tiles = s.scalar(select(func.count()).select_from(LedgerTileRow))
    engine.dispose()
    assert tiles == 3 + 1  # three full level-0 tiles and level 1 (the rest: leaf hashes)
    tree = MerkleTree()
    tree.extend(bytes(h) for h in hashes)
    with Exchange(settings_for(data_dir)) as ex:
        signed = ex.ledger.checkpoint()
        assert verify_checkpoint(signed.note, ex.log_signer.verifier()).root == tree.root()  # type: ignore[union-attr]
        for seq in (0, 255, 256, size - 1):
            assert ex.ledger.inclusion_proof(seq, size) == tree.inclusion_proof(seq, size)
        # the ledger goes on from the rebuilt edge
        ex.ledger.append(EntryDraft(kind="test.after-upgrade"))
        tree.append(leaf_hash(ex.ledger.entry(size)))
        assert ex.ledger.checkpoint().root == tree.root()


def test_the_upgrade_refuses_a_ledger_altered_under_its_checkpoint(data_dir: Path) -> None:
    _ledger_before_tiles(data_dir)
    engine = _engine(data_dir)
    with Session(engine) as s, s.begin():
        s.execute(
            update(LedgerEntryRow).where(LedgerEntryRow.seq == 300).values(leaf_hash=bytes(32))
        )
    with pytest.raises(RuntimeError, match="do not hash to its latest checkpoint"):
        migrate(engine)
    # nothing was changed: still at 0009, and a later upgrade (after a restore) can run
    assert _revision(engine) == "0009"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ledger_entries")).scalar_one() > 0
    engine.dispose()


def test_the_upgrade_refuses_a_ledger_shorter_than_its_checkpoint(data_dir: Path) -> None:
    _ledger_before_tiles(data_dir, extra_after_checkpoint=0)
    engine = _engine(data_dir)
    with Session(engine) as s, s.begin():
        s.execute(text("DELETE FROM ledger_entries WHERE seq >= 500"))
    with pytest.raises(RuntimeError, match="fewer than its latest checkpoint"):
        migrate(engine)
    assert _revision(engine) == "0009"
    engine.dispose()


CRASHING_WRITER = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from exchange.server.ledger import EntryDraft
    from exchange.server.runtime import Exchange
    from exchange.server.tilestore import TileStore
    from exchange.settings import Settings

    real_write = TileStore.write

    def write_then_die(self, conn, changed):
        real_write(self, conn, changed)  # tiles written inside the batch's transaction ...
        os._exit(3)  # ... and the process dies before the commit

    ex = Exchange(Settings.from_data_dir(Path(sys.argv[1])))
    TileStore.write = write_then_die
    ex.ledger.append_batch_sync([EntryDraft(kind="test.lost") for _ in range(300)])
    """
)


def test_a_crash_mid_batch_leaves_tiles_and_entries_as_they_were(data_dir: Path) -> None:
    with Exchange(settings_for(data_dir)) as ex:
        ex.ledger.append_batch_sync([EntryDraft(kind="test.kept") for _ in range(200)])
        before = ex.ledger.checkpoint()
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_WRITER, str(data_dir)],
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        capture_output=True,
        timeout=120,
    )
    assert crashed.returncode == 3, crashed.stderr.decode()
    with Exchange(settings_for(data_dir)) as ex:  # a cold start: nothing rebuilt
        assert ex.ledger.size() == before.size
        assert ex.ledger.checkpoint().root == before.root
        ex.ledger.append_batch_sync([EntryDraft(kind="test.next") for _ in range(300)])
        tree = MerkleTree()
        with Session(ex.engine) as s:
            tree.extend(
                bytes(h)
                for h in s.scalars(select(LedgerEntryRow.leaf_hash).order_by(LedgerEntryRow.seq))
            )
        after = ex.ledger.checkpoint()
        assert after.size == before.size + 300 and after.root == tree.root()


def test_a_worker_is_ready_without_reading_the_tree(server: LiveServer) -> None:
    # readiness is one head read: the ledger's size does not enter it
    import httpx

    assert httpx.get(f"{server.url}/v1/ready").status_code == 200
    assert server.exchange.ledger.tiles.reads == 0
