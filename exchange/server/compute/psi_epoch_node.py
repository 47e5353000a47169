"""Epoch mode of the private joins for zones hosted on a node: the exchange's side
(``docs/psi.md``, "Epoch mode", "Node-hosted zones").

The zone's node keeps k_e, the order seed and the rows (:mod:`exchange.node.psi_epoch`). The
exchange asks it to prepare (task ``psi_epoch_prepare``, which only starts the preparation:
:func:`ask_node`), receives the sorted fingerprints and positions through node-only routes with
a manifest the node signs (:func:`receive_epoch_file`, :func:`receive_epoch`; ledgered as
``psi.epoch_stored``), stores them in the layout of :mod:`.psi_epoch`, which from then on binds,
matches and rotates as for a zone the exchange hosts, and tells the node which epochs it still
keeps (:func:`node_epochs`). Each session's A_e (and, for ``aggregate``, the values in I's
order) is a node task (``psi_epoch_answer``, :func:`node_answer`) whose outputs are checked
against the digests the node signed. No epoch key of a node-hosted zone is ever on the
exchange.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from crypto import he
from crypto import psi as cpsi
from crypto.canonical import canonicalize
from crypto.envelope import Envelope, verify_envelope
from crypto.errors import CryptoError, EncodingError, VerificationError
from crypto.keys import VerifyKey
from exchange.domain import Principal, PrincipalKind
from exchange.errors import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    ZonexError,
)
from exchange.node import psi_epoch as node_epoch
from exchange.psi_epoch import FP_DTYPE
from exchange.psi_protocol import LABEL, NORMALIZATION
from exchange.server import dispatch
from exchange.server.compute import psi
from exchange.server.compute.contexts import load_context
from exchange.server.compute.psi_epoch import (
    _check_snapshot,
    _dataset_dir,
    _delete,
    _epoch_dir,
    _epoch_of,
    _epochs,
    _flock,
    _hosting,
    _meta_lock,
    _now,
    _public,
    _retire,
    _save,
    _stale,
    log,
    sweep_epochs,
)
from exchange.server.ledger import EntryDraft
from exchange.server.models import NodeRow, PrincipalRow
from exchange.server.runtime import Exchange

__all__ = [
    "ask_node",
    "ask_node_background",
    "node_answer",
    "node_epochs",
    "receive_epoch",
    "receive_epoch_file",
]

_P = cpsi.POINT_BYTES
_FP = FP_DTYPE.itemsize

#: where a node's upload waits for its manifest: DATA_DIR/psi_epochs/<zone>/.incoming/<epoch>/
_INCOMING = ".incoming"
#: the files a node uploads, with the bytes per subject of each (pos: at most 8)
_FILES = {"fp": _FP, "pos": 8}


def _asked_path(ex: Exchange, zone: str, dataset: str) -> Path:
    return _dataset_dir(ex, zone, dataset) / "node_asked"


def ask_node(ex: Exchange, zone: str, dataset: str, actor: str | None) -> None:
    """Ask the zone's node to prepare an epoch of ``dataset`` (task ``psi_epoch_prepare``: the
    node starts it in the background and answers at once), unless a usable epoch serves or the
    node was asked within ``node_task_seconds`` (a provider following the progress, sessions
    arriving meanwhile); 503 when the node is offline, 409 when it refuses."""
    snapshot, _ = _hosting(ex, zone, dataset)
    now = _now()
    if any(
        m["state"] == "ready" and _stale(ex, m, snapshot, now) is None
        for m in _epochs(ex, zone, dataset)
    ):
        return  # a usable epoch serves: the next one is asked for when it is retired
    stamp = _asked_path(ex, zone, dataset)
    psi._private_dir(stamp.parent)
    with Session(ex.engine) as s:
        node = psi._node_online(ex, s, zone)
    with _flock(_dataset_dir(ex, zone, dataset) / "ask.lock"):
        if stamp.exists() and time.time() - stamp.stat().st_mtime < ex.settings.node_task_seconds:
            return
        stamp.touch()
    answer = dispatch.dispatch(
        ex,
        node,
        node_epoch.PREPARE_KIND,
        {
            "consumer": actor or "-",
            "purpose": "psi_epoch_prepare",
            "dataset": dataset,
            "snapshot": snapshot,
            "chunk": ex.settings.psi_epoch_chunk,
            "max_items": ex.settings.psi_max_items,
        },
    )
    body = answer.payload
    if body.get("dataset") != dataset or body.get("snapshot") != snapshot:
        raise psi._node_mismatch("a preparation")


def ask_node_background(ex: Exchange, zone: str, dataset: str, actor: str | None) -> None:
    try:
        ask_node(ex, zone, dataset, actor)
    except ZonexError as exc:
        log.warning("could not ask the node of %s to prepare %s: %s", zone, dataset, exc.detail)
    except Exception:
        log.exception("asking the node of %s to prepare %s failed", zone, dataset)


def _node_of(ex: Exchange, actor: Principal) -> tuple[str, VerifyKey]:
    """The zone of the calling node (active) and its registered key."""
    if actor.kind is not PrincipalKind.NODE:
        raise ForbiddenError("only a zone node calls this")
    with Session(ex.engine) as s:
        row = s.get(NodeRow, actor.key_id)
        principal = s.get(PrincipalRow, actor.key_id)
        if row is None or row.status != "active" or principal is None:
            raise ForbiddenError("this node is not approved")
        return row.zone, VerifyKey(bytes(principal.public_key))


def _epoch_id(epoch: str) -> str:
    if not node_epoch.EPOCH_ID.fullmatch(epoch):
        raise InvalidInputError("not an epoch id", reason="bad_epoch")
    return epoch


def _incoming(ex: Exchange, zone: str, epoch: str) -> Path:
    return ex.settings.data_dir / "psi_epochs" / zone / _INCOMING / epoch


#: an upload no chunk reached for this long is dropped
_STALE_UPLOAD_SECONDS = 3600


def _make_room(ex: Exchange, zone: str) -> None:
    """Before a node starts uploading another epoch: drop its uploads untouched for an hour,
    and refuse when ``psi_epoch_max_uploads`` are still under way (each waits for a manifest,
    up to ``psi_max_items``·20 bytes on the exchange's disk)."""
    root = ex.settings.data_dir / "psi_epochs" / zone / _INCOMING
    live = []
    for folder in root.iterdir() if root.exists() else ():
        try:
            touched = max([folder.stat().st_mtime] + [f.stat().st_mtime for f in folder.iterdir()])
        except FileNotFoundError:  # stored or refused meanwhile
            continue
        if time.time() - touched > _STALE_UPLOAD_SECONDS:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            live.append(folder)
    if len(live) >= ex.settings.psi_epoch_max_uploads:
        raise ConflictError(
            f"{len(live)} epoch uploads of this zone are under way; finish or abandon one first",
            reason="too_many_uploads",
        )


def receive_epoch_file(
    ex: Exchange, actor: Principal, epoch: str, name: str, offset: int, body: bytes
) -> dict[str, Any]:
    """One chunk of a prepared epoch's ``fp`` (sorted fingerprints) or ``pos`` (positions) from
    the zone's node, at byte ``offset`` = the bytes received so far (0 starts over). Nothing
    is used before the node's signed manifest names the file's digest (:func:`receive_epoch`)."""
    zone, _ = _node_of(ex, actor)
    _epoch_id(epoch)
    if name not in _FILES:
        raise NotFoundError(f"an epoch has no file {name[:16]!r}")
    most = ex.settings.psi_max_items * _FILES[name]
    if not _incoming(ex, zone, epoch).exists():
        _make_room(ex, zone)
    folder = psi._private_dir(_incoming(ex, zone, epoch))
    path = folder / name
    have = path.stat().st_size if path.exists() else 0
    if offset not in (0, have):
        raise ConflictError(
            f"expected the chunk at offset {have}, got {offset}", reason="out_of_order"
        )
    if offset + len(body) > most:
        raise InvalidInputError(f"{name} is at most {most} bytes", reason="too_large")
    with path.open("r+b" if offset else "wb") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(body)
    return {"received": offset + len(body)}


def _manifest(envelope: object, key: VerifyKey) -> dict[str, Any]:
    """The manifest's payload, verified under the node's registered key (bytes first)."""
    try:
        parsed = Envelope.model_validate(envelope)
        payload = verify_envelope(parsed, node_epoch.MANIFEST_TYPE, {key.key_id: key})
    except (ValueError, VerificationError) as exc:
        # one collapsed answer; the reason stays in the log
        log.warning("an epoch manifest from node %s did not verify: %s", key.key_id[:16], exc)
        raise InvalidInputError(
            "the epoch manifest does not verify under this node's key",
            reason="verification_failed",
        ) from exc
    if not isinstance(payload, dict):
        raise InvalidInputError("the epoch manifest is not an object", reason="bad_manifest")
    return payload


def _count(value: object, most: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
        raise InvalidInputError(
            "the epoch manifest's counts are out of range", reason="bad_manifest"
        )
    return value


def _check_image(fp: np.ndarray[Any, Any], pos: np.ndarray[Any, Any]) -> None:
    """The uploaded image is what a lookup needs: fingerprints strictly increasing (two equal
    ones would be one point twice, or a chance of 2⁻⁹⁶ per pair) and positions a permutation
    of 0..|Y|-1."""
    hi, lo = fp["hi"], fp["lo"]
    if len(fp) > 1 and not bool(
        np.all((hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1])))
    ):
        raise InvalidInputError("the fingerprints are not sorted", reason="bad_image")
    seen = np.zeros(len(pos), dtype=bool)
    if len(pos) and int(pos.max()) >= len(pos):
        raise InvalidInputError("a position is out of range", reason="bad_image")
    seen[pos] = True
    if not bool(seen.all()):
        raise InvalidInputError("the positions repeat one another", reason="bad_image")


