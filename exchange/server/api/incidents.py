"""Routes of incidents (应急处置): the monitor's responses, labels, two-person reinstatement.

- ``POST /v1/incidents`` (the monitor, the operator): open an incident with its response
  (``alert``, ``throttle``, ``suspend``); 409 if one already records the same evidence.
- ``GET /v1/incidents`` (the operator, auditors, the monitor): every incident with its status
  and label.
- ``POST /v1/incidents/{id}/label`` (the operator, an auditor): a true or false positive.
- ``POST /v1/principals/{key_id}/reinstatement-approvals`` (an auditor, the operator): the
  second person's approval before the operator reinstates a principal the monitor suspended
  (``POST /v1/principals/{key_id}/status``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import Field

from exchange.server import incidents
from exchange.server.api.deps import Actor, Ex
from exchange.server.api.schemas import In, Out

__all__ = ["IncidentIn", "IncidentOut", "principals_router", "router"]

router = APIRouter(prefix="/v1/incidents")
principals_router = APIRouter(prefix="/v1/principals")

_KEY_ID = r"^[0-9a-f]{64}$"


class IncidentIn(In):
    detector: Annotated[str, Field(max_length=32, description="e.g. `epsilon_burn`")]
    severity: Annotated[str, Field(max_length=16, description="low | medium | high | critical")]
    response: Annotated[str, Field(max_length=16, description="alert | throttle | suspend")]
    first_seq: Annotated[int, Field(ge=0, le=2**53 - 1)]
    last_seq: Annotated[int, Field(ge=0, le=2**53 - 1)]
    principal: Annotated[str | None, Field(pattern=_KEY_ID, description="the key id")] = None
    zone: Annotated[str | None, Field(max_length=63)] = None
    throttle_seconds: Annotated[int | None, Field(ge=1, le=incidents.MAX_THROTTLE_SECONDS)] = None


class IncidentOut(Out):
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
    #: the seq of the ``incident.opened`` entry
    opened_seq: int | None
    throttled_until: datetime | None
    #: open | resolved
    status: str
    #: null until a person labels it: "true" | "false" (positive)
    label: str | None
    labelled_by: str | None

    @classmethod
    def from_domain(cls, incident: incidents.Incident) -> IncidentOut:
        return cls.model_validate(incident, from_attributes=True)


class LabelIn(In):
    label: Annotated[bool, Field(description="true positive (true) or false positive (false)")]


class ReinstatementApprovalOut(Out):
    id: str
    principal: str
    approver: str
    created_at: datetime
    seq: int | None


@router.post("", response_model=IncidentOut, status_code=201)
def open_incident(actor: Actor, ex: Ex, body: IncidentIn) -> IncidentOut:
    spec = incidents.IncidentSpec(
        detector=body.detector,
        severity=body.severity,
        response=body.response,
        first_seq=body.first_seq,
        last_seq=body.last_seq,
        principal=body.principal,
        zone=body.zone,
        throttle_seconds=body.throttle_seconds,
    )
    return IncidentOut.from_domain(incidents.open_incident(ex, actor, spec))


@router.get("", response_model=list[IncidentOut])
def list_incidents(
    actor: Actor, ex: Ex, status: Annotated[str | None, Query(max_length=16)] = None
) -> list[IncidentOut]:
    return [IncidentOut.from_domain(i) for i in incidents.list_incidents(ex, actor, status)]


@router.post("/{incident_id}/label", response_model=IncidentOut)
def label_incident(incident_id: str, actor: Actor, ex: Ex, body: LabelIn) -> IncidentOut:
    return IncidentOut.from_domain(incidents.label_incident(ex, actor, incident_id, body.label))


@principals_router.post(
    "/{key_id}/reinstatement-approvals", response_model=ReinstatementApprovalOut, status_code=201
)
def approve_reinstatement(key_id: str, actor: Actor, ex: Ex) -> ReinstatementApprovalOut:
    approval = incidents.approve_reinstatement(ex, actor, key_id)
    return ReinstatementApprovalOut.model_validate(approval, from_attributes=True)
