"""``he_score``: a consumer's secret linear model evaluated on a zone's features, encrypted.

The protocol (DESIGN, "Encrypted scoring"; ``docs/he.md``):

1. The consumer commits to its model (:func:`commit_model`): the exchange stores and ledgers
   the public document (feature names, link, parameter set, a hiding digest of the weights)
   and its SHA-256, the **commitment**. Weights never reach the exchange.
2. It uploads its public CKKS context (:mod:`exchange.server.compute.contexts`) and its weights
   encrypted under it (one ciphertext per weight, replicated over every slot), as one framed
   binary upload.
3. :func:`run_score` names the commitment, the context, the upload and the entity ids. Every
   call is authorized (``he_score``). Every id must be a subject id (no control or format
   character: :func:`exchange.subjects.check_subject_id`) and every entity must have a live
   consent for this consumer and purpose (found by consent digest, :func:`exchange.server.access.
   live_consents`): otherwise the call is refused **by position and count**, before any
   feature is read, and the refusal is ledgered. For a zone on its provider's node the consent
   digests are the node's (the exchange holds no subject key for it): the task carries the live
   consents of the consumer and purpose as consent digest -> consent id
   (:func:`exchange.server.access.live_consent_digests`, at most ``max_node_score_consents``),
   the node matches the ids and refuses **by count** (no positions) before reading a feature,
   or names the consent of each id, checked here against those sent. Then the zone reads
   exactly the committed feature columns for those entities and computes packed ``Enc(w·x)``
   (4096 entities per ciphertext, column packing, no rotations;
   :func:`crypto.he.encrypted_scores`): in this process, or, for a dataset hosted on its
   zone's node, on the node as an ``he_score`` task (:mod:`exchange.node.score`; the same
   code), whose uploaded scores are checked here against the digests the node signed; the
   receipt then embeds the node's signed result.
4. The consumer decrypts locally, adds its bias and applies its link (:mod:`exchange.client.he`).

What comes back names no subject by anything derived from a secret (DESIGN, "Privacy
defaults"): a digest keyed by the zone of an id the caller chose would be an oracle for every
other keyed digest of the zone (see :mod:`exchange.subjects`). A refusal lists the refused
positions in the request (``refused_positions``) and their count (``refused_count``). The
result and the receipt cite the ids scored by a commitment, ``subjects`` = SHA-256(nonce ||
canonical JSON of the ids in request order), with a fresh 32-byte nonce returned to the consumer
only (``subjects_nonce``, outside the signed result): the consumer can open it to an auditor;
no one else, the exchange included, can test a guess against it. The ledger entry of the score
adds ``consents``, the SHA-256 of the canonical JSON list of the consent ids used (request
order), so an auditor holding the consent table sees which consents each score relied on.

Raw ids pass through memory only: they are needed to find the zone's rows, which are keyed by
them (for a node-hosted zone they also pass, for the task's duration only, through a salted
input file the node fetches, deleted when the task ends). Scores come back in the order the ids
were sent.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
from collections.abc import Sequence
from typing import Any, NoReturn

from sqlalchemy.orm import Session

from crypto import he
from crypto.canonical import canonicalize
from crypto.encoding import b64url_encode
from crypto.errors import CryptoError
from exchange import subjects
from exchange.domain import Principal
from exchange.errors import ConflictError, DeniedError, InvalidInputError, NotFoundError
from exchange.node.score import IDS_SALT_BYTES, Scored, score_columns, score_entities
from exchange.node.score import KIND as NODE_TASK_KIND
from exchange.node.score import OUTPUT as SCORES_OUTPUT
from exchange.server import access, dispatch
from exchange.server.compute import contexts
from exchange.server.compute.source import open_source
from exchange.server.ledger import EntryDraft
from exchange.server.models import DatasetRow, ModelCommitmentRow, NodeRow
from exchange.server.receipts import record_computation
from exchange.server.runtime import Exchange
from policy import Operation

__all__ = ["commit_model", "get_model", "run_score"]
#: refused positions listed in a problem (the count is always exact)
_MAX_LISTED = 10_000
#: a score's ledger entry names the consents it used when they are at most this many
MAX_CITED_CONSENTS = 64


def _model_out(row: ModelCommitmentRow) -> dict[str, Any]:
    return {
        "commitment": row.commitment,
        "owner": row.owner,
        "document": row.document,
        "created_at": row.created_at.isoformat(),
    }


def commit_model(ex: Exchange, actor: Principal, document: object) -> dict[str, Any]:
    """Store and ledger a model commitment (``he.model_committed``). Idempotent for its owner;
    the same commitment from another principal is a conflict (it holds a secret nonce, so a
    second owner can only have copied it)."""
    try:
        doc = he.parse_model_document(document)
        commitment = he.model_commitment(doc)
    except CryptoError as exc:
        raise InvalidInputError(f"not a model document: {exc}", reason="bad_model") from exc

    def apply(session: Session, draft: EntryDraft) -> dict[str, Any]:
        row = session.get(ModelCommitmentRow, commitment)
        if row is not None:
            raise ConflictError("this model commitment is already registered")
        row = ModelCommitmentRow(commitment=commitment, owner=actor.key_id, document=doc)
        session.add(row)
        session.flush()
        return _model_out(row)

    with Session(ex.engine) as session:
        existing = session.get(ModelCommitmentRow, commitment)
        if existing is not None:
            if existing.owner != actor.key_id:
                raise ConflictError("this model commitment is registered by someone else")
            return _model_out(existing)
    draft = EntryDraft(
        kind="he.model_committed",
        actor=actor.key_id,
        digests={"model": commitment, "weights": doc["weights_digest"]},
        attrs={
            "features": len(doc["features"]),
            "link": doc["link"],
            "parameter_set": doc["parameter_set"],
        },
    )
    stored: dict[str, Any] = ex.ledger.append(draft, apply).value
    return stored


def get_model(ex: Exchange, actor: Principal, commitment: str) -> dict[str, Any]:
    """A commitment's public document: for its owner, auditors and the operator."""
    with Session(ex.engine) as session:
        row = session.get(ModelCommitmentRow, commitment)
        if row is None or (
            row.owner != actor.key_id and actor.kind.value not in ("operator", "auditor")
        ):
            raise NotFoundError("no such model commitment")
        return _model_out(row)


