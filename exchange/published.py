"""The catalog an exchange publishes for the catalog chain: the wire format every side imports.

``GET /v1/chain/published`` answers, to anyone, a DSSE envelope (:mod:`crypto.envelope`) of
payload type :data:`PAYLOAD_TYPE`, signed by the exchange's log key, whose payload is a
:class:`PublishedCatalog`: the exchange's zones and datasets as metadata only (names,
descriptions, column names, types and levels, the coarse row-count band the catalog shows),
the log's origin and the ledger size it was made at. No row, no salt, no snapshot digest, no
key id of a principal. A parent exchange fetches it from each child, verifies it with the
child's log key (:func:`verify_published`) and lists it with the child's recorded checkpoint.

The log key also signs checkpoint notes and receipts; DSSE's pre-authentication encoding
(which starts ``DSSEv1 <length> <payload type>``) keeps these signatures apart from a note's
(whose text starts with the origin, a name without spaces) and from each other.
"""

from __future__ import annotations

from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crypto.envelope import Envelope, verify_envelope
from crypto.errors import VerificationError
from crypto.note import ALG_ED25519, NoteVerifier

__all__ = [
    "PAYLOAD_TYPE",
    "PUBLISHED_TYPE",
    "PublishedCatalog",
    "PublishedColumn",
    "PublishedDataset",
    "PublishedError",
    "PublishedZone",
    "verify_published",
]

PAYLOAD_TYPE = "application/vnd.zonex.published-catalog+json"
PUBLISHED_TYPE: Final = "zonex.published-catalog.v1"

_Short = Annotated[str, Field(max_length=200)]
_Text = Annotated[str, Field(max_length=10_000)]
_Time = Annotated[
    str, Field(pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z$")
]
_Count = Annotated[int, Field(ge=0, le=(1 << 53) - 1)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class PublishedColumn(_Frozen):
    name: _Short
    type: _Short
    level: _Short


class PublishedDataset(_Frozen):
    name: _Short
    description: _Text
    #: the dataset's level: its highest column's
    level: _Short
    subject_column: _Short
    columns: tuple[PublishedColumn, ...]
    #: the coarse row count the catalog shows (``"1k-9.9k"``), never the exact one
    row_count_band: _Short
    #: the provider opted out of differential privacy by default at L3 (shown in the catalog)
    exact_release: bool


class PublishedZone(_Frozen):
    name: _Short
    description: _Text
    #: the providing principal's name
    owner_name: _Short
    status: _Short
    datasets: tuple[PublishedDataset, ...]


class PublishedCatalog(_Frozen):
    """What an exchange publishes about its catalog; the payload of the signed envelope."""

    type: Literal["zonex.published-catalog.v1"]
    #: the log's origin (its checkpoints' first line and its key's name)
    origin: _Short
    #: the number of ledger entries when the catalog was made
    ledger_size: _Count
    #: the registry version it was read at
    registry_version: _Count
    #: when it was made, RFC 3339 UTC with milliseconds
    published_at: _Time
    zones: tuple[PublishedZone, ...]


class PublishedError(Exception):
    """A published catalog that does not verify under the child's log key, or does not parse."""


def verify_published(data: bytes, log: NoteVerifier) -> tuple[Envelope, PublishedCatalog]:
    """Verify a published-catalog envelope (the bytes received) with the publishing exchange's
    log key, then parse its payload; raise :class:`PublishedError` saying why not.

    The payload's origin must be the key's name: a catalog signed by the right key for another
    log is refused.
    """
    if log.signature_type != ALG_ED25519:
        raise PublishedError("a published catalog is checked with a log key (log.pub)")
    try:
        envelope = Envelope.model_validate_json(data)
    except ValidationError as exc:
        raise PublishedError(f"not a signed envelope: {exc.errors()[0]['msg']}") from exc
    try:
        # verify the bytes received, then parse them (never a re-serialization)
        verify_envelope(envelope, PAYLOAD_TYPE, {log.key.key_id: log.key})
        catalog = PublishedCatalog.model_validate_json(envelope.payload_bytes())
    except VerificationError as exc:
        raise PublishedError(f"the envelope does not verify with the log key: {exc}") from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise PublishedError(f"not a published catalog: {where}: {first['msg']}") from exc
    if catalog.origin != log.name:
        raise PublishedError(
            f"published for the log {catalog.origin!r}, not {log.name!r} (the key given)"
        )
    return envelope, catalog
