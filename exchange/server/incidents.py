"""Incidents (应急处置): the monitor's graduated responses, labels, two-person reinstatement.

The monitor (a principal of kind ``monitor``, registered by the operator) opens an incident for
a finding with one response, recorded in the same transaction as its effect:

- ``alert``: ``incident.opened`` only;
- ``throttle``: ``incident.opened`` and ``principal.throttled`` (refs principal, incident;
  attrs ``until``): a deny row ``throttle:<key id>`` that expires at ``until``, so every
  computation of the principal is answered 429 ``throttled`` until then;
- ``suspend``: ``incident.opened`` and ``principal.suspended`` with refs ``incident``: the
  principal's key is refused (401) and its policy denies everything, as the operator's
  suspension does.

A principal the monitor suspended is reinstated by two people: a second principal (an auditor)
records ``principal.reinstatement_approved``, then the operator's reinstatement succeeds only
if an unused approval by someone other than the operator, given after the suspension and at
most ``APPROVAL_SECONDS`` ago, exists; it is used up. The monitor and the operator may open
incidents; the operator, auditors and the monitor list them; a person (operator or auditor)
labels one a true or a false positive.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from exchange.audit.detectors import DETECTORS, RESPONSES
from exchange.domain import PROVIDER_KINDS, Principal, PrincipalKind
from exchange.errors import ConflictError, ForbiddenError, InvalidInputError, NotFoundError
from exchange.server.access import principal_suspension
from exchange.server.ledger import EntryDraft
from exchange.server.models import IncidentRow, PrincipalRow, ReinstatementApprovalRow
from exchange.server.policystore import add_rules, remove_rules
from exchange.server.runtime import Exchange
from policy import throttle_principal_row
from policy.errors import UnknownRuleError
from policy.rows import THROTTLE_PREFIX

__all__ = [
    "APPROVAL_SECONDS",
    "Incident",
    "IncidentSpec",
    "ReinstatementApproval",
    "approve_reinstatement",
    "label_incident",
    "list_incidents",
    "open_incident",
    "use_reinstatement_approval",
]

SEVERITIES = ("low", "medium", "high", "critical")
#: an approval to reinstate is fresh for this long
APPROVAL_SECONDS = 24 * 3600
#: a throttle lasts at most this long
MAX_THROTTLE_SECONDS = 30 * 86400
#: who may open incidents, list them, label them
OPENERS = (PrincipalKind.MONITOR, PrincipalKind.OPERATOR)
READERS = (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR, PrincipalKind.MONITOR)
PEOPLE = (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR)


@dataclass(frozen=True)
class IncidentSpec:
    """What the monitor asks for: a finding and the response it chose."""

    detector: str
    severity: str
    response: str
    first_seq: int
    last_seq: int
    principal: str | None = None
    zone: str | None = None
    throttle_seconds: int | None = None


@dataclass(frozen=True)
class Incident:
    id: str
    detector: str
    severity: str
    response: str
    principal: str | None
    zone: str | None
    first_seq: int
    last_seq: int
    opened_by: str
    opened_at: datetime
    opened_seq: int | None
    throttled_until: datetime | None
    status: str
    label: str | None
    labelled_by: str | None


@dataclass(frozen=True)
class ReinstatementApproval:
    id: str
    principal: str
    approver: str
    created_at: datetime
    seq: int | None


def _to_incident(row: IncidentRow) -> Incident:
    return Incident(
        id=row.id,
        detector=row.detector,
        severity=row.severity,
        response=row.response,
        principal=row.subject or None,
        zone=row.zone,
        first_seq=row.first_seq,
        last_seq=row.last_seq,
        opened_by=row.opened_by,
        opened_at=row.opened_at,
        opened_seq=row.opened_seq,
        throttled_until=row.throttled_until,
        status=row.status,
        label=row.label,
        labelled_by=row.labelled_by,
    )


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_spec(ex: Exchange, spec: IncidentSpec) -> None:
    if spec.detector not in DETECTORS:
        raise InvalidInputError(f"unknown detector {spec.detector!r}")
    if spec.severity not in SEVERITIES:
        raise InvalidInputError(f"severity is one of {', '.join(SEVERITIES)}")
    if spec.response not in RESPONSES:
        raise InvalidInputError(f"response is one of {', '.join(RESPONSES)}")
    if not 0 <= spec.first_seq <= spec.last_seq < ex.ledger.size():
        raise InvalidInputError("first_seq and last_seq name entries of the log, in order")
    if spec.response != "alert" and spec.principal is None:
        raise InvalidInputError(f"a {spec.response} response names the principal concerned")
    if spec.response == "throttle":
        seconds = spec.throttle_seconds
        if seconds is None or not 1 <= seconds <= MAX_THROTTLE_SECONDS:
            raise InvalidInputError(f"throttle_seconds is 1 to {MAX_THROTTLE_SECONDS}")


def open_incident(ex: Exchange, actor: Principal, spec: IncidentSpec) -> Incident:
    """Open an incident and take its response, all recorded in one transaction.

    The response acts only on agencies and enterprises (never the operator, an auditor, a
    monitor or a zone node). A second incident for the same detector, principal and last
    entry is refused with 409 (a monitor that reads the same entries twice opens nothing
    twice)."""
    if actor.kind not in OPENERS:
        raise ForbiddenError("only the monitor and the operator open incidents")
    _check_spec(ex, spec)
    now = datetime.now(UTC)
    incident_id = "inc_" + secrets.token_hex(12)
    subject = spec.principal or ""
    until = (
        now + timedelta(seconds=spec.throttle_seconds)
        if spec.response == "throttle" and spec.throttle_seconds is not None
        else None
    )
    refs = {"incident": incident_id}
    if spec.principal is not None:
        refs["principal"] = spec.principal
    if spec.zone is not None:
        refs["zone"] = spec.zone
    opened = EntryDraft(
        kind="incident.opened",
        actor=actor.key_id,
        refs=refs,
        attrs={
            "detector": spec.detector,
            "severity": spec.severity,
            "response": spec.response,
            "first_seq": spec.first_seq,
            "last_seq": spec.last_seq,
        },
    )
    drafts = [opened]
    already_suspended = False
    if spec.principal is not None:
        with Session(ex.engine) as session:
            target = session.get(PrincipalRow, spec.principal)
            if target is None:
                raise NotFoundError("no such principal")
            if spec.response != "alert" and PrincipalKind(target.kind) not in PROVIDER_KINDS:
                raise ForbiddenError("incidents throttle or suspend agencies and enterprises only")
            already_suspended = target.status == "suspended"
    if spec.response == "throttle" and until is not None:
        drafts.append(
            EntryDraft(
                kind="principal.throttled",
                actor=actor.key_id,
                refs={"principal": subject, "incident": incident_id},
                attrs={"until": _utc(until)},
            )
        )
    elif spec.response == "suspend" and not already_suspended:
        drafts.append(
            EntryDraft(
                kind="principal.suspended",
                actor=actor.key_id,
                refs={"principal": subject, "incident": incident_id},
            )
        )

    def apply(session: Session, draft: EntryDraft) -> Incident:
        duplicate = session.execute(
            select(IncidentRow.id).where(
                IncidentRow.detector == spec.detector,
                IncidentRow.subject == subject,
                IncidentRow.last_seq == spec.last_seq,
            )
        ).first()
        if duplicate is not None:
            raise ConflictError(
                f"incident {duplicate[0]} already records this evidence", incident=duplicate[0]
            )
        if spec.response == "throttle" and until is not None:
            with contextlib.suppress(UnknownRuleError):
                remove_rules(session, THROTTLE_PREFIX + subject)
            add_rules(session, [throttle_principal_row(subject, expires=until)])
        elif spec.response == "suspend":
            row = session.get(PrincipalRow, subject)
            if row is None:
                raise NotFoundError("no such principal")
            if row.status != "suspended":
                row.status = "suspended"
                principal_suspension(session, subject, True)
        incident = IncidentRow(
            id=incident_id,
            detector=spec.detector,
            severity=spec.severity,
            response=spec.response,
            subject=subject,
            zone=spec.zone,
            first_seq=spec.first_seq,
            last_seq=spec.last_seq,
            opened_by=actor.key_id,
            opened_at=now,
            opened_seq=draft.seq,
            throttled_until=until,
            status="open",
        )
        session.add(incident)
        session.flush()
        return _to_incident(incident)

    appended = ex.ledger.append_group(drafts, apply)
    if spec.response != "alert":
        ex.policy.refresh()
    result: Incident = appended[0].value
    return result


def list_incidents(ex: Exchange, actor: Principal, status: str | None = None) -> list[Incident]:
    if actor.kind not in READERS:
        raise ForbiddenError("only the operator, auditors and the monitor read incidents")
    with Session(ex.engine) as session:
        query = select(IncidentRow).order_by(IncidentRow.opened_at, IncidentRow.id)
        if status is not None:
            query = query.where(IncidentRow.status == status)
        return [_to_incident(row) for row in session.execute(query).scalars()]


def label_incident(ex: Exchange, actor: Principal, incident_id: str, label: bool) -> Incident:
    """A person (the operator or an auditor) says whether the incident was a true positive."""
    if actor.kind not in PEOPLE:
        raise ForbiddenError("only the operator and auditors label incidents")
    value = "true" if label else "false"

    def apply(session: Session, draft: EntryDraft) -> Incident:
        row = session.get(IncidentRow, incident_id) if len(incident_id) <= 40 else None
        if row is None:
            raise NotFoundError("no such incident")
        row.label = value
        row.labelled_by = actor.key_id
        session.flush()
        return _to_incident(row)

    draft = EntryDraft(
        kind="incident.labelled",
        actor=actor.key_id,
        refs={"incident": incident_id[:40]},
        attrs={"label": value},
    )
    result: Incident = ex.ledger.append(draft, apply).value
    return result


def _suspending_incidents(session: Session, key_id: str) -> list[IncidentRow]:
    """The open incidents whose response suspended ``key_id``."""
    return list(
        session.execute(
            select(IncidentRow).where(
                IncidentRow.subject == key_id,
                IncidentRow.response == "suspend",
                IncidentRow.status == "open",
            )
        ).scalars()
    )


def approve_reinstatement(ex: Exchange, actor: Principal, key_id: str) -> ReinstatementApproval:
    """The second person's approval to reinstate a principal the monitor suspended."""
    if actor.kind not in PEOPLE:
        raise ForbiddenError("only the operator and auditors approve a reinstatement")
    if actor.key_id == key_id:
        raise ForbiddenError("a principal does not approve its own reinstatement")
    approval_id = "rap_" + secrets.token_hex(12)

    def apply(session: Session, draft: EntryDraft) -> ReinstatementApproval:
        row = session.get(PrincipalRow, key_id) if len(key_id) == 64 else None
        if row is None:
            raise NotFoundError("no such principal")
        if row.status != "suspended" or not _suspending_incidents(session, key_id):
            raise ConflictError(
                "this principal is not suspended by an incident: no second approval is needed",
                reason="not_suspended_by_incident",
            )
        approval = ReinstatementApprovalRow(
            id=approval_id,
            principal=key_id,
            approver=actor.key_id,
            created_at=datetime.now(UTC),
            seq=draft.seq,
            used=False,
        )
        session.add(approval)
        session.flush()
        return ReinstatementApproval(
            approval.id, approval.principal, approval.approver, approval.created_at, approval.seq
        )

    draft = EntryDraft(
        kind="principal.reinstatement_approved",
        actor=actor.key_id,
        refs={"principal": key_id[:64], "approval": approval_id},
    )
    result: ReinstatementApproval = ex.ledger.append(draft, apply).value
    return result


