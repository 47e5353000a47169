"""Routes of cross-border data flows (数据跨境流动): compliance approvals, counts."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/v1/xborder")
