"""The access workflow: requests, signed approvals, grants, revocation, consents, suspensions,
ceilings, and the authorization every data call goes through.

Flow (DESIGN, "Policy"): a consumer files an **access request** (datasets, operations, purpose,
duration, justification) → the zone's provider signs an **approval** (a DSSE envelope over the
exact terms; important data also needs the operator's) → the exchange creates a **grant**: policy
rows with an expiry, written in the same transaction as the ledger entry that records them → the
provider (or the operator) may **revoke** it at any time.

:func:`authorize` is the only way a computation reaches data. It builds the decision request
from the registry (level, zone, ceilings) and the server's clock, asks the per-process policy
cache, records a denial on the ledger with the full decision, and raises
:class:`~exchange.errors.DeniedError` carrying only the reason code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from crypto.canonical import canonicalize
from crypto.envelope import Envelope, verify_envelope
from crypto.errors import VerificationError
from crypto.keys import VerifyKey
from exchange import subjects
from exchange.domain import (
    APPROVAL_TYPE,
    PROVIDER_KINDS,
    Principal,
    PrincipalKind,
    approval_payload,
)
from exchange.errors import (
    ConflictError,
    DeniedError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    ThrottledError,
)
from exchange.server.ledger import EntryDraft
from exchange.server.models import (
    AccessRequestRow,
    ConsentRow,
    DatasetRow,
    GrantRow,
    NodeRow,
    PrincipalRow,
    ZoneRow,
)
from exchange.server.observability import record_decision
from exchange.server.policystore import add_rules, remove_rules
from exchange.server.registry import to_principal
from exchange.server.runtime import Exchange
from policy import (
    DEFAULT_CEILINGS,
    CeilingError,
    Decision,
    DecisionRequest,
    Level,
    Operation,
    Reason,
    grant_rows,
    suspend_principal_row,
    suspend_zone_row,
    tighten,
)
from policy.errors import UnknownPurposeError, UnknownRuleError
from policy.levels import Ceilings

__all__ = [
    "APPROVAL_TYPE",
    "MAX_DURATION",
    "MIN_DURATION",
    "AccessRequest",
    "Authorization",
    "Consent",
    "ConsentDraft",
    "Grant",
    "approval_payload",
    "approve_request",
    "authorize",
    "effective_ceilings",
    "file_request",
    "has_live_consent",
    "import_consents",
    "list_consents",
    "list_grants",
    "list_requests",
    "live_consents",
    "record_consent",
    "reject_request",
    "revoke_grant",
    "set_ceilings",
    "set_zone_status",
    "subject_digest",
    "withdraw_consent",
]

MIN_DURATION = 60
MAX_DURATION = 366 * 24 * 3600
#: every status an access request can have
REQUEST_STATUSES = ("pending", "awaiting_operator", "approved", "rejected", "withdrawn")
#: an approval's ``not_after`` may run this much past ``now + duration`` (clock skew, signing)
APPROVAL_SLACK = timedelta(seconds=300)
#: live_consents scans a zone's consents when they are at most this many per asked digest
_CONSENT_SCAN_FACTOR = 4
_HEX64 = re.compile(r"[0-9a-f]{64}")


# -- domain objects ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AccessRequest:
    id: str
    consumer: str
    zone: str
    datasets: tuple[str, ...]
    operations: tuple[str, ...]
    purpose: str
    duration_seconds: int
    justification: str
    status: str
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None
    reason: str | None
    grant_id: str | None
    #: the consumer's registered name, shown next to its key id
    consumer_name: str | None = None
    #: while the operator's approval is awaited: the exact terms the provider signed, which
    #: the operator signs in turn (datasets, operations, purpose, not_after, the provider)
    pending_terms: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Grant:
    id: str
    request_id: str
    consumer: str
    zone: str
    datasets: tuple[str, ...]
    operations: tuple[str, ...]
    purpose: str
    expires_at: datetime
    created_at: datetime
    status: str
    approved_by: tuple[str, ...]
    revoked_at: datetime | None
    revoke_reason: str | None
    consumer_name: str | None = None

    def live(self, now: datetime) -> bool:
        return self.status == "active" and now < self.expires_at


@dataclass(frozen=True)
class Consent:
    id: str
    zone: str
    subject_digest: str
    consumer: str
    purpose: str
    expires_at: datetime
    status: str
    created_at: datetime
    withdrawn_at: datetime | None
    consumer_name: str | None = None


@dataclass(frozen=True)
class Authorization:
    """An allowed decision and the context it was made in; computations ledger ``record()``."""

    decision: Decision
    request: DecisionRequest
    level: Level
    digest: str  # the dataset's snapshot digest at decision time
    extra: dict[str, Any] = field(default_factory=dict)

    def attrs(self, prefix: str = "") -> dict[str, str | int]:
        """Ledger attrs naming the decision: rule, policy version, level, operation, purpose."""
        return {
            f"{prefix}rule": self.decision.rule or "",
            f"{prefix}policy_version": self.decision.policy_version,
            f"{prefix}level": self.level.value,
            f"{prefix}operation": str(self.request.operation),
            f"{prefix}purpose": self.request.purpose,
        }


def _now() -> datetime:
    return datetime.now(UTC)


def _pending_terms(row: AccessRequestRow) -> dict[str, Any] | None:
    """The provider's signed terms of a request awaiting the operator (stored after they
    verified), without the signature: what the operator's approval must repeat."""
    if row.status != "awaiting_operator" or row.provider_approval is None:
        return None
    payload = json.loads(Envelope.model_validate(json.loads(row.provider_approval)).payload_bytes())
    return {
        key: payload[key]
        for key in ("datasets", "operations", "purpose", "not_after", "approver")
        if key in payload
    }


def _to_request(row: AccessRequestRow, consumer_name: str | None = None) -> AccessRequest:
    return AccessRequest(
        id=row.id,
        consumer=row.consumer,
        zone=row.zone,
        datasets=tuple(row.datasets),
        operations=tuple(row.operations),
        purpose=row.purpose,
        duration_seconds=row.duration_seconds,
        justification=row.justification,
        status=row.status,
        created_at=row.created_at,
        decided_at=row.decided_at,
        decided_by=row.decided_by,
        reason=row.reason,
        grant_id=row.grant_id,
        consumer_name=consumer_name,
        pending_terms=_pending_terms(row),
    )


def _to_grant(row: GrantRow, consumer_name: str | None = None) -> Grant:
    return Grant(
        id=row.id,
        request_id=row.request_id,
        consumer=row.consumer,
        zone=row.zone,
        datasets=tuple(row.datasets),
        operations=tuple(row.operations),
        purpose=row.purpose,
        expires_at=row.expires_at,
        created_at=row.created_at,
        # an active grant past its end is shown as what it is (the policy row denies it too)
        status="expired" if row.status == "active" and row.expires_at <= _now() else row.status,
        approved_by=tuple(
            sig["keyid"] for env in row.approvals for sig in env.get("signatures", ())
        ),
        revoked_at=row.revoked_at,
        revoke_reason=row.revoke_reason,
        consumer_name=consumer_name,
    )