def receive_epoch(ex: Exchange, actor: Principal, envelope: object) -> dict[str, Any]:
    """A node's prepared epoch: its manifest (DSSE signed by the node's key) names the epoch,
    dataset, snapshot, |Y| and the SHA-256 and size of the uploaded ``fp`` and ``pos``; once
    every check passes the epoch is stored as a zone's epoch the exchange prepared would be
    (state ``ready``; the current one retired) and serves sessions. Never a key. A refused
    upload is deleted (the node sends it again from offset 0)."""
    zone, key = _node_of(ex, actor)
    try:
        return _store_epoch(ex, zone, key, envelope)
    except ZonexError:
        epoch = _claimed_epoch(envelope)
        if epoch is not None:  # the caller's own upload (its zone's staging only)
            shutil.rmtree(_incoming(ex, zone, epoch), ignore_errors=True)
        raise


def _claimed_epoch(envelope: object) -> str | None:
    """The epoch id a manifest names, verified or not (only to find its staged upload)."""
    try:
        claimed = json.loads(Envelope.model_validate(envelope).payload_bytes()).get("epoch")
    except (ValueError, TypeError, AttributeError, EncodingError):
        return None
    if isinstance(claimed, str) and node_epoch.EPOCH_ID.fullmatch(claimed):
        return claimed
    return None


