"""``he_score``'s zone part: a zone's feature rows to encrypted scores, on the zone's host.

:func:`score_entities` is the one code path from a zone's rows to the scores: the exchange calls
it in-process for zones it hosts (:mod:`exchange.server.compute.score`), and a zone node runs it
for the ``he_score`` tasks it receives (:func:`run_he_score`), so the features of a node-hosted
dataset are read and encrypted under the consumer's key on the node and never reach the exchange.

The exchange keeps everything around it (``docs/he.md``): authorization, the model commitment,
the limits, the ``subjects`` commitment and the receipt. The consent check is the node's: the
zone's subject key lives in the node's directory only, so the task carries the live consents of
the consumer and purpose as consent digest -> consent id (``consents``), and the node digests
each id with its key. The task carries the consumer, purpose, dataset and snapshot, the model
commitment with its features, link and parameter set, the digests of the consumer's public
context and of its encrypted weights, and the digest and count of the ids. The node

1. checks its local veto (``refuse = ["he_score"]``) and that it still holds the snapshot;
2. checks the committed features against its own copy of the columns and levels;
3. fetches the context (``GET /v1/node/tasks/{id}/inputs/context``), the encrypted weights
   (``inputs/weights``) and the ids (``inputs/ids``: a 32-byte salt, then the canonical JSON
   list), each checked against its digest in the task; if any id has no consent in the task,
   it reads and computes nothing and signs only how many (``no_consent``);
4. reads the features where the rows live and computes packed ``Enc(w·x)`` (or, if some ids have
   no single complete row, computes nothing and names their positions);
5. uploads the packed ciphertexts (``PUT /v1/node/tasks/{id}/outputs/scores``) and signs a result
   naming the upload's SHA-256 and size, the snapshot, the ids' digest and count, and the part of
   the released result it knows (zone, dataset, model, context, weights, features, entities,
   slots and each ciphertext's SHA-256), so a receipt's verifier checks those against the node's
   signature, and the consent id covering each id (``consents``, request order).
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import duckdb
import httpx
import numpy as np
import numpy.typing as npt
import pyarrow as pa
from sqlalchemy import Connection, Double, Engine, String, TableClause, cast, column, select, table
from sqlalchemy.exc import SQLAlchemyError

from crypto import he
from crypto.envelope import Envelope
from crypto.errors import CryptoError
from exchange.errors import DeniedError, InvalidInputError
from exchange.node.analysis import NUMERIC_TYPES
from exchange.node.export import node_subjects
from exchange.node.home import NodeHome
from exchange.node.psi import _digest, _fetch, _field, _upload, fetch_context
from exchange.subjects import MAX_SUBJECT_ID, check_subject_id
from exchange.tasks import TaskRefused, sign_result
from policy.levels import Level

__all__ = [
    "IDS_SALT_BYTES",
    "KIND",
    "OUTPUT",
    "Scored",
    "read_features",
    "run_he_score",
    "score_columns",
    "score_entities",
]

#: the task kind, also the name a veto file refuses it by (``refuse = ["he_score"]``)
KIND = "he_score"
#: the task output holding the packed score ciphertexts
OUTPUT = "scores"
#: the random prefix of the ids input (so the ids' digest in the task tests no guess)
IDS_SALT_BYTES = 32
#: most ids one task scores (the exchange's max_score_entities is far below)
_MAX_IDS = 1_000_000

#: ids per ``IN (...)`` when reading features from an attached table
_READ_CHUNK = 5_000
#: an id that can name an integer subject (its canonical text is checked by the lookup)
_INTEGER = re.compile(r"-?[0-9]+")


@dataclass(frozen=True)
class Scored:
    """``he_score`` on a zone's rows: the encrypted scores (packed, request order), or the
    positions of the ids that cannot be scored (then nothing was computed)."""

    ciphertexts: list[bytes]
    unscorable: list[int]


def score_columns(
    dataset: str,
    subject_column: str,
    columns: Sequence[Mapping[str, str]],
    features: Sequence[str],
) -> str:
    """Check the committed features are numeric, scorable columns of the dataset; return the
    subject column's portable type."""
    by_name = {c["name"]: c for c in columns}
    for name in features:
        found = by_name.get(name)
        if found is None:
            raise InvalidInputError(f"dataset {dataset!r} has no column {name!r}")
        if name == subject_column:
            raise InvalidInputError("the subject column is not a feature")
        if found["type"] not in NUMERIC_TYPES:
            raise InvalidInputError(f"feature {name!r} is not numeric")
        if Level(found["level"]) >= Level.CORE:
            raise DeniedError("level_ceiling", f"feature {name!r} is core data")
    return by_name[subject_column]["type"]


