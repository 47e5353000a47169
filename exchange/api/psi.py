"""Routes for the private-join computations (``psi_cardinality``, ``psi_members``,
``psi_aggregate``)."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1")
