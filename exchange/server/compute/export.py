"""``export``: row export where the level allows it (``L1``, ``L2`` by default).

``L2`` data carries the ``mask_columns`` obligation: the subject column is replaced by a
pseudonym, HMAC-SHA-256 of the consumer's key id and the subject id (length-prefixed) under the
zone's pseudonym key, 128 bits in hex (:meth:`exchange.subjects.ZoneSubjects.pseudonym`). A
consumer links its own exports, not another consumer's, and cannot recover the id. The key is
derived for this use alone (label ``zonex/v1/pseudonym``): no other answer of the exchange is
keyed by it, so nothing a caller can ask confirms a guessed pseudonym.

A dataset hosted on its zone's node is exported **on the node** (an ``export`` task,
:mod:`exchange.node.export`, the same reading and masking code): the pseudonyms are keyed by the
node's key, and the rows come back sealed to the consumer (a libsodium sealed box to the X25519
form of its Ed25519 key), so the exchange relays them without seeing them. The result then
names the row count, the SHA-256 of the plaintext canonical rows and of the sealed blob, all
signed by the node; the answer carries the blob (``sealed``, base64url) next to the result,
which the SDK opens and checks (:meth:`exchange.client.sdk.Client.export`). For a consumer
abroad the node also returns the rows' subjects digested under its own cross-border key, which
the exchange counts instead of digesting ids (a subject held in two zones of one provider may
then be counted twice: conservative).
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
import shutil
from typing import Any

from sqlalchemy.orm import Session

from crypto.canonical import canonicalize
from crypto.encoding import b64url_encode
from exchange import subjects
from exchange.domain import Principal
from exchange.errors import InvalidInputError
from exchange.node.export import KIND as NODE_TASK_KIND
from exchange.node.export import (
    MAX_EXPORT_ROWS,
    MAX_SEALED_BYTES,
    OUTPUT,
    SUBJECTS_OUTPUT,
    mask_rows,
    masks,
    read_rows,
)
from exchange.server import access, dispatch, xborder
from exchange.server.compute.source import open_source
from exchange.server.ledger import Apply, EntryDraft
from exchange.server.models import DatasetRow, NodeRow, PrincipalRow
from exchange.server.receipts import record_computation
from exchange.server.runtime import Exchange
from policy import Operation

__all__ = ["MAX_EXPORT_ROWS", "export_rows"]

_TOO_MANY = f"export is limited to {MAX_EXPORT_ROWS} rows; aggregate instead"


def _node_mismatch(what: str) -> dispatch.NodeRefusedError:
    return dispatch.NodeRefusedError(
        f"the zone's node answered {what} other than asked; nothing was released",
        reason="node_mismatch",
    )


def _export_on_node(
    ex: Exchange,
    actor: Principal,
    node: NodeRow,
    row: DatasetRow,
    *,
    snapshot: str,
    purpose: str,
    level: str,
    mask: bool,
    abroad: bool,
) -> tuple[dict[str, Any], bytes, set[bytes] | None, dispatch.NodeResult]:
    """The node reads, masks and seals the rows; returns the node's released result, the
    sealed blob, the subjects' cross-border digests (``abroad`` only) and its answer."""
    with Session(ex.engine) as session:
        consumer = session.get(PrincipalRow, actor.key_id)
        assert consumer is not None
        public_key = bytes(consumer.public_key)
    work = ex.settings.data_dir / "exports" / secrets.token_hex(16)
    work.mkdir(mode=0o700, parents=True)
    try:
        outputs = {OUTPUT: (work / OUTPUT, MAX_SEALED_BYTES)}
        if abroad:
            outputs[SUBJECTS_OUTPUT] = (work / SUBJECTS_OUTPUT, MAX_EXPORT_ROWS * 32)
        fields = {
            "consumer": actor.key_id,
            "consumer_key": b64url_encode(public_key),
            "purpose": purpose,
            "dataset": row.name,
            "snapshot": snapshot,
            "level": level,
            "xborder": abroad,
        }
        answer = dispatch.dispatch(
            ex, node, NODE_TASK_KIND, fields, files=dispatch.TaskFiles({}, outputs)
        )
        body = answer.payload
        if body.get("snapshot") != snapshot:
            raise _node_mismatch("for another snapshot")
        result = body.get("result")
        want = {
            "zone": node.zone,
            "dataset": row.name,
            "columns": [c["name"] for c in row.columns],
        }
        keys = {*want, "masked", "row_count", "rows_sha256", "sealed_sha256"}
        if not isinstance(result, dict) or set(result) != keys:
            raise _node_mismatch("a result")
        if any(result[name] != value for name, value in want.items()):
            raise _node_mismatch("a computation")
        if result["masked"] != [row.subject_column] and (mask or result["masked"] != []):
            raise _node_mismatch("masked columns")
        count = result["row_count"]
        if type(count) is not int or not 0 <= count <= MAX_EXPORT_ROWS:
            raise _node_mismatch("a row count")
        sealed = outputs[OUTPUT][0].read_bytes() if outputs[OUTPUT][0].exists() else b""
        if result["sealed_sha256"] != hashlib.sha256(sealed).hexdigest():
            raise _node_mismatch("a sealed blob of another digest")
        digests: set[bytes] | None = None
        if abroad:
            path = outputs[SUBJECTS_OUTPUT][0]
            blob = path.read_bytes() if path.exists() else b""
            parts = [blob[i : i + 32] for i in range(0, len(blob), 32)]
            if len(blob) % 32 or len(parts) > count or parts != sorted(set(parts)):
                raise _node_mismatch("subject digests")
            digests = set(parts)
        return result, sealed, digests, answer
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_rows(
    ex: Exchange, actor: Principal, zone: str, dataset: str, purpose: str
) -> dict[str, Any]:
    auth = access.authorize(ex, actor, zone, dataset, Operation.EXPORT, purpose)
    with Session(ex.engine) as session:
        row = access._dataset(session, zone, dataset)
        session.expunge(row)
        node = dispatch.node_for_zone(session, zone) if row.source == "node" else None
        if node is not None:
            session.expunge(node)
    names = [c["name"] for c in row.columns]
    subject = row.subject_column
    if row.row_count > MAX_EXPORT_ROWS:
        raise InvalidInputError(_TOO_MANY)
    mask = masks(auth.level)
    answer: dispatch.NodeResult | None = None
    sealed: bytes | None = None
    if node is not None:
        # a consumer abroad: the node digests the subjects under its cross-border key
        abroad = xborder.release_for(ex, actor.key_id, zone, dataset, Operation.EXPORT, dp=False)
        released, sealed, digests, answer = _export_on_node(
            ex,
            actor,
            node,
            row,
            snapshot=auth.digest,
            purpose=auth.request.purpose,
            level=auth.level.value,
            mask=mask,
            abroad=abroad is not None,
        )
        if abroad is not None:
            abroad = dataclasses.replace(abroad, digests=digests)
        result_doc: dict[str, Any] = {**released, "level": auth.level.value}
        count = int(released["row_count"])
    else:
        keys = subjects.ZoneSubjects.of(ex.zones_dir / zone) if mask else None
        with open_source(ex, row) as src:
            try:
                rows = read_rows(src.engine, src.relation)
            except InvalidInputError:
                raise InvalidInputError(_TOO_MANY) from None
        index = names.index(subject)
        # a consumer abroad: the rows' subjects are digested under the provider's cross-border
        # key here (never stored as ids) and counted in the release's transaction
        abroad = xborder.release_for(
            ex,
            actor.key_id,
            zone,
            dataset,
            Operation.EXPORT,
            dp=False,
            subjects=(r[index] for r in rows),
        )
        out_rows = mask_rows(rows, index, keys, actor.key_id)
        result_doc = {
            "zone": zone,
            "dataset": dataset,
            "columns": names,
            "masked": [subject] if mask else [],
            "level": auth.level.value,
            "rows": out_rows,
        }
        count = len(out_rows)
    query = {
        "operation": "export",
        "zone": zone,
        "dataset": dataset,
        "purpose": auth.request.purpose,
    }
    node_attrs: dict[str, str | int] = {}
    if answer is not None:
        node_attrs = {
            "node_task": str(answer.payload["task"]),
            "node_result": hashlib.sha256(canonicalize(answer.envelope)).hexdigest(),
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
            attrs={**auth.attrs(), "rows": count, **node_attrs},
            apply=apply,
            more=more,
            node=answer,
        )

    receipt, _ = record(None, []) if abroad is None else abroad.record(record)
    out: dict[str, Any] = {"result": result_doc, "receipt": receipt}
    if sealed is not None:
        out["sealed"] = b64url_encode(sealed)
    return out
