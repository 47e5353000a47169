"""The exchange's side of zone nodes: registration, availability, and task dispatch.

A provider registers a node key for its zone (pending); the operator approves it (a ledgered,
signed request, as for principals). From then on the zone's computations run on that node:

1. The computation is checked and authorized here exactly as before; then a ``task.authorized``
   entry is ledgered with the task's digest (:mod:`exchange.tasks`).
2. The task is queued (``node_tasks``). The node's long poll (``POST /v1/node/poll``, signed
   with the node key) claims it and receives the bundle: the task, its entry, an inclusion proof
   and a checkpoint that covers it, and a consistency proof from the last checkpoint the node
   saw. With witnesses configured, that checkpoint is a stored one carrying their cosignatures
   (a node may pin a witness policy and refuse anything less). The node dials out; it never
   needs an inbound port.
3. The node answers with a signed result (or a refusal); the waiting request verifies it under
   the node's registered key and releases it through the usual receipt transaction, which
   charges ε. A task the node never finishes is **terminated** (ledgered, nothing released,
   nothing charged): when the node has not polled for ``node_offline_seconds`` or the task's
   deadline passes. ε is only ever charged at release, so a terminated task costs none.

Waiting is a loop over the task's row (every 25 ms) woken early by a condition variable when the
answer arrives in this process, so several API workers over one PostgreSQL database dispatch
correctly and one worker dispatches without polling delay.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import secrets
import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from crypto.encoding import b64url_decode
from crypto.errors import EncodingError, VerificationError
from crypto.keys import VerifyKey
from exchange.domain import (
    PROVIDER_KINDS,
    Principal,
    PrincipalKind,
    check_dataset_name,
    check_pi_classes,
)
from exchange.errors import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    ZoneUnavailableError,
    ZonexError,
)
from exchange.node.store import PortableType
from exchange.server.ledger import ANONYMOUS, EntryDraft, SignedCheckpoint
from exchange.server.models import DatasetRow, NodeRow, NodeTaskRow, PrincipalRow, ZoneRow
from exchange.server.runtime import Exchange
from exchange.server.services import to_dataset
from exchange.server.storage import WRITE
from exchange.tasks import (
    AUTHORIZED_KIND,
    TASK_TYPE,
    build_task_bundle,
    task_digest,
    verify_result,
)
from policy.levels import Level, max_level

__all__ = [
    "NodeRefusedError",
    "NodeResult",
    "TaskFiles",
    "approve_node",
    "availability",
    "dispatch",
    "finish_task",
    "list_nodes",
    "next_task",
    "node_for_zone",
    "register_node",
    "task_input",
    "task_output",
]

log = logging.getLogger("zonex.dispatch")

PORTABLE_TYPES = frozenset(get_args(PortableType))

#: how often a waiting request re-reads its task's row
_TICK = 0.025


class NodeRefusedError(ZonexError):
    """The zone's node refused the task (its local veto rules, a snapshot it no longer holds,
    or a task it could not verify); nothing was released and nothing was charged."""

    code = "node_refused"
    status = 409
    title = "The zone's node refused the task"


@dataclass(frozen=True)
class NodeResult:
    """A node's verified answer: its signed envelope and the payload inside."""

    node: str
    public_key: bytes
    envelope: dict[str, Any]
    payload: dict[str, Any]


@dataclass(frozen=True)
class TaskFiles:
    """Bulk data a task moves without putting it in the task: files (under the exchange's data
    directory) the node may read while the task is ``started`` (``inputs``: name -> path), and
    files it may write then (``outputs``: name -> (path, most bytes)). The node's signed result
    names each output it wrote with its SHA-256 and size (``outputs``: name -> {"sha256",
    "bytes"}); an answer whose outputs do not match is refused (``bad_output``)."""

    inputs: Mapping[str, Path] = field(default_factory=dict)
    outputs: Mapping[str, tuple[Path, int]] = field(default_factory=dict)


def _now() -> datetime:
    return datetime.now(UTC)


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(eq=False)
class _Poll:
    """A node's long poll waiting in this process. A dispatcher here takes it (``taken``) and
    hands it its task directly (``row``, then ``done``): the task is queued already ``started``
    in the transaction that ledgers its authorization, so no claim commit and no wake-up
    delay stand between the two. ``done`` with no ``row``: the dispatch failed; poll on."""

    node: str
    taken: bool = False
    row: NodeTaskRow | None = None
    done: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class _Answer:
    """A node's answer as :func:`finish_task` recorded it (``payload``: the verified result of
    a ``done`` task), handed to the dispatcher waiting in this process."""

    status: str
    outcome: dict[str, Any]
    payload: dict[str, Any] | None


