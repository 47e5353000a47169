"""Epoch mode of the private joins: the zone's preparation and the exchange's matcher
(``docs/psi.md``, "Epoch mode").

The per-session protocol (:mod:`exchange.server.compute.psi`) costs both sides O(|Y|) per
session. In epoch mode a zone hosted by the exchange blinds its subjects once per epoch:

- **preparation** (:func:`prepare`): the zone draws an epoch key ``k_e`` and a secret order
  seed, kept only in the zone's directory (``ZONES/<zone>/psi/epochs/<epoch>.key``, 0600; never
  on the ledger, never sent), reads Y as a session would, orders it by a keyed hash of each id
  (a secret permutation that the zone can recompute, so an interrupted preparation continues
  where it stopped) and computes ``I = k_e·H_e(y)`` in that order with
  :func:`crypto.psi.blind`, in chunks, recording its progress after each. The exchange keeps
  I only as 96-bit fingerprints sorted for lookup (``fp.npy``) and each one's position in I's
  order (``pos.npy``), under ``DATA_DIR/psi_epochs/<zone>/<dataset>/<epoch>/`` with the
  epoch's metadata (``epoch.json``: id, dataset, snapshot digest, |Y|, created, sessions
  served, state).
- **rotation**: an epoch serves new sessions while the dataset's snapshot is the one it was
  prepared from, for at most ``psi_epoch_max_seconds`` and ``psi_epoch_max_sessions``
  sessions; then it is retired (sessions already bound to it finish) and deleted once no
  session can still use it (``psi_session_seconds`` later).
- **a session** (:func:`bind` at create, then the steps of :mod:`exchange.server.compute.psi`
  with the epoch's key in place of a fresh one): A_e = k_e·A for the consumer (every point
  checked), which it downloads (:func:`get_ae_points`), unblinds and sends back as F
  (:func:`put_f_points`, checked whole: |X| distinct valid points); :func:`match` looks F up in
  the image. For ``aggregate`` the zone encrypts its values in I's order under the consumer's
  context and the mask is built over I's order.

Every step is authorized and re-checked against the rules in force by the same helpers as the
per-session protocol.

A zone hosted on its own node (:mod:`exchange.node.psi_epoch`) keeps k_e, the order seed and
the rows there: the exchange asks it to prepare (task ``psi_epoch_prepare``, which only starts
the preparation), receives the sorted fingerprints and positions through node-only routes with
a manifest the node signs (:func:`receive_epoch_file`, :func:`receive_epoch`), stores them in
the same layout and from then on binds, matches and rotates as for a zone it hosts; each
session's A_e (and, for ``aggregate``, the values in I's order) is a node task
(``psi_epoch_answer``, :func:`node_answer`) whose outputs are checked against the digests the
node signed. No epoch key of a node-hosted zone is ever on the exchange.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
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
from exchange.psi_epoch import (
    FP_DTYPE,
    PROTOCOLS,
    EpochPreparingError,
    blind_image,
    choose_protocol,
    fingerprints,
    keyed_order,
    retry_seconds,
    sort_image,
)
from exchange.psi_protocol import LABEL, NORMALIZATION, encrypt_columns, read_y
from exchange.server import access, dispatch
from exchange.server.compute import psi
from exchange.server.compute.contexts import load_context
from exchange.server.compute.source import open_source
from exchange.server.ledger import EntryDraft
from exchange.server.models import NodeRow, PrincipalRow
from exchange.server.runtime import Exchange
from exchange.server.services import _require_owner, _zone_row

__all__ = [
    "bind",
    "epoch_status",
    "get_ae_points",
    "join_preparations",
    "match",
    "node_answer",
    "node_epochs",
    "prepare",
    "put_f_points",
    "receive_epoch",
    "receive_epoch_file",
    "request_preparation",
    "session_epoch",
    "start_preparation",
    "sweep_epochs",
    "zone_answer",
    "zone_key",
]

log = logging.getLogger("zonex.psi_epoch")

_P = cpsi.POINT_BYTES
_FP = FP_DTYPE.itemsize
#: the seconds per subject a Retry-After assumes before a preparation has measured its own
_FIRST_GUESS = 1e-4


def _now() -> datetime:
    return datetime.now(UTC)


# -- files ----------------------------------------------------------------------------------


def _dataset_dir(ex: Exchange, zone: str, dataset: str) -> Path:
    return ex.settings.data_dir / "psi_epochs" / zone / dataset


def _epoch_dir(ex: Exchange, zone: str, dataset: str, epoch: str) -> Path:
    return _dataset_dir(ex, zone, dataset) / epoch


def _key_path(ex: Exchange, zone: str, epoch: str) -> Path:
    return ex.zones_dir / zone / "psi" / "epochs" / f"{epoch}.key"


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True))
    os.replace(tmp, path)


def _epochs(ex: Exchange, zone: str, dataset: str) -> list[dict[str, Any]]:
    """Every epoch's metadata for a dataset, oldest first."""
    root = _dataset_dir(ex, zone, dataset)
    out = []
    for meta in root.glob("*/epoch.json") if root.exists() else ():
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(meta.read_text()))
    return sorted(out, key=lambda m: str(m["created_at"]))


