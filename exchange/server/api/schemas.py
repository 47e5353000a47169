"""Wire schemas of the HTTP API (pydantic). Mapped explicitly from domain objects."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from crypto.encoding import b64url_encode
from crypto.envelope import Envelope
from exchange.domain import Dataset, Principal, Zone
from exchange.node.analysis import EXACT_RELEASE_NOTE
from exchange.node.store import row_count_band
from exchange.server.access import AccessRequest, Consent, Grant

Name = Annotated[str, Field(min_length=1, max_length=128)]
Text = Annotated[str, Field(max_length=4000)]


class In(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Out(BaseModel):
    model_config = ConfigDict(frozen=True)


class PrincipalIn(In):
    name: Name
    kind: Annotated[str, Field(max_length=16)]
    #: raw 32-byte Ed25519 public key, unpadded base64url
    public_key: Annotated[str, Field(min_length=43, max_length=43)]
    #: ISO 3166-1 alpha-2; default: the operator's jurisdiction setting
    jurisdiction: Annotated[str, Field(min_length=2, max_length=2)] | None = None
    #: a critical information infrastructure operator
    ciio: bool = False


class PrincipalOut(Out):
    key_id: str
    name: str
    kind: str
    status: str
    created_at: datetime
    #: ISO 3166-1 alpha-2; null: registered before jurisdictions, the operator's setting
    jurisdiction: str | None = None
    ciio: bool = False

    @classmethod
    def from_domain(cls, p: Principal) -> PrincipalOut:
        return cls(
            key_id=p.key_id,
            name=p.name,
            kind=p.kind.value,
            status=p.status,
            created_at=p.created_at,
            jurisdiction=p.jurisdiction,
            ciio=p.ciio,
        )


class StatusIn(In):
    status: Annotated[str, Field(max_length=16)]


class ZoneIn(In):
    name: Annotated[str, Field(min_length=2, max_length=63)]
    description: Text = ""


class ColumnOut(Out):
    name: str
    type: str
    level: str
    #: personal-information class: none | personal | sensitive
    pi: str = "none"


class DatasetOut(Out):
    zone: str
    name: str
    description: str
    subject_column: str
    columns: list[ColumnOut]
    level: str
    row_count_band: str
    digest: str
    source: str
    created_at: datetime
    #: the provider opted out of DP by default at L3 (its rules set exact_release)
    exact_release: bool = False
    #: "exact: differencing possible" when it did
    release_note: str | None = None

    @classmethod
    def from_domain(cls, d: Dataset) -> DatasetOut:
        return cls(
            zone=d.zone,
            name=d.name,
            description=d.description,
            subject_column=d.subject_column,
            columns=[
                ColumnOut(name=c.name, type=c.type, level=c.level, pi=c.pi) for c in d.columns
            ],
            level=d.level,
            row_count_band=row_count_band(d.row_count),
            digest=d.digest,
            source=d.source,
            created_at=d.created_at,
            exact_release=d.exact_release,
            release_note=EXACT_RELEASE_NOTE if d.exact_release else None,
        )


class ZoneOut(Out):
    name: str
    owner: str
    owner_name: str
    description: str
    public_key: str
    status: str
    created_at: datetime
    datasets: list[DatasetOut]

    @classmethod
    def from_domain(cls, z: Zone) -> ZoneOut:
        return cls(
            name=z.name,
            owner=z.owner,
            owner_name=z.owner_name,
            description=z.description,
            public_key=b64url_encode(z.public_key),
            status=z.status,
            created_at=z.created_at,
            datasets=[DatasetOut.from_domain(d) for d in z.datasets],
        )


class CatalogOut(Out):
    zones: list[ZoneOut]


class AttachIn(In):
    url: Annotated[str, Field(min_length=1, max_length=2000)]
    table: Annotated[str, Field(min_length=1, max_length=128)]


class CsvIn(In):
    """How an uploaded CSV file is written: field delimiter (one character, tab included),
    encoding (utf-8, utf-8-sig, gb18030, gbk, big5, latin-1) and header renames."""

    delimiter: Annotated[str, Field(min_length=1, max_length=1)] = ","
    encoding: Annotated[str, Field(min_length=1, max_length=20)] = "utf-8"
    #: a header name in the file -> the column name to import it as
    rename: Annotated[
        dict[Annotated[str, Field(max_length=200)], Annotated[str, Field(max_length=63)]],
        Field(max_length=1000),
    ] = Field(default_factory=dict)


class DatasetIn(In):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    description: Text = ""
    subject_column: Annotated[str, Field(min_length=1, max_length=128)]
    levels: Annotated[dict[Annotated[str, Field(max_length=128)], str], Field(max_length=1000)]
    #: column -> personal-information class (personal | sensitive); unnamed columns: none
    pi: Annotated[
        dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=16)]],
        Field(max_length=1000),
    ] = Field(default_factory=dict)
    upload_id: Annotated[str, Field(min_length=32, max_length=32)] | None = None
    attach: AttachIn | None = None
    #: for a CSV upload: how the file is written (default: UTF-8, comma, headers as they are)
    csv: CsvIn | None = None


class UploadOut(Out):
    upload_id: str
    sha256: str
    bytes: int
    format: str


class InclusionProofOut(Out):
    seq: int
    size: int
    leaf_hash: str
    proof: list[str]


class ConsistencyProofOut(Out):
    size1: int
    size2: int
    proof: list[str]


class EntryOut(Out):
    seq: int
    #: the entry's exact canonical JSON text
    entry: str


# -- access workflow --------------------------------------------------------------------------

Token = Annotated[str, Field(min_length=1, max_length=200)]


class AccessRequestIn(In):
    zone: Annotated[str, Field(min_length=2, max_length=63)]
    datasets: Annotated[list[Token], Field(min_length=1, max_length=100)]
    operations: Annotated[list[Token], Field(min_length=1, max_length=10)]
    purpose: Token
    #: bounded by the service alone (exchange.server.access.MIN_DURATION .. MAX_DURATION), whose
    #: problem names the field: one check per bound
    duration_seconds: int
    justification: Text


class AccessRequestOut(Out):
    id: str
    consumer: str
    zone: str
    datasets: list[str]
    operations: list[str]
    purpose: str
    duration_seconds: int
    justification: str
    status: str
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    reason: str | None
    grant_id: str | None
    #: the consumer's registered name
    consumer_name: str | None = None
    #: while ``status`` is ``awaiting_operator``: the exact terms the provider signed
    #: (datasets, operations, purpose, not_after, approver), which the operator's approval
    #: must repeat; null otherwise
    pending_terms: dict[str, Any] | None = None

    @classmethod
    def from_domain(cls, r: AccessRequest) -> AccessRequestOut:
        return cls(
            id=r.id,
            consumer=r.consumer,
            zone=r.zone,
            datasets=list(r.datasets),
            operations=list(r.operations),
            purpose=r.purpose,
            duration_seconds=r.duration_seconds,
            justification=r.justification,
            status=r.status,
            created_at=r.created_at,
            decided_at=r.decided_at,
            decided_by=r.decided_by,
            reason=r.reason,
            grant_id=r.grant_id,
            consumer_name=r.consumer_name,
            pending_terms=dict(r.pending_terms) if r.pending_terms is not None else None,
        )


class ApproveIn(In):
    #: a DSSE envelope over :func:`exchange.server.access.approval_payload`, signed by the approver
    approval: Envelope


class ReasonIn(In):
    reason: Annotated[str, Field(min_length=1, max_length=2000)]


class GrantOut(Out):
    id: str
    request_id: str
    consumer: str
    zone: str
    datasets: list[str]
    operations: list[str]
    purpose: str
    expires_at: datetime
    created_at: datetime
    status: str
    approved_by: list[str]
    revoked_at: datetime | None
    revoke_reason: str | None
    #: the consumer's registered name
    consumer_name: str | None = None

    @classmethod
    def from_domain(cls, g: Grant) -> GrantOut:
        return cls(
            id=g.id,
            request_id=g.request_id,
            consumer=g.consumer,
            zone=g.zone,
            datasets=list(g.datasets),
            operations=list(g.operations),
            purpose=g.purpose,
            expires_at=g.expires_at,
            created_at=g.created_at,
            status=g.status,
            approved_by=list(g.approved_by),
            revoked_at=g.revoked_at,
            revoke_reason=g.revoke_reason,
            consumer_name=g.consumer_name,
        )


class CeilingsIn(In):
    #: per level, the operations allowed at most (a subset of the default ceiling)
    ceilings: Annotated[dict[Token, list[Token]], Field(max_length=6)]


class CeilingsOut(Out):
    ceilings: dict[str, list[str]]


class ConsentIn(In):
    """One consent: ``subject`` (the id) for a zone the exchange hosts, or ``subject_digest``
    (its consent digest, made by the zone's node with its key) for a node-hosted zone."""

    subject: Annotated[str | None, Field(min_length=1, max_length=512)] = None
    subject_digest: Annotated[str | None, Field(pattern=r"^[0-9a-f]{64}$")] = None
    #: the consumer's key id, a unique prefix of it (6+ characters), or its registered name
    consumer: Annotated[str, Field(min_length=1, max_length=128)]
    purpose: Token
    expires_at: datetime


class ConsentImportIn(In):
    """Many consents at once, all or nothing (``POST /v1/zones/{zone}/consents/import``);
    at most ``max_consent_import_rows`` per call."""

    consents: Annotated[list[ConsentIn], Field(min_length=1)]


class ConsentImportOut(Out):
    """The consents recorded by an import: their ids in the order of the rows given (subjects
    are never echoed, not even digested)."""

    zone: str
    recorded: int
    ids: list[str]


class ConsentOut(Out):
    """A consent as answered: named by its id. The subject's keyed digest stays in the
    exchange (no answer carries a keyed digest of a string the caller chose)."""

    id: str
    zone: str
    consumer: str
    purpose: str
    expires_at: datetime
    status: str
    created_at: datetime
    withdrawn_at: datetime | None
    #: the consumer's registered name
    consumer_name: str | None = None

    @classmethod
    def from_domain(cls, c: Consent) -> ConsentOut:
        return cls(
            id=c.id,
            zone=c.zone,
            consumer=c.consumer,
            purpose=c.purpose,
            expires_at=c.expires_at,
            status=c.status,
            created_at=c.created_at,
            withdrawn_at=c.withdrawn_at,
            consumer_name=c.consumer_name,
        )


class PurposeIn(In):
    purpose: Token


class AggregateIn(In):
    #: one SELECT over the zone's datasets (checked against the analysis rules)
    sql: Annotated[str, Field(min_length=1, max_length=20_000)]
    purpose: Token
    #: ε as a decimal string: asks for differential privacy, or sets the ε of a query that
    #: must be private (default 0.1); parsed by exchange.node.dp.parse_epsilon alone, which answers
    #: a bad one with a reason code
    epsilon: Annotated[str | None, Field(max_length=32)] = None


class RulesIn(In):
    #: an analysis-rules document (see docs/analysis-rules.md); ``version`` is assigned
    rules: dict[str, Any]


class RulesOut(Out):
    zone: str
    dataset: str
    version: int
    default: bool
    rules: dict[str, Any]


class BudgetOut(Out):
    zone: str
    dataset: str
    budget: str
    spent: str
    remaining: str
    window_start: str
    window_end: str
    dp_required: bool
    rules_version: int


class EnvelopeSignatureOut(Out):
    keyid: str = Field(description="the signer's key id (hex SHA-256 of its public key)")
    sig: str = Field(description="Ed25519 signature over the DSSE PAE, unpadded base64url")


class EnvelopeOut(Out):
    """A DSSE envelope: the signature covers ``DSSEv1 <len> <payloadType> <len> <payload>``."""

    payloadType: str = Field(description="`application/vnd.zonex.receipt+json` for receipts")
    payload: str = Field(description="unpadded base64url of the canonical (RFC 8785) JSON")
    signatures: list[EnvelopeSignatureOut]


class InclusionOut(Out):
    index: int = Field(description="the ledger entry's sequence number")
    size: int = Field(description="the tree size of the checkpoint the proof is against")
    proof: list[str] = Field(description="RFC 9162 inclusion proof, unpadded base64url hashes")


class ReceiptOut(Out):
    """A receipt bundle (:mod:`crypto.receipt`): the exchange's signed statement of what was
    computed, the ledger entry that records it and its inclusion in a signed checkpoint.
    Verifiable offline with the log's key (``zonex receipt verify``)."""

    model_config = ConfigDict(frozen=True, extra="allow")

    type: str = Field(description="`zonex.receipt-bundle.v1`")
    statement: EnvelopeOut = Field(
        description="DSSE envelope signed by the log key over the statement: kind, consumer, "
        "zones, datasets with snapshot digests, query digest, grant, policy and rules "
        "versions, k, epsilon, output level, result_digest, time, ledger_index"
    )
    entry: str = Field(description="the ledger entry's exact canonical JSON, unpadded base64url")
    inclusion: InclusionOut
    checkpoint: str = Field(description="the signed checkpoint (C2SP signed-note text)")


class ComputationOut(Out):
    #: the result document; its canonical JSON hashes to the receipt's ``result_digest``
    result: dict[str, Any] = Field(
        description="the released result; its RFC 8785 canonical JSON hashes (SHA-256) to "
        "the statement's result_digest"
    )
    #: a receipt bundle (:mod:`crypto.receipt`), verifiable offline with ``log.pub``
    receipt: ReceiptOut


class ExportOut(ComputationOut):
    #: a node-hosted dataset's rows, sealed to the consumer (the result names their digests)
    sealed: str | None = Field(
        default=None,
        description="for a dataset hosted on its zone's node: the rows' canonical JSON in a "
        "libsodium sealed box to the X25519 form of the consumer's Ed25519 key, unpadded "
        "base64url (the result then holds row_count, rows_sha256 and sealed_sha256, not rows); "
        "null when the exchange read the rows",
    )


class ProblemOut(BaseModel):
    """An RFC 9457 problem (``application/problem+json``), the body of every 4xx and 5xx. Some
    carry more members: ``reason`` (a stable refusal code), ``errors``, counts."""

    model_config = ConfigDict(frozen=True, extra="allow", title="Problem")

    type: str = Field(description="`urn:zonex:problem:<code>`")
    title: str = Field(description="a short, fixed summary of the error class")
    status: int = Field(description="the HTTP status, repeated")
    detail: str = Field(description="what was wrong in this request and what to do")
    code: str = Field(
        description="stable error class: verification_failed, denied, forbidden, not_found, "
        "conflict, payload_too_large, unsupported_media_type, invalid_input, "
        "budget_exhausted, unavailable, ..."
    )
    reason: str | None = Field(
        default=None,
        description="a stable refusal code within the class (e.g. not_granted, dp_required, "
        "bad_point); docs/api-psi-he.md lists those of the PSI and HE routes",
    )
    errors: list[dict[str, Any]] | None = Field(
        default=None,
        description="on 422 invalid_input from body validation: up to 20 of "
        '`{"loc": [...], "msg": "..."}`, naming each field that is wrong; a refused consent '
        'import (reason `bad_rows`) names rows as `{"loc": ["rows", index, field], "row": '
        'index, "msg": ...}` (0-based) with `invalid_rows` and `problems` counting them all',
    )


#: the one schema of every problem document: ``components.schemas.Problem`` in the OpenAPI
#: document (:mod:`exchange.server.api.openapi`), referenced by every error answer
PROBLEM_COMPONENT: dict[str, Any] = ProblemOut.model_json_schema()
PROBLEM_REF = "#/components/schemas/Problem"

#: declared on every operation: each error answer is a problem document
PROBLEM_RESPONSES: dict[int | str, dict[str, Any]] = {
    key: {
        "description": description,
        "content": {"application/problem+json": {"schema": {"$ref": PROBLEM_REF}}},
    }
    for key, description in (
        (
            "4XX",
            "Refused: unauthenticated (401), denied (403), not found (404), conflict "
            "(409), too large (413), unsupported media type (415), invalid input (422), privacy "
            "budget exhausted (429)",
        ),
        ("5XX", "The exchange failed (500) or cannot record evidence (503)"),
    )
}
