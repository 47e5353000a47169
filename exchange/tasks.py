"""Tasks between the exchange and a zone node: the wire format both sides import.

The exchange authorizes a computation, ledgers a ``task.authorized`` entry whose
``digests.task`` is the SHA-256 of the task's canonical JSON, and hands the node a **task
bundle**::

    {
      "type": "zonex.task-bundle.v1",
      "task": {"type": "zonex.task.v1", "id", "kind", "zone", "node", "consumer", "purpose",
               "deadline", ...kind-specific fields},
      "entry": <base64url of the authorization entry's canonical bytes>,
      "inclusion": {"index": n, "size": m, "proof": [<base64url hash>, ...]},
      "checkpoint": <signed-note checkpoint text of size m>,
      "consistency": {"from": s, "proof": [...]}    # from the node's last checkpoint, if any
    }

The node trusts nothing the exchange says outside the log: :func:`verify_task_bundle` checks
that the checkpoint verifies under the log key the node pinned at ``zonex node init``, that the
entry is included in it, that the entry authorizes exactly this task, that the task is for this
node and zone and not past its deadline, and that the checkpoint extends the last one the node
accepted (so an exchange cannot show the node one history and auditors another without a
signed fork as proof). A node that pinned a witness policy (C2SP tlog-policy,
:mod:`crypto.tlogpolicy`) also requires the checkpoint to carry cosignatures meeting its quorum:
a private fork shown only to the node is then refused unless the witnesses cosigned it too.

The node answers with a **result envelope** (DSSE, payload type :data:`RESULT_TYPE`) signed by
its own key: the task's id and digest, the released result (noise already drawn on the node),
and the parameters it was released under. The exchange embeds it in the receipt, so a consumer
can check offline that the zone's key vouched for the result (:mod:`crypto.receipt`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from crypto.canonical import canonicalize
from crypto.encoding import b64url_decode, b64url_encode
from crypto.envelope import Envelope, sign_envelope, verify_envelope
from crypto.errors import EncodingError, VerificationError
from crypto.keys import SigningKey, VerifyKey
from crypto.merkle import leaf_hash, verify_consistency, verify_inclusion
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint
from crypto.receipt import NODE_RESULT_TYPE
from crypto.tlogpolicy import Policy, PolicyError, check_quorum

__all__ = [
    "AUTHORIZED_KIND",
    "BUNDLE_TYPE",
    "RESULT_TYPE",
    "RESULT_VERSION",
    "TASK_TYPE",
    "TaskRefused",
    "build_task_bundle",
    "parse_time",
    "sign_result",
    "task_digest",
    "verify_result",
    "verify_task_bundle",
]

TASK_TYPE = "zonex.task.v1"
BUNDLE_TYPE = "zonex.task-bundle.v1"
RESULT_TYPE = NODE_RESULT_TYPE
RESULT_VERSION = "zonex.node-result.v1"
#: the ledger entry kind that authorizes a task
AUTHORIZED_KIND = "task.authorized"

_TASK_FIELDS = ("type", "id", "kind", "zone", "node", "consumer", "purpose", "deadline")


class TaskRefused(Exception):
    """A node refuses a task: ``reason`` is a stable code, ``detail`` one readable line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def to_json(self) -> dict[str, str]:
        return {"reason": self.reason, "detail": self.detail}