def _save(ex: Exchange, meta: dict[str, Any]) -> None:
    _write_json(_epoch_dir(ex, meta["zone"], meta["dataset"], meta["id"]) / "epoch.json", meta)


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on ``path`` across threads and processes; yields whether it was taken
    (always, when ``wait``)."""
    psi._private_dir(path.parent)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _meta_lock(ex: Exchange, zone: str, dataset: str) -> contextlib.AbstractContextManager[bool]:
    return _flock(_dataset_dir(ex, zone, dataset) / "meta.lock")


def _read_key(ex: Exchange, zone: str, epoch: str) -> tuple[cpsi.PsiKey, bytes]:
    """The epoch key k_e and the order seed (the zone's secrets)."""
    data = _key_path(ex, zone, epoch).read_bytes()
    return cpsi.PsiKey.from_bytes(data[: cpsi.SCALAR_BYTES]), data[cpsi.SCALAR_BYTES :]


#: the zone's secret order of its subjects (:func:`exchange.psi_epoch.keyed_order`)
_order = keyed_order


def _delete(ex: Exchange, meta: dict[str, Any]) -> None:
    shutil.rmtree(_epoch_dir(ex, meta["zone"], meta["dataset"], meta["id"]), ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        _key_path(ex, meta["zone"], meta["id"]).unlink()


# -- rotation -------------------------------------------------------------------------------


def _stale(ex: Exchange, meta: dict[str, Any], snapshot: str, now: datetime) -> str | None:
    """Why a ready epoch may serve no new session, or ``None`` if it may."""
    cfg = ex.settings
    if meta["snapshot"] != snapshot:
        return "snapshot"
    if int(meta["sessions"]) >= cfg.psi_epoch_max_sessions:
        return "sessions"
    if (now - datetime.fromisoformat(meta["ready_at"])).total_seconds() >= (
        cfg.psi_epoch_max_seconds
    ):
        return "age"
    return None


def _retire(ex: Exchange, meta: dict[str, Any], why: str, now: datetime) -> None:
    meta.update(state="retired", retired_at=now.isoformat(), retired_for=why)
    _save(ex, meta)


def sweep_epochs(ex: Exchange, zone: str, dataset: str) -> int:
    """Delete retired epochs no session can use any more; returns how many."""
    now = _now()
    gone = 0
    with _meta_lock(ex, zone, dataset):
        for meta in _epochs(ex, zone, dataset):
            if meta["state"] != "retired":
                continue
            age = (now - datetime.fromisoformat(meta["retired_at"])).total_seconds()
            if age > ex.settings.psi_session_seconds:
                _delete(ex, meta)
                gone += 1
    return gone


# -- preparation ----------------------------------------------------------------------------


def _dataset_row(ex: Exchange, zone: str, dataset: str) -> tuple[str, str]:
    """The dataset's snapshot digest now, refusing a node-hosted dataset (its node prepares
    its epochs: :func:`request_preparation`)."""
    with Session(ex.engine) as s:
        row = access._dataset(s, zone, dataset)
        if row.source == "node":
            raise InvalidInputError(
                f"dataset {zone}/{dataset} is hosted on its zone's node, which prepares its "
                "epochs itself (zonex psi prepare --node DIR)",
                reason="epoch_on_node",
            )
        return row.digest, row.subject_column


def _hosting(ex: Exchange, zone: str, dataset: str) -> tuple[str, bool]:
    """The dataset's snapshot digest now and whether its zone's node hosts it."""
    with Session(ex.engine) as s:
        row = access._dataset(s, zone, dataset)
        return row.digest, row.source == "node"


def _read_ids(ex: Exchange, zone: str, dataset: str) -> tuple[list[str], int]:
    with Session(ex.engine) as s:
        row = access._dataset(s, zone, dataset)
        subject = row.subject_column
    with open_source(ex, row) as src:
        ids, _, skipped = read_y(
            src.engine, src.relation, subject, [], 1, ex.settings.psi_max_items
        )
    return ids, skipped


def _preparing_error(ex: Exchange, zone: str, dataset: str) -> EpochPreparingError:
    done, total, rate = 0, 0, _FIRST_GUESS
    for meta in _epochs(ex, zone, dataset):
        if meta["state"] == "preparing":
            done, total = int(meta.get("done", 0)), int(meta.get("y_count") or 0)
            rate = float(meta.get("seconds_per_item") or _FIRST_GUESS)
    remaining = (total - done) if total else max(1, ex.settings.psi_epoch_chunk)
    return EpochPreparingError(
        f"zone {zone!r} is preparing an epoch of {dataset!r} ({done} of {total or '?'} "
        "subjects blinded); retry later",
        retry_after=retry_seconds(remaining, rate),
        done=done,
        total=total,
    )


def prepare(
    ex: Exchange,
    zone: str,
    dataset: str,
    *,
    wait: bool = True,
    max_chunks: int | None = None,
) -> dict[str, Any]:
    """Prepare (or finish preparing) the dataset's epoch; returns its metadata.

    Idempotent: a usable ready epoch is returned as it is; an unfinished preparation of the
    same snapshot continues from its last recorded chunk with its key (``max_chunks`` stops
    after that many chunks, leaving it ``preparing``). One preparation per dataset runs at a
    time: with ``wait`` a second caller waits for it (then finds its epoch), without it gets
    :class:`~exchange.psi_epoch.EpochPreparingError`.
    """
    root = _dataset_dir(ex, zone, dataset)
    with _flock(root / "prepare.lock", wait=wait) as taken:
        if not taken:
            raise _preparing_error(ex, zone, dataset)
        snapshot, _ = _dataset_row(ex, zone, dataset)
        now = _now()
        with _meta_lock(ex, zone, dataset):
            meta = None
            for m in _epochs(ex, zone, dataset):
                if m["state"] == "ready" and _stale(ex, m, snapshot, now) is None:
                    return m
                if m["state"] == "preparing":
                    if m["snapshot"] == snapshot and meta is None:
                        meta = m
                    else:  # of another snapshot: its image would be of other data
                        _delete(ex, m)
            if meta is None:
                meta = _new_epoch(ex, zone, dataset, snapshot, now)
        return _blind_image(ex, meta, max_chunks)


def _new_epoch(
    ex: Exchange, zone: str, dataset: str, snapshot: str, now: datetime
) -> dict[str, Any]:
    epoch = "ep_" + secrets.token_urlsafe(18)
    psi._write_key(_key_path(ex, zone, epoch), cpsi.PsiKey.generate())
    with _key_path(ex, zone, epoch).open("ab") as f:  # the order seed follows k_e
        f.write(secrets.token_bytes(32))
    psi._private_dir(_epoch_dir(ex, zone, dataset, epoch))
    meta: dict[str, Any] = {
        "id": epoch,
        "zone": zone,
        "dataset": dataset,
        "snapshot": snapshot,
        "state": "preparing",
        "created_at": now.isoformat(),
        "ready_at": None,
        "y_count": None,
        "y_skipped": None,
        "done": 0,
        "sessions": 0,
    }
    _save(ex, meta)
    return meta


def _blind_image(ex: Exchange, meta: dict[str, Any], max_chunks: int | None) -> dict[str, Any]:
    zone, dataset, epoch = meta["zone"], meta["dataset"], meta["id"]
    folder = _epoch_dir(ex, zone, dataset, epoch)
    key, seed = _read_key(ex, zone, epoch)
    ids, skipped = _read_ids(ex, zone, dataset)
    n = len(ids)
    done = int(meta.get("done", 0)) if meta.get("y_count") == n else 0
    meta.update(y_count=n, y_skipped=skipped, done=done)

    def record(end: int, seconds_per_item: float) -> None:
        meta.update(done=end, seconds_per_item=seconds_per_item)
        _save(ex, meta)  # the progress record: a restart continues from here

    image = folder / "image.fp"
    finished = blind_image(
        key,
        seed,
        epoch,
        ids,
        image,
        start=done,
        chunk=ex.settings.psi_epoch_chunk,
        workers=ex.settings.psi_workers,
        max_chunks=max_chunks,
        on_chunk=record,
    )
    if not finished:
        _save(ex, meta)
        return meta
    fp, pos = sort_image(image)
    np.save(folder / "fp.npy", fp)
    np.save(folder / "pos.npy", pos)
    image.unlink()
    now = _now()
    with _meta_lock(ex, zone, dataset):
        for other in _epochs(ex, zone, dataset):
            if other["state"] == "ready" and other["id"] != epoch:
                _retire(ex, other, "replaced", now)
        meta.update(state="ready", ready_at=now.isoformat())
        _save(ex, meta)
    log.info("epoch %s of %s/%s ready: %d subjects", epoch, zone, dataset, n)
    return meta


def _background(ex: Exchange, zone: str, dataset: str) -> None:
    try:
        prepare(ex, zone, dataset, wait=False)
    except EpochPreparingError:
        pass  # another preparation of this dataset is running
    except Exception:
        log.exception("preparing an epoch of %s/%s failed", zone, dataset)


_threads: list[threading.Thread] = []
_threads_lock = threading.Lock()


def start_preparation(ex: Exchange, zone: str, dataset: str, actor: str | None = None) -> None:
    """Prepare the dataset's epoch on a background thread (a session never waits for it); for a
    node-hosted dataset, ask its node to (``actor``: whose request led to it)."""
    _, on_node = _hosting(ex, zone, dataset)
    target, args = (
        (_ask_node_background, (ex, zone, dataset, actor))
        if on_node
        else (_background, (ex, zone, dataset))
    )
    thread = threading.Thread(target=target, args=args, name="psi-epoch", daemon=True)
    with _threads_lock:
        _threads[:] = [t for t in _threads if t.is_alive()]
        _threads.append(thread)
    thread.start()


def join_preparations(timeout: float | None = None) -> None:
    """Wait for the background preparations started so far (shutdown, tests)."""
    with _threads_lock:
        threads = list(_threads)
    for thread in threads:
        thread.join(timeout)


def _public(meta: dict[str, Any]) -> dict[str, Any]:
    """What the provider sees of an epoch (never its key)."""
    fields = ("id", "zone", "dataset", "snapshot", "state", "created_at", "ready_at")
    out = {name: meta.get(name) for name in fields}
    out.update(
        y_count=meta.get("y_count"), done=int(meta.get("done", 0)), sessions=meta["sessions"]
    )
    return out


def request_preparation(ex: Exchange, actor: Principal, zone: str, dataset: str) -> dict[str, Any]:
    """The provider asks for an epoch of its dataset: started in the background unless a usable
    one is ready; answers the epochs' state (:func:`epoch_status`)."""
    status = epoch_status(ex, actor, zone, dataset)
    if status["current"] is None:
        _, on_node = _hosting(ex, zone, dataset)
        if on_node:  # the provider learns at once when its node is offline or refuses
            _ask_node(ex, zone, dataset, actor.key_id, again=True)
        else:
            start_preparation(ex, zone, dataset)
    return status


def epoch_status(ex: Exchange, actor: Principal, zone: str, dataset: str) -> dict[str, Any]:
    """The dataset's epochs (the zone's provider only): the current one, if any, and every
    epoch kept."""
    with Session(ex.engine) as s:
        _require_owner(_zone_row(s, zone), actor)
    snapshot, _ = _hosting(ex, zone, dataset)
    sweep_epochs(ex, zone, dataset)
    now = _now()
    epochs = _epochs(ex, zone, dataset)
    current = next(
        (
            m["id"]
            for m in reversed(epochs)
            if m["state"] == "ready" and _stale(ex, m, snapshot, now) is None
        ),
        None,
    )
    return {
        "zone": zone,
        "dataset": dataset,
        "current": current,
        "epochs": [_public(m) for m in epochs],
    }


# -- sessions -------------------------------------------------------------------------------


def bind(
    ex: Exchange,
    *,
    zone: str,
    dataset: str,
    snapshot: str,
    on_node: bool,
    x_count: int,
    requested: str | None,
) -> dict[str, Any] | None:
    """The epoch a new session uses, counted as one more session served, or ``None`` for the
    per-session protocol (:func:`~exchange.psi_epoch.choose_protocol`). A retired epoch is
    replaced in the background; an explicit ``epoch`` without a usable one is refused with
    :class:`~exchange.psi_epoch.EpochPreparingError` while its preparation runs."""
    if requested is not None and requested not in PROTOCOLS:
        raise InvalidInputError(f"protocol must be one of {', '.join(PROTOCOLS)}")
    if requested == "session":
        return None
    sweep_epochs(ex, zone, dataset)
    now = _now()
    usable = None
    seen = False
    with _meta_lock(ex, zone, dataset):
        for meta in _epochs(ex, zone, dataset):
            seen = True
            if meta["state"] != "ready":
                continue
            why = _stale(ex, meta, snapshot, now)
            if why is None:
                usable = meta
            else:
                _retire(ex, meta, why, now)
        y = None if usable is None else int(usable["y_count"])
        chosen = choose_protocol(
            requested, x_count=x_count, y_count=y, ratio=ex.settings.psi_epoch_ratio
        )
        if chosen == "epoch" and usable is not None:
            usable["sessions"] = int(usable["sessions"]) + 1
            _save(ex, usable)
            return {"id": usable["id"], "y_count": y, "snapshot": usable["snapshot"]}
    if chosen == "epoch" or seen:
        # an explicit request, or a dataset whose provider prepared epochs before
        start_preparation(ex, zone, dataset)
    if chosen == "epoch":
        raise _preparing_error(ex, zone, dataset)
    return None


def _epoch_of(ex: Exchange, snap: psi._Snap) -> dict[str, Any]:
    epoch = str(snap.params.get("epoch"))
    path = _epoch_dir(ex, snap.zone, snap.dataset, epoch) / "epoch.json"
    try:
        meta: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConflictError("the session's epoch is gone", reason="session_broken") from exc
    return meta


def _check_snapshot(meta: dict[str, Any], snapshot: str) -> None:
    if meta["snapshot"] != snapshot:
        raise psi._cannot_comply("the dataset changed since its epoch was prepared", "epoch_stale")


def zone_key(ex: Exchange, snap: psi._Snap) -> cpsi.PsiKey:
    """The epoch key the zone applies to the session's A."""
    try:
        return _read_key(ex, snap.zone, str(snap.params.get("epoch")))[0]
    except (OSError, CryptoError) as exc:
        raise ConflictError("the epoch's key is gone", reason="session_broken") from exc


def zone_answer(
    ex: Exchange, snap: psi._Snap, terms: psi._Terms, snapshot: str
) -> tuple[int, dict[str, Any]]:
    """The zone's answer once A_e is whole: |Y| of the epoch and, for ``aggregate``, each sum
    column's per-subject totals encrypted under C's context in I's order."""
    meta = _epoch_of(ex, snap)
    _check_snapshot(meta, snapshot)
    y = int(meta["y_count"])
    digests: dict[str, Any] = {"y_skipped": int(meta["y_skipped"]), "epoch": meta["id"]}
    if snap.mode == "aggregate" and y:
        assert snap.context_digest is not None
        ids, totals, _ = psi._read_y(ex, snap, terms.plan, terms.max_rows)
        if len(ids) != y:
            raise psi._cannot_comply(
                "the dataset changed since its epoch was prepared", "epoch_stale"
            )
        _, seed = _read_key(ex, snap.zone, meta["id"])
        ctx = load_context(ex, snap.context_digest, expected=he.BFV_DEFAULT)
        columns = encrypt_columns(ctx, terms.plan, totals, _order(seed, ids), terms.max_rows)
        folder = psi._session_dir(ex, snap.id)
        for j, chunks in enumerate(columns):
            for c, chunk in enumerate(chunks):
                (folder / f"sum{j}.{c}.ct").write_bytes(chunk)
            digests[f"sum{j}"] = str(len(chunks))
    return y, digests


def get_ae_points(ex: Exchange, actor: Principal, sid: str, offset: int, limit: int) -> bytes:
    """A slice of A_e = k_e·A, in A's order (a read: it may be repeated until the session
    ends). |X| points in all: nothing the consumer downloads grows with |Y|."""
    snap = psi._readable(ex, actor, sid, "ae_ready", "ae")
    n = snap.x_count
    if offset < 0 or limit < 1 or offset > n:
        raise InvalidInputError("offset and limit must select points of A_e")
    limit = min(limit, ex.settings.max_psi_batch_bytes // _P, n - offset)
    with (psi._session_dir(ex, sid) / "a_prime.bin").open("rb") as f:
        f.seek(offset * _P)
        return f.read(limit * _P)


def put_f_points(
    ex: Exchange, actor: Principal, sid: str, offset: int, body: bytes
) -> dict[str, Any]:
    """Receive one batch of F = c⁻¹·A_e = k_e·H_e(x), in A's order. Every point must be a
    valid point other than the identity and appear once; complete, F is checked whole."""
    with psi._step(ex, actor, sid, ("ae_ready",)) as snap:
        psi._authorize(ex, actor, snap, "f")
        psi._terms(ex, snap, encrypted=True)
        if offset != snap.bc_received:
            raise ConflictError(
                f"expected the batch at offset {snap.bc_received}, got {offset}",
                reason="out_of_order",
            )
        points = psi._points(body, "F")
        if offset + len(points) > snap.x_count:
            raise InvalidInputError(f"A has only {snap.x_count} points", reason="too_many_points")
        psi._check_points(points, offset)
        repeat = psi._first_repeat(points, offset)
        if repeat is not None:
            raise InvalidInputError(repeat, reason="duplicate_point")
        folder = psi._session_dir(ex, sid)
        psi._append(folder / "bc.bin", offset, points)
        received = offset + len(points)
        if received < snap.x_count:
            psi._release(ex, sid, bc_received=received)
            return {"received": received, "complete": False}
        psi._check_whole(psi._read_points(folder / "bc.bin"), snap.x_count, "F")
        digests = {**snap.digests, "f": psi._file_digest(folder / "bc.bin")}
        psi._release(ex, sid, bc_received=received, step="f_done", digests=digests)
    return {"received": received, "complete": True}


def match(ex: Exchange, snap: psi._Snap, snapshot: str) -> tuple[list[int], list[int]]:
    """F against the epoch's image: for each point of F (A's order) whether it is in I, and the
    0/1 mask over I's order. F is checked whole first (|X| distinct valid points)."""
    meta = _epoch_of(ex, snap)
    _check_snapshot(meta, snapshot)
    f_points = psi._read_points(psi._session_dir(ex, snap.id) / "bc.bin")
    psi._check_whole(f_points, snap.x_count, "F")
    try:
        for p in f_points:
            cpsi.validate_point(p)
    except VerificationError as exc:
        raise InvalidInputError(f"F: {exc}", reason="bad_point", fatal=True) from exc
    folder = _epoch_dir(ex, snap.zone, snap.dataset, meta["id"])
    image = np.load(folder / "fp.npy", mmap_mode="r")
    positions = np.load(folder / "pos.npy", mmap_mode="r")
    y = int(meta["y_count"])
    hits = [-1] * len(f_points)
    if y:
        query = fingerprints(f_points)
        first = np.searchsorted(image["hi"], query["hi"], side="left")
        for i, (start, want) in enumerate(zip(first.tolist(), query.tolist(), strict=True)):
            j = start
            # equal high words are rare (about y²/2⁶⁵ pairs): walk them for the low word
            while j < y and int(image["hi"][j]) == want[0]:
                if int(image["lo"][j]) == want[1]:
                    hits[i] = int(positions[j])
                    break
                j += 1
    a_mask = [1 if h >= 0 else 0 for h in hits]
    b_mask = [0] * y
    for h in hits:
        if h >= 0:
            b_mask[h] = 1
    return a_mask, b_mask


def session_epoch(snap: psi._Snap) -> str | None:
    """The epoch a session is bound to (``None``: the per-session protocol)."""
    epoch = snap.params.get("epoch")
    return None if epoch is None else str(epoch)


# -- zones hosted on a node -----------------------------------------------------------------

#: where a node's upload waits for its manifest: DATA_DIR/psi_epochs/<zone>/.incoming/<epoch>/
_INCOMING = ".incoming"
#: the files a node uploads, with the bytes per subject of each (pos: at most 8)
_FILES = {"fp": _FP, "pos": 8}


def _asked_path(ex: Exchange, zone: str, dataset: str) -> Path:
    return _dataset_dir(ex, zone, dataset) / "node_asked"


def _ask_node(ex: Exchange, zone: str, dataset: str, actor: str | None, *, again: bool) -> None:
    """Ask the zone's node to prepare an epoch of ``dataset`` (task ``psi_epoch_prepare``: the
    node starts it in the background and answers at once). Not asked again within
    ``node_task_seconds`` of the last time unless ``again``; 503 when the node is offline."""
    snapshot, _ = _hosting(ex, zone, dataset)
    stamp = _asked_path(ex, zone, dataset)
    psi._private_dir(stamp.parent)
    with Session(ex.engine) as s:
        node = psi._node_online(ex, s, zone)
    with _flock(_dataset_dir(ex, zone, dataset) / "ask.lock"):
        recent = stamp.exists() and (
            time.time() - stamp.stat().st_mtime < ex.settings.node_task_seconds
        )
        if recent and not again:
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


def _ask_node_background(ex: Exchange, zone: str, dataset: str, actor: str | None) -> None:
    try:
        _ask_node(ex, zone, dataset, actor, again=False)
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