def _check_ids(ex: Exchange, ids: object) -> list[str]:
    limit = ex.settings.max_score_entities
    if not isinstance(ids, list) or not 1 <= len(ids) <= limit:
        raise InvalidInputError(f"ids is a list of 1..{limit} entity ids")
    for k, i in enumerate(ids):
        subjects.check_subject_id(i, what=f"the entity id at position {k}")
    if len(set(ids)) != len(ids):
        raise InvalidInputError("each entity id may appear once")
    return ids


def _refuse(
    ex: Exchange,
    actor: Principal,
    zone: str,
    dataset: str,
    error: InvalidInputError | DeniedError,
    positions: Sequence[int],
    asked: int,
    count: int | None = None,
) -> NoReturn:
    """Ledger a refusal and raise ``error`` naming the refused positions and their count only
    (never anything derived from the ids: see the module docstring). ``count`` without
    positions: a zone's node refused that many ids and names no positions."""
    refused = len(positions) if count is None else count
    ex.ledger.append(
        EntryDraft(
            kind="he.score_refused",
            actor=actor.key_id,
            refs={"zone": zone, "dataset": dataset},
            attrs={
                "reason": str(error.extra.get("reason", "")),
                "refused": refused,
                "asked": asked,
            },
        )
    )
    # the problem renderer passes only strings and integers through: lists travel joined
    error.extra.update(
        refused_positions=",".join(str(p) for p in positions[:_MAX_LISTED]),
        refused_count=refused,
    )
    error.ledgered = True
    raise error


def _no_consent(
    ex: Exchange,
    actor: Principal,
    zone: str,
    dataset: str,
    positions: Sequence[int],
    count: int,
    asked: int,
) -> NoReturn:
    """Refuse (and ledger) a score some of whose entities have no live consent."""
    _refuse(
        ex,
        actor,
        zone,
        dataset,
        DeniedError("no_consent", f"{count} entities have no live consent"),
        positions,
        asked,
        count,
    )