def task_digest(task: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of the task's RFC 8785 canonical JSON."""
    return hashlib.sha256(canonicalize(dict(task))).hexdigest()


_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")


def parse_time(value: object) -> datetime:
    """An RFC 3339 UTC time exactly as the wire writes it (``YYYY-MM-DDTHH:MM:SS[.ffffff]Z``);
    any other spelling is refused, so one instant has one text."""
    if not isinstance(value, str) or not _TIME.fullmatch(value):
        raise ValueError("a time is RFC 3339 in UTC: YYYY-MM-DDTHH:MM:SSZ")
    return datetime.fromisoformat(value[:-1]).replace(tzinfo=UTC)


def build_task_bundle(
    task: Mapping[str, Any],
    entry: bytes,
    index: int,
    size: int,
    proof: list[bytes],
    checkpoint: str,
    consistency: tuple[int, list[bytes]] | None = None,
) -> dict[str, Any]:
    """Assemble a bundle (the exchange's side; the node checks it with
    :func:`verify_task_bundle`)."""
    bundle: dict[str, Any] = {
        "type": BUNDLE_TYPE,
        "task": dict(task),
        "entry": b64url_encode(entry),
        "inclusion": {"index": index, "size": size, "proof": [b64url_encode(h) for h in proof]},
        "checkpoint": checkpoint,
    }
    if consistency is not None:
        bundle["consistency"] = {
            "from": consistency[0],
            "proof": [b64url_encode(h) for h in consistency[1]],
        }
    return bundle


def _hashes(items: object, what: str) -> list[bytes]:
    if not isinstance(items, list):
        raise TaskRefused("malformed", f"the {what} proof is not a list")
    try:
        return [b64url_decode(str(h)) for h in items]
    except EncodingError as exc:
        raise TaskRefused("malformed", f"the {what} proof is not base64url") from exc


@dataclass(frozen=True)
class Verified:
    """A task whose authorization the node checked, and the checkpoint that showed it."""

    task: dict[str, Any]
    checkpoint: Checkpoint


def verify_task_bundle(
    bundle: object,
    *,
    log: NoteVerifier,
    zone: str,
    node: str,
    now: datetime,
    last: Checkpoint | None,
    policy: Policy | None = None,
) -> Verified:
    """Check a task bundle against the pinned log key, the node's witness policy (if any) and
    its last checkpoint.

    Raises :class:`TaskRefused` naming the first check that failed: ``malformed``,
    ``bad_checkpoint``, ``unwitnessed`` (with ``policy``: the checkpoint's cosignatures do not
    meet its quorum), ``not_on_ledger``, ``not_authorized``, ``wrong_zone``, ``wrong_node``,
    ``expired``, ``stale_checkpoint`` or ``inconsistent_checkpoint``.
    """
    if not isinstance(bundle, Mapping) or bundle.get("type") != BUNDLE_TYPE:
        raise TaskRefused("malformed", "not a zonex.task-bundle.v1")
    task = bundle.get("task")
    if not isinstance(task, dict) or any(f not in task for f in _TASK_FIELDS):
        raise TaskRefused("malformed", "the task lacks required fields")
    if task["type"] != TASK_TYPE:
        raise TaskRefused("malformed", f"unknown task type {task['type']!r}")

    note = bundle.get("checkpoint")
    if not isinstance(note, str):
        raise TaskRefused("malformed", "the checkpoint is not text")
    try:
        checkpoint = verify_checkpoint(note, log)
    except (VerificationError, EncodingError) as exc:
        raise TaskRefused("bad_checkpoint", f"the checkpoint does not verify ({exc})") from exc
    if policy is not None:
        _require_quorum(note, policy, log)

    try:
        entry = b64url_decode(str(bundle.get("entry")))
        parsed = json.loads(entry)
    except (EncodingError, ValueError) as exc:
        raise TaskRefused("malformed", "the entry is not base64url JSON") from exc
    if not isinstance(parsed, dict) or canonicalize(parsed) != entry:
        raise TaskRefused("malformed", "the entry is not canonical JSON")
    inclusion = bundle.get("inclusion")
    if not isinstance(inclusion, Mapping):
        raise TaskRefused("malformed", "no inclusion proof")
    index, size = inclusion.get("index"), inclusion.get("size")
    if not isinstance(index, int) or size != checkpoint.size or parsed.get("seq") != index:
        raise TaskRefused("not_on_ledger", "the inclusion proof is for another entry or size")
    try:
        verify_inclusion(
            index,
            checkpoint.size,
            leaf_hash(entry),
            _hashes(inclusion.get("proof"), "inclusion"),
            checkpoint.root,
        )
    except (VerificationError, ValueError, TypeError) as exc:
        raise TaskRefused("not_on_ledger", f"the entry is not in the checkpoint ({exc})") from exc
    digests = parsed.get("digests")
    if (
        parsed.get("kind") != AUTHORIZED_KIND
        or not isinstance(digests, dict)
        or digests.get("task") != task_digest(task)
    ):
        raise TaskRefused("not_authorized", "the ledger entry does not authorize this task")

    if task["zone"] != zone:
        raise TaskRefused("wrong_zone", f"the task is for zone {task['zone']!r}, not {zone!r}")
    if task["node"] != node:
        raise TaskRefused("wrong_node", "the task is addressed to another node key")
    try:
        deadline = parse_time(task["deadline"])
    except ValueError as exc:
        raise TaskRefused("malformed", f"deadline: {exc}") from exc
    if now >= deadline:
        raise TaskRefused("expired", f"the task's deadline {task['deadline']} has passed")

    if last is not None:
        if checkpoint.origin != last.origin:
            raise TaskRefused("bad_checkpoint", "the checkpoint is from another log")
        if checkpoint.size < last.size:
            raise TaskRefused(
                "stale_checkpoint",
                f"the checkpoint (size {checkpoint.size}) is older than one already seen "
                f"(size {last.size})",
            )
        consistency = bundle.get("consistency")
        if checkpoint.size > last.size or checkpoint.root != last.root:
            if not isinstance(consistency, Mapping) or consistency.get("from") != last.size:
                raise TaskRefused(
                    "inconsistent_checkpoint",
                    f"no consistency proof from the node's last checkpoint (size {last.size})",
                )
            try:
                verify_consistency(
                    last.size,
                    checkpoint.size,
                    last.root,
                    checkpoint.root,
                    _hashes(consistency.get("proof"), "consistency"),
                )
            except (VerificationError, ValueError, TypeError) as exc:
                raise TaskRefused(
                    "inconsistent_checkpoint",
                    f"the checkpoint does not extend the node's last one ({exc})",
                ) from exc
    return Verified(task, checkpoint)


def _require_quorum(note: str, policy: Policy, log: NoteVerifier) -> None:
    """The checkpoint is trusted only once the policy's witnesses vouched for it: a checkpoint
    the log signed for this node alone (a split view) carries no quorum of cosignatures."""
    try:
        report = check_quorum(note, policy, log)
    except PolicyError as exc:
        raise TaskRefused("unwitnessed", f"the node's witness policy: {exc}") from exc
    except (VerificationError, EncodingError) as exc:  # pragma: no cover - verified just before
        raise TaskRefused("bad_checkpoint", f"the checkpoint does not verify ({exc})") from exc
    if not report.ok:
        raise TaskRefused("unwitnessed", report.explain())


def sign_result(key: SigningKey, task: Mapping[str, Any], body: Mapping[str, Any]) -> Envelope:
    """The node's signed answer to ``task``: ``body`` (result and release parameters) bound to
    the task's id and digest and to the node's key id."""
    payload = {
        **body,
        "type": RESULT_VERSION,
        "task": task["id"],
        "task_digest": task_digest(task),
        "zone": task["zone"],
        "node": key.key_id,
    }
    return sign_envelope(RESULT_TYPE, payload, [key])


def verify_result(envelope: object, key: VerifyKey, task: Mapping[str, Any]) -> dict[str, Any]:
    """The payload of a node's result envelope for ``task``, checked under the node's key."""
    try:
        parsed = Envelope.model_validate(envelope)
        payload = verify_envelope(parsed, RESULT_TYPE, {key.key_id: key})
    except (ValueError, VerificationError) as exc:
        raise VerificationError(f"the node's result does not verify: {exc}") from exc
    if (
        not isinstance(payload, dict)
        or payload.get("type") != RESULT_VERSION
        or payload.get("task") != task["id"]
        or payload.get("task_digest") != task_digest(task)
        or payload.get("zone") != task["zone"]
        or payload.get("node") != key.key_id
    ):
        raise VerificationError("the node's result answers another task")
    return payload
