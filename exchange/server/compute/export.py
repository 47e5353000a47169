"""``export``: row export where the level allows it (``L1``, ``L2`` by default).

``L2`` data carries the ``mask_columns`` obligation: the subject column is replaced by a
pseudonym, HMAC-SHA-256 of the consumer's key id and the subject id (length-prefixed) under the
zone's pseudonym key, 128 bits in hex (:meth:`exchange.subjects.ZoneSubjects.pseudonym`). A
consumer links its own exports, not another consumer's, and cannot recover the id. The key is
derived for this use alone (label ``zonex/v1/pseudonym``): no other answer of the exchange is
keyed by it, so nothing a caller can ask confirms a guessed pseudonym.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto.canonical import canonicalize
from exchange import subjects
from exchange.domain import Principal
from exchange.errors import InvalidInputError
from exchange.server import access, xborder
from exchange.server.compute.source import open_source
from exchange.server.ledger import Apply, EntryDraft
from exchange.server.receipts import record_computation
from exchange.server.runtime import Exchange
from policy import Obligation, Operation, obligations

MAX_EXPORT_ROWS = 100_000


def _json_value(value: Any) -> Any:
    """JSON-safe, float-free values (DESIGN: signed objects carry decimal strings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, decimal.Decimal):
        return format(value, "f")
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return str(value)


def export_rows(
    ex: Exchange, actor: Principal, zone: str, dataset: str, purpose: str
) -> dict[str, Any]:
    auth = access.authorize(ex, actor, zone, dataset, Operation.EXPORT, purpose)
    with Session(ex.engine) as session:
        row = access._dataset(session, zone, dataset)
        names = [c["name"] for c in row.columns]
        subject = row.subject_column
        count = row.row_count
    if count > MAX_EXPORT_ROWS:
        raise InvalidInputError(f"export is limited to {MAX_EXPORT_ROWS} rows; aggregate instead")
    mask = Obligation.MASK_COLUMNS in obligations(auth.level, Operation.EXPORT)
    keys = subjects.ZoneSubjects.of(ex.zones_dir / zone) if mask else None
    with open_source(ex, row) as src, src.engine.connect() as conn:
        result = conn.execute(select(*src.relation.c).limit(MAX_EXPORT_ROWS + 1))
        rows = [list(r) for r in result]
    if len(rows) > MAX_EXPORT_ROWS:
        raise InvalidInputError(f"export is limited to {MAX_EXPORT_ROWS} rows; aggregate instead")
    index = names.index(subject)
    # a consumer abroad: the rows' subjects are digested under the provider's cross-border key
    # here (never stored as ids) and counted in the release's transaction
    abroad = xborder.release_for(
        ex,
        actor.key_id,
        zone,
        dataset,
        Operation.EXPORT,
        dp=False,
        subjects=(r[index] for r in rows),
    )
    out_rows = []
    for r in rows:
        values = [_json_value(v) for v in r]
        if keys is not None and values[index] is not None:
            values[index] = keys.pseudonym(actor.key_id, str(values[index]))
        out_rows.append(values)
    result_doc = {
        "zone": zone,
        "dataset": dataset,
        "columns": names,
        "masked": [subject] if mask else [],
        "level": auth.level.value,
        "rows": out_rows,
    }
    query = {
        "operation": "export",
        "zone": zone,
        "dataset": dataset,
        "purpose": auth.request.purpose,
    }

    def record(apply: Apply | None, more: list[EntryDraft]) -> tuple[dict[str, Any], Any]:
        return record_computation(
            ex,
            kind="export",
            actor=actor.key_id,
            statement={
                "consumer": actor.key_id,
                "zones": [zone],
                "datasets": [{"zone": zone, "name": dataset, "snapshot": auth.digest}],
                "query_digest": hashlib.sha256(canonicalize(query)).hexdigest(),
                "rules_version": None,
                "grant": auth.decision.rule,
                "policy_version": auth.decision.policy_version,
                "purpose": auth.request.purpose,
                "k": None,
                "epsilon": "0",
                "output_level": auth.level.value,
            },
            result=result_doc,
            refs={"zone": zone, "dataset": dataset},
            attrs={**auth.attrs(), "rows": len(out_rows)},
            apply=apply,
            more=more,
        )

    receipt, _ = record(None, []) if abroad is None else abroad.record(record)
    return {"result": result_doc, "receipt": receipt}