def _read_here(
    ex: Exchange,
    row: DatasetRow,
    *,
    id_type: str,
    features: Sequence[str],
    ids: Sequence[str],
    ctx: Any,
    weights: Sequence[bytes],
) -> Scored:
    """The zone's part, in this process: read the rows and score them
    (:func:`exchange.node.engine.score_entities`, the code a zone node runs)."""
    with open_source(ex, row) as src:
        return score_entities(
            src.engine,
            src.relation,
            src.dialect,
            subject_column=row.subject_column,
            id_type=id_type,
            features=features,
            ids=ids,
            ctx=ctx,
            weights=weights,
        )


def _node_mismatch(what: str) -> dispatch.NodeRefusedError:
    return dispatch.NodeRefusedError(
        f"the zone's node answered {what} other than asked; nothing was released",
        reason="node_mismatch",
    )


def _consent_attrs(consents: Sequence[str | None]) -> dict[str, str | int]:
    """The consents a score relied on, for an auditor checking them against the ledger's
    ``consent.recorded`` / ``consent.withdrawn`` entries: how many distinct ones
    (``consent_count``) and, up to :data:`MAX_CITED_CONSENTS` of them, their ids, sorted and
    comma-joined (``consent_ids``); beyond that only the count (an entry stays small)."""
    used = sorted({c for c in consents if c is not None})
    attrs: dict[str, str | int] = {"consent_count": len(used)}
    if len(used) <= MAX_CITED_CONSENTS:
        attrs["consent_ids"] = ",".join(used)
    return attrs


def _node_attrs(answer: dispatch.NodeResult) -> dict[str, str | int]:
    """What the computation's ledger entry says of the node's answer (as for private joins)."""
    return {
        "node_task": str(answer.payload["task"]),
        "node_result": hashlib.sha256(canonicalize(answer.envelope)).hexdigest(),
    }