def _to_consent(row: ConsentRow, consumer_name: str | None = None) -> Consent:
    return Consent(
        id=row.id,
        zone=row.zone,
        subject_digest=row.subject_digest,
        consumer=row.consumer,
        purpose=row.purpose,
        expires_at=row.expires_at,
        status=row.status,
        created_at=row.created_at,
        withdrawn_at=row.withdrawn_at,
        consumer_name=consumer_name,
    )


# -- registry helpers -------------------------------------------------------------------------

#: an id may be given by a unique prefix of at least this many characters (like git)
MIN_ID_PREFIX = 6
#: at most this many rows are looked at for one prefix
_PREFIX_SCAN = 1000

_IdRow = TypeVar("_IdRow", AccessRequestRow, GrantRow, ConsentRow)


def _resolve(
    session: Session,
    model: type[_IdRow],
    given: str,
    what: str,
    visible: Callable[[_IdRow], bool],
) -> _IdRow:
    """The row named by ``given``: its exact id, else the one row the caller may see whose id
    starts with it. Rows the caller may not see are never counted or named, and a row the
    caller may not see is as absent as a row that does not exist (404 either way)."""
    row = session.get(model, given)
    if row is not None:
        if visible(row):
            return row
        raise NotFoundError(f"no such {what}")
    if len(given) >= MIN_ID_PREFIX:
        escaped = given.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = select(model).where(model.id.like(escaped + "%", escape="\\")).limit(_PREFIX_SCAN)
        found = [r for r in session.scalars(stmt) if visible(r)]
        if len(found) == 1:
            return found[0]
        if found:
            raise InvalidInputError(
                f"the id prefix {given!r} matches {len(found)} {what}s you can see; "
                "give more characters of the id",
                reason="ambiguous_id",
                candidates=len(found),
            )
    raise NotFoundError(f"no such {what}")


def _names_of(session: Session, key_ids: Iterable[str]) -> dict[str, str]:
    wanted = set(key_ids)
    if not wanted:
        return {}
    stmt = select(PrincipalRow.key_id, PrincipalRow.name).where(PrincipalRow.key_id.in_(wanted))
    return {str(row[0]): str(row[1]) for row in session.execute(stmt)}


def _zone(session: Session, name: str) -> ZoneRow:
    row = session.get(ZoneRow, name)
    if row is None:
        raise NotFoundError(f"no zone {name!r}")
    return row


def _dataset(session: Session, zone: str, name: str) -> DatasetRow:
    row = session.execute(
        select(DatasetRow).where(DatasetRow.zone == zone, DatasetRow.name == name)
    ).scalar_one_or_none()
    if row is None:
        raise NotFoundError(f"no dataset {name!r} in zone {zone!r}")
    return row


def _removed_to_allowed(removed: Mapping[str, Iterable[str]] | None) -> dict[Level, set[Operation]]:
    out: dict[Level, set[Operation]] = {}
    for level, ops in (removed or {}).items():
        lv = Level(level)
        out[lv] = set(DEFAULT_CEILINGS[lv]) - {Operation(op) for op in ops}
    return out


def effective_ceilings(zone: ZoneRow, dataset: DatasetRow | None) -> Ceilings:
    """The defaults narrowed by the zone's and the dataset's tightening."""
    return tighten(
        DEFAULT_CEILINGS,
        _removed_to_allowed(zone.ceilings),
        _removed_to_allowed(dataset.ceilings if dataset is not None else None),
    )


def _operations(ops: Iterable[str]) -> list[str]:
    out: list[str] = []
    for op in ops:
        try:
            out.append(Operation(op).value)
        except ValueError as exc:
            raise InvalidInputError(
                f"unknown operation {op!r}; use one of {', '.join(o.value for o in Operation)}"
            ) from exc
    if not out:
        raise InvalidInputError("name at least one operation")
    return sorted(set(out))


def _names(names: Iterable[str], what: str) -> list[str]:
    out = sorted(set(names))
    if not out:
        raise InvalidInputError(f"name at least one {what}")
    return out


def _purpose(ex: Exchange, purpose: str) -> str:
    try:
        return ex.policy.point.vocabulary.check(purpose)
    except (UnknownPurposeError, LookupError) as exc:
        raise InvalidInputError(f"unknown purpose {purpose!r}") from exc


def _check_ceilings(
    session: Session, zone: ZoneRow, datasets: Sequence[str], operations: Sequence[str]
) -> None:
    """Refuse operations above any dataset's (tightened) ceiling — at request and approval."""
    for name in datasets:
        ds = _dataset(session, zone.name, name)
        if ds.status == "retired":
            raise DeniedError("retired", f"dataset {name!r} was retired by its provider")
        ceilings = effective_ceilings(zone, ds)
        above = [op for op in operations if Operation(op) not in ceilings[Level(ds.level)]]
        if above:
            raise DeniedError(
                "level_ceiling",
                f"{', '.join(above)} is above the ceiling of dataset {name!r} ({ds.level})",
            )


# -- requests ---------------------------------------------------------------------------------


def file_request(
    ex: Exchange,
    actor: Principal,
    zone: str,
    datasets: Sequence[str],
    operations: Sequence[str],
    purpose: str,
    duration_seconds: int,
    justification: str,
) -> AccessRequest:
    """A consumer asks for access. Refuses operations above the datasets' ceilings right away."""
    if actor.kind not in PROVIDER_KINDS:
        raise ForbiddenError("only agencies and enterprises request access")
    ds = _names(datasets, "dataset")
    ops = _operations(operations)
    purpose = _purpose(ex, purpose)
    # the one check of this bound (the API schema and the CLI leave it to this one)
    if not MIN_DURATION <= duration_seconds <= MAX_DURATION:
        raise InvalidInputError(
            f"the duration must be from 1 minute to 366 days (duration_seconds "
            f"{MIN_DURATION} to {MAX_DURATION}); got {duration_seconds} seconds",
            field="duration_seconds",
        )
    justification = justification.strip()
    if not justification or len(justification) > 4000:
        raise InvalidInputError("a justification of 1-4000 characters is required")
    request_id = "req-" + secrets.token_hex(12)

    def apply(session: Session, draft: EntryDraft) -> AccessRequest:
        z = _zone(session, zone)
        if z.status != "active":
            raise DeniedError("suspended", "the zone is suspended")
        _check_ceilings(session, z, ds, ops)
        row = AccessRequestRow(
            id=request_id,
            consumer=actor.key_id,
            zone=zone,
            datasets=ds,
            operations=ops,
            purpose=purpose,
            duration_seconds=duration_seconds,
            justification=justification,
            status="pending",
        )
        session.add(row)
        session.flush()
        return _to_request(row)

    draft = EntryDraft(
        kind="access.requested",
        actor=actor.key_id,
        refs={"request": request_id, "zone": zone},
        digests={"justification": hashlib.sha256(justification.encode()).hexdigest()},
        attrs={
            "datasets": ",".join(ds),
            "operations": ",".join(ops),
            "purpose": purpose,
            "duration_seconds": duration_seconds,
        },
    )
    result: AccessRequest = ex.ledger.append(draft, apply).value
    return result


