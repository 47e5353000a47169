"""Wire schemas of the HTTP API (pydantic). Mapped explicitly from domain objects."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from crypto.encoding import b64url_encode
from exchange.domain import Dataset, Principal, Zone
from exchange.zonestore import row_count_band

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


class PrincipalOut(Out):
    key_id: str
    name: str
    kind: str
    status: str
    created_at: datetime

    @classmethod
    def from_domain(cls, p: Principal) -> PrincipalOut:
        return cls(
            key_id=p.key_id,
            name=p.name,
            kind=p.kind.value,
            status=p.status,
            created_at=p.created_at,
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

    @classmethod
    def from_domain(cls, d: Dataset) -> DatasetOut:
        return cls(
            zone=d.zone,
            name=d.name,
            description=d.description,
            subject_column=d.subject_column,
            columns=[ColumnOut(name=c.name, type=c.type, level=c.level) for c in d.columns],
            level=d.level,
            row_count_band=row_count_band(d.row_count),
            digest=d.digest,
            source=d.source,
            created_at=d.created_at,
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


class DatasetIn(In):
    name: Annotated[str, Field(min_length=1, max_length=63)]
    description: Text = ""
    subject_column: Annotated[str, Field(min_length=1, max_length=128)]
    levels: Annotated[dict[Annotated[str, Field(max_length=128)], str], Field(max_length=1000)]
    upload_id: Annotated[str, Field(min_length=32, max_length=32)] | None = None
    attach: AttachIn | None = None


class UploadOut(Out):
    upload_id: str
    sha256: str
    bytes: int
    format: str


class CheckpointOut(Out):
    size: int
    root: str
    note: str


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
