"""Routes of published reports (月报季评): a report's digest signed and recorded on the ledger."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/reports")
