"""``export``'s zone part: a dataset's rows, masked as its level requires, sealed to the consumer.

:func:`read_rows` and :func:`mask_rows` are the one code path from a zone's rows to an export:
the exchange calls them in-process for zones it hosts (:mod:`exchange.server.compute.export`),
and a zone node runs them for the ``export`` tasks it receives (:func:`run_export`), so the rows
of a node-hosted dataset are read, masked and encrypted on the node and never reach the
exchange in the clear.

The task carries the consumer's key id and Ed25519 public key, the purpose, dataset, snapshot
and level (the exchange authorized the export), and whether the consumer is abroad
(``xborder``). The node

1. checks its local veto (``refuse = ["export"]``), that it still holds the snapshot and that
   the public key is the consumer's;
2. reads at most :data:`MAX_EXPORT_ROWS` rows and applies the level's obligations exactly as the
   exchange does (``L2``: the subject column replaced by the consumer's pseudonym under the
   **node's** pseudonym key, :meth:`exchange.subjects.ZoneSubjects.pseudonym`);
3. encrypts the canonical JSON of ``{"rows", "salt"}`` (the rows and 32 random bytes) to the
   consumer: a libsodium sealed box to the X25519 key converted from the consumer's Ed25519 key
   (only the consumer's private key opens it);
4. uploads the sealed blob (``PUT /v1/node/tasks/{id}/outputs/sealed``) and, for a consumer
   abroad, the sorted distinct digests of the rows' subjects under the node's cross-border key
   (``outputs/subjects``, 32 bytes each), so the exchange counts subjects sent abroad without
   seeing them;
5. signs a result naming the uploads' SHA-256 and size, the row count and the SHA-256 of the
   plaintext (which the consumer checks after opening the box, and can show a third party with
   the plaintext). The salt keeps that digest from confirming a guess of a small dataset's
   whole export to whoever sees the result, the exchange included.

The node's keys live in its directory only (files 0600, written whole): ``subject.salt``, from
which the consent-digest and pseudonym keys are derived (:mod:`exchange.subjects`), and
``xborder/subject.salt``, from which the cross-border subject key is derived (label
``zonex/v1/xborder-subject``). The exchange never holds them.
"""

from __future__ import annotations

import datetime as dt
import decimal
import hashlib
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import duckdb
import httpx
import nacl.exceptions
import nacl.public
import nacl.signing
from sqlalchemy import Engine, TableClause, select
from sqlalchemy.exc import SQLAlchemyError

from crypto.canonical import canonicalize
from crypto.encoding import b64url_decode, b64url_encode
from crypto.envelope import Envelope
from crypto.errors import EncodingError
from crypto.kdf import DigestKey, derive_key, label
from crypto.keys import key_id
from exchange.errors import InvalidInputError
from exchange.node.home import NodeHome
from exchange.node.psi import _digest, _field, _upload
from exchange.subjects import ZoneSubjects, read_salt
from exchange.tasks import TaskRefused, sign_result
from policy import Obligation, Operation, obligations
from policy.levels import Level, max_level

__all__ = [
    "KIND",
    "MAX_EXPORT_ROWS",
    "MAX_SEALED_BYTES",
    "OUTPUT",
    "SUBJECTS_OUTPUT",
    "json_value",
    "mask_rows",
    "node_subjects",
    "read_rows",
    "run_export",
    "xborder_key",
]

#: the task kind, also the name a veto file refuses it by (``refuse = ["export"]``)
KIND = "export"
#: the task output holding the rows sealed to the consumer
OUTPUT = "sealed"
#: the task output holding the subjects' cross-border digests (a consumer abroad only)
SUBJECTS_OUTPUT = "subjects"
#: rows one export may release (more: aggregate instead)
MAX_EXPORT_ROWS = 100_000
#: the largest sealed blob a node may upload
MAX_SEALED_BYTES = 256 << 20
#: the cross-border subject key's label (as the exchange's, :mod:`exchange.server.xborder`)
XBORDER_LABEL = label("zonex/v1/xborder-subject")
_TOO_MANY = f"export is limited to {MAX_EXPORT_ROWS} rows; aggregate instead"


def node_subjects(node_dir: Path) -> ZoneSubjects:
    """The node's subject keys (consent digests, pseudonyms), from ``NODE_DIR/subject.salt``
    (created on first use, 0600, written whole)."""
    return ZoneSubjects.of(node_dir)


def xborder_key(node_dir: Path) -> DigestKey:
    """The node's cross-border subject key, from ``NODE_DIR/xborder/subject.salt``."""
    return DigestKey(derive_key(read_salt(node_dir / "xborder"), XBORDER_LABEL))


def json_value(value: Any) -> Any:
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


def read_rows(engine: Engine, relation: TableClause) -> list[list[Any]]:
    """Every row of the relation, at most :data:`MAX_EXPORT_ROWS` (more: refused)."""
    with engine.connect() as conn:
        rows = [list(r) for r in conn.execute(select(*relation.c).limit(MAX_EXPORT_ROWS + 1))]
    if len(rows) > MAX_EXPORT_ROWS:
        raise InvalidInputError(_TOO_MANY)
    return rows


