"""Issuing receipts (the format and its offline verification: :mod:`crypto.receipt`).

:func:`record_computation` appends the computation's ledger entry (running ``apply``, e.g. the
privacy-budget charge, in the same transaction), then signs the statement with the log key,
signs a checkpoint that covers the entry and assembles the bundle with its inclusion proof.

The grants a computation was authorized under are checked again inside that transaction: it
holds the ledger-head lock, so a revocation ledgered by any process before the computation's
entry refuses the release (another process's policy cache may not have seen it yet).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from crypto.encoding import b64url_encode
from crypto.envelope import sign_envelope
from crypto.receipt import STATEMENT_TYPE, build_bundle, result_digest, statement_digest
from exchange.errors import DeniedError, LedgerError
from exchange.server import xborder
from exchange.server.ledger import Apply, EntryDraft
from exchange.server.models import GrantRow
from exchange.server.runtime import Exchange
from policy.levels import Operation

if TYPE_CHECKING:
    from exchange.server.dispatch import NodeResult

__all__ = ["record_computation"]

_OPERATIONS = frozenset(op.value for op in Operation)


def record_computation(
    ex: Exchange,
    *,
    kind: str,
    actor: str,
    statement: Mapping[str, Any],
    result: Any,
    refs: Mapping[str, str] | None = None,
    attrs: Mapping[str, str | int] | None = None,
    apply: Apply | None = None,
    node: NodeResult | None = None,
    nodes: Sequence[tuple[str, NodeResult | None]] | None = None,
    more: Sequence[EntryDraft] = (),
    registry_version: int | None = None,
) -> tuple[dict[str, Any], Any]:
    """Ledger a computation and return ``(receipt bundle, apply's return value)``.

    ``statement`` holds the receipt fields except ``type``, ``kind``, ``result_digest``, ``time``
    and ``ledger_index``, which are filled in here. ``node``: the zone node's verified answer
    when a node computed the result; the statement names its key and the bundle embeds its
    signed envelope. ``nodes``: for a computation over several zones (a secure sum), each zone
    with its node's verified answer (None for a zone hosted in-process), in the statement's
    ``zones`` order: the statement's ``nodes`` names every zone's node (or none) and the
    bundle embeds every node's envelope (``node_results``). ``more``: entries committed right
    after the computation's, in its transaction (a cross-border decision, which ``apply``
    completes). ``registry_version``: the version the request was authenticated at, for the
    cross-border lookup (None: current).
    """
    if ex.log_signer is None:
        raise LedgerError("this process holds no log key and cannot sign receipts")
    digest = result_digest(result)
    core: dict[str, Any] = {
        **statement,
        "type": "zonex.receipt.v1",
        "kind": kind,
        "result_digest": digest,
        "time": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
    }
    if node is not None and nodes is not None:
        raise ValueError("a computation names one node or the nodes of its zones, not both")
    if node is not None:
        core["node"] = _node_ref(node)
    if nodes is not None:
        core["nodes"] = [
            {"zone": zone, "node": None if answer is None else _node_ref(answer)}
            for zone, answer in nodes
        ]
    draft = EntryDraft(
        kind=f"computation.{kind}",
        actor=actor,
        refs=dict(refs or {}),
        digests={"statement": statement_digest(core), "result": digest},
        attrs=dict(attrs or {}),
    )
    grants = sorted(
        {g for g in str(statement.get("grant") or "").split(",") if g.startswith("grant:")}
    )
    abroad = [] if more else _abroad(ex, kind, actor, refs, statement, registry_version)
    try:
        if abroad:
            # a consumer abroad: the cross-border decisions in the release's transaction
            appended = xborder.record_releases(
                abroad,
                lambda wrapped, extra: ex.ledger.append_group(
                    [draft, *extra], _still_granted(grants, wrapped)
                )[0],
                apply,
            )
        elif more:
            appended = ex.ledger.append_group([draft, *more], _still_granted(grants, apply))[0]
        else:
            appended = ex.ledger.append(draft, _still_granted(grants, apply))
    except DeniedError as exc:
        ex.ledger.append(
            EntryDraft(
                kind="access.denied",
                actor=actor,
                refs=dict(refs or {}),
                attrs={"reason": exc.reason, "rule": ",".join(grants)[:200], "step": "release"},
            )
        )
        exc.ledgered = True
        raise
    signed = {**core, "ledger_index": appended.seq}
    envelope = sign_envelope(STATEMENT_TYPE, signed, [ex.log_signer.key])
    checkpoint = ex.ledger.checkpoint(persist=False, covering=appended.seq)
    proof = ex.ledger.inclusion_proof(appended.seq, checkpoint.size)
    bundle = build_bundle(
        envelope,
        appended.body or ex.ledger.entry(appended.seq),
        appended.seq,
        checkpoint.size,
        proof,
        checkpoint.note,
        None if node is None else node.envelope,
        None
        if nodes is None
        else [
            {"zone": zone, "key_id": answer.node, "envelope": answer.envelope}
            for zone, answer in nodes
            if answer is not None
        ],
    )
    return bundle, appended.value


def _node_ref(answer: NodeResult) -> dict[str, str]:
    """How a statement names the node that answered: its key id and raw public key."""
    return {"key_id": answer.node, "public_key": b64url_encode(answer.public_key)}


def _abroad(
    ex: Exchange,
    kind: str,
    actor: str,
    refs: Mapping[str, str] | None,
    statement: Mapping[str, Any],
    version: int | None,
) -> list[xborder.Release]:
    """The releases abroad of a computation that did not decide them itself: decided here with
    no subject count (DP aggregates are anonymized output and exempt; personal information
    whose subjects are not counted needs an assessment). A secure sum releases one
    contribution of each zone's dataset (its statement's ``datasets``); any other computation
    one dataset of its ``refs`` zone."""
    if kind not in _OPERATIONS:
        return []
    dp = str(statement.get("epsilon") or "0") not in ("0", "0.0")
    if kind == Operation.SECURE_SUM.value:
        pairs = [(str(d["zone"]), str(d["name"])) for d in statement.get("datasets") or ()]
    else:
        zone, dataset = (refs or {}).get("zone"), (refs or {}).get("dataset")
        pairs = [] if zone is None or dataset is None else [(zone, dataset)]
    found = (
        xborder.release_for(ex, actor, zone, name, Operation(kind), dp=dp, registry_version=version)
        for zone, name in pairs
    )
    return [release for release in found if release is not None]


def _still_granted(grants: list[str], apply: Apply | None) -> Apply:
    """``apply`` preceded by a check that every grant is still active and unexpired."""

    def checked(session: Session, draft: EntryDraft) -> Any:
        now = datetime.now(UTC)
        for grant_id in grants:
            row = session.get(GrantRow, grant_id)
            if row is None or row.status != "active":
                raise DeniedError("not_granted", "the grant was revoked before the release")
            if row.expires_at <= now:
                raise DeniedError("expired", "the grant expired before the release")
        return None if apply is None else apply(session, draft)

    return checked