def _score_on_node(
    ex: Exchange,
    actor: Principal,
    node: NodeRow,
    *,
    dataset: str,
    snapshot: str,
    purpose: str,
    model: str,
    doc: dict[str, Any],
    context: str,
    weights: str,
    ids: list[str],
    ctx: Any,
    consents: dict[str, str],
) -> tuple[Scored, dispatch.NodeResult, list[str | None] | int]:
    """The zone's part on its node (:mod:`exchange.node.score`): the node reads the features
    and uploads the encrypted scores, checked here against the digests it signed. The exchange
    never reads a feature.

    The ids travel as a task input (never in the task, which is stored): a file holding a
    random 32-byte salt and the canonical JSON of the ids, deleted when the task ends; the task
    names its SHA-256 (salted, so the digest the node signs tests no guess).

    ``consents``: the live consents of the consumer and purpose (consent digest -> consent
    id, :func:`exchange.server.access.live_consent_digests`); the node digests each id with
    the zone's key, which only it holds. Returns the scores, the node's answer, and the consent
    id of each id (request order, each one of those sent), or how many ids the node found no
    consent for (then it read and computed nothing)."""
    cfg = ex.settings
    params = he.PARAMETER_SETS[doc["parameter_set"]]
    features: list[str] = list(doc["features"])
    work = cfg.data_dir / "he" / "tasks" / secrets.token_hex(16)
    work.mkdir(mode=0o700, parents=True)
    try:
        blob = secrets.token_bytes(IDS_SALT_BYTES) + canonicalize(ids)
        ids_path = work / "ids"
        fd = os.open(ids_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        upload = contexts._uploads(ex) / f"{actor.key_id}.{context}.{weights}"
        slots = he.slot_count(params)
        count = -(-len(ids) // slots)
        limit = he.max_ciphertext_bytes(params)
        outputs = {SCORES_OUTPUT: (work / SCORES_OUTPUT, count * (limit + 4))}
        inputs = {
            "context": cfg.data_dir / "contexts" / context,
            "weights": upload,
            "ids": ids_path,
        }
        ids_spec = {"sha256": hashlib.sha256(blob).hexdigest(), "count": len(ids)}
        fields = {
            "consumer": actor.key_id,
            "purpose": purpose,
            "dataset": dataset,
            "snapshot": snapshot,
            "model": model,
            "features": features,
            "link": doc["link"],
            "parameter_set": doc["parameter_set"],
            "context": context,
            "weights": {"sha256": weights, "bytes": upload.stat().st_size},
            "ids": {**ids_spec, "bytes": len(blob)},
            "consents": consents,
        }
        del blob
        answer = dispatch.dispatch(
            ex, node, NODE_TASK_KIND, fields, files=dispatch.TaskFiles(inputs, outputs)
        )
        body = answer.payload
        if body.get("snapshot") != snapshot or body.get("ids") != ids_spec:
            raise _node_mismatch("for another snapshot or list of ids")
        if "no_consent" in body:
            missing = body["no_consent"]
            if type(missing) is not int or not 0 < missing <= len(ids) or "result" in body:
                raise _node_mismatch("a consent refusal")
            return Scored([], []), answer, missing
        used = body.get("consents")
        sent = set(consents.values())
        if (
            not isinstance(used, list)
            or len(used) != len(ids)
            or any(not isinstance(c, str) or c not in sent for c in used)
        ):
            raise _node_mismatch("consents")
        if "unscorable" in body:
            positions = body["unscorable"]
            if (
                not isinstance(positions, list)
                or not positions
                or any(type(p) is not int or not 0 <= p < len(ids) for p in positions)
                or positions != sorted(set(positions))
                or "result" in body
            ):
                raise _node_mismatch("unscorable positions")
            return Scored([], positions), answer, list(used)
        result = body.get("result")
        want: dict[str, Any] = {
            "zone": node.zone,
            "dataset": dataset,
            "model": model,
            "context": context,
            "weights": weights,
            "features": features,
            "entities": len(ids),
            "slots": slots,
        }
        if not isinstance(result, dict) or set(result) != {*want, "ciphertexts"}:
            raise _node_mismatch("a result")
        if any(result[name] != value for name, value in want.items()):
            raise _node_mismatch("a computation")
        path = outputs[SCORES_OUTPUT][0]
        data = path.read_bytes() if path.exists() else b""
        claim = (body.get("outputs") or {}).get(SCORES_OUTPUT) or {}
        if claim.get("sha256") != hashlib.sha256(data).hexdigest():  # dispatch checked it too
            raise _node_mismatch("scores of another digest")
        try:
            chunks = he.unpack_ciphertexts(data, max_items=count, max_item_bytes=limit)
            for chunk in chunks:
                he.load_ciphertext(ctx, chunk, max_bytes=limit, kind=params.scheme)
        except CryptoError as exc:
            raise _node_mismatch(
                f"scores that are not ciphertexts under the context ({exc})"
            ) from exc
        if len(chunks) != count:
            raise _node_mismatch("another number of ciphertexts")
        if result["ciphertexts"] != [hashlib.sha256(c).hexdigest() for c in chunks]:
            raise _node_mismatch("ciphertext digests")
        return Scored(chunks, []), answer, list(used)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_score(
    ex: Exchange,
    actor: Principal,
    *,
    zone: str,
    dataset: str,
    purpose: str,
    model: str,
    context: str,
    weights: str,
    ids: object,
) -> dict[str, Any]:
    """Score consented entities under the consumer's encrypted model (module docstring)."""
    entity_ids = _check_ids(ex, ids)
    auth = access.authorize(ex, actor, zone, dataset, Operation.HE_SCORE, purpose, step="he_score")
    purpose = auth.request.purpose
    with Session(ex.engine) as session:
        model_row = session.get(ModelCommitmentRow, model) if isinstance(model, str) else None
        if model_row is None or model_row.owner != actor.key_id:
            raise NotFoundError("no such model commitment of yours; commit the model first")
        doc = dict(model_row.document)
        row = access._dataset(session, zone, dataset)
        session.expunge(row)
        # a node-hosted dataset is scored on its zone's node; without an active node the
        # in-process path refuses it (open_source: node_hosted)
        node = dispatch.node_for_zone(session, zone) if row.source == "node" else None
        if node is not None:
            session.expunge(node)
    features: list[str] = list(doc["features"])
    id_type = score_columns(row.name, row.subject_column, row.columns, features)
    params = he.PARAMETER_SETS[doc["parameter_set"]]
    ctx = contexts.load_context(ex, context, expected=params)
    encrypted = contexts.load_ciphertexts(ex, actor, context, weights)
    if len(encrypted) != len(features):
        raise InvalidInputError(
            f"the model commits to {len(features)} weights; the upload holds {len(encrypted)}"
        )

    answer: dispatch.NodeResult | None = None
    consents: list[str | None]
    if node is not None:
        # consent first, on the node: only it holds the zone's subject key
        live = access.live_consent_digests(ex, zone, actor.key_id, purpose)
        if not live:
            _no_consent(ex, actor, zone, dataset, [], len(entity_ids), len(entity_ids))
        scored, answer, checked = _score_on_node(
            ex,
            actor,
            node,
            dataset=dataset,
            snapshot=auth.digest,
            purpose=purpose,
            model=model,
            doc=doc,
            context=context,
            weights=weights,
            ids=entity_ids,
            ctx=ctx,
            consents=live,
        )
        if isinstance(checked, int):
            _no_consent(ex, actor, zone, dataset, [], checked, len(entity_ids))
        consents = checked
    else:
        if row.source == "node":
            # its node is not active: refused as node-hosted, before any key is touched here
            with open_source(ex, row):
                pass
        # consent first: nothing about an unconsented entity is read, computed or returned
        consents = access.live_consents(ex, zone, entity_ids, actor.key_id, purpose)
        unconsented = [k for k, c in enumerate(consents) if c is None]
        if unconsented:
            _no_consent(ex, actor, zone, dataset, unconsented, len(unconsented), len(entity_ids))
        scored = _read_here(
            ex, row, id_type=id_type, features=features, ids=entity_ids, ctx=ctx, weights=encrypted
        )
    if scored.unscorable:
        _refuse(
            ex,
            actor,
            zone,
            dataset,
            InvalidInputError(
                f"{len(scored.unscorable)} consented entities have no single complete row",
                reason="unscorable",
            ),
            scored.unscorable,
            len(entity_ids),
        )
    chunks = scored.ciphertexts

    # which ids, in which order: hidden by a nonce only the consumer receives
    nonce = secrets.token_bytes(subjects.NONCE_BYTES)
    committed = subjects.commit_ids(nonce, entity_ids)
    used = hashlib.sha256(canonicalize(consents)).hexdigest()
    result = {
        "zone": zone,
        "dataset": dataset,
        "model": model,
        "context": context,
        "weights": weights,
        "features": features,
        "entities": len(entity_ids),
        "subjects": committed,
        "slots": he.slot_count(params),
        "ciphertexts": [hashlib.sha256(c).hexdigest() for c in chunks],
        "level": auth.level.value,
    }
    query = {
        "operation": "he_score",
        "zone": zone,
        "dataset": dataset,
        "purpose": purpose,
        "model": model,
        "context": context,
        "weights": weights,
        "subjects": committed,
    }
    receipt, _ = record_computation(
        ex,
        kind="he_score",
        actor=actor.key_id,
        statement={
            "consumer": actor.key_id,
            "zones": [zone],
            "datasets": [{"zone": zone, "name": dataset, "snapshot": auth.digest}],
            "query_digest": hashlib.sha256(canonicalize(query)).hexdigest(),
            "rules_version": None,
            "grant": auth.decision.rule,
            "policy_version": auth.decision.policy_version,
            "purpose": purpose,
            "k": None,
            "epsilon": "0",
            "output_level": auth.level.value,
            "context": context,
            "model": model,
            "subjects": committed,
        },
        result=result,
        refs={"zone": zone, "dataset": dataset},
        attrs={
            **auth.attrs(),
            "entities": len(entity_ids),
            "features": len(features),
            **_consent_attrs(consents),
            **({} if answer is None else _node_attrs(answer)),
        },
        apply=lambda _session, draft: draft.digests.update(consents=used),
        node=answer,
    )
    return {
        "result": result,
        "receipt": receipt,
        "ciphertexts": [b64url_encode(c) for c in chunks],
        "subjects_nonce": b64url_encode(nonce),
    }