def _visible(actor: Principal, consumer: str, zone_owner: str) -> bool:
    return (
        actor.kind in (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR)
        or actor.key_id == consumer
        or actor.key_id == zone_owner
    )


def list_requests(
    ex: Exchange, actor: Principal, *, zone: str | None = None, status: str | None = None
) -> list[AccessRequest]:
    """Requests the actor may see: its own, those on zones it owns, or all (operator/auditor)."""
    with Session(ex.engine) as session:
        stmt = select(AccessRequestRow, ZoneRow.owner).join(
            ZoneRow, ZoneRow.name == AccessRequestRow.zone
        )
        if zone is not None:
            stmt = stmt.where(AccessRequestRow.zone == zone)
        if status is not None:
            if status not in REQUEST_STATUSES:
                raise InvalidInputError(
                    f"unknown status {status!r}; use one of {', '.join(REQUEST_STATUSES)}"
                )
            stmt = stmt.where(AccessRequestRow.status == status)
        rows = session.execute(stmt.order_by(AccessRequestRow.created_at)).all()
        shown = [r for r, owner in rows if _visible(actor, r.consumer, owner)]
        names = _names_of(session, (r.consumer for r in shown))
        return [_to_request(r, names.get(r.consumer)) for r in shown]


def _request_row(session: Session, actor: Principal, given: str) -> AccessRequestRow:
    """The request named by its id or a unique prefix of it (among those the actor sees)."""
    return _resolve(
        session,
        AccessRequestRow,
        given,
        "request",
        lambda r: _visible(actor, r.consumer, _zone(session, r.zone).owner),
    )


def get_request(ex: Exchange, actor: Principal, request_id: str) -> AccessRequest:
    """One request, by its id or a unique prefix of it."""
    with Session(ex.engine) as session:
        row = _request_row(session, actor, request_id)
        if not _visible(actor, row.consumer, _zone(session, row.zone).owner):
            raise NotFoundError("no such request")
        return _to_request(row, _names_of(session, [row.consumer]).get(row.consumer))


