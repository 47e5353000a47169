"""Epoch mode of the private joins for a zone hosted on its own node (``docs/psi.md``, "Epoch
mode", "Node-hosted zones").

The node keeps everything secret about an epoch: the epoch key ``k_e``, the order seed and the
rows. The exchange receives only the image's sorted fingerprints and their positions, signed
by the node's key, and asks the node for each session's ``A_e = k_e·A``::

    NODE_DIR/psi_epochs/<dataset>/<epoch>/
      key          k_e ‖ order seed (0600): never sent, deleted when the epoch ends
      epoch.json   id, dataset, snapshot, state (preparing, prepared, uploaded), |Y|, progress
      image.fp     fingerprints in I's order while the preparation runs (a restart continues
                   from the last recorded chunk)
      fp, pos      the sorted fingerprints and their positions until the exchange accepts them

- **preparation** (:func:`prepare_epoch`): ``zonex psi prepare --node DIR`` or the task
  ``psi_epoch_prepare`` (which only starts it, on a background thread, and answers at once);
  the same pure kernel the exchange uses for zones it hosts (:mod:`exchange.psi_epoch`). A node
  restarted mid-way continues its unfinished preparations at its first poll
  (:func:`resume_preparations`), from the last recorded chunk.
- **upload** (:func:`upload_epoch`): ``fp`` and ``pos`` in chunks through the node-only route
  ``PUT /v1/node/psi/epochs/{epoch}/files/{name}``, then the manifest (:func:`sign_manifest`:
  DSSE, payload type :data:`MANIFEST_TYPE`) naming the epoch, dataset, snapshot, |Y| and each
  file's SHA-256 and size, ``POST /v1/node/psi/epochs``.
- **a session** (task ``psi_epoch_answer``, :func:`run_epoch_answer`): the node fetches A,
  checks its digest and every point, answers A_e = k_e·A and, for ``aggregate``, each
  subject's clipped totals encrypted under the consumer's public context in I's order; it
  signs a result naming each output's digest, as for the per-session protocol.
- **the end of an epoch** (:func:`sweep_epochs`): the node deletes an epoch's key once the
  exchange no longer lists it (it deletes retired epochs when no session can use them any
  more) or once it is past its longest life, whichever the node sees first.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from crypto import he
from crypto import psi as cpsi
from crypto.envelope import Envelope, sign_envelope
from crypto.errors import VerificationError
from crypto.keys import SigningKey
from exchange import psi_epoch as kernel
from exchange.errors import InvalidInputError
from exchange.node.home import HostedDataset, NodeHome
from exchange.node.psi import _field, fetch_context, put_chunks, session_task
from exchange.psi_protocol import LABEL, encrypt_columns, read_y
from exchange.tasks import TaskRefused, sign_result

__all__ = [
    "ANSWER_KIND",
    "MANIFEST_TYPE",
    "MANIFEST_VERSION",
    "PREPARE_KIND",
    "EpochProgress",
    "prepare_epoch",
    "resume_preparations",
    "run_epoch_answer",
    "run_epoch_prepare",
    "sign_manifest",
    "sweep_epochs",
    "upload_epoch",
]

log = logging.getLogger("zonex.node.psi_epoch")

#: the task that starts a preparation (also its name in a veto file's ``refuse``)
PREPARE_KIND = "psi_epoch_prepare"
#: the task that answers one session's A with the epoch key (and encrypts values)
ANSWER_KIND = "psi_epoch_answer"
#: DSSE payload type of the node's signed epoch manifest
MANIFEST_TYPE = "application/vnd.zonex.psi-epoch+json"
MANIFEST_VERSION = "zonex.psi-epoch.v1"
#: the most subjects a preparation reads when the exchange does not say (its own
#: ``psi_max_items`` refuses a larger epoch at upload)
_MAX_ITEMS = 10_000_000
#: an epoch id as the exchange accepts it
EPOCH_ID = re.compile(r"ep_[A-Za-z0-9_-]{16,40}")

_P = cpsi.POINT_BYTES
#: bytes per upload request of the image's files
_UPLOAD_CHUNK = 4 << 20

#: progress callback: (subjects blinded, |Y|)
EpochProgress = Callable[[int, int], None]


def _now() -> datetime:
    return datetime.now(UTC)


# -- files ----------------------------------------------------------------------------------


def _root(home: NodeHome) -> Path:
    return home.dir / "psi_epochs"


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True))
    os.replace(tmp, path)


def _epochs(home: NodeHome, dataset: str | None = None) -> list[dict[str, Any]]:
    """The epochs this node keeps (of one dataset, or all), oldest first."""
    root = _root(home)
    pattern = f"{dataset}/*/epoch.json" if dataset else "*/*/epoch.json"
    out = []
    for meta in root.glob(pattern) if root.exists() else ():
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(meta.read_text()))
    return sorted(out, key=lambda m: str(m["created_at"]))


def _folder(home: NodeHome, meta: dict[str, Any]) -> Path:
    return _root(home) / str(meta["dataset"]) / str(meta["id"])


def _save(home: NodeHome, meta: dict[str, Any]) -> None:
    _write_json(_folder(home, meta) / "epoch.json", meta)


def _find(home: NodeHome, epoch: str) -> dict[str, Any] | None:
    for meta in _epochs(home):
        if meta["id"] == epoch:
            return meta
    return None


def _read_key(home: NodeHome, meta: dict[str, Any]) -> tuple[cpsi.PsiKey, bytes]:
    data = (_folder(home, meta) / "key").read_bytes()
    return cpsi.PsiKey.from_bytes(data[: cpsi.SCALAR_BYTES]), data[cpsi.SCALAR_BYTES :]


def _delete(home: NodeHome, meta: dict[str, Any]) -> None:
    folder = _folder(home, meta)
    # the key first: whatever else survives a crash, k_e does not
    with contextlib.suppress(FileNotFoundError):
        (folder / "key").unlink()
    shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _flock(path: Path, *, wait: bool) -> Iterator[bool]:
    _private_dir(path.parent)
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


# -- preparation ----------------------------------------------------------------------------


def _dataset(home: NodeHome, name: str) -> HostedDataset:
    dataset = home.datasets().get(name)
    if dataset is None:
        raise InvalidInputError(f"this node hosts no dataset {name!r}", reason="unknown_dataset")
    return dataset


def _read_ids(home: NodeHome, dataset: HostedDataset, max_items: int) -> tuple[list[str], int]:
    with home.source(dataset) as (engine, relation, _):
        ids, _, skipped = read_y(engine, relation, dataset.subject_column, [], 1, max_items)
    return ids, skipped


def _new_epoch(home: NodeHome, dataset: HostedDataset) -> dict[str, Any]:
    epoch = "ep_" + secrets.token_urlsafe(18)
    meta: dict[str, Any] = {
        "id": epoch,
        "dataset": dataset.name,
        "snapshot": dataset.digest,
        "state": "preparing",
        "created_at": _now().isoformat(),
        "y_count": None,
        "y_skipped": None,
        "done": 0,
    }
    folder = _private_dir(_folder(home, meta))
    fd = os.open(folder / "key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:  # k_e, then the order seed
        out.write(cpsi.PsiKey.generate().to_bytes() + secrets.token_bytes(32))
    _save(home, meta)
    return meta


def prepare_epoch(
    home: NodeHome,
    name: str,
    *,
    chunk: int = kernel.DEFAULT_CHUNK,
    max_items: int = _MAX_ITEMS,
    max_chunks: int | None = None,
    workers: int | None = None,
    wait: bool = True,
    progress: EpochProgress | None = None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    """Prepare (or finish preparing) an epoch of the dataset ``name``; returns its metadata
    (state ``prepared`` when done, ``preparing`` when ``max_chunks`` stopped it).

    An unfinished epoch of the dataset's current snapshot continues from its last recorded
    chunk with its key; one of another snapshot is deleted (its image would be of other
    data); an epoch prepared but not yet uploaded is returned as it is. One preparation per
    dataset at a time: with ``wait`` a second caller waits for it, without it gets
    :class:`~exchange.psi_epoch.EpochPreparingError`. ``scheduler``: blind on the zone's own
    Dask cluster at that address (:func:`exchange.psi_epoch.blind_image`; k_e goes to its
    workers)."""
    dataset = _dataset(home, name)
    with _flock(_root(home) / name / "prepare.lock", wait=wait) as taken:
        if not taken:
            raise kernel.EpochPreparingError(
                f"this node is already preparing an epoch of {name!r}", retry_after=60
            )
        meta = None
        for m in _epochs(home, name):
            if m["state"] in ("preparing", "prepared"):
                if m["snapshot"] == dataset.digest and meta is None:
                    meta = m
                else:
                    _delete(home, m)
        if meta is None:
            meta = _new_epoch(home, dataset)
        if meta["state"] == "prepared":
            return meta
        return _blind(
            home, dataset, meta, chunk, max_items, max_chunks, workers, progress, scheduler
        )


def _blind(
    home: NodeHome,
    dataset: HostedDataset,
    meta: dict[str, Any],
    chunk: int,
    max_items: int,
    max_chunks: int | None,
    workers: int | None,
    progress: EpochProgress | None,
    scheduler: str | None = None,
) -> dict[str, Any]:
    folder = _folder(home, meta)
    key, seed = _read_key(home, meta)
    ids, skipped = _read_ids(home, dataset, max_items)
    n = len(ids)
    done = int(meta.get("done", 0)) if meta.get("y_count") == n else 0
    # the chunk and limit it runs under: a restarted node resumes with the same
    meta.update(y_count=n, y_skipped=skipped, done=done, resumed_from=done, chunk=chunk)
    meta.update(max_items=max_items)
    _save(home, meta)

    def record(end: int, seconds_per_item: float) -> None:
        meta.update(done=end, seconds_per_item=seconds_per_item)
        _save(home, meta)  # the progress record: a restart continues from here
        if progress is not None:
            progress(end, n)

    finished = kernel.blind_image(
        key,
        seed,
        meta["id"],
        ids,
        folder / "image.fp",
        start=done,
        chunk=chunk,
        max_chunks=max_chunks,
        workers=workers,
        on_chunk=record,
        scheduler=scheduler,
    )
    if not finished:
        return meta
    fp, pos = kernel.sort_image(folder / "image.fp")
    (folder / "fp").write_bytes(fp.tobytes())
    (folder / "pos").write_bytes(pos.tobytes())
    (folder / "image.fp").unlink()
    meta.update(state="prepared", prepared_at=_now().isoformat(), pos_dtype=pos.dtype.str)
    _save(home, meta)
    log.info("epoch %s of %s prepared: %d subjects", meta["id"], dataset.name, n)
    return meta


# -- the upload -----------------------------------------------------------------------------


def _file_digest(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"sha256": h.hexdigest(), "bytes": path.stat().st_size}


def sign_manifest(key: SigningKey, zone: str, meta: dict[str, Any], folder: Path) -> Envelope:
    """The node's signed statement of a prepared epoch: what the exchange stores and serves
    sessions from (never the key, never an id)."""
    payload = {
        "type": MANIFEST_VERSION,
        "zone": zone,
        "node": key.key_id,
        "epoch": meta["id"],
        "dataset": meta["dataset"],
        "snapshot": meta["snapshot"],
        "y_count": int(meta["y_count"]),
        "y_skipped": int(meta["y_skipped"]),
        "label": LABEL,
        "fp_bits": kernel.FP_BITS,
        "pos_dtype": meta["pos_dtype"],
        "files": {name: _file_digest(folder / name) for name in ("fp", "pos")},
        "prepared_at": meta["prepared_at"],
    }
    return sign_envelope(MANIFEST_TYPE, payload, [key])


def _problem(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("detail") or body.get("title"))[:300] if isinstance(body, dict) else ""


class UploadError(Exception):
    """The exchange refused an epoch's upload (one readable line)."""


