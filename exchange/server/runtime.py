"""The running exchange: settings, control-plane engine, ledger, keys, zone stores.

``init_data_dir`` lays out a new data directory; ``Exchange.open`` wires a process to one.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select
from sqlalchemy.orm import Session

from crypto.keys import SigningKey
from crypto.note import NoteSigner, NoteVerifier
from exchange.errors import ConfigurationError
from exchange.keyfile import load_private_key, write_private_key, write_public_key
from exchange.node.store import ZoneStore
from exchange.server.chain import ChainPoller
from exchange.server.cosigning import Cosigner
from exchange.server.ledger import EntryDraft, Ledger, ensure_head
from exchange.server.models import NonceRow, PrincipalRow
from exchange.server.policystore import PolicyCache
from exchange.server.readlog import CatalogReadLog
from exchange.server.registry import NonceLog, RegistryCache
from exchange.server.storage import WRITE, create_control_engine, migrate
from exchange.settings import CONFIG_FILE, Settings

log = logging.getLogger("zonex")

OPERATOR_KEY = "operator.key"
OPERATOR_PUB = "operator.pub"
LOG_KEY = "log.key"
LOG_PUB = "log.pub"


def init_data_dir(
    data_dir: Path, *, origin: str = "zonex.local/log", database_url: str | None = None
) -> dict[str, str]:
    """Create the control-plane database, the operator identity and the log signing key.

    Writes the log's verifier key to ``DATA_DIR/log.pub``. Refuses an initialized directory.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if (data_dir / CONFIG_FILE).exists():
        raise ConfigurationError(f"{data_dir} is already initialized")
    operator = SigningKey.generate()
    log_key = SigningKey.generate()
    write_private_key(data_dir / OPERATOR_KEY, operator)
    write_public_key(data_dir / OPERATOR_PUB, operator.public_key)
    write_private_key(data_dir / LOG_KEY, log_key)
    signer = NoteSigner(origin, log_key)
    (data_dir / LOG_PUB).write_text(signer.verifier_key() + "\n", "utf-8")
    (data_dir / "zones").mkdir(exist_ok=True)
    (data_dir / "staging").mkdir(exist_ok=True)
    config: dict[str, Any] = {"origin": origin}
    if database_url:
        config["database_url"] = database_url
    settings = Settings.from_data_dir(data_dir, **config)
    engine = create_control_engine(settings.resolved_database_url)
    try:
        migrate(engine)
        ensure_head(engine)
        ledger = Ledger(engine, signer)
        ledger.start()
        try:

            def add_operator(session: Session, draft: EntryDraft) -> None:
                session.add(
                    PrincipalRow(
                        key_id=operator.key_id,
                        name="operator",
                        kind="operator",
                        public_key=operator.public_key.raw,
                        status="active",
                        registered_by=None,
                    )
                )

            ledger.append(
                EntryDraft(
                    kind="log.initialized",
                    actor=operator.key_id,
                    attrs={"origin": origin},
                    refs={"principal": operator.key_id},
                ),
                apply=add_operator,
            )
        finally:
            ledger.close()
    finally:
        engine.dispose()
    # written last: its presence marks a complete initialization
    (data_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
    return {"operator": operator.key_id, "log": signer.verifier_key()}


class Exchange:
    """One process's exchange: open it, serve, close it."""

    def __init__(self, settings: Settings, *, with_log_key: bool = True) -> None:
        if not (settings.data_dir / CONFIG_FILE).exists():
            raise ConfigurationError(
                f"{settings.data_dir} is not an initialized data directory; run: zonex init"
            )
        self.settings = settings
        self.engine: Engine = create_control_engine(settings.resolved_database_url)
        migrate(self.engine)
        signer = None
        if with_log_key:
            signer = NoteSigner(settings.origin, load_private_key(settings.data_dir / LOG_KEY))
        self.log_signer = signer
        self.ledger = Ledger(
            self.engine,
            signer,
            batch_max=settings.ledger_batch_max,
            checkpoint_interval=settings.checkpoint_interval_seconds,
        )
        self.ledger.rejections.per_key_limit = settings.rejection_entries_per_key
        self.ledger.add_ticker(
            settings.rejection_summary_interval_seconds, self.ledger.rejections.flush
        )
        self.ledger.add_ticker(float(settings.max_skew_seconds), self.purge_nonces)
        #: catalog reads: one entry per reader, version and document per interval, plus counts
        self.catalog_reads = CatalogReadLog(self.ledger)
        self.ledger.add_ticker(settings.catalog_read_interval_seconds, self.catalog_reads.flush)
        # witnesses cosign the stored checkpoints; the submissions run on a thread of their own
        self.cosigner: Cosigner | None = None
        log_verifier = signer.verifier() if signer is not None else _published_log_key(settings)
        if log_verifier is not None:
            self.cosigner = Cosigner(self.engine, self.ledger, log_verifier, settings)
            self.ledger.add_ticker(settings.witness_interval_seconds, self.cosigner.tick)
        # the catalog chain: children's checkpoints are polled on a thread of their own
        self.chain = ChainPoller(self.engine, self.ledger, settings)
        self.ledger.add_ticker(settings.chain_interval_seconds, self.chain.tick)
        self.nonces = NonceLog(self.engine)
        self.registry = RegistryCache(self.engine)
        self.policy = PolicyCache(
            self.engine,
            refresh_interval=settings.policy_refresh_seconds,
            max_staleness=settings.policy_max_staleness_seconds,
        )
        self._zone_stores: dict[str, ZoneStore] = {}
        self._closers: list[Callable[[], None]] = []
        self._started = False

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run ``closer`` when the exchange closes, before the ledger stops (last added,
        first run): a helper's thread that appends entries finishes its work there."""
        self._closers.append(closer)

    def zone_store(self, zone: str) -> ZoneStore:
        """The zone's embedded store, opened once per process."""
        store = self._zone_stores.get(zone)
        if store is None:
            store = self._zone_stores.setdefault(zone, ZoneStore(self.zones_dir / zone))
        return store

    @property
    def zones_dir(self) -> Path:
        return self.settings.data_dir / "zones"

    @property
    def staging_dir(self) -> Path:
        return self.settings.data_dir / "staging"

    def start(self) -> Exchange:
        self.zones_dir.mkdir(exist_ok=True)
        self.staging_dir.mkdir(exist_ok=True)
        if self.cosigner is not None:
            self.cosigner.start()
        self.chain.start()
        self.ledger.start()
        self.nonces.start()
        self.policy.refresh()
        self._started = True
        return self

    def close(self) -> None:
        while self._closers:
            self._closers.pop()()
        for store in self._zone_stores.values():
            store.close()
        self._zone_stores.clear()
        self.chain.close()
        if self.cosigner is not None:
            self.cosigner.close()  # also after an offline round (zonex ledger witness cosign)
        if self._started:
            self.nonces.close()
            # the interval's catalog-read counts go on the ledger before it stops
            self.catalog_reads.close()
            self.ledger.close()
            self._started = False
        self.engine.dispose()

    def __enter__(self) -> Exchange:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def purge_nonces(self) -> None:
        """Forget nonces older than twice the skew window (older requests are stale anyway)."""
        horizon = int(datetime.now(UTC).timestamp()) - 2 * self.settings.max_skew_seconds
        with Session(self.engine.execution_options(**WRITE)) as session, session.begin():
            session.execute(delete(NonceRow).where(NonceRow.created < horizon))

    def operator_key_id(self) -> str:
        with Session(self.engine) as session:
            key_id = session.execute(
                select(PrincipalRow.key_id).where(PrincipalRow.kind == "operator")
            ).scalar_one()
            return key_id


def _published_log_key(settings: Settings) -> NoteVerifier | None:
    """The log's verifier key from ``DATA_DIR/log.pub`` (a process without the log key)."""
    path = settings.data_dir / LOG_PUB
    if not path.is_file():
        return None
    return NoteVerifier.from_verifier_key(path.read_text("utf-8").strip())
