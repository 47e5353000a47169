"""Control-plane tables (database rows). Domain objects and wire schemas are separate types."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import Mapped, mapped_column

from exchange.server.db import Base


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


class PrincipalRow(Base):
    __tablename__ = "principals"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    registered_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: ISO 3166-1 alpha-2 (docs/cross-border.md); None: the operator's ``jurisdiction`` setting
    jurisdiction: Mapped[str | None] = mapped_column(String(2), nullable=True)
    #: a critical information infrastructure operator
    ciio: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")


class ZoneRow(Base):
    __tablename__ = "zones"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(ForeignKey("principals.key_id"))
    description: Mapped[str] = mapped_column(Text, default="")
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32))
    status: Mapped[str] = mapped_column(String(16), default="active")
    #: operations the zone removes from the default ceilings, per level (never adds)
    ceilings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: the zone's cross-border negative list: ``[[operation, category], ...]`` refused abroad
    xborder_negative: Mapped[list[list[str]] | None] = mapped_column(JSON, nullable=True)


class DatasetRow(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("zone", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    zone: Mapped[str] = mapped_column(ForeignKey("zones.name"))
    name: Mapped[str] = mapped_column(String(64))
    description: Mapped[str] = mapped_column(Text, default="")
    subject_column: Mapped[str] = mapped_column(String(64))
    #: [{"name", "type", "level"}]
    columns: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    level: Mapped[str] = mapped_column(String(16))
    row_count: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))  # "import" | "attach"
    source_format: Mapped[str | None] = mapped_column(String(16), nullable=True)
    attach_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    attach_table: Mapped[str | None] = mapped_column(String(128), nullable=True)
    ceilings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class RegistryStateRow(Base):
    """One row: the registry version. Triggers bump it on every change to principals, zones or
    datasets (migration 0007); caches of those rows compare against it."""

    __tablename__ = "registry_state"
    __table_args__ = (CheckConstraint("id = 1", name="single_row"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    version: Mapped[int] = mapped_column(BigInteger, default=0)


class UploadRow(Base):
    __tablename__ = "uploads"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    zone: Mapped[str] = mapped_column(ForeignKey("zones.name"))
    owner: Mapped[str] = mapped_column(String(64))
    media_type: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    used: Mapped[bool] = mapped_column(default=False)


class NonceRow(Base):
    """Nonces seen inside the skew window; the primary key makes a replay fail to insert."""

    __tablename__ = "nonces"

    key_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)
    created: Mapped[int] = mapped_column(BigInteger, index=True)


class LedgerEntryRow(Base):
    __tablename__ = "ledger_entries"

    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    leaf_hash: Mapped[bytes] = mapped_column(LargeBinary(32))


class LedgerHeadRow(Base):
    """Single row locked by every ledger batch: serializes sequencing across processes."""

    __tablename__ = "ledger_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    size: Mapped[int] = mapped_column(BigInteger)
    last_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    last_time: Mapped[str] = mapped_column(String(32))


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    size: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    root: Mapped[bytes] = mapped_column(LargeBinary(32))
    note: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class AccessRequestRow(Base):
    """A consumer's request for access: datasets, operations, purpose, duration, justification."""

    __tablename__ = "access_requests"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    consumer: Mapped[str] = mapped_column(ForeignKey("principals.key_id"), index=True)
    zone: Mapped[str] = mapped_column(ForeignKey("zones.name"), index=True)
    datasets: Mapped[list[str]] = mapped_column(JSON)
    operations: Mapped[list[str]] = mapped_column(JSON)
    purpose: Mapped[str] = mapped_column(String(200))
    duration_seconds: Mapped[int] = mapped_column(BigInteger)
    justification: Mapped[str] = mapped_column(Text)
    #: pending | awaiting_operator | approved | rejected | withdrawn
    status: Mapped[str] = mapped_column(String(20), default="pending")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    decided_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    decided_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    #: the provider's signed approval (DSSE envelope, JSON) while the operator's is awaited
    provider_approval: Mapped[str | None] = mapped_column(Text, nullable=True)
    grant_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class GrantRow(Base):
    """An approved request: its policy rows carry ``id`` as their rule id."""

    __tablename__ = "grants"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("access_requests.id"), unique=True)
    consumer: Mapped[str] = mapped_column(ForeignKey("principals.key_id"), index=True)
    zone: Mapped[str] = mapped_column(ForeignKey("zones.name"), index=True)
    datasets: Mapped[list[str]] = mapped_column(JSON)
    operations: Mapped[list[str]] = mapped_column(JSON)
    purpose: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: the signed approvals (a JSON list of DSSE envelopes), provider first
    approvals: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    #: active | revoked
    status: Mapped[str] = mapped_column(String(16), default="active")
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    revoke_reason: Mapped[str | None] = mapped_column(Text, nullable=True)