def upload_epoch(home: NodeHome, http: httpx.Client, meta: dict[str, Any]) -> dict[str, Any]:
    """Send a prepared epoch's fingerprints and positions, then its signed manifest; once the
    exchange has stored them the node keeps only the key (and the metadata)."""
    folder = _folder(home, meta)
    for name in ("fp", "pos"):
        data = (folder / name).read_bytes()
        url = f"/v1/node/psi/epochs/{meta['id']}/files/{name}"
        refused = put_chunks(http, url, data, _UPLOAD_CHUNK)
        if refused is not None:
            raise UploadError(f"the exchange refused {name}: {_problem(refused)}")
    envelope = sign_manifest(home.key, home.zone, meta, folder)
    response = http.post("/v1/node/psi/epochs", json={"manifest": envelope.model_dump()})
    if response.status_code not in (200, 201):
        raise UploadError(f"the exchange refused the epoch: {_problem(response)}")
    for name in ("fp", "pos"):
        (folder / name).unlink(missing_ok=True)
    meta.update(state="uploaded", uploaded_at=_now().isoformat())
    _save(home, meta)
    log.info("epoch %s of %s uploaded", meta["id"], meta["dataset"])
    return meta


def exchange_epochs(http: httpx.Client) -> dict[str, Any]:
    """What the exchange keeps of this node's epochs (``GET /v1/node/psi/epochs``), with when
    this node asked (``asked_at``: an epoch uploaded since is not in it yet)."""
    asked = _now()
    response = http.get("/v1/node/psi/epochs")
    if response.status_code != 200:
        raise UploadError(f"the exchange did not list the epochs: {_problem(response)}")
    listing: dict[str, Any] = response.json()
    listing["asked_at"] = asked.isoformat()
    return listing


