"""One frozen settings object holds every security limit and deployment choice."""

from __future__ import annotations

import json
import os
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from policy.xborder import Thresholds

CONFIG_FILE = "config.json"


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    database_url: str | None = None
    #: the log's origin line and note key name (set by ``zonex init``)
    origin: str = "zonex.local/log"

    # request authentication (RFC 9421)
    max_skew_seconds: int = 300
    max_json_bytes: int = 1 << 20
    max_upload_bytes: int = 512 << 20

    # ledger
    ledger_batch_max: int = 2000
    checkpoint_interval_seconds: float = 1.0
    #: rejections naming a known key are ledgered one by one up to this many per key and interval
    rejection_entries_per_key: int = 10
    rejection_summary_interval_seconds: float = 60.0
    #: catalog reads: the first of each (principal, registry version, document) per interval is
    #: a durable catalog.read entry before it is answered, the others are counted in one
    #: catalog.read.summary at the interval's end (a crash loses at most one interval's counts)
    catalog_read_interval_seconds: float = Field(default=60.0, gt=0)

    # witnesses (exchange.server.cosigning)
    #: how often the newest checkpoint is offered to the configured witnesses
    witness_interval_seconds: float = Field(default=1.0, gt=0)
    #: one add-checkpoint request (connect and answer)
    witness_timeout_seconds: float = Field(default=10.0, gt=0)
    #: after n failures in a row a witness is retried after 2^(n-1) s, at most this long
    witness_backoff_max_seconds: float = Field(default=300.0, gt=0)

    # the catalog chain: recording child exchanges' checkpoints (exchange.server.chain)
    #: how often each child's checkpoint is fetched
    chain_interval_seconds: float = Field(default=5.0, gt=0)
    #: one request to a child (connect and answer)
    chain_timeout_seconds: float = Field(default=10.0, gt=0)
    #: after n failures in a row a child is polled again after 2^(n-1) s, at most this long
    chain_backoff_max_seconds: float = Field(default=300.0, gt=0)
    #: the largest published catalog (a signed envelope) taken from a child
    chain_max_published_bytes: int = Field(default=4 << 20, gt=0)
    #: serve ``GET /v1/chain/published`` (unsigned: zone, dataset and column metadata to
    #: anyone who can reach it); off unless this exchange has a parent that lists it
    chain_publish_catalog: bool = False

    # policy: how often a process checks the database's policy version, and how stale its
    # cache may grow (database unreachable) before every decision fails closed
    policy_refresh_seconds: float = 0.25
    policy_max_staleness_seconds: float = 1.0

    # computations
    #: the least ε one differentially private release may spend (exchange.node.dp.parse_epsilon):
    #: a refusal by a noisy gate spends it too, so no probe is nearly free
    min_release_epsilon: Decimal = Decimal("0.01")
    #: an uploaded HE public context (no Galois or relinearization keys; ~0.5 MB at n = 8192)
    max_he_context_bytes: int = 1 << 20
    #: memory for parsed HE contexts kept in each process (least recently used go first)
    he_context_cache_bytes: int = 256 << 20
    #: one upload of framed ciphertexts (encrypted model weights, ~0.37 MB each at n = 8192)
    max_he_upload_bytes: int = 128 << 20
    #: entities one he_score call may ask about (25 ciphertexts of 4096 scores come back)
    max_score_entities: int = 100_000
    #: consents one ``consents/import`` call may record (all in one transaction), and the
    #: size of its body (a row is at most ~700 bytes of JSON)
    max_consent_import_rows: int = 10_000
    max_consent_import_bytes: int = 8 << 20
    #: live consents of one (zone, consumer, purpose) an he_score task on the zone's node may
    #: carry (consent digest -> consent id): above it the score is refused
    max_node_score_consents: int = Field(default=100_000, ge=1)
    #: zones one secure_sum may combine
    max_secure_sum_zones: int = 32
    #: one binary batch of PSI points (32 bytes each): 64 MiB is two million points
    max_psi_batch_bytes: int = 64 << 20
    #: the largest id set either side of a private join may bring (|X| and |Y|)
    psi_max_items: int = 2_000_000
    #: a private-join session must finish within this; its artefacts are deleted after
    psi_session_seconds: int = 900
    #: threads for blinding and re-blinding (None: every available core)
    psi_workers: int | None = None
    #: epoch mode (docs/psi.md, "Epoch mode"): a zone's prepared image serves sessions for at
    #: most this long and this many sessions, then a new epoch (a fresh key) is prepared
    psi_epoch_max_seconds: int = Field(default=7 * 24 * 3600, ge=1)
    psi_epoch_max_sessions: int = Field(default=1000, ge=1)
    #: a session uses a prepared epoch by itself when |Y| >= this many times |X|
    psi_epoch_ratio: int = Field(default=16, ge=1)
    #: subjects blinded between two progress records of a preparation
    psi_epoch_chunk: int = Field(default=262_144, ge=1)
    #: a Dask scheduler (tcp://host:8786) of the operator's own cluster on which the epochs of
    #: the zones this exchange hosts are blinded (the extra zonex[psi-dask]; the epoch key is
    #: sent to its workers); None: on this machine's cores
    psi_epoch_scheduler: str | None = None
    #: epochs a zone's node may be uploading at once (each up to psi_max_items·20 bytes
    #: waiting for its manifest); an upload untouched for an hour is dropped
    psi_epoch_max_uploads: int = Field(default=4, ge=1)

    # zone nodes
    #: a node's long poll waits at most this long for a task before answering 204
    node_poll_seconds: float = 4.0
    #: a node unseen for this long is offline: its zone answers 503 zone_unavailable and a task
    #: it holds is terminated (the poll above plus slack; a dead node is noticed within 10 s)
    node_offline_seconds: float = 8.0
    #: a dispatched task must be finished by then, else it is terminated
    node_task_seconds: int = 120

    # cross-border flows (policy.xborder, docs/cross-border.md)
    #: the operator's jurisdiction (ISO 3166-1 alpha-2): principals registered without one, and
    #: principals registered before jurisdictions existed, are here
    jurisdiction: str = "CN"
    #: distinct subjects per provider and calendar year (China Standard Time) sent abroad: the
    #: 2024 CAC Provisions' values (Art. 7, 8 and 5(4)); a deployment or a test may lower them
    xborder_personal_contract: int = Field(default=100_000, ge=1)
    xborder_personal_assessment: int = Field(default=1_000_000, ge=2)
    xborder_sensitive_assessment: int = Field(default=10_000, ge=1)
    #: warn once a count reaches this percentage of a threshold
    xborder_warn_percent: int = Field(default=80, ge=1, le=100)

    # operations
    #: ``/v1/ready`` answers 503 when the database does not answer a trivial query within this
    ready_timeout_seconds: float = 2.0

    # catalog and storage
    upload_ttl_seconds: int = 24 * 3600
    #: SQLAlchemy URL prefixes a provider may attach; empty means attaching is disabled
    attach_allowed_prefixes: tuple[str, ...] = ()
    #: public origin (scheme://host[:port]) clients use; the signed @target-uri is checked
    #: against it. None: take scheme and host from the request.
    public_base_url: str | None = None

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'control.db'}"

    def xborder_thresholds(self) -> Thresholds:
        """The cross-border thresholds in force (defaults: the 2024 Provisions' values)."""
        from policy.xborder import Thresholds  # policy loads Casbin: not at every CLI start

        return Thresholds(
            personal_contract=self.xborder_personal_contract,
            personal_assessment=self.xborder_personal_assessment,
            sensitive_assessment=self.xborder_sensitive_assessment,
            warn_percent=self.xborder_warn_percent,
        )

    @classmethod
    def from_data_dir(cls, data_dir: Path, **overrides: object) -> Settings:
        """Settings from ``DATA_DIR/config.json`` (written by ``zonex init``), then overrides."""
        values: dict[str, object] = {}
        path = data_dir / CONFIG_FILE
        if path.exists():
            values.update(json.loads(path.read_text("utf-8")))
        env_url = os.environ.get("ZONEX_DATABASE_URL")
        if env_url:
            values["database_url"] = env_url
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["data_dir"] = data_dir
        return cls.model_validate(values)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings from ``ZONEX_DATA_DIR`` (used by ``zonex serve`` workers)."""
    data_dir = os.environ.get("ZONEX_DATA_DIR")
    if not data_dir:
        raise RuntimeError("ZONEX_DATA_DIR is not set")
    return Settings.from_data_dir(Path(data_dir))
