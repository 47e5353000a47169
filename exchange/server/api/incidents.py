"""Routes of incidents (应急处置): the monitor's responses, labels, two-person reinstatement."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/incidents")