def _store_epoch(ex: Exchange, zone: str, key: VerifyKey, envelope: object) -> dict[str, Any]:
    doc = _manifest(envelope, key)
    if doc.get("type") != node_epoch.MANIFEST_VERSION or doc.get("node") != key.key_id:
        raise InvalidInputError("not an epoch manifest of this node", reason="bad_manifest")
    if doc.get("zone") != zone:
        raise ForbiddenError("the manifest is for another zone")
    if doc.get("label") != LABEL or doc.get("fp_bits") != FP_DTYPE.itemsize * 8:
        raise InvalidInputError(
            "the epoch hashes or fingerprints otherwise than this exchange", reason="bad_manifest"
        )
    epoch = _epoch_id(str(doc.get("epoch")))
    dataset = str(doc.get("dataset"))
    dtype = doc.get("pos_dtype")
    if dtype not in ("<u4", "<u8"):
        raise InvalidInputError("positions are <u4 or <u8", reason="bad_manifest")
    y = _count(doc.get("y_count"), ex.settings.psi_max_items)
    skipped = _count(doc.get("y_skipped"), 2**53 - 1)
    snapshot, on_node = _hosting(ex, zone, dataset)
    if not on_node:
        raise ConflictError(f"{zone}/{dataset} is not hosted on a node", reason="not_on_node")
    if doc.get("snapshot") != snapshot:
        raise ConflictError(
            "the epoch is of another snapshot than the dataset's current one", reason="epoch_stale"
        )
    folder = _epoch_dir(ex, zone, dataset, epoch)
    if (folder / "epoch.json").exists():
        raise ConflictError(f"epoch {epoch} is already stored", reason="epoch_exists")
    staged = _incoming(ex, zone, epoch)
    files = doc.get("files")
    if not isinstance(files, dict) or set(files) != set(_FILES):
        raise InvalidInputError("the manifest names fp and pos", reason="bad_manifest")
    sizes = {"fp": y * _FP, "pos": y * np.dtype(dtype).itemsize}
    for name, size in sizes.items():
        claim = files[name]
        path = staged / name
        if (
            not isinstance(claim, dict)
            or claim.get("bytes") != size
            or not path.exists()
            or path.stat().st_size != size
            or claim.get("sha256") != psi._file_digest(path)
        ):
            raise InvalidInputError(
                f"{name} as uploaded does not match the digest and size the node signed",
                reason="digest_mismatch",
            )
    fp = np.fromfile(staged / "fp", dtype=FP_DTYPE)
    pos = np.fromfile(staged / "pos", dtype=np.dtype(dtype))
    _check_image(fp, pos)
    psi._private_dir(folder)
    np.save(folder / "fp.npy", fp)
    np.save(folder / "pos.npy", pos)
    # the node's signed statement, kept for whoever audits what this epoch served
    (folder / "manifest.json").write_text(json.dumps(envelope, sort_keys=True))
    try:
        ex.ledger.append(
            EntryDraft(
                kind="psi.epoch_stored",
                actor=key.key_id,
                refs={"zone": zone, "dataset": dataset, "epoch": epoch, "node": key.key_id},
                digests={
                    "snapshot": snapshot,
                    "manifest": hashlib.sha256(canonicalize(envelope)).hexdigest(),
                    "fp": str(files["fp"]["sha256"]),
                    "pos": str(files["pos"]["sha256"]),
                },
                attrs={"y_count": y, "host": "node"},
            )
        )
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    shutil.rmtree(staged, ignore_errors=True)
    now = _now()
    meta: dict[str, Any] = {
        "id": epoch,
        "zone": zone,
        "dataset": dataset,
        "snapshot": snapshot,
        "state": "ready",
        "created_at": now.isoformat(),
        "ready_at": now.isoformat(),
        "y_count": y,
        "y_skipped": skipped,
        "done": y,
        "sessions": 0,
        "host": "node",
        "node": key.key_id,
    }
    with _meta_lock(ex, zone, dataset):
        for other in _epochs(ex, zone, dataset):
            if other["state"] == "ready":
                _retire(ex, other, "replaced", now)
            elif other["state"] == "preparing":  # stored before this zone moved to its node
                _delete(ex, other)
        _save(ex, meta)
    log.info("epoch %s of %s/%s stored from its node: %d subjects", epoch, zone, dataset, y)
    return _public(meta)