def sweep_epochs(home: NodeHome, listing: dict[str, Any]) -> int:
    """Delete the uploaded epochs the exchange no longer keeps, and any epoch past its longest
    life (``listing``: :func:`exchange_epochs`); returns how many keys went."""
    kept = {e["id"] for e in listing.get("epochs", [])}
    asked = datetime.fromisoformat(str(listing["asked_at"]))
    life = float(listing.get("max_seconds", 0)) + float(listing.get("session_seconds", 0))
    now = _now()
    gone = 0
    for meta in _epochs(home):
        # its life counts from its upload (the exchange's ready time follows it), else from
        # its creation; an epoch uploaded after the listing was asked for is not in it yet
        since = datetime.fromisoformat(str(meta.get("uploaded_at") or meta["created_at"]))
        dropped = meta["state"] == "uploaded" and meta["id"] not in kept and since < asked
        if dropped or (life and (now - since).total_seconds() > life):
            _delete(home, meta)
            gone += 1
            log.info("epoch %s of %s ended: its key is deleted", meta["id"], meta["dataset"])
    return gone


_swept: dict[str, float] = {}
_swept_lock = threading.Lock()
#: seconds between two looks at which epochs the exchange still keeps
SWEEP_SECONDS = 60.0


def sweep_now_and_then(home: NodeHome, http: httpx.Client, every: float = SWEEP_SECONDS) -> None:
    """:func:`sweep_epochs` at most every ``every`` seconds (the serve loop calls it after each
    poll; the first time also :func:`resume_preparations`); a node without epochs asks
    nothing. A failure is logged, never raised."""
    now = time.monotonic()
    with _swept_lock:
        first = home.key_id not in _swept
        if not first and now - _swept[home.key_id] < every:
            return
        _swept[home.key_id] = now
    if first:  # this process's first poll: finish what a previous one left
        resume_preparations(home, http)
    if not epoch_ids(home):
        return
    try:
        sweep_epochs(home, exchange_epochs(http))
    except (httpx.HTTPError, UploadError, OSError, ValueError) as exc:
        log.warning("could not check which epochs the exchange keeps: %s", exc)


