"""``he_score``: a consumer's secret linear model evaluated on a zone's features, encrypted.

The protocol (DESIGN, "Encrypted scoring"; ``docs/he.md``):

1. The consumer commits to its model (:func:`commit_model`): the exchange stores and ledgers
   the public document (feature names, link, parameter set, a hiding digest of the weights)
   and its SHA-256, the **commitment**. Weights never reach the exchange.
2. It uploads its public CKKS context (:mod:`exchange.compute.contexts`) and its weights
   encrypted under it (one ciphertext per weight, replicated over every slot), as one framed
   binary upload.
3. :func:`run_score` names the commitment, the context, the upload and the entity ids. Every
   call is authorized (``he_score``). Every id must be a subject id (no control or format
   character: :func:`exchange.subjects.check_subject_id`) and every entity must have a live
   consent for this consumer and purpose (found by consent digest, :func:`exchange.access.
   live_consents`): otherwise the call is refused **by position and count**, before any
   feature is read, and the refusal is ledgered. Then the zone reads exactly the committed
   feature columns for those entities and computes packed ``Enc(w·x)`` (4096 entities per
   ciphertext, column packing, no rotations; :func:`crypto.he.encrypted_scores`).
4. The consumer decrypts locally, adds its bias and applies its link (:mod:`exchange.he_client`).

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
them. Scores come back in the order the ids were sent.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt
import pyarrow as pa
from sqlalchemy import Connection, Double, String, cast, column, select, table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from crypto import he
from crypto.canonical import canonicalize
from crypto.encoding import b64url_encode
from crypto.errors import CryptoError
from exchange import access, subjects
from exchange.analysis import NUMERIC_TYPES
from exchange.compute import contexts
from exchange.compute.source import Source, open_source
from exchange.domain import Principal
from exchange.errors import ConflictError, DeniedError, InvalidInputError, NotFoundError
from exchange.ledger import EntryDraft
from exchange.models import DatasetRow, ModelCommitmentRow
from exchange.receipts import record_computation
from exchange.runtime import Exchange
from policy import Level, Operation

__all__ = ["commit_model", "get_model", "run_score"]

#: ids per ``IN (...)`` when reading features from an attached table
_READ_CHUNK = 5_000
#: an id that can name an integer subject (its canonical text is checked by the lookup)
_INTEGER = re.compile(r"-?[0-9]+")
#: refused positions listed in a problem (the count is always exact)
_MAX_LISTED = 10_000


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
) -> None:
    """Ledger a refusal and raise ``error`` naming the refused positions and their count only
    (never anything derived from the ids: see the module docstring)."""
    ex.ledger.append(
        EntryDraft(
            kind="he.score_refused",
            actor=actor.key_id,
            refs={"zone": zone, "dataset": dataset},
            attrs={
                "reason": str(error.extra.get("reason", "")),
                "refused": len(positions),
                "asked": asked,
            },
        )
    )
    # the problem renderer passes only strings and integers through: lists travel joined
    error.extra.update(
        refused_positions=",".join(str(p) for p in positions[:_MAX_LISTED]),
        refused_count=len(positions),
    )
    error.ledgered = True
    raise error


def _feature_columns(row: DatasetRow, features: Sequence[str]) -> tuple[str, str]:
    """Check the committed features are numeric, scorable columns; return the subject column
    and its portable type."""
    by_name = {c["name"]: c for c in row.columns}
    for name in features:
        column = by_name.get(name)
        if column is None:
            raise InvalidInputError(f"dataset {row.name!r} has no column {name!r}")
        if name == row.subject_column:
            raise InvalidInputError("the subject column is not a feature")
        if column["type"] not in NUMERIC_TYPES:
            raise InvalidInputError(f"feature {name!r} is not numeric")
        if Level(column["level"]) >= Level.CORE:
            raise DeniedError("level_ceiling", f"feature {name!r} is core data")
    return row.subject_column, by_name[row.subject_column]["type"]


def _read_features(
    ex: Exchange, row: DatasetRow, features: Sequence[str], ids: Sequence[str], id_type: str
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """The committed features of each id, one row per id in request order, and the positions of
    the ids that cannot be scored: no row, several rows, or a missing value (their rows are 0).

    An id matches a row whose subject value, as text, is exactly the id."""
    try:
        with open_source(ex, row) as src, src.engine.connect() as conn:
            if src.dialect == "duckdb" and id_type in ("text", "integer"):
                return _read_features_joined(conn, src, row, features, ids, id_type)
            return _read_features_chunked(conn, src, row, features, ids, id_type)
    except (SQLAlchemyError, duckdb.Error) as exc:
        raise InvalidInputError("the zone could not read the features") from exc


def _read_features_joined(
    conn: Connection,
    src: Source,
    row: DatasetRow,
    features: Sequence[str],
    ids: Sequence[str],
    id_type: str,
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """DuckDB: one join of the dataset with the ids (registered as an Arrow table), fetched as
    numpy columns."""
    name = f"zx_score_ids_{secrets.token_hex(8)}"
    wanted = table(name, column("pos"), column("id"))
    subject = src.relation.c[row.subject_column]
    # integer subjects compare as their canonical text, so "007" does not match 7
    key = cast(subject, String) if id_type == "integer" else subject
    stmt = select(
        wanted.c.pos.label("zx_pos"),
        *(cast(src.relation.c[f], Double).label(f"zx_v{j}") for j, f in enumerate(features)),
    ).select_from(wanted.join(src.relation, key == wanted.c.id))
    sql = str(stmt.compile(dialect=conn.dialect))
    n = len(ids)
    positions = pa.array(np.arange(n, dtype=np.int64))
    raw = conn.connection.driver_connection
    assert raw is not None
    raw.register(name, pa.table({"pos": positions, "id": pa.array(ids, pa.string())}))
    try:
        result = raw.execute(sql).fetchnumpy()
    finally:
        raw.unregister(name)
    pos = np.asarray(result["zx_pos"], dtype=np.int64)
    columns = [result[f"zx_v{j}"] for j in range(len(features))]
    # one row per subject and no NULL, else the subject is unscorable
    bad = np.bincount(pos, minlength=n) != 1
    for values in columns:
        bad[pos[np.ma.getmaskarray(values)]] = True
    keep = ~bad[pos]
    matrix = np.zeros((n, len(features)))
    for j, values in enumerate(columns):
        matrix[pos[keep], j] = np.ma.getdata(values)[keep]
    return matrix, np.flatnonzero(bad).tolist()


def _read_features_chunked(
    conn: Connection,
    src: Source,
    row: DatasetRow,
    features: Sequence[str],
    ids: Sequence[str],
    id_type: str,
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """Any SQLAlchemy source (an attached table): ``IN`` lists of ids, rows read in Python."""
    found: dict[str, list[Any] | None] = {}
    subject = src.relation.c[row.subject_column]
    columns = [src.relation.c[f] for f in features]
    for start in range(0, len(ids), _READ_CHUNK):
        chunk: list[Any] = list(ids[start : start + _READ_CHUNK])
        if id_type == "integer":
            chunk = [int(i) for i in chunk if _INTEGER.fullmatch(i)]
        for record in conn.execute(select(subject, *columns).where(subject.in_(chunk))):
            key = str(record[0])
            found[key] = None if key in found else list(record[1:])
    matrix = np.zeros((len(ids), len(features)))
    unscorable: list[int] = []
    for k, entity in enumerate(ids):
        values = found.get(entity)
        if values is None or any(v is None for v in values):
            unscorable.append(k)  # no row, several rows, or a missing feature value
        else:
            matrix[k] = [float(v) for v in values]
    return matrix, unscorable


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
    features: list[str] = list(doc["features"])
    _, id_type = _feature_columns(row, features)
    params = he.PARAMETER_SETS[doc["parameter_set"]]
    ctx = contexts.load_context(ex, context, expected=params)
    encrypted = contexts.load_ciphertexts(ex, actor, context, weights)
    if len(encrypted) != len(features):
        raise InvalidInputError(
            f"the model commits to {len(features)} weights; the upload holds {len(encrypted)}"
        )

    # consent first: nothing about an unconsented entity is read, computed or returned
    consents = access.live_consents(ex, zone, entity_ids, actor.key_id, purpose)
    unconsented = [k for k, c in enumerate(consents) if c is None]
    if unconsented:
        _refuse(
            ex,
            actor,
            zone,
            dataset,
            DeniedError("no_consent", f"{len(unconsented)} entities have no live consent"),
            unconsented,
            len(entity_ids),
        )

    matrix, unscorable = _read_features(ex, row, features, entity_ids, id_type)
    if unscorable:
        _refuse(
            ex,
            actor,
            zone,
            dataset,
            InvalidInputError(
                f"{len(unscorable)} consented entities have no single complete row",
                reason="unscorable",
            ),
            unscorable,
            len(entity_ids),
        )

    try:
        chunks = he.encrypted_scores(ctx, encrypted, matrix)
    except CryptoError as exc:
        raise InvalidInputError(f"cannot score: {exc}", reason="bad_ciphertext") from exc

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
        attrs={**auth.attrs(), "entities": len(entity_ids), "features": len(features)},
        apply=lambda _session, draft: draft.digests.update(consents=used),
    )
    return {
        "result": result,
        "receipt": receipt,
        "ciphertexts": [b64url_encode(c) for c in chunks],
        "subjects_nonce": b64url_encode(nonce),
    }