class _Signals:
    """Per exchange: one condition that every arrival of a task or an answer notifies, when
    each node's last poll was last written, the nodes' polls waiting here, and the answers
    recorded for dispatchers waiting here (task id -> the answer, or None until it comes)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.touched: dict[str, float] = {}
        self.polls: dict[str, list[_Poll]] = {}
        self.answers: dict[str, _Answer | None] = {}

    def wait_poll(self, node: str) -> _Poll:
        poll = _Poll(node)
        with self.cond:
            self.polls.setdefault(node, []).append(poll)
        return poll

    def take_poll(self, node: str) -> _Poll | None:
        """The oldest poll of ``node`` waiting here, now taken, or None."""
        with self.cond:
            waiting = self.polls.get(node)
            if not waiting:
                return None
            poll = waiting.pop(0)
            poll.taken = True
            return poll

    def leave(self, poll: _Poll) -> bool:
        """Withdraw a poll; False if a dispatcher took it first (it will set ``done``)."""
        with self.cond:
            if poll.taken:
                return False
            self.polls[poll.node].remove(poll)
            return True

    def notify(self) -> None:
        with self.cond:
            self.cond.notify_all()

    def expect(self, task_id: str) -> None:
        """A dispatcher here waits for ``task_id``: its answer is handed over when recorded."""
        with self.cond:
            self.answers[task_id] = None

    def forget(self, task_id: str) -> None:
        with self.cond:
            self.answers.pop(task_id, None)

    def answered(self, task_id: str, answer: _Answer) -> None:
        """Hand a recorded answer to the dispatcher waiting here (if one is) and wake all."""
        with self.cond:
            if task_id in self.answers:
                self.answers[task_id] = answer
            self.cond.notify_all()

    def await_answer(self, task_id: str, seconds: float) -> _Answer | None:
        """The answer handed over for ``task_id``, waiting at most ``seconds`` for it (checked
        under the condition's lock: an answer recorded just before the wait is not missed)."""
        with self.cond:
            found = self.answers.get(task_id)
            if found is None and seconds > 0:
                self.cond.wait(seconds)
                found = self.answers.get(task_id)
            return found

    def wait(self, seconds: float) -> None:
        with self.cond:
            self.cond.wait(seconds)


_signals: weakref.WeakKeyDictionary[Exchange, _Signals] = weakref.WeakKeyDictionary()
_signals_lock = threading.Lock()


def _signal(ex: Exchange) -> _Signals:
    with _signals_lock:
        found = _signals.get(ex)
        if found is None:
            found = _signals[ex] = _Signals()
        return found


# -- registration -----------------------------------------------------------------------------


def _node_json(row: NodeRow, now: datetime, offline: float) -> dict[str, Any]:
    return {
        "key_id": row.key_id,
        "zone": row.zone,
        "status": row.status,
        "registered_by": row.registered_by,
        "approved_by": row.approved_by,
        "created_at": row.created_at.isoformat(),
        "last_seen": None if row.last_seen is None else row.last_seen.isoformat(),
        "online": _online(row, now, offline),
    }


def _online(row: NodeRow, now: datetime, offline: float) -> bool:
    return (
        row.status == "active"
        and row.last_seen is not None
        and (now - row.last_seen).total_seconds() < offline
    )


def register_node(ex: Exchange, actor: Principal, zone: str, public_key: str) -> dict[str, Any]:
    """A provider registers a node key for its own zone; it waits for the operator's approval."""
    if actor.kind not in PROVIDER_KINDS:
        raise ForbiddenError("only a zone's provider registers its node")
    try:
        key = VerifyKey(b64url_decode(public_key))
    except (EncodingError, ValueError) as exc:
        raise InvalidInputError(f"public_key: {exc}") from exc

    def apply(session: Session, draft: EntryDraft) -> dict[str, Any]:
        zone_row = session.get(ZoneRow, zone)
        if zone_row is None:
            raise NotFoundError(f"no zone {zone!r}")
        if zone_row.owner != actor.key_id:
            raise ForbiddenError("only the zone's provider may register its node")
        if session.get(PrincipalRow, key.key_id) is not None:
            raise ConflictError("this key is already registered")
        session.add(
            PrincipalRow(
                key_id=key.key_id,
                name=f"node {zone} {key.key_id[:12]}",
                kind=PrincipalKind.NODE.value,
                public_key=key.raw,
                status="pending",
                registered_by=actor.key_id,
            )
        )
        session.flush()
        row = NodeRow(key_id=key.key_id, zone=zone, status="pending", registered_by=actor.key_id)
        session.add(row)
        session.flush()
        return _node_json(row, _now(), ex.settings.node_offline_seconds)

    draft = EntryDraft(
        kind="node.registered", actor=actor.key_id, refs={"zone": zone, "node": key.key_id}
    )
    result: dict[str, Any] = ex.ledger.append(draft, apply).value
    return result


def approve_node(ex: Exchange, actor: Principal, key_id: str) -> dict[str, Any]:
    """The operator approves a pending node; it then hosts its zone (one active node a zone)."""
    if actor.kind is not PrincipalKind.OPERATOR:
        raise ForbiddenError("only the operator approves nodes")

    def apply(session: Session, draft: EntryDraft) -> dict[str, Any]:
        row = session.get(NodeRow, key_id)
        if row is None:
            raise NotFoundError(f"no node {key_id[:16]}…")
        if row.status != "pending":
            raise ConflictError(f"the node is {row.status}, not pending")
        other = session.execute(
            select(NodeRow.key_id).where(NodeRow.zone == row.zone, NodeRow.status == "active")
        ).first()
        if other is not None:
            raise ConflictError(
                f"zone {row.zone!r} already has an active node ({other[0][:16]}…); retire it first"
            )
        row.status = "active"
        row.approved_by = actor.key_id
        principal = session.get(PrincipalRow, key_id)
        assert principal is not None
        principal.status = "active"
        # the node's key becomes the zone's key: the catalog shows it, contributions and
        # results are verified under it, and the exchange's own copy is deleted below
        zone_row = session.get(ZoneRow, row.zone)
        assert zone_row is not None
        zone_row.public_key = principal.public_key
        draft.refs["zone"] = row.zone
        draft.refs["zone_key"] = key_id
        session.flush()
        return _node_json(row, _now(), ex.settings.node_offline_seconds)

    draft = EntryDraft(kind="node.approved", actor=actor.key_id, refs={"node": key_id})
    result: dict[str, Any] = ex.ledger.append(draft, apply).value
    # the zone signs on its node from now on; the key the exchange generated for it goes
    (ex.zones_dir / result["zone"] / "zone.key").unlink(missing_ok=True)
    return result


def list_nodes(ex: Exchange, actor: Principal) -> list[dict[str, Any]]:
    """Nodes the caller may see: all (operator, auditor), its zones' (provider), itself (node)."""
    now = _now()
    with Session(ex.engine) as session:
        query = select(NodeRow).order_by(NodeRow.zone, NodeRow.created_at)
        if actor.kind is PrincipalKind.NODE:
            query = query.where(NodeRow.key_id == actor.key_id)
        elif actor.kind in PROVIDER_KINDS:
            owned = select(ZoneRow.name).where(ZoneRow.owner == actor.key_id)
            query = query.where(NodeRow.zone.in_(owned))
        elif actor.kind not in (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR):
            return []
        rows = session.execute(query).scalars().all()
        return [_node_json(r, now, ex.settings.node_offline_seconds) for r in rows]


def node_for_zone(session: Session, zone: str) -> NodeRow | None:
    """The zone's active node, or None when the exchange hosts the zone in-process."""
    return session.execute(
        select(NodeRow).where(NodeRow.zone == zone, NodeRow.status == "active")
    ).scalar_one_or_none()


def availability(ex: Exchange) -> dict[str, dict[str, Any]]:
    """Zone name -> where it is hosted and whether its node is online (node-hosted zones)."""
    now = _now()
    with Session(ex.engine) as session:
        rows = session.execute(select(NodeRow).where(NodeRow.status == "active")).scalars()
        return {
            r.zone: {
                "host": "node",
                "node": r.key_id,
                "online": _online(r, now, ex.settings.node_offline_seconds),
                "last_seen": None if r.last_seen is None else r.last_seen.isoformat(),
            }
            for r in rows
        }


def _node_principal(actor: Principal) -> None:
    if actor.kind is not PrincipalKind.NODE:
        raise ForbiddenError("only a zone node calls this")


def _active_node(session: Session, actor: Principal) -> NodeRow:
    _node_principal(actor)
    row = session.get(NodeRow, actor.key_id)
    if row is None or row.status != "active":
        raise ForbiddenError("this node is not approved")
    return row


def node_self(ex: Exchange, actor: Principal) -> dict[str, Any]:
    """The calling node's own registration (``zonex node doctor``)."""
    with Session(ex.engine) as session:
        row = _active_node(session, actor)
        return _node_json(row, _now(), ex.settings.node_offline_seconds)


# -- dispatch (the consumer's request waits here) ----------------------------------------------


def dispatch(
    ex: Exchange,
    node: NodeRow,
    kind: str,
    fields: dict[str, Any],
    *,
    files: TaskFiles | None = None,
) -> NodeResult:
    """Ledger a task's authorization, queue it for ``node`` and wait for its verified answer.

    Raises :class:`ZoneUnavailableError` (nothing released, nothing charged) when the node is
    offline or does not finish in time, and :class:`NodeRefusedError` when it refuses.

    ``files``: what the node reads and writes through ``GET /v1/node/tasks/{id}/inputs/{name}``
    and ``PUT /v1/node/tasks/{id}/outputs/{name}``; the task names them (``io``) and the upload
    chunk size. When this call raises, the outputs written so far are deleted.
    """
    settings = ex.settings
    now = _now()
    if node.last_seen is None or (now - node.last_seen).total_seconds() >= (
        settings.node_offline_seconds
    ):
        raise ZoneUnavailableError(
            f"zone {node.zone!r} is hosted on a node that is offline; retry when the catalog "
            "shows it online"
        )
    deadline = now + timedelta(seconds=settings.node_task_seconds)
    task: dict[str, Any] = {
        **fields,
        "type": TASK_TYPE,
        "id": secrets.token_hex(16),
        "kind": kind,
        "zone": node.zone,
        "node": node.key_id,
        "deadline": _rfc3339(deadline),
    }
    stored: dict[str, Any] = {}
    if files is not None:
        task["io"] = {
            "inputs": sorted(files.inputs),
            "outputs": {name: limit for name, (_, limit) in sorted(files.outputs.items())},
            "chunk_bytes": _chunk_bytes(ex),
        }
        stored = {
            "inputs": {name: _relative(ex, path) for name, path in files.inputs.items()},
            "outputs": {
                name: {"path": _relative(ex, path), "max": limit}
                for name, (path, limit) in files.outputs.items()
            },
        }
    digest = task_digest(task)
    signals = _signal(ex)
    signals.expect(task["id"])  # before the node can have it: its answer is handed over here
    # the node polling this process, if it is: handed the task as soon as it is ledgered
    poll = signals.take_poll(node.key_id)
    handed: list[NodeTaskRow] = []

    def enqueue(session: Session, draft: EntryDraft) -> None:
        # queued in the transaction that ledgers its authorization: never one without the other
        assert draft.seq is not None
        fields = {
            "id": task["id"],
            "zone": node.zone,
            "node": node.key_id,
            "kind": kind,
            "bundle": {"task": task, "index": draft.seq, **({"files": stored} if stored else {})},
            "deadline": deadline,
        }
        if poll is None:
            session.add(NodeTaskRow(status="queued", **fields))
            return
        started = {"status": "started", "started_at": _now()}
        session.add(NodeTaskRow(**started, **fields))
        handed[:] = [NodeTaskRow(**started, **fields)]  # the poll's copy, in no session

    appended = False
    try:
        ex.ledger.append(
            EntryDraft(
                kind=AUTHORIZED_KIND,
                actor=str(task.get("consumer") or ANONYMOUS),
                refs={"zone": node.zone, "node": node.key_id, "task": task["id"]},
                digests={"task": digest},
                attrs={"kind": kind},
            ),
            enqueue,
        )
        appended = True
    finally:
        if poll is not None:  # a task whose batch did not commit is never handed over
            poll.row = handed[0] if appended and handed else None
            poll.done.set()
    if poll is None:
        signals.notify()
    public_key = _public_key(ex, node.key_id)
    try:
        return _wait(ex, node, task, deadline, public_key)
    except BaseException:
        if files is not None:
            for path, _ in files.outputs.values():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        raise
    finally:
        signals.forget(task["id"])


def _wait(
    ex: Exchange, node: NodeRow, task: dict[str, Any], deadline: datetime, public_key: bytes
) -> NodeResult:
    """Wait for the answer to a queued task (see :func:`dispatch`). An answer recorded in this
    process is handed over as :func:`finish_task` verified it (its row update is what decided
    the task, so it is not read back nor verified again); one recorded by another process is
    read from the task's row and verified here."""
    settings = ex.settings
    signals = _signal(ex)
    digest = task_digest(task)
    while True:
        # a tick for the answer first: the row is read only when none was handed over (the
        # node, another process's answer, termination, the deadline)
        handed = signals.await_answer(task["id"], _TICK)
        # (a result verified for this very task, by this node: else the row decides below)
        payload = None if handed is None else handed.payload
        if handed is not None and (
            payload is None
            or (payload.get("task_digest") == digest and payload.get("node") == node.key_id)
        ):
            return _answered(node, public_key, handed)
        with Session(ex.engine) as session:
            row = session.get(NodeTaskRow, task["id"])
            seen = session.execute(
                select(NodeRow.last_seen).where(NodeRow.key_id == node.key_id)
            ).scalar_one()
        assert row is not None
        if row.status == "done" and row.outcome is not None:
            payload = verify_result(row.outcome["result"], VerifyKey(public_key), task)
            return _answered(node, public_key, _Answer(row.status, row.outcome, payload))
        if row.status == "refused" and row.outcome is not None:
            return _answered(node, public_key, _Answer(row.status, row.outcome, None))
        if row.status == "terminated":
            raise ZoneUnavailableError(f"the task on zone {node.zone!r} was terminated")
        now = _now()
        offline = seen is None or (now - seen).total_seconds() >= settings.node_offline_seconds
        if offline or now >= deadline:
            why = "node_offline" if offline else "deadline"
            if _terminate(ex, task["id"], why):
                raise ZoneUnavailableError(
                    f"zone {node.zone!r}: "
                    + (
                        "its node went offline before answering"
                        if offline
                        else "its node did not answer before the deadline"
                    )
                    + "; nothing was released and no epsilon was charged"
                )
            continue  # the answer arrived meanwhile: read it


def _answered(node: NodeRow, public_key: bytes, answer: _Answer) -> NodeResult:
    """The result of a ``done`` task; :class:`NodeRefusedError` for a refused one."""
    if answer.status == "done" and answer.payload is not None:
        envelope = answer.outcome["result"]
        return NodeResult(node.key_id, public_key, envelope, answer.payload)
    refused = answer.outcome.get("refused") or {}
    reason = str(refused.get("reason", "refused"))[:64]
    detail = str(refused.get("detail", ""))[:300]
    raise NodeRefusedError(f"the zone's node refused the task ({reason}): {detail}", reason=reason)


def _public_key(ex: Exchange, key_id: str) -> bytes:
    with Session(ex.engine) as session:
        row = session.get(PrincipalRow, key_id)
        assert row is not None
        return bytes(row.public_key)


def _chunk_bytes(ex: Exchange) -> int:
    """The most bytes one output upload carries: a PSI batch (the API's body limit for the
    output routes, ``exchange.server.api.app.NODE_OUTPUTS``)."""
    return max(1, ex.settings.max_psi_batch_bytes)


def _relative(ex: Exchange, path: Path) -> str:
    return path.resolve().relative_to(ex.settings.data_dir.resolve()).as_posix()


def _absolute(ex: Exchange, relative: str) -> Path:
    base = ex.settings.data_dir.resolve()
    path = (base / relative).resolve()
    if not path.is_relative_to(base):  # pragma: no cover - written by dispatch() only
        raise ConflictError("a task file outside the data directory")
    return path


def _terminate(ex: Exchange, task_id: str, reason: str) -> bool:
    """Mark a task terminated unless it already finished; ledger it. True if this call did."""

    def apply(session: Session, draft: EntryDraft) -> bool:
        done = _rowcount(
            session.execute(
                update(NodeTaskRow)
                .where(NodeTaskRow.id == task_id, NodeTaskRow.status.in_(("queued", "started")))
                .values(status="terminated", finished_at=_now(), outcome={"terminated": reason})
            )
        )
        if not done:
            raise _AlreadyFinished
        return True

    try:
        ex.ledger.append(
            EntryDraft(
                kind="task.terminated",
                actor=ANONYMOUS,
                refs={"task": task_id},
                attrs={"reason": reason, "epsilon_charged": "0"},
            ),
            apply,
        )
    except _AlreadyFinished:
        return False
    _signal(ex).notify()
    return True


class _AlreadyFinished(Exception):
    pass


def _rowcount(result: Any) -> int:
    """Rows an UPDATE matched (a ``CursorResult``; typed loosely by SQLAlchemy's stubs)."""
    return int(result.rowcount)


# -- the node's side of the API ----------------------------------------------------------------


#: a node's last poll is written at most this often (seconds): availability needs seconds, not
#: a durable write per poll competing with the ledger for the database's write lock
TOUCH_INTERVAL = 1.0


def _touch(ex: Exchange, key_id: str) -> None:
    signals = _signal(ex)
    now = time.monotonic()
    with signals.cond:
        if now - signals.touched.get(key_id, -TOUCH_INTERVAL) < TOUCH_INTERVAL:
            return
        signals.touched[key_id] = now
    with Session(ex.engine.execution_options(**WRITE)) as session, session.begin():
        session.execute(update(NodeRow).where(NodeRow.key_id == key_id).values(last_seen=_now()))


def next_task(
    ex: Exchange, actor: Principal, since: int | None, wait: float, witnessed: bool = False
) -> dict[str, Any] | None:
    """The node's long poll: claim the oldest queued task for it and return its bundle, or None
    after ``wait`` seconds (at most ``node_poll_seconds``). ``witnessed``: the node pinned a
    witness policy, so the bundle's checkpoint is cosigned first (:func:`_witnessed`); other
    nodes are not kept waiting for a witnessing round they do not check."""
    with Session(ex.engine) as session:
        _active_node(session, actor)
    if since is not None and (not isinstance(since, int) or since < 0):
        raise InvalidInputError("since is the size of the last checkpoint the node accepted")
    wait = max(0.0, min(float(wait), ex.settings.node_poll_seconds))
    _touch(ex, actor.key_id)
    signals = _signal(ex)
    end = time.monotonic() + wait
    while True:
        claimed = _claim(ex, actor.key_id)
        if claimed is not None:
            return _bundle(ex, claimed, since, witnessed)
        left = end - time.monotonic()
        if left <= 0:
            return None
        # a dispatcher in this process hands its task over directly; one in another process
        # queues it, and the next claim above finds it
        poll = signals.wait_poll(actor.key_id)
        if not poll.done.wait(min(left, _TICK * 4)) and signals.leave(poll):
            continue
        poll.done.wait()  # taken: the dispatcher sets it once its ledger append has ended
        if poll.row is not None:
            return _bundle(ex, poll.row, since, witnessed)


def _claim(ex: Exchange, node: str) -> NodeTaskRow | None:
    queued = select(NodeTaskRow.id).where(NodeTaskRow.node == node, NodeTaskRow.status == "queued")
    with Session(ex.engine) as session:
        # a read first: an idle poll never takes the write lock
        if session.execute(queued.limit(1)).first() is None:
            return None
    with Session(ex.engine.execution_options(**WRITE)) as session, session.begin():
        candidates = session.execute(queued.order_by(NodeTaskRow.created_at).limit(4)).scalars()
        for task_id in list(candidates):
            claimed = _rowcount(
                session.execute(
                    update(NodeTaskRow)
                    .where(NodeTaskRow.id == task_id, NodeTaskRow.status == "queued")
                    .values(status="started", started_at=_now())
                )
            )
            if claimed:
                row = session.get(NodeTaskRow, task_id)
                assert row is not None
                session.expunge(row)
                return row
    return None


def _bundle(ex: Exchange, row: NodeTaskRow, since: int | None, witnessed: bool) -> dict[str, Any]:
    index = int(row.bundle["index"])
    # a checkpoint that covers the entry and is no older than the node's last one
    floor = index if since is None else max(index, since - 1)
    cosigned = _witnessed(ex, floor) if witnessed else None
    checkpoint = cosigned or ex.ledger.checkpoint(persist=False, covering=floor)
    proof = ex.ledger.inclusion_proof(index, checkpoint.size)
    consistency = None
    if since is not None and 0 < since <= checkpoint.size:
        consistency = (since, ex.ledger.consistency_proof(since, checkpoint.size))
    return build_task_bundle(
        row.bundle["task"],
        ex.ledger.entry(index),
        index,
        checkpoint.size,
        proof,
        checkpoint.note,
        consistency,
    )


def _witnessed(ex: Exchange, floor: int) -> SignedCheckpoint | None:
    """With witnesses configured: a stored checkpoint including entry ``floor`` that carries
    the cosignatures they gave it within the witness timeout (tasks handed out together share
    one round: :meth:`~exchange.server.cosigning.Cosigner.cosigned_covering`). ``None``
    without witnesses, or if the round could not run: the bundle then goes out with a
    checkpoint as signed, and a node with a witness policy refuses it."""
    cosigner = ex.cosigner
    if cosigner is None:
        return None
    try:
        if not cosigner.has_witnesses():
            return None
        return cosigner.cosigned_covering(floor, ex.settings.witness_timeout_seconds)
    except (ZonexError, SQLAlchemyError):
        log.exception("could not get a cosigned checkpoint including entry %d", floor)
        return None


def _started_task(ex: Exchange, actor: Principal, task_id: str) -> dict[str, Any]:
    """The stored bundle of a task addressed to the calling node and ``started`` (claimed by its
    poll, not yet answered); anything else is refused."""
    _node_principal(actor)
    with Session(ex.engine) as session:
        _active_node(session, actor)
        row = session.get(NodeTaskRow, task_id) if len(task_id) <= 40 else None
        if row is None or row.node != actor.key_id:
            raise NotFoundError("no such task for this node")
        if row.status != "started":
            raise ConflictError(
                f"the task is {row.status}; its files are available only while it runs",
                reason="task_not_started",
            )
        return dict(row.bundle)


def task_input(
    ex: Exchange, actor: Principal, task_id: str, name: str, offset: int, limit: int | None
) -> bytes:
    """A slice of a task's input file (``GET /v1/node/tasks/{id}/inputs/{name}``): only for the
    node the task is addressed to, only while the task is ``started``."""
    bundle = _started_task(ex, actor, task_id)
    inputs: dict[str, str] = (bundle.get("files") or {}).get("inputs") or {}
    if name not in inputs:
        raise NotFoundError(f"the task has no input {name[:32]!r}")
    most = ex.settings.max_psi_batch_bytes
    size = most if limit is None else min(limit, most)
    if offset < 0 or size < 1:
        raise InvalidInputError("offset and limit select bytes of the input")
    try:
        with _absolute(ex, inputs[name]).open("rb") as f:
            f.seek(offset)
            return f.read(size)
    except FileNotFoundError:
        raise ConflictError("the task's input is gone", reason="task_not_started") from None


def task_output(
    ex: Exchange, actor: Principal, task_id: str, name: str, offset: int, body: bytes
) -> dict[str, Any]:
    """Write one chunk of a task's output (``PUT /v1/node/tasks/{id}/outputs/{name}``) at byte
    ``offset``, which is the bytes received so far (0 starts over): only for the node the task
    is addressed to, only while it is ``started``, at most the output's declared size."""
    bundle = _started_task(ex, actor, task_id)
    outputs: dict[str, Any] = (bundle.get("files") or {}).get("outputs") or {}
    if name not in outputs:
        raise NotFoundError(f"the task has no output {name[:32]!r}")
    if len(body) > _chunk_bytes(ex):
        raise InvalidInputError(f"one chunk is at most {_chunk_bytes(ex)} bytes")
    path = _absolute(ex, str(outputs[name]["path"]))
    have = path.stat().st_size if path.exists() else 0
    if offset not in (0, have):
        raise ConflictError(
            f"expected the chunk at offset {have}, got {offset}", reason="out_of_order"
        )
    if offset + len(body) > int(outputs[name]["max"]):
        raise InvalidInputError(
            f"the output {name!r} is at most {outputs[name]['max']} bytes", reason="too_large"
        )
    if not path.parent.is_dir():  # the task's requester is gone (its files deleted)
        raise ConflictError("the task's files are gone", reason="task_not_started")
    with path.open("r+b" if offset else "wb") as f:
        f.truncate(offset)
        f.seek(offset)
        f.write(body)
    return {"received": offset + len(body)}


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _outputs_problem(ex: Exchange, bundle: Mapping[str, Any], payload: Any) -> str | None:
    """Why the uploaded outputs of a task are not what the node's signed result names (each
    declared output it wrote, with its SHA-256 and size, and none it did not), or None."""
    outputs: dict[str, Any] = (bundle.get("files") or {}).get("outputs") or {}
    if not outputs:
        return None
    signed = payload.get("outputs") if isinstance(payload, dict) else None
    if not isinstance(signed, dict) or set(signed) - set(outputs):
        return "the signed result does not name the task's outputs"
    for name, spec in outputs.items():
        path = _absolute(ex, str(spec["path"]))
        claim = signed.get(name)
        if claim is None:
            if path.exists():
                return f"output {name!r} was uploaded but the signed result does not name it"
            continue
        if not isinstance(claim, dict) or not path.exists():
            return f"output {name!r} named in the signed result was not uploaded"
        if claim.get("bytes") != path.stat().st_size or claim.get("sha256") != _file_sha256(path):
            return f"output {name!r} does not match the digest the node signed"
    return None


def finish_task(ex: Exchange, actor: Principal, task_id: str, outcome: dict[str, Any]) -> None:
    """Record a node's answer to a task it claimed: ``{"result": envelope}`` (verified here
    under the node's key before it is stored) or ``{"refused": {"reason", "detail"}}``."""
    _node_principal(actor)
    with Session(ex.engine) as session:
        row = session.get(NodeTaskRow, task_id)
        if row is None or row.node != actor.key_id:
            raise NotFoundError("no such task for this node")
        bundle = dict(row.bundle)
        task = bundle["task"]
        status = row.status
        principal = session.get(PrincipalRow, actor.key_id)
        assert principal is not None
        public_key = bytes(principal.public_key)
    if status != "started":
        raise ConflictError(f"the task is {status}; its answer is no longer wanted")
    bad_output = None
    payload: dict[str, Any] | None = None
    if set(outcome) == {"result"}:
        try:
            payload = verify_result(outcome["result"], VerifyKey(public_key), task)
        except VerificationError as exc:
            raise InvalidInputError(str(exc), reason="bad_result") from exc
        new_status = "done"
        bad_output = _outputs_problem(ex, bundle, payload)
        if bad_output is not None:
            # signed, but not what was uploaded: the task ends refused (the waiting request
            # stops, nothing is released) and the node is told why
            outcome = {"refused": {"reason": "bad_output", "detail": bad_output}}
            new_status = "refused"
            payload = None
    elif set(outcome) == {"refused"} and isinstance(outcome["refused"], dict):
        new_status = "refused"
    else:
        raise InvalidInputError("an outcome is {result: envelope} or {refused: {reason, detail}}")
    with Session(ex.engine.execution_options(**WRITE)) as session, session.begin():
        updated = _rowcount(
            session.execute(
                update(NodeTaskRow)
                .where(NodeTaskRow.id == task_id, NodeTaskRow.status == "started")
                .values(status=new_status, outcome=outcome, finished_at=_now())
            )
        )
    if not updated:
        raise ConflictError("the task was terminated; its answer is no longer wanted")
    if new_status == "refused":
        refused = outcome["refused"]
        ex.ledger.append(
            EntryDraft(
                kind="task.refused",
                actor=actor.key_id,
                refs={"task": task_id, "zone": task["zone"]},
                attrs={"reason": str(refused.get("reason", ""))[:64]},
            )
        )
    # the row update above decided the task: a dispatcher waiting here takes the answer as is
    _signal(ex).answered(task_id, _Answer(new_status, outcome, payload))
    if bad_output is not None:
        raise InvalidInputError(
            f"the exchange refused the result: {bad_output}", reason="bad_output"
        )


def register_node_dataset(
    ex: Exchange,
    actor: Principal,
    *,
    name: str,
    description: str,
    subject_column: str,
    columns: list[dict[str, str]],
    row_count: int,
    digest: str,
) -> Any:
    """A node registers a dataset it imported or attached on its own machine: only the
    metadata (columns, levels, subject column, row count, snapshot digest) reaches the catalog;
    the request is signed with the node's key and the registration is ledgered under it."""
    check_dataset_name(name)
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise InvalidInputError("digest is the snapshot's 64 lowercase hex digits")
    if row_count < 0:
        raise InvalidInputError("row_count is not negative")
    names = [c.get("name", "") for c in columns]
    if len(set(names)) != len(names) or not names:
        raise InvalidInputError("columns have distinct names")
    if subject_column not in names:
        raise InvalidInputError(f"subject column {subject_column!r} is not a column")
    clean: list[dict[str, str]] = []
    for col in columns:
        try:
            level = Level(col.get("level", ""))
        except ValueError as exc:
            raise InvalidInputError(
                f"unknown level {col.get('level')!r} for column {col.get('name')!r}"
            ) from exc
        if col.get("type") not in PORTABLE_TYPES:
            raise InvalidInputError(f"column {col.get('name')!r}: unknown type {col.get('type')!r}")
        entry = {"name": str(col["name"]), "type": str(col["type"]), "level": level.value}
        pi = col.get("pi", "none")
        check_pi_classes({entry["name"]: pi}, [entry["name"]])
        if pi != "none":
            entry["pi"] = pi
        clean.append(entry)
    top = max_level(Level(c["level"]) for c in clean).value
    with Session(ex.engine) as session:
        zone = _active_node(session, actor).zone

    def apply(session: Session, draft: EntryDraft) -> Any:
        exists = session.execute(
            select(DatasetRow.status).where(DatasetRow.zone == zone, DatasetRow.name == name)
        ).first()
        if exists:
            raise ConflictError(f"dataset {name!r} already exists in zone {zone!r}")
        row = DatasetRow(
            zone=zone,
            name=name,
            description=description,
            subject_column=subject_column,
            columns=clean,
            level=top,
            row_count=row_count,
            digest=digest,
            source="node",
            source_format=None,
            attach_url=None,
            attach_table=None,
            ceilings={},
            status="active",
        )
        session.add(row)
        session.flush()
        return to_dataset(row)

    draft = EntryDraft(
        kind="dataset.registered",
        actor=actor.key_id,
        refs={"zone": zone, "dataset": name},
        digests={"snapshot": digest},
        attrs={"level": top, "source": "node"},
    )
    return ex.ledger.append(draft, apply).value