def use_reinstatement_approval(session: Session, actor: Principal, key_id: str) -> str | None:
    """Inside the reinstatement's transaction: None if ``key_id`` was not suspended by an
    incident (one person reinstates); else the id of the fresh approval by someone other than
    ``actor`` that this reinstatement uses up (and the incidents are resolved), or 409."""
    incidents = _suspending_incidents(session, key_id)
    if not incidents:
        return None
    suspended_at = max(i.opened_at for i in incidents)
    now = datetime.now(UTC)
    approvals = list(
        session.execute(
            select(ReinstatementApprovalRow)
            .where(
                ReinstatementApprovalRow.principal == key_id,
                ReinstatementApprovalRow.used.is_(False),
            )
            .order_by(ReinstatementApprovalRow.created_at)
        ).scalars()
    )
    fresh = [
        a
        for a in approvals
        if a.created_at >= suspended_at and a.created_at > now - timedelta(seconds=APPROVAL_SECONDS)
    ]
    others = [a for a in fresh if a.approver != actor.key_id]
    if not others:
        reason = "same_person" if fresh else "second_approval_needed"
        raise ConflictError(
            "the monitor suspended this principal: reinstating it needs a fresh approval by a "
            "second person (an auditor: zonex principal approve-reinstatement KEY)",
            reason=reason,
        )
    used = others[-1]
    used.used = True
    for incident in incidents:
        incident.status = "resolved"
    return used.id