def prepare_and_upload(
    home: NodeHome, http: httpx.Client, name: str, **options: Any
) -> dict[str, Any]:
    """:func:`prepare_epoch`, then :func:`upload_epoch` when it finished."""
    meta = prepare_epoch(home, name, **options)
    if meta["state"] == "prepared":
        meta = upload_epoch(home, http, meta)
    return meta


# -- tasks ----------------------------------------------------------------------------------


def _background(home: NodeHome, http: httpx.Client, name: str, options: dict[str, Any]) -> None:
    try:
        prepare_and_upload(home, http, name, wait=False, **options)
    except kernel.EpochPreparingError:
        pass  # a preparation of this dataset is already running
    except Exception:
        log.exception("preparing an epoch of %s failed", name)


_threads: list[threading.Thread] = []
_threads_lock = threading.Lock()


def join_preparations(timeout: float | None = None) -> None:
    """Wait for the background preparations this process started (shutdown, tests)."""
    with _threads_lock:
        threads = list(_threads)
    for thread in threads:
        thread.join(timeout)


def run_epoch_prepare(home: NodeHome, http: httpx.Client, task: dict[str, Any]) -> Envelope:
    """Start preparing an epoch of the task's dataset on a background thread and answer at once
    (a preparation can take minutes; a task never waits for it)."""
    name = _field(task, "dataset", str)
    snapshot = _field(task, "snapshot", str)
    chunk = _field(task, "chunk", int)
    max_items = _field(task, "max_items", int)
    home.veto().check(PREPARE_KIND, None)
    dataset = home.datasets().get(name)
    if dataset is None:
        raise TaskRefused("unknown_dataset", f"this node hosts no dataset {name!r}")
    if dataset.digest != snapshot:
        raise TaskRefused("snapshot_mismatch", f"{name}: the task is for another snapshot")
    if chunk < 1 or max_items < 1:
        raise TaskRefused("malformed", "the task's chunk and max_items are positive")
    _start(home, http, name, {"chunk": chunk, "max_items": max_items})
    return sign_result(home.key, task, {"dataset": name, "snapshot": snapshot, "started": True})