class ConsentRow(Base):
    """A data subject's authorization of a consumer for a purpose, recorded by the provider.

    The subject is stored only as a keyed digest (HMAC-SHA-256 under the zone's secret salt).
    """

    __tablename__ = "consents"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    zone: Mapped[str] = mapped_column(ForeignKey("zones.name"))
    subject_digest: Mapped[str] = mapped_column(String(64))
    #: the key that made ``subject_digest``: 0 the zone's raw salt (legacy), 1 the derived
    #: consent-digest key (migration 0008)
    digest_version: Mapped[int] = mapped_column(Integer, default=1, server_default="0")
    consumer: Mapped[str] = mapped_column(ForeignKey("principals.key_id"))
    purpose: Mapped[str] = mapped_column(String(200))
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    #: active | withdrawn
    status: Mapped[str] = mapped_column(String(16), default="active")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    recorded_by: Mapped[str] = mapped_column(String(64))
    withdrawn_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (Index("ix_consents_lookup", "zone", "subject_digest", "consumer"),)


class AnalysisRulesRow(Base):
    """A version of a dataset's analysis rules (:mod:`exchange.node.analysis`); the highest
    applies."""

    __tablename__ = "analysis_rules"
    __table_args__ = (UniqueConstraint("zone", "dataset", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    zone: Mapped[str] = mapped_column(ForeignKey("zones.name"))
    dataset: Mapped[str] = mapped_column(String(64))
    version: Mapped[int] = mapped_column(Integer)
    rules: Mapped[dict[str, Any]] = mapped_column(JSON)
    set_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BudgetRow(Base):
    """Privacy budget spent by one consumer on one dataset in one refresh window.

    ``spent`` is a decimal string (exact accounting, no binary floats). Charges run inside the
    ledger batch that records the release, so concurrent queries serialize on the ledger head.
    """

    __tablename__ = "privacy_budgets"
    __table_args__ = (UniqueConstraint("consumer", "zone", "dataset", "window_start"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    consumer: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(64))
    window_start: Mapped[int] = mapped_column(BigInteger)
    spent: Mapped[str] = mapped_column(String(64))
    #: δ spent by gates over groups found in the data (decimal string)
    delta_spent: Mapped[str] = mapped_column(String(64), default="0", server_default="0")


class PsiSessionRow(Base):
    """One private-join session (:mod:`exchange.server.compute.psi`): who, on what, and how far it
    got.

    Only counts and digests are stored here. Blinded points and ciphertexts live in files under
    ``DATA_DIR/psi/<id>/`` and the provider's session scalar under the zone's directory; both
    are deleted when the session ends, fails or expires.
    """

    __tablename__ = "psi_sessions"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    consumer: Mapped[str] = mapped_column(String(64))
    zone: Mapped[str] = mapped_column(String(64))
    dataset: Mapped[str] = mapped_column(String(64))
    #: cardinality | members | aggregate
    mode: Mapped[str] = mapped_column(String(16))
    purpose: Mapped[str] = mapped_column(String(200))
    #: open | matched | done | failed | expired
    state: Mapped[str] = mapped_column(String(16))
    #: the last protocol step completed (create, a, b, result)
    step: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime())
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: |X| as sent by the consumer and |Y| as read by the zone
    x_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    y_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    #: points received so far in the consumer's two uploads (A, then B^c)
    a_received: Mapped[int] = mapped_column(BigInteger, default=0)
    bc_received: Mapped[int] = mapped_column(BigInteger, default=0)
    #: SHA-256 digests of the messages (a, a_prime, b, b_c, chunks), for receipts and replays
    digests: Mapped[dict[str, Any]] = mapped_column(JSON)
    #: the canonical parameters (sum columns, epsilon) as JSON
    params: Mapped[dict[str, Any]] = mapped_column(JSON)
    context_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: a reason code when the session failed
    error: Mapped[str | None] = mapped_column(String(200), nullable=True)

    __table_args__ = (Index("ix_psi_sessions_expiry", "state", "expires_at"),)


class ModelCommitmentRow(Base):
    """A consumer's commitment to a scoring model (:mod:`exchange.server.compute.score`).

    ``commitment`` is the SHA-256 of the canonical public document (feature names, link,
    parameter set and a hiding digest of the weights); the weights themselves never reach the
    exchange. ``he_score`` names the commitment and its receipt cites it.
    """

    __tablename__ = "he_models"

    commitment: Mapped[str] = mapped_column(String(64), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), index=True)
    document: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class NodeRow(Base):
    """A provider's zone node: its key (also a principal of kind ``node``), the zone it hosts,
    and when it last called in. ``pending`` until the operator approves it; one ``active`` node
    per zone."""

    __tablename__ = "nodes"

    key_id: Mapped[str] = mapped_column(ForeignKey("principals.key_id"), primary_key=True)
    zone: Mapped[str] = mapped_column(ForeignKey("zones.name"), index=True)
    #: pending | active | retired
    status: Mapped[str] = mapped_column(String(16))
    registered_by: Mapped[str] = mapped_column(String(64))
    approved_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: the start of the node's latest poll (None: never called in)
    last_seen: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class NodeTaskRow(Base):
    """One task dispatched to a zone node (:mod:`exchange.server.dispatch`).

    ``bundle`` is what the node receives (the task, its authorization entry, inclusion proof and
    checkpoint); ``outcome`` what it answered (a node-signed result envelope, or a refusal).
    """

    __tablename__ = "node_tasks"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    zone: Mapped[str] = mapped_column(String(64))
    node: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    #: queued | started | done | refused | terminated
    status: Mapped[str] = mapped_column(String(16))
    bundle: Mapped[dict[str, Any]] = mapped_column(JSON)
    outcome: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    __table_args__ = (Index("ix_node_tasks_node_status", "node", "status"),)


class LedgerTileRow(Base):
    """One C2SP tlog-tiles hash tile: up to 256 concatenated 32-byte hashes."""

    __tablename__ = "ledger_tiles"

    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    hashes: Mapped[bytes] = mapped_column(LargeBinary)


class WitnessRow(Base):
    """A witness the exchange asks to cosign its checkpoints (c2sp.org/tlog-witness), and how
    far it got (:mod:`exchange.server.cosigning`).

    ``cosigned_size`` is the size of the latest checkpoint the witness cosigned for this log, as
    far as the exchange knows (the next submission's old size); ``retry_at`` delays the next
    attempt after failures; ``lease_until`` lets one process at a time submit to it.
    """

    __tablename__ = "ledger_witnesses"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    #: the C2SP vkey (type 0x04 or 0x01) that checks its cosignatures
    verifier_key: Mapped[str] = mapped_column(Text)
    #: one key is one witness: the Ed25519 cosigned message does not name the witness
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    added_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    cosigned_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    cosigned_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class ChainChildRow(Base):
    """A child exchange of the catalog chain (a district under a city, a street under a
    district) whose checkpoints this exchange records (:mod:`exchange.server.chain`).

    ``size``, ``root`` and ``note`` are the latest checkpoint recorded for it (a
    ``chain.checkpoint`` entry, ``recorded_seq``); ``published`` the catalog it published, as
    the signed envelope received; ``fork_*`` the latest checkpoint it showed that does not
    extend the recorded one (a ``chain.fork`` entry, ``fork_seq``). ``retry_at`` delays the
    next poll after failures; ``lease_until`` lets one process at a time poll it.
    """

    __tablename__ = "chain_children"

    name: Mapped[str] = mapped_column(String(63), primary_key=True)
    url: Mapped[str] = mapped_column(Text)
    #: the child's log verifier key (C2SP vkey, type 0x01): its log.pub
    log_key: Mapped[str] = mapped_column(Text)
    #: one log key is one child
    public_key: Mapped[bytes] = mapped_column(LargeBinary(32), unique=True)
    added_by: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    root: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    recorded_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    recorded_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    published: Mapped[str | None] = mapped_column(Text, nullable=True)
    published_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    published_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    fork_size: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fork_root: Mapped[bytes | None] = mapped_column(LargeBinary(32), nullable=True)
    fork_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    fork_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    fork_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class XborderSubjectRow(Base):
    """A data subject whose personal information a provider sent abroad in a calendar year
    (China Standard Time), as a digest under the provider's cross-border subject key (never the
    id): one row per subject, so a subject is counted once (:mod:`exchange.server.xborder`)."""

    __tablename__ = "xborder_subjects"

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    digest: Mapped[bytes] = mapped_column(LargeBinary(32), primary_key=True)
    #: personal information (not sensitive) of the subject left
    personal: Mapped[bool] = mapped_column(Boolean)
    #: sensitive personal information of the subject left
    sensitive: Mapped[bool] = mapped_column(Boolean)
    first_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class XborderCountRow(Base):
    """The counts of :class:`XborderSubjectRow` flags per (provider, year), kept in the same
    transaction as the rows."""

    __tablename__ = "xborder_counts"

    provider: Mapped[str] = mapped_column(String(64), primary_key=True)
    year: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    personal: Mapped[int] = mapped_column(BigInteger, default=0)
    sensitive: Mapped[int] = mapped_column(BigInteger, default=0)


class XborderApprovalRow(Base):
    """A compliance approval the operator recorded for a provider: a standard contract filing,
    a certification or a security assessment, with the document's SHA-256 and the operator's
    signed envelope over the terms."""

    __tablename__ = "xborder_approvals"
    __table_args__ = (Index("ix_xborder_approvals_provider", "provider", "document"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    provider: Mapped[str] = mapped_column(ForeignKey("principals.key_id"))
    #: contract | certification | assessment
    document: Mapped[str] = mapped_column(String(16))
    document_digest: Mapped[str] = mapped_column(String(64))
    valid_from: Mapped[datetime] = mapped_column(UTCDateTime())
    valid_until: Mapped[datetime] = mapped_column(UTCDateTime())
    envelope: Mapped[str] = mapped_column(Text)
    recorded_by: Mapped[str] = mapped_column(String(64))
    recorded_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: active | revoked
    status: Mapped[str] = mapped_column(String(16), default="active")


class IncidentRow(Base):
    """An incident the monitor (or the operator) opened, with the response taken
    (docs/incidents.md). Unique on (detector, subject, last_seq): a monitor that reads the same
    entries again opens nothing twice."""

    __tablename__ = "incidents"
    __table_args__ = (
        UniqueConstraint("detector", "subject", "last_seq", name="uq_incidents_evidence"),
        Index("ix_incidents_subject", "subject", "response"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    detector: Mapped[str] = mapped_column(String(32))
    severity: Mapped[str] = mapped_column(String(16))
    #: alert | throttle | suspend
    response: Mapped[str] = mapped_column(String(16))
    #: the key id concerned, "" when the finding names nobody
    subject: Mapped[str] = mapped_column(String(64), default="")
    zone: Mapped[str | None] = mapped_column(String(63), nullable=True)
    first_seq: Mapped[int] = mapped_column(BigInteger)
    last_seq: Mapped[int] = mapped_column(BigInteger)
    opened_by: Mapped[str] = mapped_column(String(64))
    opened_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    #: the seq of the incident.opened entry
    opened_seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    throttled_until: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    #: open | resolved (the suspended principal was reinstated)
    status: Mapped[str] = mapped_column(String(16), default="open")
    #: None until a person labels it: "true" | "false" (positive)
    label: Mapped[str | None] = mapped_column(String(8), nullable=True)
    labelled_by: Mapped[str | None] = mapped_column(String(64), nullable=True)


class ReinstatementApprovalRow(Base):
    """A second person's approval to reinstate a principal the monitor suspended; used once."""

    __tablename__ = "reinstatement_approvals"
    __table_args__ = (Index("ix_reinstatement_approvals_principal", "principal", "used"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    principal: Mapped[str] = mapped_column(String(64))
    approver: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    seq: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    used: Mapped[bool] = mapped_column(Boolean, default=False)
