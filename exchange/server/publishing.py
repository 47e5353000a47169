"""The catalog this exchange publishes for its parent in the catalog chain
(``GET /v1/chain/published``; the format is :mod:`exchange.published`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from crypto.envelope import sign_envelope
from crypto.keys import SigningKey
from exchange.domain import Zone
from exchange.node.store import row_count_band
from exchange.published import (
    PAYLOAD_TYPE,
    PUBLISHED_TYPE,
    PublishedCatalog,
    PublishedColumn,
    PublishedDataset,
    PublishedZone,
)
from exchange.server.ledger import format_time

__all__ = ["render_published"]


def render_published(
    zones: Sequence[Zone], origin: str, ledger_size: int, registry_version: int, key: SigningKey
) -> bytes:
    """The catalog this exchange publishes (``zones`` as metadata only, read at
    ``registry_version``), as the JSON of a DSSE envelope signed by the log key ``key``."""
    catalog = PublishedCatalog(
        type=PUBLISHED_TYPE,
        origin=origin,
        ledger_size=ledger_size,
        registry_version=registry_version,
        published_at=format_time(datetime.now(UTC)),
        zones=tuple(
            PublishedZone(
                name=zone.name,
                description=zone.description,
                owner_name=zone.owner_name,
                status=zone.status,
                datasets=tuple(
                    PublishedDataset(
                        name=d.name,
                        description=d.description,
                        level=d.level,
                        subject_column=d.subject_column,
                        columns=tuple(
                            PublishedColumn(name=c.name, type=c.type, level=c.level)
                            for c in d.columns
                        ),
                        row_count_band=row_count_band(d.row_count),
                        exact_release=d.exact_release,
                    )
                    for d in zone.datasets
                ),
            )
            for zone in zones
        ),
    )
    envelope = sign_envelope(PAYLOAD_TYPE, catalog.model_dump(mode="json"), [key])
    return envelope.model_dump_json().encode("utf-8")