def _check_approval(
    envelope: Envelope, actor: Principal, public_key: bytes, row: AccessRequestRow, now: datetime
) -> tuple[dict[str, Any], datetime]:
    try:
        verifier = VerifyKey(public_key)
        payload = verify_envelope(envelope, APPROVAL_TYPE, {verifier.key_id: verifier})
    except VerificationError as exc:
        raise InvalidInputError(f"the approval does not verify: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("type") != "zonex.approval.v1":
        raise InvalidInputError("the approval payload is not a zonex.approval.v1 object")
    for key, want in (
        ("request", row.id),
        ("consumer", row.consumer),
        ("zone", row.zone),
        ("purpose", row.purpose),
        ("approver", actor.key_id),
    ):
        if payload.get(key) != want:
            raise InvalidInputError(f"the approval's {key} does not match the request")
    ds, ops = payload.get("datasets"), payload.get("operations")
    if not isinstance(ds, list) or not isinstance(ops, list) or not ds or not ops:
        raise InvalidInputError("the approval names datasets and operations")
    if not set(ds) <= set(row.datasets):
        raise InvalidInputError("the approval names datasets the request did not ask for")
    if not set(ops) <= set(row.operations):
        raise InvalidInputError("the approval names operations the request did not ask for")
    try:
        not_after = datetime.strptime(str(payload.get("not_after")), "%Y-%m-%dT%H:%M:%SZ")
    except ValueError as exc:
        raise InvalidInputError("the approval's not_after is not an RFC 3339 UTC time") from exc
    not_after = not_after.replace(tzinfo=UTC)
    if not_after <= now:
        raise InvalidInputError("the approval has already lapsed")
    if not_after > now + timedelta(seconds=row.duration_seconds) + APPROVAL_SLACK:
        raise InvalidInputError("the approval runs longer than the requested duration")
    return payload, not_after


def approve_request(
    ex: Exchange, actor: Principal, request_id: str, envelope: Envelope
) -> AccessRequest:
    """The zone's provider (and, for important data, then the operator) approves a request with
    a signed approval. The last required approval creates the grant and its policy rows."""
    now = _now()

    def apply(session: Session, draft: EntryDraft) -> AccessRequest:
        row = _request_row(session, actor, request_id)
        draft.refs["request"] = row.id
        zone = _zone(session, row.zone)
        if actor.key_id == row.consumer:
            raise ForbiddenError("no one approves their own request")
        if row.status == "pending":
            if actor.key_id != zone.owner:
                raise ForbiddenError("only the zone's provider approves requests on it")
        elif row.status == "awaiting_operator":
            if actor.kind != PrincipalKind.OPERATOR:
                raise ForbiddenError("important data: the operator's approval is awaited")
        else:
            raise ConflictError(f"the request is {row.status}")
        if zone.status != "active":
            raise DeniedError("suspended", "the zone is suspended")
        consumer = session.get(PrincipalRow, row.consumer)
        if consumer is None or consumer.status != "active":
            raise DeniedError("suspended", "the consumer is suspended")
        key = session.get(PrincipalRow, actor.key_id)
        assert key is not None
        payload, not_after = _check_approval(envelope, actor, bytes(key.public_key), row, now)
        datasets, operations = sorted(payload["datasets"]), sorted(payload["operations"])
        _check_ceilings(session, zone, datasets, operations)
        draft.digests["approval"] = hashlib.sha256(
            canonicalize(envelope.model_dump(mode="json"))
        ).hexdigest()
        important = any(
            Level(_dataset(session, zone.name, d).level) >= Level.IMPORTANT for d in datasets
        )
        if row.status == "pending" and important and actor.kind != PrincipalKind.OPERATOR:
            row.status = "awaiting_operator"
            row.provider_approval = canonicalize(envelope.model_dump(mode="json")).decode()
            draft.kind = "access.approved_by_provider"
            session.flush()
            return _to_request(row)
        if row.status == "awaiting_operator" and row.provider_approval is not None:
            first = json.loads(row.provider_approval)
            # the operator must sign the same terms the provider did
            provider_terms = Envelope.model_validate(first).payload_bytes()
            mine = dict(payload, approver=None)
            theirs = dict(json.loads(provider_terms), approver=None)
            if mine != theirs:
                differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
                raise InvalidInputError(
                    f"the operator's approval differs from the provider's in {', '.join(differ)}: "
                    "sign the request's pending_terms as they are (zonex approve does)",
                    reason="terms_differ",
                )
            approvals = [first, envelope.model_dump(mode="json")]
        else:
            approvals = [envelope.model_dump(mode="json")]
        grant_id = "grant:" + secrets.token_hex(12)
        rows = grant_rows(
            grant_id,
            subject=row.consumer,
            zone=row.zone,
            datasets=datasets,
            operations=operations,
            purpose=row.purpose,
            expires=not_after,
        )
        version = add_rules(session, rows, vocabulary=ex.policy.point.vocabulary)
        session.add(
            GrantRow(
                id=grant_id,
                request_id=row.id,
                consumer=row.consumer,
                zone=row.zone,
                datasets=datasets,
                operations=operations,
                purpose=row.purpose,
                expires_at=not_after,
                approvals=approvals,
                status="active",
            )
        )
        row.status = "approved"
        row.decided_at = now
        row.decided_by = actor.key_id
        row.grant_id = grant_id
        row.provider_approval = None
        draft.kind = "grant.created"
        draft.refs.update({"grant": grant_id, "consumer": row.consumer, "zone": row.zone})
        draft.attrs.update(
            {
                "datasets": ",".join(datasets),
                "operations": ",".join(operations),
                "purpose": row.purpose,
                "expires": payload["not_after"],
                "policy_version": version,
            }
        )
        session.flush()
        return _to_request(row)

    draft = EntryDraft(kind="access.approved", actor=actor.key_id, refs={"request": request_id})
    result: AccessRequest = ex.ledger.append(draft, apply).value
    ex.policy.refresh()  # read your own writes; other processes catch up within the interval
    return result


def reject_request(ex: Exchange, actor: Principal, request_id: str, reason: str) -> AccessRequest:
    """The provider (or the operator) rejects a pending request with a reason; the consumer may
    withdraw its own."""
    reason = reason.strip()
    if not reason or len(reason) > 2000:
        raise InvalidInputError("give a reason of 1-2000 characters")

    def apply(session: Session, draft: EntryDraft) -> AccessRequest:
        row = _request_row(session, actor, request_id)
        draft.refs["request"] = row.id
        zone = _zone(session, row.zone)
        if actor.key_id == row.consumer:
            new_status = "withdrawn"
        elif actor.key_id == zone.owner or actor.kind == PrincipalKind.OPERATOR:
            new_status = "rejected"
        else:
            raise ForbiddenError("only the zone's provider or the operator rejects a request")
        if row.status not in ("pending", "awaiting_operator"):
            raise ConflictError(f"the request is {row.status}")
        row.status = new_status
        row.decided_at = _now()
        row.decided_by = actor.key_id
        row.reason = reason
        row.provider_approval = None
        draft.kind = f"access.{new_status}"
        session.flush()
        return _to_request(row)

    draft = EntryDraft(
        kind="access.rejected",
        actor=actor.key_id,
        refs={"request": request_id},
        digests={"reason": hashlib.sha256(reason.encode()).hexdigest()},
    )
    result: AccessRequest = ex.ledger.append(draft, apply).value
    return result


# -- grants -----------------------------------------------------------------------------------


def list_grants(
    ex: Exchange, actor: Principal, *, zone: str | None = None, include_inactive: bool = False
) -> list[Grant]:
    with Session(ex.engine) as session:
        stmt = select(GrantRow, ZoneRow.owner).join(ZoneRow, ZoneRow.name == GrantRow.zone)
        if zone is not None:
            stmt = stmt.where(GrantRow.zone == zone)
        if not include_inactive:
            stmt = stmt.where(GrantRow.status == "active")
        rows = session.execute(stmt.order_by(GrantRow.created_at)).all()
        shown = [g for g, owner in rows if _visible(actor, g.consumer, owner)]
        names = _names_of(session, (g.consumer for g in shown))
        return [_to_grant(g, names.get(g.consumer)) for g in shown]


def _grant_row(session: Session, actor: Principal, given: str) -> GrantRow:
    """The grant named by its id or a unique prefix of it (among those the actor sees)."""
    return _resolve(
        session,
        GrantRow,
        given,
        "grant",
        lambda g: _visible(actor, g.consumer, _zone(session, g.zone).owner),
    )


def get_grant(ex: Exchange, actor: Principal, grant_id: str) -> Grant:
    """One grant, by its id or a unique prefix of it."""
    with Session(ex.engine) as session:
        row = _grant_row(session, actor, grant_id)
        return _to_grant(row, _names_of(session, [row.consumer]).get(row.consumer))


def revoke_grant(ex: Exchange, actor: Principal, grant_id: str, reason: str) -> Grant:
    """Revoke a grant now: its policy rows go in the same transaction as the ledger entry, and
    every process sees the new policy version within its refresh interval."""
    reason = reason.strip()
    if not reason or len(reason) > 2000:
        raise InvalidInputError("give a reason of 1-2000 characters")

    def apply(session: Session, draft: EntryDraft) -> Grant:
        row = _grant_row(session, actor, grant_id)
        draft.refs["grant"] = row.id
        zone = _zone(session, row.zone)
        if actor.key_id not in (zone.owner, row.consumer) and actor.kind != PrincipalKind.OPERATOR:
            raise ForbiddenError("only the zone's provider, the operator or the grantee revokes")
        if row.status != "active":
            raise ConflictError(f"the grant is {row.status}")
        try:
            version = remove_rules(session, grant_id)
        except UnknownRuleError:  # nothing left in the policy: still mark it revoked
            version = 0
        row.status = "revoked"
        row.revoked_at = _now()
        row.revoked_by = actor.key_id
        row.revoke_reason = reason
        draft.refs.update({"zone": row.zone, "consumer": row.consumer})
        draft.attrs["policy_version"] = version
        session.flush()
        return _to_grant(row)

    draft = EntryDraft(
        kind="grant.revoked",
        actor=actor.key_id,
        refs={"grant": grant_id},
        digests={"reason": hashlib.sha256(reason.encode()).hexdigest()},
    )
    result: Grant = ex.ledger.append(draft, apply).value
    ex.policy.refresh()
    return result


# -- principals as seen by providers ----------------------------------------------------------


def _seen_principals(session: Session, actor: Principal) -> set[str] | None:
    """Key ids of the principals ``actor`` may look up: all (None) for the operator and
    auditors; for a zone's provider itself and every principal with a request, grant or
    consent on its zones; for anyone else only itself."""
    if actor.kind in (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR):
        return None
    owned = select(ZoneRow.name).where(ZoneRow.owner == actor.key_id)
    seen = {actor.key_id}
    for column, zone_column in (
        (AccessRequestRow.consumer, AccessRequestRow.zone),
        (GrantRow.consumer, GrantRow.zone),
        (ConsentRow.consumer, ConsentRow.zone),
    ):
        seen.update(session.scalars(select(column).where(zone_column.in_(owned)).distinct()))
    return seen


def list_principals(ex: Exchange, actor: Principal) -> list[Principal]:
    """Principals by name: all of them for the operator and auditors; for a zone's provider,
    itself and those with requests, grants or consents on its zones. A principal that owns no
    zone lists none (``whoami`` names itself; the catalog names the providers)."""
    with Session(ex.engine) as session:
        seen = _seen_principals(session, actor)
        stmt = select(PrincipalRow).order_by(PrincipalRow.name)
        if seen is not None:
            owns = session.scalars(
                select(ZoneRow.name).where(ZoneRow.owner == actor.key_id).limit(1)
            ).first()
            if owns is None:
                raise ForbiddenError(
                    "only the operator, auditors and zone providers list principals "
                    "(a provider sees those with requests, grants or consents on its zones)"
                )
            stmt = stmt.where(PrincipalRow.key_id.in_(seen))
        return [to_principal(r) for r in session.scalars(stmt)]


def _consumer_key_id(session: Session, actor: Principal, given: str) -> str:
    """A consumer named by its full key id (whoever holds a key id may name it), or by the
    registered name or a unique prefix (6+) of the key id of a principal the actor may look up
    (:func:`_seen_principals`): a name or prefix never tells whether a principal the actor may
    not see exists."""
    if session.get(PrincipalRow, given) is not None:
        return given
    seen = _seen_principals(session, actor)
    by_name = [
        k
        for k in session.scalars(select(PrincipalRow.key_id).where(PrincipalRow.name == given))
        if seen is None or k in seen
    ]
    if by_name:
        return by_name[0]
    if len(given) >= MIN_ID_PREFIX and all(c in "0123456789abcdef" for c in given):
        stmt = select(PrincipalRow.key_id).where(PrincipalRow.key_id.startswith(given))
        found = [k for k in session.scalars(stmt.limit(_PREFIX_SCAN)) if seen is None or k in seen]
        if len(found) == 1:
            return found[0]
        if found:
            raise InvalidInputError(
                f"the key id prefix {given!r} matches {len(found)} principals you can see; "
                "give more characters or the name",
                reason="ambiguous_id",
                candidates=len(found),
            )
    raise NotFoundError(
        f"no consumer {given!r} among the principals you can see: give its full key id (a name "
        "or a prefix works once it has a request, grant or consent on your zones)"
    )


# -- suspensions and ceilings -----------------------------------------------------------------


def set_zone_status(ex: Exchange, actor: Principal, zone: str, status: str) -> None:
    """The operator suspends or reinstates a whole zone; effective on the next call anywhere."""
    if actor.kind != PrincipalKind.OPERATOR:
        raise ForbiddenError("only the operator suspends zones")
    if status not in ("active", "suspended"):
        raise InvalidInputError("status is 'active' or 'suspended'")

    def apply(session: Session, draft: EntryDraft) -> None:
        row = _zone(session, zone)
        if row.status == status:
            raise ConflictError(f"the zone is already {status}")
        row.status = status
        suspension = suspend_zone_row(zone)
        if status == "suspended":
            draft.attrs["policy_version"] = add_rules(session, [suspension])
        else:
            with contextlib.suppress(UnknownRuleError):
                draft.attrs["policy_version"] = remove_rules(session, suspension.rule)
        session.flush()

    kind = "zone.suspended" if status == "suspended" else "zone.reinstated"
    ex.ledger.append(EntryDraft(kind=kind, actor=actor.key_id, refs={"zone": zone}), apply)
    ex.policy.refresh()


def principal_suspension(session: Session, key_id: str, suspended: bool) -> int | None:
    """Add or remove the deny-everything row of a principal (called inside the status change)."""
    row = suspend_principal_row(key_id)
    if suspended:
        return add_rules(session, [row])
    try:
        return remove_rules(session, row.rule)
    except UnknownRuleError:
        return None


def set_ceilings(
    ex: Exchange,
    actor: Principal,
    zone: str,
    table: Mapping[str, Iterable[str]],
    *,
    dataset: str | None = None,
) -> dict[str, list[str]]:
    """The provider sets, per level, the operations allowed at most in a zone or on one dataset.

    A table may only list operations within the default ceiling of its level (tighten, never
    loosen); levels it leaves out keep the default. Returns the effective allowed table.
    """
    allowed_by_level: dict[Level, set[Operation]] = {}
    try:
        for level, ops in table.items():
            allowed_by_level[Level(level)] = {Operation(op) for op in ops}
        tighten(DEFAULT_CEILINGS, allowed_by_level)
    except ValueError as exc:
        raise InvalidInputError(f"not a ceiling table: {exc}") from exc
    except CeilingError as exc:
        raise InvalidInputError(str(exc), reason="loosening") from exc
    removed = {
        lv.value: sorted(op.value for op in DEFAULT_CEILINGS[lv] - ops)
        for lv, ops in allowed_by_level.items()
    }

    def apply(session: Session, draft: EntryDraft) -> dict[str, list[str]]:
        z = _zone(session, zone)
        if z.owner != actor.key_id:
            raise ForbiddenError("only the zone's provider sets its ceilings")
        ds = None
        if dataset is not None:
            ds = _dataset(session, zone, dataset)
            ds.ceilings = removed
        else:
            z.ceilings = removed
        session.flush()
        eff = effective_ceilings(z, ds)
        return {lv.value: sorted(op.value for op in eff[lv]) for lv in Level}

    refs = {"zone": zone}
    if dataset is not None:
        refs["dataset"] = dataset
    draft = EntryDraft(
        kind="ceilings.set",
        actor=actor.key_id,
        refs=refs,
        digests={"table": hashlib.sha256(canonicalize(removed)).hexdigest()},
    )
    result: dict[str, list[str]] = ex.ledger.append(draft, apply).value
    return result


# -- consents ---------------------------------------------------------------------------------


#: the zone's subject salt; read in one place (:mod:`exchange.subjects`), kept here for callers
_salt = subjects.read_salt


def subject_digest(ex: Exchange, zone: str, subject: str) -> str:
    """The current consent digest of a subject id: HMAC-SHA-256 under the zone's
    consent-digest key (:mod:`exchange.subjects`), hex. Only digests are stored or ledgered,
    never answered; without the salt, a digest cannot be confirmed by guessing ids."""
    subjects.check_subject_id(subject)
    return subjects.ZoneSubjects.of(ex.zones_dir / zone).consent_digest(subject)


def node_hosted_zone(session: Session, zone: str) -> bool:
    """Does ``zone`` run on its provider's node (a registered node, pending or active)? Its
    subject key then lives in the node's directory only: its consents arrive as digests made
    there (``zonex consent add|import --node``), and the exchange never makes a key for it."""
    found = session.execute(
        select(NodeRow.key_id).where(NodeRow.zone == zone, NodeRow.status != "retired").limit(1)
    ).first()
    return found is not None


def _check_subject_digest(value: object, what: str = "subject_digest") -> str:
    if not isinstance(value, str) or not _HEX64.fullmatch(value):
        raise InvalidInputError(f"{what} is 64 lowercase hex digits", reason="bad_subject_digest")
    return value


def _consent_form(session: Session, zone: str, *, digests: bool) -> None:
    """Raw subject ids for a zone the exchange hosts, digests for a node-hosted one (422
    ``subject_digest_required`` / ``subject_required``, saying what to do)."""
    hosted = node_hosted_zone(session, zone)
    if hosted and not digests:
        raise InvalidInputError(
            f"zone {zone!r} runs on its provider's node, which holds its subject key: send "
            "subject_digest made there, not the subject (zonex consent add|import --node DIR)",
            reason="subject_digest_required",
        )
    if digests and not hosted:
        raise InvalidInputError(
            f"zone {zone!r} is hosted by the exchange, which digests subjects itself: send "
            "subject, not subject_digest (zonex consent add|import without --node)",
            reason="subject_required",
        )


def record_consent(
    ex: Exchange,
    actor: Principal,
    zone: str,
    subject: str | None,
    consumer: str,
    purpose: str,
    expires_at: datetime,
    *,
    digest: str | None = None,
) -> Consent:
    """The provider records that a data subject authorizes ``consumer`` for ``purpose``.

    ``subject``: the id, for a zone the exchange hosts (digested here); ``digest``: its
    consent digest made by the zone's node, for a node-hosted zone (:func:`node_hosted_zone`);
    exactly one of them, the other form is refused (422)."""
    if (subject is None) == (digest is None):
        raise InvalidInputError(
            "give exactly one of subject and subject_digest", reason="bad_subject"
        )
    if subject is not None:
        subjects.check_subject_id(subject)
    else:
        _check_subject_digest(digest)
    purpose = _purpose(ex, purpose)
    if expires_at.tzinfo is None:
        raise InvalidInputError("expires_at needs a time zone")
    if expires_at <= _now():
        raise InvalidInputError("expires_at is in the past")
    consent_id = "consent-" + secrets.token_hex(12)

    def apply(session: Session, draft: EntryDraft) -> Consent:
        z = _zone(session, zone)
        if z.owner != actor.key_id:
            raise ForbiddenError("only the zone's provider records consents")
        consumer_id = _consumer_key_id(session, actor, consumer)
        draft.refs["consumer"] = consumer_id
        _consent_form(session, zone, digests=digest is not None)
        made = digest if subject is None else subject_digest(ex, zone, subject)
        assert made is not None
        row = ConsentRow(
            id=consent_id,
            zone=zone,
            subject_digest=made,
            digest_version=subjects.CONSENT_DIGEST_VERSION,
            consumer=consumer_id,
            purpose=purpose,
            expires_at=expires_at,
            status="active",
            recorded_by=actor.key_id,
        )
        session.add(row)
        draft.digests["subject"] = made
        draft.attrs["digest_version"] = subjects.CONSENT_DIGEST_VERSION
        session.flush()
        return _to_consent(row, _names_of(session, [consumer_id]).get(consumer_id))

    draft = EntryDraft(
        kind="consent.recorded",
        actor=actor.key_id,
        refs={"consent": consent_id, "zone": zone},  # the consumer's key id: added on apply
        attrs={"purpose": purpose, "expires": expires_at.astimezone(UTC).isoformat()},
    )
    result: Consent = ex.ledger.append(draft, apply).value
    return result


@dataclass(frozen=True)
class ConsentDraft:
    """One consent of a bulk import, as the provider gave it."""

    #: the subject id (a zone the exchange hosts), or None with ``digest``
    subject: str | None
    #: the consumer's key id, registered name or unique key id prefix (as for record_consent)
    consumer: str
    purpose: str
    expires_at: datetime
    #: the consent digest made by the zone's node (a node-hosted zone), or None with ``subject``
    digest: str | None = None


#: a refused import names at most this many row problems; the rest are counted
MAX_ROW_PROBLEMS = 20


def import_consents(
    ex: Exchange, actor: Principal, zone: str, drafts: Sequence[ConsentDraft]
) -> list[Consent]:
    """Record many consents at once under :func:`record_consent`'s rules, all or nothing.

    Every row is checked before anything is recorded; a refusal (``invalid_input``, reason
    ``bad_rows``) names up to :data:`MAX_ROW_PROBLEMS` problems by row index (0-based) and
    counts the rest. On success each consent gets its own ``consent.recorded`` entry, exactly
    as one ``record_consent`` call would, all in one transaction. The answer lists the
    consents in row order; subjects are never echoed, not even digested."""
    limit = ex.settings.max_consent_import_rows
    if not drafts:
        raise InvalidInputError("no consents to record: the import has no rows")
    if len(drafts) > limit:
        raise InvalidInputError(
            f"{len(drafts)} consents in one import; at most {limit} per call "
            "(max_consent_import_rows): split the file",
            reason="too_many_rows",
        )
    now = _now()
    problems: list[dict[str, Any]] = []

    def bad(row: int, name: str, message: str) -> None:
        problems.append({"loc": ["rows", row, name], "row": row, "msg": message})

    purposes: list[str] = []
    by_digest = drafts[0].digest is not None
    for i, d in enumerate(drafts):
        try:
            if (d.digest is not None) != by_digest or (d.subject is None) != by_digest:
                raise InvalidInputError("every row gives subject, or every row subject_digest")
            if d.subject is not None:
                subjects.check_subject_id(d.subject)
            else:
                _check_subject_digest(d.digest)
        except InvalidInputError as exc:
            bad(i, "subject_digest" if by_digest else "subject", exc.detail)
        try:
            purposes.append(_purpose(ex, d.purpose))
        except InvalidInputError as exc:
            purposes.append(d.purpose)
            bad(i, "purpose", exc.detail)
        if d.expires_at.tzinfo is None:
            bad(i, "expires_at", "expires_at needs a time zone")
        elif d.expires_at <= now:
            bad(i, "expires_at", "expires_at is in the past")

    def resolve(session: Session) -> tuple[dict[str, str], dict[str, str]]:
        """The zone checked; each distinct consumer as given -> its key id, or why not."""
        z = _zone(session, zone)
        if z.owner != actor.key_id:
            raise ForbiddenError("only the zone's provider records consents")
        _consent_form(session, zone, digests=by_digest)
        found: dict[str, str] = {}
        unknown: dict[str, str] = {}
        for given in dict.fromkeys(d.consumer for d in drafts):
            try:
                found[given] = _consumer_key_id(session, actor, given)
            except (InvalidInputError, NotFoundError) as exc:
                unknown[given] = exc.detail
        return found, unknown

    with Session(ex.engine) as session:
        consumers, unknown = resolve(session)
    for i, d in enumerate(drafts):
        if d.consumer in unknown:
            bad(i, "consumer", unknown[d.consumer])
    if problems:
        problems.sort(key=lambda p: int(p["row"]))
        rows = len({p["row"] for p in problems})
        raise InvalidInputError(
            f"{rows} of {len(drafts)} rows are invalid; nothing was recorded",
            reason="bad_rows",
            invalid_rows=rows,
            problems=len(problems),
            errors=problems[:MAX_ROW_PROBLEMS],
        )

    if by_digest:
        digests = [str(d.digest) for d in drafts]
    else:
        keys = subjects.ZoneSubjects.of(ex.zones_dir / zone)
        digests = keys.consent_digests([str(d.subject) for d in drafts])
    version = subjects.CONSENT_DIGEST_VERSION
    ids = ["consent-" + secrets.token_hex(12) for _ in drafts]
    entries = [
        EntryDraft(
            kind="consent.recorded",
            actor=actor.key_id,
            refs={"consent": ids[i], "zone": zone, "consumer": consumers[d.consumer]},
            digests={"subject": digests[i]},
            attrs={
                "purpose": purposes[i],
                "expires": d.expires_at.astimezone(UTC).isoformat(),
                "digest_version": version,
            },
        )
        for i, d in enumerate(drafts)
    ]

    def apply(session: Session, _draft: EntryDraft) -> list[Consent]:
        # the zone and consumers again, inside the transaction: they may have changed since
        if resolve(session)[0] != consumers:
            raise ConflictError("the zone's principals changed during the import; try again")
        created = _now()
        rows = [
            ConsentRow(
                id=ids[i],
                zone=zone,
                subject_digest=digests[i],
                digest_version=version,
                consumer=consumers[d.consumer],
                purpose=purposes[i],
                expires_at=d.expires_at,
                status="active",
                created_at=created,
                recorded_by=actor.key_id,
            )
            for i, d in enumerate(drafts)
        ]
        session.add_all(rows)
        session.flush()
        names = _names_of(session, consumers.values())
        return [_to_consent(r, names.get(r.consumer)) for r in rows]

    appended = ex.ledger.append_group(entries, apply)
    result: list[Consent] = appended[0].value
    return result


def withdraw_consent(ex: Exchange, actor: Principal, consent_id: str) -> Consent:
    def apply(session: Session, draft: EntryDraft) -> Consent:
        row = _resolve(
            session,
            ConsentRow,
            consent_id,
            "consent",
            lambda c: (
                actor.key_id in (c.consumer, _zone(session, c.zone).owner)
                or actor.kind in (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR)
            ),
        )
        draft.refs["consent"] = row.id
        if _zone(session, row.zone).owner != actor.key_id:
            raise ForbiddenError("only the zone's provider withdraws consents")
        if row.status != "active":
            raise ConflictError("the consent is already withdrawn")
        row.status = "withdrawn"
        row.withdrawn_at = _now()
        draft.refs["zone"] = row.zone
        session.flush()
        return _to_consent(row)

    draft = EntryDraft(kind="consent.withdrawn", actor=actor.key_id, refs={"consent": consent_id})
    result: Consent = ex.ledger.append(draft, apply).value
    return result


def list_consents(ex: Exchange, actor: Principal, zone: str) -> list[Consent]:
    with Session(ex.engine) as session:
        z = _zone(session, zone)
        stmt = select(ConsentRow).where(ConsentRow.zone == zone)
        if actor.key_id != z.owner and actor.kind not in (
            PrincipalKind.OPERATOR,
            PrincipalKind.AUDITOR,
        ):
            stmt = stmt.where(ConsentRow.consumer == actor.key_id)
        shown = list(session.scalars(stmt.order_by(ConsentRow.created_at)))
        names = _names_of(session, (c.consumer for c in shown))
        return [_to_consent(c, names.get(c.consumer)) for c in shown]


def live_consents(
    ex: Exchange,
    zone: str,
    subject_ids: Sequence[str],
    consumer: str,
    purpose: str,
    now: datetime | None = None,
) -> list[str | None]:
    """For each subject id, the id of an active, unexpired consent for ``consumer`` whose
    purpose covers ``purpose`` (a consent for a parent purpose covers its children), else None.
    Where several do, the least consent id (so the answer does not depend on row order).

    Each stored digest is compared under the key its ``digest_version`` names only: version 1
    under the consent-digest key, version 0 (consents recorded before the keys were separated)
    under the raw salt, computed only while the zone still has such consents."""
    moment = now or _now()
    keys = subjects.ZoneSubjects.of(ex.zones_dir / zone)
    current = subjects.CONSENT_DIGEST_VERSION
    legacy = subjects.LEGACY_DIGEST_VERSION
    positions: dict[tuple[int, str], list[int]] = {}
    for k, d in enumerate(keys.consent_digests(subject_ids)):
        positions.setdefault((current, d), []).append(k)
    vocabulary = ex.policy.point.vocabulary
    found: list[str | None] = [None] * len(subject_ids)
    covers: dict[str, bool] = {}
    live = (
        ConsentRow.zone == zone,
        ConsentRow.consumer == consumer,
        ConsentRow.status == "active",
        ConsentRow.expires_at > moment,
    )
    stmt = select(
        ConsentRow.id, ConsentRow.digest_version, ConsentRow.subject_digest, ConsentRow.purpose
    ).where(*live)
    with ex.engine.connect() as conn:
        has_legacy = conn.execute(
            select(ConsentRow.id).where(*live, ConsentRow.digest_version == legacy).limit(1)
        ).first()
        if has_legacy is not None:
            for k, d in enumerate(keys.legacy_consent_digests(subject_ids)):
                positions.setdefault((legacy, d), []).append(k)
        wanted = sorted({d for _, d in positions})
        # many digests against a zone with not many more consents: one pass over the zone's
        # consents is cheaper than one index probe per digest (the count stops at the cap)
        cap = _CONSENT_SCAN_FACTOR * len(wanted)
        in_zone = select(ConsentRow.id).where(ConsentRow.zone == zone).limit(cap + 1).subquery()
        scan = conn.execute(select(func.count()).select_from(in_zone)).scalar_one() <= cap
        chunks = [wanted] if scan else [wanted[i : i + 2000] for i in range(0, len(wanted), 2000)]
        for chunk in chunks:
            rows = conn.execute(stmt if scan else stmt.where(ConsentRow.subject_digest.in_(chunk)))
            for consent_id, version, digest, granted_purpose in rows:
                at = positions.get((version, digest))
                if at is None:
                    continue  # another subject's consent, or a digest under another key
                ok = covers.get(granted_purpose)
                if ok is None:
                    ok = covers[granted_purpose] = vocabulary.is_within(purpose, granted_purpose)
                if ok:
                    for k in at:
                        if found[k] is None or consent_id < str(found[k]):
                            found[k] = consent_id
    return found


def live_consent_digests(
    ex: Exchange, zone: str, consumer: str, purpose: str, now: datetime | None = None
) -> dict[str, str]:
    """A node-hosted zone's live consents for ``consumer`` and ``purpose`` (a consent for a
    parent purpose covers its children): consent digest -> consent id, the least id where
    several share a digest. The exchange cannot digest ids for such a zone; its node matches
    ids against these digests with its own key (:mod:`exchange.node.score`). At most
    ``max_node_score_consents``: above it, refused (422 ``too_many_consents``)."""
    moment = now or _now()
    limit = ex.settings.max_node_score_consents
    vocabulary = ex.policy.point.vocabulary
    stmt = (
        select(ConsentRow.id, ConsentRow.subject_digest, ConsentRow.purpose)
        .where(
            ConsentRow.zone == zone,
            ConsentRow.consumer == consumer,
            ConsentRow.status == "active",
            ConsentRow.expires_at > moment,
            ConsentRow.digest_version == subjects.CONSENT_DIGEST_VERSION,
        )
        .limit(limit + 1)
    )
    found: dict[str, str] = {}
    covers: dict[str, bool] = {}
    with ex.engine.connect() as conn:
        rows = conn.execute(stmt).all()
    if len(rows) > limit:
        raise InvalidInputError(
            f"this consumer holds more than {limit} live consents in zone {zone!r}, more than "
            "one task to its node may carry (max_node_score_consents): ask the provider to "
            "withdraw those no longer needed, or the operator to raise the limit",
            reason="too_many_consents",
        )
    for consent_id, digest, granted in rows:
        ok = covers.get(granted)
        if ok is None:
            ok = covers[granted] = vocabulary.is_within(purpose, granted)
        if ok and (digest not in found or consent_id < found[digest]):
            found[digest] = consent_id
    return found


def has_live_consent(
    ex: Exchange,
    zone: str,
    subject_ids: Sequence[str],
    consumer: str,
    purpose: str,
    now: datetime | None = None,
) -> dict[str, bool]:
    """For each subject id: does a live consent cover it (:func:`live_consents`)?"""
    found = live_consents(ex, zone, subject_ids, consumer, purpose, now)
    return {s: c is not None for s, c in zip(subject_ids, found, strict=True)}


# -- authorization ----------------------------------------------------------------------------


def _denial(reason: str, zone: str, dataset: str, operation: str, purpose: str) -> DeniedError:
    """A ledgered denial naming what the caller asked for (its own dataset, operation and
    purpose: nothing of the policy) and, where there is one, the next step."""
    ask = (
        f"zonex request {zone} --dataset {dataset} --operation {operation} "
        f"--purpose {purpose} --justification TEXT"
    )
    hints = {
        "not_granted": f"request access: {ask}",
        "expired": f"the grant has expired; request access again: {ask}",
        "purpose_mismatch": f"no grant covers this purpose; request access for it: {ask}",
        "level_ceiling": "the operation is above the dataset's level ceiling: see zonex catalog",
        "suspended": "the zone or your principal is suspended: ask the exchange's operator",
    }
    denied = DeniedError(
        reason, f"denied: {reason}: {operation} on {zone}/{dataset} for purpose {purpose}"
    )
    denied.extra.update(zone=zone, dataset=dataset, operation=operation, purpose=purpose)
    if reason in hints:
        denied.extra["next"] = hints[reason]
    denied.ledgered = True  # authorize's access.denied entry records it, with the full decision
    return denied


def authorize(
    ex: Exchange,
    actor: Principal,
    zone: str,
    dataset: str,
    operation: Operation | str,
    purpose: str,
    *,
    step: str | None = None,
    rows: tuple[ZoneRow, DatasetRow] | None = None,
) -> Authorization:
    """Decide one call against the live policy. Level, zone, ceilings and time come from the
    registry and the server clock. A denial is ledgered with the full decision and raised as
    :class:`DeniedError` with its reason code only.

    ``rows`` passes the zone and dataset rows a caller has just read for the same call (so
    they are not read twice)."""
    try:
        op = Operation(operation)
    except ValueError as exc:
        raise InvalidInputError(f"unknown operation {operation!r}") from exc
    purpose = _purpose(ex, purpose)
    if rows is None:
        with Session(ex.engine) as session:
            rows = (_zone(session, zone), _dataset(session, zone, dataset))
    z, ds = rows
    if z.name != zone or ds.zone != zone or ds.name != dataset:
        raise ValueError("authorize: rows for another zone or dataset")
    level = Level(ds.level)
    ceilings = effective_ceilings(z, ds)
    digest = ds.digest
    zone_active = z.status == "active" and ds.status == "active"
    request = DecisionRequest(
        subject=actor.key_id,
        zone=zone,
        dataset=dataset,
        operation=op,
        purpose=purpose,
        level=level,
        ceilings=ceilings,
        now=_now(),
    )
    decision = ex.policy.decide(request)
    if ds.status == "retired":
        # its provider retired it: nothing runs on it any more, granted or not
        decision = Decision(
            False, f"retired:dataset:{zone}/{dataset}", "retired", decision.policy_version
        )
    elif decision.allowed and not zone_active:
        # the suspension row is written with the status; this covers the refresh interval
        decision = Decision(False, f"suspend:zone:{zone}", "suspended", decision.policy_version)
    record_decision(decision.allowed, str(decision.reason))
    if not decision.allowed:
        attrs: dict[str, str | int] = {
            "reason": str(decision.reason),
            "rule": decision.rule or "",
            "policy_version": decision.policy_version,
            "operation": op.value,
            "purpose": purpose[:200],
            "level": level.value,
        }
        if step is not None:
            attrs["step"] = step
        ex.ledger.append(
            EntryDraft(
                kind="access.denied",
                actor=actor.key_id,
                refs={"zone": zone, "dataset": dataset},
                attrs=attrs,
            )
        )
        if decision.reason == Reason.THROTTLED:
            throttled = ThrottledError(
                "your computations are throttled after an incident; retry later or ask the "
                "operator",
                reason="throttled",
            )
            throttled.ledgered = True  # the access.denied entry above records it
            raise throttled
        raise _denial(str(decision.reason), zone, dataset, op.value, purpose)
    return Authorization(decision=decision, request=request, level=level, digest=digest)
