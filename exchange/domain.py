"""Domain objects: what services pass around. Rows and wire schemas map to and from these."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from exchange.errors import InvalidInputError


class PrincipalKind(StrEnum):
    OPERATOR = "operator"
    AGENCY = "agency"
    ENTERPRISE = "enterprise"
    AUDITOR = "auditor"
    #: a provider's zone node (its key is approved by the operator for one zone)
    NODE = "node"
    #: follows the log and responds to abuse: opens incidents, throttles, suspends; nothing else
    MONITOR = "monitor"


#: kinds that may own zones and hold data
PROVIDER_KINDS = frozenset({PrincipalKind.AGENCY, PrincipalKind.ENTERPRISE})

NAME_RE = re.compile(r"[a-z][a-z0-9-]{1,62}")
DATASET_RE = re.compile(r"[a-z][a-z0-9_]{0,62}")
PRINCIPAL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._()-]{0,127}")


def check_zone_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
        raise InvalidInputError("zone names are 2-63 of a-z, 0-9 and '-', starting with a letter")
    return name


def check_dataset_name(name: str) -> str:
    if not DATASET_RE.fullmatch(name):
        raise InvalidInputError(
            "dataset names are 1-63 of a-z, 0-9 and '_', starting with a letter"
        )
    return name


@dataclass(frozen=True)
class Principal:
    key_id: str
    name: str
    kind: PrincipalKind
    status: str
    created_at: datetime
    #: ISO 3166-1 alpha-2 (policy.xborder); None: the operator's ``jurisdiction`` setting
    jurisdiction: str | None = None
    #: a critical information infrastructure operator (cross-border rules, Art. 7(1))
    ciio: bool = False

    @property
    def active(self) -> bool:
        return self.status == "active"


#: a column's personal-information class (policy.xborder.PiClass); ``none`` by default
PI_CLASSES = ("none", "personal", "sensitive")


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    level: str
    #: personal-information class: none | personal | sensitive
    pi: str = "none"


@dataclass(frozen=True)
class Dataset:
    zone: str
    name: str
    description: str
    subject_column: str
    columns: tuple[Column, ...]
    level: str
    row_count: int
    digest: str
    source: str
    created_at: datetime
    #: the provider's rules in force opt out of DP by default at L3: differencing possible
    exact_release: bool = False


@dataclass(frozen=True)
class Zone:
    name: str
    owner: str
    owner_name: str
    description: str
    public_key: bytes
    status: str
    created_at: datetime
    datasets: tuple[Dataset, ...] = ()


#: DSSE payload type of a zone's signed part of a secure sum (the consumer verifies it)
CONTRIBUTION_TYPE = "application/vnd.zonex.secure-sum-contribution+json"
CONTRIBUTION_VERSION = "zonex.secure-sum-contribution.v1"

#: DSSE payload type of an access approval; nothing else verifies as one
APPROVAL_TYPE = "application/vnd.zonex.approval+json"


def approval_payload(
    request: Mapping[str, Any],
    *,
    approver: str,
    not_after: datetime,
    datasets: Sequence[str] | None = None,
    operations: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The exact terms an approver signs for an access request (given as its API/JSON form or
    any mapping with ``id``, ``consumer``, ``zone``, ``datasets``, ``operations``, ``purpose``).

    It may narrow the request (fewer datasets or operations, an earlier end), never widen it;
    the exchange checks that against the stored request.
    """
    if not_after.tzinfo is None:
        raise ValueError("not_after must be timezone-aware")
    return {
        "type": "zonex.approval.v1",
        "request": request["id"],
        "consumer": request["consumer"],
        "zone": request["zone"],
        "datasets": sorted(set(datasets if datasets is not None else request["datasets"])),
        "operations": sorted(set(operations if operations is not None else request["operations"])),
        "purpose": request["purpose"],
        "not_after": not_after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "approver": approver,
    }


def leveled_columns(
    columns: Sequence[tuple[str, str]],
    levels: Mapping[str, str],
    subject_column: str,
    pi: Mapping[str, str] | None = None,
) -> list[dict[str, str]]:
    """The catalog's ``[{"name", "type", "level"}]`` for a table's ``(name, type)`` columns and
    the provider's column -> level map: every column has exactly one known level and the subject
    column is a column (the exchange and a zone node register datasets through this).

    ``pi``: column -> personal-information class (``personal`` | ``sensitive``; ``none`` is the
    default and is not stored); a column carrying one gets a ``"pi"`` key."""
    classes = check_pi_classes(pi or {}, [name for name, _ in columns])
    from policy.levels import Level

    names = [name for name, _ in columns]
    missing = [n for n in names if n not in levels]
    extra = [n for n in levels if n not in names]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no level for column(s) {', '.join(missing)}")
        if extra:
            parts.append(f"no such column(s) {', '.join(extra)}")
        raise InvalidInputError("; ".join(parts))
    if subject_column not in names:
        raise InvalidInputError(f"subject column {subject_column!r} is not in the data")
    out = []
    for name, kind in columns:
        try:
            level = Level(levels[name])
        except ValueError as exc:
            raise InvalidInputError(
                f"unknown level {levels[name]!r} for column {name!r}; "
                f"use one of {', '.join(lv.value for lv in Level)}"
            ) from exc
        col = {"name": name, "type": kind, "level": level.value}
        if classes.get(name, "none") != "none":
            col["pi"] = classes[name]
        out.append(col)
    return out


def check_pi_classes(pi: Mapping[str, str], names: Sequence[str]) -> dict[str, str]:
    """``pi`` (column -> personal-information class) if every column exists and every class is
    known; else :class:`InvalidInputError` naming them."""
    extra = [n for n in pi if n not in names]
    if extra:
        raise InvalidInputError(
            f"personal-information class for no such column(s) {', '.join(extra)}"
        )
    for name, cls in pi.items():
        if cls not in PI_CLASSES:
            raise InvalidInputError(
                f"unknown personal-information class {cls!r} for column {name!r}; "
                f"use one of {', '.join(PI_CLASSES)}"
            )
    return dict(pi)
