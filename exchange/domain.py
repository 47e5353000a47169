"""Domain objects: what services pass around. Rows and wire schemas map to and from these."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from exchange.errors import InvalidInputError


class PrincipalKind(StrEnum):
    OPERATOR = "operator"
    AGENCY = "agency"
    ENTERPRISE = "enterprise"
    AUDITOR = "auditor"


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

    @property
    def active(self) -> bool:
        return self.status == "active"


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    level: str


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