def node_epochs(ex: Exchange, actor: Principal) -> dict[str, Any]:
    """The calling node's zone's epochs as the exchange keeps them (retired ones deleted first
    when no session can use them any more), and the epochs' longest life: the node deletes the
    key of an epoch absent here, or past that life."""
    zone, _ = _node_of(ex, actor)
    root = ex.settings.data_dir / "psi_epochs" / zone
    now = _now()
    out = []
    for folder in sorted(root.iterdir()) if root.exists() else ():
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        sweep_epochs(ex, zone, folder.name)
        try:
            snapshot, _ = _hosting(ex, zone, folder.name)
        except NotFoundError:
            snapshot = None
        for m in _epochs(ex, zone, folder.name):
            current = (
                m["state"] == "ready"
                and snapshot is not None
                and _stale(ex, m, snapshot, now) is None
            )
            out.append({**_public(m), "current": current})
    return {
        "zone": zone,
        "epochs": out,
        "max_seconds": ex.settings.psi_epoch_max_seconds,
        "session_seconds": ex.settings.psi_session_seconds,
    }


def node_answer(
    ex: Exchange, snap: psi._Snap, terms: psi._Terms, snapshot: str
) -> tuple[int, dict[str, Any]]:
    """:func:`zone_answer` for a node-hosted zone: the node computes A_e = k_e·A (and, for
    ``aggregate``, the values in I's order encrypted under C's context) as the task
    ``psi_epoch_answer``; its uploads are checked against the digests it signed and take the
    places an in-process zone writes them to. The exchange never holds k_e."""
    meta = _epoch_of(ex, snap)
    _check_snapshot(meta, snapshot)
    y = int(meta["y_count"])
    with Session(ex.engine) as s:
        node = psi._node_online(ex, s, snap.zone)
    if meta.get("node") != node.key_id:
        # the zone moved to another node, which does not hold k_e: no session can use it
        with _meta_lock(ex, snap.zone, snap.dataset):
            if meta["state"] == "ready":
                _retire(ex, meta, "node", _now())
        raise psi._cannot_comply("the epoch was prepared by another node", "epoch_stale")
    cfg = ex.settings
    folder = psi._session_dir(ex, snap.id)
    work = psi._private_dir(folder / "node")
    a_path = folder / "a.bin"
    a_digest = psi._file_digest(a_path)
    slots = he.slot_count(he.BFV_DEFAULT)
    per = -(-y // slots)
    inputs = {"a": a_path}
    outputs = {"a_e": (work / "a_e", snap.x_count * _P)}
    if snap.mode == "aggregate":
        assert snap.context_digest is not None
        load_context(ex, snap.context_digest, expected=he.BFV_DEFAULT)  # stored and usable
        inputs["context"] = cfg.data_dir / "contexts" / snap.context_digest
        outputs["ciphertexts"] = (
            work / "ciphertexts",
            len(terms.plan) * per * (he.max_ciphertext_bytes(he.BFV_DEFAULT) + 4),
        )
    fields = {
        "consumer": snap.consumer,
        "purpose": snap.purpose,
        "session": snap.id,
        "dataset": snap.dataset,
        "snapshot": snapshot,
        "epoch": meta["id"],
        "mode": snap.mode,
        "a": {"sha256": a_digest, "count": snap.x_count},
        "sums": terms.plan,
        "max_rows_per_subject": terms.max_rows,
        "context": snap.context_digest,
        "label": LABEL,
        "normalization": NORMALIZATION,
        "k": terms.k,
        "epsilon": snap.params.get("epsilon"),
        "max_items": cfg.psi_max_items,
    }
    answer = dispatch.dispatch(
        ex, node, node_epoch.ANSWER_KIND, fields, files=dispatch.TaskFiles(inputs, outputs)
    )
    body = answer.payload
    want: dict[str, Any] = {
        "zone": snap.zone,
        "session": snap.id,
        "dataset": snap.dataset,
        "mode": snap.mode,
        "x_count": snap.x_count,
        "y_count": y,
    }
    if snap.mode == "aggregate":
        want["bounds"] = {p["column"]: [p["lower"], p["upper"]] for p in terms.plan}
        want["he_context"] = snap.context_digest
    if body.get("result") != want:
        raise psi._node_mismatch("a result")
    if (
        body.get("snapshot") != snapshot
        or body.get("epoch") != meta["id"]
        or body.get("a") != {"sha256": a_digest, "count": snap.x_count}
    ):
        raise psi._node_mismatch("for another snapshot, epoch or list")
    signed = body.get("outputs")
    assert isinstance(signed, dict)  # dispatch checked the uploads against it

    def output(name: str) -> bytes:
        path = outputs[name][0]
        data = path.read_bytes() if path.exists() else b""
        claim = signed.get(name) or {}
        if claim.get("sha256") != hashlib.sha256(data).hexdigest():
            raise psi._node_mismatch(f"{name} of another digest")
        path.unlink()
        return data

    a_e = output("a_e")
    if len(a_e) != snap.x_count * _P:
        raise psi._node_mismatch("A_e of another length")
    points = [a_e[i : i + _P] for i in range(0, len(a_e), _P)]
    psi._check_whole(points, snap.x_count, "A_e")
    try:
        for p in points:
            cpsi.validate_point(p)
    except VerificationError as exc:
        raise psi._node_mismatch(f"A_e with an invalid point ({exc})") from exc
    (folder / "a_prime.bin").write_bytes(a_e)
    digests: dict[str, Any] = {"y_skipped": int(meta["y_skipped"]), "epoch": meta["id"]}
    if snap.mode == "aggregate" and y:
        count = per * len(terms.plan)
        try:
            chunks = he.unpack_ciphertexts(
                output("ciphertexts"),
                max_items=count,
                max_item_bytes=he.max_ciphertext_bytes(he.BFV_DEFAULT),
            )
        except CryptoError as exc:
            raise psi._node_mismatch(f"ciphertexts that do not unpack ({exc})") from exc
        if len(chunks) != count:
            raise psi._node_mismatch("another number of ciphertexts")
        for j in range(len(terms.plan)):
            for c in range(per):
                (folder / f"sum{j}.{c}.ct").write_bytes(chunks[j * per + c])
            digests[f"sum{j}"] = str(per)
    shutil.rmtree(work, ignore_errors=True)
    a_path.unlink()
    digests["node"] = {"task": body["task"], "key_id": answer.node}
    return y, digests