def read_features(
    engine: Engine,
    relation: TableClause,
    dialect: str,
    subject_column: str,
    features: Sequence[str],
    ids: Sequence[str],
    id_type: str,
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """The committed features of each id, one row per id in request order, and the positions of
    the ids that cannot be scored: no row, several rows, or a missing value (their rows are 0).

    An id matches a row whose subject value, as text, is exactly the id."""
    try:
        with engine.connect() as conn:
            if dialect == "duckdb" and id_type in ("text", "integer"):
                return _read_features_joined(conn, relation, subject_column, features, ids, id_type)
            return _read_features_chunked(conn, relation, subject_column, features, ids, id_type)
    except (SQLAlchemyError, duckdb.Error) as exc:
        raise InvalidInputError("the zone could not read the features") from exc


def _read_features_joined(
    conn: Connection,
    relation: TableClause,
    subject_column: str,
    features: Sequence[str],
    ids: Sequence[str],
    id_type: str,
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """DuckDB: one join of the dataset with the ids (registered as an Arrow table), fetched as
    numpy columns."""
    name = f"zx_score_ids_{secrets.token_hex(8)}"
    wanted = table(name, column("pos"), column("id"))
    subject = relation.c[subject_column]
    # integer subjects compare as their canonical text, so "007" does not match 7
    key = cast(subject, String) if id_type == "integer" else subject
    stmt = select(
        wanted.c.pos.label("zx_pos"),
        *(cast(relation.c[f], Double).label(f"zx_v{j}") for j, f in enumerate(features)),
    ).select_from(wanted.join(relation, key == wanted.c.id))
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
    relation: TableClause,
    subject_column: str,
    features: Sequence[str],
    ids: Sequence[str],
    id_type: str,
) -> tuple[npt.NDArray[np.float64], list[int]]:
    """Any SQLAlchemy source (an attached table): ``IN`` lists of ids, rows read in Python."""
    found: dict[str, list[Any] | None] = {}
    subject = relation.c[subject_column]
    columns = [relation.c[f] for f in features]
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


def score_entities(
    engine: Engine,
    relation: TableClause,
    dialect: str,
    *,
    subject_column: str,
    id_type: str,
    features: Sequence[str],
    ids: Sequence[str],
    ctx: Any,
    weights: Sequence[bytes],
) -> Scored:
    """Read the features of ``ids`` and compute packed ``Enc(w·x)`` under the consumer's public
    context ``ctx`` from its encrypted weights (:func:`crypto.he.encrypted_scores`). When some
    ids cannot be scored, nothing is computed: their positions are returned instead."""
    matrix, unscorable = read_features(
        engine, relation, dialect, subject_column, features, ids, id_type
    )
    if unscorable:
        return Scored([], unscorable)
    try:
        chunks = he.encrypted_scores(ctx, weights, matrix)
    except CryptoError as exc:
        raise InvalidInputError(f"cannot score: {exc}", reason="bad_ciphertext") from exc
    return Scored(chunks, [])


# -- the node's task ------------------------------------------------------------------------


def _spec(task: dict[str, Any], name: str, most: int) -> tuple[str, int]:
    """An input's SHA-256 and size as the task names them."""
    spec = _field(task, name, dict)
    digest, size = spec.get("sha256"), spec.get("bytes")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise TaskRefused("malformed", f"the task's {name} names no SHA-256")
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= most:
        raise TaskRefused("malformed", f"the task's {name} names no usable size")
    return digest, size


def _ids(http: httpx.Client, task: dict[str, Any]) -> list[str]:
    """The ids to score, fetched and checked against the task's digest and count."""
    digest, size = _spec(task, "ids", IDS_SALT_BYTES + 2 + _MAX_IDS * (6 * MAX_SUBJECT_ID + 3))
    count = task["ids"].get("count")
    if not isinstance(count, int) or isinstance(count, bool) or not 0 < count <= _MAX_IDS:
        raise TaskRefused("malformed", "the task's ids name no count")
    blob = _fetch(http, task["id"], "ids", size)
    if hashlib.sha256(blob).hexdigest() != digest:
        raise TaskRefused("bad_input", "the ids do not match the digest in the task")
    try:
        ids = json.loads(blob[IDS_SALT_BYTES:])
        if not isinstance(ids, list) or len(ids) != count:
            raise TaskRefused("bad_input", "the ids are not a list of the task's count")
        for k, i in enumerate(ids):
            check_subject_id(i, what=f"the entity id at position {k}")
    except (ValueError, InvalidInputError) as exc:
        raise TaskRefused("bad_input", f"unusable ids: {exc}") from exc
    if len(set(ids)) != len(ids):
        raise TaskRefused("bad_input", "an id appears twice")
    return ids


def _consent_map(task: dict[str, Any]) -> dict[str, str]:
    consents: dict[str, str] = _field(task, "consents", dict)
    for digest, consent_id in consents.items():
        if not re.fullmatch(r"[0-9a-f]{64}", digest) or not isinstance(consent_id, str):
            raise TaskRefused("malformed", "the task's consents are not digest -> consent id")
    return consents


def _consents_of(home: NodeHome, task: dict[str, Any], ids: Sequence[str]) -> list[str | None]:
    """The consent id the task names for each id (request order), None where it names none:
    each id digested with the node's consent-digest key, which only this node holds."""
    consents = _consent_map(task)
    return [consents.get(d) for d in node_subjects(home.dir).consent_digests(ids)]


def run_he_score(home: NodeHome, http: httpx.Client, task: dict[str, Any]) -> Envelope:
    """Score the task's entities on this node's rows and sign what it produced."""
    name = _field(task, "dataset", str)
    snapshot = _field(task, "snapshot", str)
    model = _field(task, "model", str)
    features = _field(task, "features", list)
    link = _field(task, "link", str)
    parameter_set = _field(task, "parameter_set", str)
    context = _field(task, "context", str)
    io = _field(task, "io", dict)
    if not features or not all(isinstance(f, str) for f in features):
        raise TaskRefused("malformed", "the task's features are not column names")
    if len(features) > he.MAX_FEATURES or link not in he.MODEL_LINKS:
        raise TaskRefused("malformed", "the task's model is not one zonex scores")
    params = he.PARAMETER_SETS.get(parameter_set)
    if params is None or params.scheme != "ckks":
        raise TaskRefused("unsupported", f"this node does not score under {parameter_set[:32]!r}")

    home.veto().check(KIND, None)
    dataset = home.datasets().get(name)
    if dataset is None:
        raise TaskRefused("unknown_dataset", f"this node hosts no dataset {name!r}")
    if dataset.digest != snapshot:
        raise TaskRefused("snapshot_mismatch", f"{name}: the task is for another snapshot")
    try:
        id_type = score_columns(name, dataset.subject_column, dataset.columns, features)
    except DeniedError as exc:
        raise TaskRefused("vetoed", exc.detail) from exc
    except InvalidInputError as exc:
        raise TaskRefused("malformed", exc.detail) from exc
    chunk = io.get("chunk_bytes")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise TaskRefused("malformed", "the task names no upload chunk size")

    limit = he.max_ciphertext_bytes(params)
    weights_digest, weights_size = _spec(task, "weights", len(features) * (limit + 4))
    ids = _ids(http, task)
    consented = _consents_of(home, task, ids)
    missing = sum(1 for c in consented if c is None)
    if missing:
        # before any feature is read: the exchange ledgers the refusal (a count, no positions)
        refusal = {
            "snapshot": snapshot,
            "ids": {"sha256": task["ids"]["sha256"], "count": len(ids)},
            "no_consent": missing,
            "outputs": {},
        }
        return sign_result(home.key, task, refusal)
    ctx = fetch_context(http, task["id"], context, params)
    packed = _fetch(http, task["id"], "weights", weights_size)
    if hashlib.sha256(packed).hexdigest() != weights_digest:
        raise TaskRefused("bad_input", "the weights do not match the digest in the task")
    try:
        weights = he.unpack_ciphertexts(packed, max_items=len(features), max_item_bytes=limit)
    except CryptoError as exc:
        raise TaskRefused("bad_input", f"unusable weights: {exc}") from exc
    if len(weights) != len(features):
        raise TaskRefused("bad_input", "the upload holds another number of weights")

    with home.source(dataset) as (engine, relation, dialect):
        try:
            scored = score_entities(
                engine,
                relation,
                dialect,
                subject_column=dataset.subject_column,
                id_type=id_type,
                features=features,
                ids=ids,
                ctx=ctx,
                weights=weights,
            )
        except InvalidInputError as exc:
            reason = "bad_input" if exc.extra.get("reason") == "bad_ciphertext" else "bad_data"
            raise TaskRefused(reason, exc.detail) from exc
    body: dict[str, Any] = {
        "snapshot": snapshot,
        "ids": {"sha256": task["ids"]["sha256"], "count": len(ids)},
        "consents": consented,
    }
    if scored.unscorable:
        # nothing computed: the exchange refuses these positions, as for an in-process zone
        body.update(unscorable=scored.unscorable, outputs={})
        return sign_result(home.key, task, body)
    blob = he.pack_ciphertexts(scored.ciphertexts)
    _upload(http, task["id"], OUTPUT, blob, chunk)
    result = {
        "zone": home.zone,
        "dataset": name,
        "model": model,
        "context": context,
        "weights": weights_digest,
        "features": features,
        "entities": len(ids),
        "slots": he.slot_count(params),
        "ciphertexts": [hashlib.sha256(c).hexdigest() for c in scored.ciphertexts],
    }
    body.update(result=result, outputs={OUTPUT: _digest(blob)})
    return sign_result(home.key, task, body)