def _start(home: NodeHome, http: httpx.Client, name: str, options: dict[str, Any]) -> None:
    """:func:`prepare_and_upload` on a background thread."""
    thread = threading.Thread(
        target=_background, args=(home, http, name, options), name="psi-epoch", daemon=True
    )
    with _threads_lock:
        _threads[:] = [t for t in _threads if t.is_alive()]
        _threads.append(thread)
    thread.start()


def resume_preparations(home: NodeHome, http: httpx.Client) -> int:
    """Start again, in the background, every preparation a previous process left unfinished
    (of the dataset's current snapshot; an epoch prepared but not uploaded included): each
    continues from its last recorded chunk with its key. Returns how many."""
    hosted = home.datasets()
    started = 0
    for meta in _epochs(home):
        dataset = hosted.get(meta["dataset"])
        if meta["state"] not in ("preparing", "prepared") or dataset is None:
            continue
        if dataset.digest != meta["snapshot"]:
            continue  # deleted when that dataset's next preparation starts
        options = {
            "chunk": int(meta.get("chunk") or kernel.DEFAULT_CHUNK),
            "max_items": int(meta.get("max_items") or _MAX_ITEMS),
        }
        _start(home, http, meta["dataset"], options)
        started += 1
    return started


def run_epoch_answer(home: NodeHome, http: httpx.Client, task: dict[str, Any]) -> Envelope:
    """One epoch session's zone role: A_e = k_e·A (every point of A checked) and, for
    ``aggregate``, the values in I's order encrypted under the consumer's public context."""
    epoch = _field(task, "epoch", str)
    t = session_task(home, task, ANSWER_KIND)
    mode, plan, limit, max_items, dataset = t.mode, t.plan, t.limit, t.max_items, t.dataset
    meta = _find(home, epoch)
    if meta is None or meta["state"] != "uploaded":
        raise TaskRefused("epoch_unknown", f"this node keeps no epoch {epoch[:40]!r}")
    if meta["dataset"] != t.name or meta["snapshot"] != t.snapshot:
        raise TaskRefused("epoch_stale", "the epoch is of another dataset or snapshot")

    key, seed = _read_key(home, meta)
    try:
        points = t.fetch_a(http, task["id"])
        if len(set(points)) != len(points):
            raise TaskRefused("bad_input", "A repeats a point")
        try:  # every point a valid point other than the identity
            a_e = cpsi.reblind(key, points)
        except VerificationError as exc:
            raise TaskRefused("bad_input", f"A: {exc}") from exc
    finally:
        del key
    y = int(meta["y_count"])
    outputs: dict[str, bytes] = {"a_e": b"".join(a_e)}
    chunks: list[int] = []
    result = t.result(home.zone, y)
    if mode == "aggregate":
        context = task.get("context")
        if not isinstance(context, str):
            raise TaskRefused("malformed", "psi_aggregate names the consumer's HE context")
        result["bounds"] = {p["column"]: [p["lower"], p["upper"]] for p in plan}
        result["he_context"] = context
        if y:
            with home.source(dataset) as (engine, relation, _):
                try:
                    ids, totals, _ = read_y(
                        engine, relation, dataset.subject_column, plan, limit, max_items
                    )
                except InvalidInputError as exc:
                    raise TaskRefused("bad_data", exc.detail) from exc
            if len(ids) != y:
                raise TaskRefused("epoch_stale", "the rows changed since the epoch was prepared")
            ctx = fetch_context(http, task["id"], context)
            try:
                encrypted = encrypt_columns(ctx, plan, totals, kernel.keyed_order(seed, ids), limit)
            except InvalidInputError as exc:
                raise TaskRefused("bad_data", exc.detail) from exc
            chunks = [len(c) for c in encrypted]
            outputs["ciphertexts"] = he.pack_ciphertexts([ct for col in encrypted for ct in col])
    counts = {"a_e": len(a_e), "ciphertexts": chunks}
    return t.sign(
        home, http, task, outputs,
        result=result, epoch=epoch, counts=counts, y_skipped=int(meta["y_skipped"]),
    )  # fmt: skip


def epoch_ids(home: NodeHome) -> list[str]:
    """The ids of the epochs this node keeps a key for."""
    return [m["id"] for m in _epochs(home) if (_folder(home, m) / "key").exists()]


def local_epochs(home: NodeHome, dataset: str | None = None) -> list[dict[str, Any]]:
    """What the node keeps of its epochs (never a key)."""
    return _epochs(home, dataset)