def mask_rows(
    rows: Iterable[Sequence[Any]], index: int, keys: ZoneSubjects | None, consumer: str
) -> list[list[Any]]:
    """The rows as released: JSON values, the subject column (at ``index``) replaced by the
    consumer's pseudonym when ``keys`` is given (``L2``'s ``mask_columns``)."""
    out = []
    for r in rows:
        values = [json_value(v) for v in r]
        if keys is not None and values[index] is not None:
            values[index] = keys.pseudonym(consumer, str(values[index]))
        out.append(values)
    return out


def masks(level: Level) -> bool:
    """Does ``level`` oblige an export to mask the subject column?"""
    return Obligation.MASK_COLUMNS in obligations(level, Operation.EXPORT)


def seal(public_key: bytes, data: bytes) -> bytes:
    """``data`` in a sealed box to the X25519 key converted from an Ed25519 public key."""
    recipient = nacl.signing.VerifyKey(public_key).to_curve25519_public_key()
    return bytes(nacl.public.SealedBox(recipient).encrypt(data))


# -- the node's task ------------------------------------------------------------------------


def _consumer_key(task: dict[str, Any]) -> bytes:
    consumer = _field(task, "consumer", str)
    try:
        raw = b64url_decode(_field(task, "consumer_key", str))
    except EncodingError as exc:
        raise TaskRefused("malformed", "the task's consumer key is not base64url") from exc
    if len(raw) != 32 or key_id(raw) != consumer:
        raise TaskRefused("malformed", "the task's consumer key is not the consumer's")
    try:
        nacl.signing.VerifyKey(raw).to_curve25519_public_key()
    except (nacl.exceptions.CryptoError, ValueError, TypeError) as exc:
        raise TaskRefused("malformed", "the consumer's key has no X25519 form") from exc
    return raw


def run_export(home: NodeHome, http: httpx.Client, task: dict[str, Any]) -> Envelope:
    """Export the task's dataset from this node's rows, sealed to the consumer, and sign it."""
    name = _field(task, "dataset", str)
    snapshot = _field(task, "snapshot", str)
    consumer = _field(task, "consumer", str)
    io = _field(task, "io", dict)
    abroad = task.get("xborder")
    if not isinstance(abroad, bool):
        raise TaskRefused("malformed", "the task's xborder is missing or of the wrong type")
    try:
        asked = Level(_field(task, "level", str))
    except ValueError as exc:
        raise TaskRefused("malformed", "the task's level is not a level") from exc
    chunk = io.get("chunk_bytes")
    if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
        raise TaskRefused("malformed", "the task names no upload chunk size")
    public_key = _consumer_key(task)

    home.veto().check(KIND, None)
    dataset = home.datasets().get(name)
    if dataset is None:
        raise TaskRefused("unknown_dataset", f"this node hosts no dataset {name!r}")
    if dataset.digest != snapshot:
        raise TaskRefused("snapshot_mismatch", f"{name}: the task is for another snapshot")
    names = [c["name"] for c in dataset.columns]
    # the stricter of the exchange's level and the node's own catalog
    level = max(asked, max_level(Level(c["level"]) for c in dataset.columns))
    if level >= Level.CORE:
        raise TaskRefused("vetoed", f"{name} holds core data, which is never exported")
    index = names.index(dataset.subject_column)
    with home.source(dataset) as (engine, relation, _dialect):
        try:
            rows = read_rows(engine, relation)
        except InvalidInputError as exc:
            raise TaskRefused("too_large", exc.detail) from exc
        except (SQLAlchemyError, duckdb.Error) as exc:
            raise TaskRefused("bad_data", "the node could not read the rows") from exc
    mask = masks(level)
    out_rows = mask_rows(rows, index, node_subjects(home.dir) if mask else None, consumer)
    plain = canonicalize({"rows": out_rows, "salt": b64url_encode(secrets.token_bytes(32))})
    rows_sha256 = hashlib.sha256(plain).hexdigest()
    sealed = seal(public_key, plain)
    del plain
    outputs = {OUTPUT: _digest(sealed)}
    _upload(http, task["id"], OUTPUT, sealed, chunk)
    if abroad:
        key = xborder_key(home.dir)
        digests = sorted({key.digest(str(r[index]).encode()) for r in rows if r[index] is not None})
        blob = b"".join(digests)
        _upload(http, task["id"], SUBJECTS_OUTPUT, blob, chunk)
        outputs[SUBJECTS_OUTPUT] = _digest(blob)
    result = {
        "zone": home.zone,
        "dataset": name,
        "columns": names,
        "masked": [dataset.subject_column] if mask else [],
        "row_count": len(out_rows),
        "rows_sha256": rows_sha256,
        "sealed_sha256": outputs[OUTPUT]["sha256"],
    }
    body = {"snapshot": snapshot, "level": level.value, "result": result, "outputs": outputs}
    return sign_result(home.key, task, body)
