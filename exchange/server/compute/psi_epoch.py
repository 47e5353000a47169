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

A zone hosted on its own node keeps k_e, the order seed and the rows there
(:mod:`exchange.node.psi_epoch`); the exchange's side of it, which stores the node's upload in
this module's layout and asks the node for each session's A_e, is
:mod:`exchange.server.compute.psi_epoch_node`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from crypto import he
from crypto import psi as cpsi
from crypto.errors import CryptoError, VerificationError
from exchange.domain import Principal
from exchange.errors import ConflictError, InvalidInputError
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
    usable_ids,
)
from exchange.psi_protocol import encrypt_columns
from exchange.server import access
from exchange.server.compute import psi
from exchange.server.compute.contexts import load_context
from exchange.server.compute.source import open_source
from exchange.server.runtime import Exchange
from exchange.server.services import _require_owner, _zone_row

__all__ = [
    "bind",
    "epoch_status",
    "get_ae_points",
    "join_preparations",
    "match",
    "prepare",
    "put_f_points",
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
    """The dataset's distinct usable subject ids and how many values were skipped: the
    column's distinct values fetched whole from the driver, then
    :func:`~exchange.psi_epoch.usable_ids` (the set a session's
    :func:`~exchange.psi_protocol.read_y` reads, without its row by row work)."""
    with Session(ex.engine) as s:
        row = access._dataset(s, zone, dataset)
        subject = row.subject_column
    if row.row_count >= cpsi.PROCESS_MIN_BATCH and ex.settings.psi_epoch_scheduler is None:
        cpsi.start_helpers(ex.settings.psi_workers)  # they start while Y is read
    with open_source(ex, row) as src, src.engine.connect() as conn:
        query = select(src.relation.c[subject]).distinct()
        # the driver's rows as they come (no result processing per row: one text column)
        rows = conn.execute(query).cursor.fetchall()
    return usable_ids((value for (value,) in rows), ex.settings.psi_max_items)


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
        scheduler=ex.settings.psi_epoch_scheduler,
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
    if on_node:
        from exchange.server.compute import psi_epoch_node  # builds on this module

        target: Any = psi_epoch_node.ask_node_background
        args: tuple[Any, ...] = (ex, zone, dataset, actor)
    else:
        target, args = _background, (ex, zone, dataset)
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
            from exchange.server.compute import psi_epoch_node

            psi_epoch_node.ask_node(ex, zone, dataset, actor.key_id)
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
    if usable is None and (chosen == "epoch" or seen):
        # an explicit request, or a dataset whose provider prepared epochs before and whose
        # epoch is gone (a usable one left to a balanced session stays as it is)
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
