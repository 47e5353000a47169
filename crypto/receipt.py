"""Computation receipts: a signed, ledger-anchored statement of what was computed.

A receipt bundle is one JSON object::

    {
      "type": "zonex.receipt-bundle.v1",
      "statement": <DSSE envelope, payloadType "application/vnd.zonex.receipt+json">,
      "entry": <base64url of the ledger entry's exact canonical bytes>,
      "inclusion": {"index": n, "size": m, "proof": [<base64url hash>, ...]},
      "checkpoint": <signed-note checkpoint text of size m>,
      "node_result": <DSSE envelope, payloadType "application/vnd.zonex.node-result+json">
    }

``node_result`` is present exactly when the statement has a ``node`` (``key_id`` and
``public_key``): the zone's own node computed the result, drew its noise and signed it; the
verifier checks that signature and that every value the node released is the result's.

A computation over several zones (a secure sum) carries one signed result per node instead:
the statement's ``nodes`` lists every zone of ``zones``, in order, as ``{"zone", "node"}``
where ``node`` is ``{"key_id", "public_key"}`` for a zone hosted on a node and ``null`` for a
zone the exchange hosts in-process; its ``contributions`` lists, in the same order, the SHA-256
of each zone's canonical signed contribution. The bundle then has ``node_results`` (in place of
``node_result``): one ``{"zone", "key_id", "envelope"}`` per zone with a node, in the
statement's order. Each envelope must verify under the key the statement names for its zone,
be signed for that node and zone (and the result's ``computation``), and carry the contribution
(its ``contribution`` field) whose digest the statement commits to for that zone.
:func:`check_nodes` reports every zone's check; :func:`verify_receipt` raises
:class:`NodeResultError` (with the same report) when any fails.

The **statement** (canonical JSON, no floats) says what ran: ``kind``, ``consumer``, ``zones``,
``datasets`` (with snapshot digests), ``query_digest``, ``rules_version``, ``grant`` (the matched
rule), ``policy_version``, ``k``, ``epsilon`` (a decimal string), ``output_level``,
``result_digest`` (SHA-256 of the result's canonical JSON), ``time`` and ``ledger_index``. It is
signed by the log key, the key that signs checkpoints: an auditor needs only ``log.pub``. DSSE's
pre-authentication encoding (``DSSEv1 <len> <type> ...``) contains no newline from a canonical
payload, so a statement signature can never be read as a signed note (a note's text is at least
three newline-terminated lines), and a note signature is never valid PAE.

The **ledger entry** for the computation records ``digests.statement``: the SHA-256 of the
canonical statement *without* ``ledger_index`` (the index is only known once the entry is
sequenced). Verification ties the three together: the statement verifies under the log key; the
entry's ``seq`` equals ``ledger_index`` and its ``digests.statement`` equals the digest of the
statement's other fields; the entry is included in a checkpoint the log key signed; the result
file hashes to ``result_digest``. Changing any byte of the bundle or the result breaks one of
these.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from crypto.canonical import canonicalize
from crypto.encoding import b64url_decode, b64url_encode
from crypto.envelope import Envelope, verify_envelope
from crypto.errors import EncodingError, VerificationError
from crypto.keys import VerifyKey
from crypto.merkle import leaf_hash, verify_inclusion
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint

__all__ = [
    "BUNDLE_TYPE",
    "NODE_RESULT_TYPE",
    "STATEMENT_TYPE",
    "NodeCheck",
    "NodeResultError",
    "build_bundle",
    "check_node_result",
    "check_nodes",
    "result_digest",
    "statement_digest",
    "verify_receipt",
]

STATEMENT_TYPE = "application/vnd.zonex.receipt+json"
BUNDLE_TYPE = "zonex.receipt-bundle.v1"
#: DSSE payload type of a zone node's signed result (exchange.tasks signs it)
NODE_RESULT_TYPE = "application/vnd.zonex.node-result+json"
_BUNDLE_KEYS = {"type", "statement", "entry", "inclusion", "checkpoint"}
_NODE_KEYS = _BUNDLE_KEYS | {"node_result"}
_NODES_KEYS = _BUNDLE_KEYS | {"node_results"}
_REQUIRED = (
    "type",
    "kind",
    "consumer",
    "zones",
    "datasets",
    "query_digest",
    "grant",
    "policy_version",
    "output_level",
    "result_digest",
    "time",
    "ledger_index",
)


def result_digest(result: Any) -> str:
    """Lowercase hex SHA-256 of the result's RFC 8785 canonical JSON."""
    return hashlib.sha256(canonicalize(result)).hexdigest()


def statement_digest(statement: Mapping[str, Any]) -> str:
    """The digest the ledger entry records: the canonical statement without ``ledger_index``."""
    core = {k: v for k, v in statement.items() if k != "ledger_index"}
    return hashlib.sha256(canonicalize(core)).hexdigest()


def build_bundle(
    statement: Envelope,
    entry: bytes,
    index: int,
    size: int,
    proof: list[bytes],
    checkpoint: str,
    node_result: Mapping[str, Any] | None = None,
    node_results: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Assemble a receipt bundle (the exchange's side; verification is :func:`verify_receipt`).

    ``node_result``: the zone node's signed result envelope, when a node computed the result;
    the statement's ``node`` field then names the node's key. ``node_results``: for a
    computation over several zones whose statement has ``nodes``, one ``{"zone", "key_id",
    "envelope"}`` per node-hosted zone (possibly none), in the statement's order.
    """
    if node_result is not None and node_results is not None:
        raise ValueError("a bundle carries node_result or node_results, not both")
    bundle: dict[str, Any] = {
        "type": BUNDLE_TYPE,
        "statement": statement.model_dump(mode="json"),
        "entry": b64url_encode(entry),
        "inclusion": {"index": index, "size": size, "proof": [b64url_encode(h) for h in proof]},
        "checkpoint": checkpoint,
    }
    if node_result is not None:
        bundle["node_result"] = dict(node_result)
    if node_results is not None:
        bundle["node_results"] = [dict(r) for r in node_results]
    return bundle


@dataclass(frozen=True)
class NodeCheck:
    """One zone's node check: ``key_id`` is None for a zone the exchange hosts in-process (it
    has no node envelope; the exchange's signature on the statement vouches for it)."""

    zone: str
    key_id: str | None
    ok: bool
    reason: str


class NodeResultError(VerificationError):
    """A zone's node check failed; ``checks`` holds every zone's check, in the statement's
    order."""

    def __init__(self, message: str, checks: Sequence[NodeCheck]) -> None:
        super().__init__(message)
        self.checks = tuple(checks)


def _check_node_result(
    bundle: Mapping[str, Any], statement: Mapping[str, Any], result: Any
) -> None:
    """The zone's node vouched for the result: its envelope verifies under the key the statement
    names, answers this computation's zone, and its released values are the result's."""
    node = statement.get("node")
    if node is None:
        if "node_result" in bundle:
            raise _fail("a node result without a node in the statement")
        return
    if not isinstance(node, Mapping) or set(node) != {"key_id", "public_key"}:
        raise _fail("the statement's node has exactly key_id and public_key")
    if "node_result" not in bundle:
        raise _fail("the statement names a node but the bundle carries no node result")
    try:
        key = VerifyKey(b64url_decode(str(node["public_key"])))
        envelope = Envelope.model_validate(bundle["node_result"])
    except (EncodingError, ValueError) as exc:
        raise _fail("the node's key or result envelope is malformed") from exc
    if key.key_id != node["key_id"]:
        raise _fail("the node's public key does not match its key id")
    try:
        payload = verify_envelope(envelope, NODE_RESULT_TYPE, {key.key_id: key})
    except VerificationError as exc:
        raise _fail(f"the node's result signature does not verify ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("node") != key.key_id:
        raise _fail("the node's result is not signed for this node")
    if payload.get("zone") not in statement["zones"]:
        raise _fail("the node's result is for another zone")
    released = payload.get("result")
    if not isinstance(released, dict) or not isinstance(result, Mapping):
        raise _fail("the node's result carries no released values")
    for name, value in released.items():
        if name not in result or canonicalize(result[name]) != canonicalize(value):
            raise _fail(f"the result's {name!r} is not what the node signed")


def _named_nodes(statement: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any] | None]]:
    """The statement's ``nodes``, checked to name every zone once, in order."""
    nodes = statement.get("nodes")
    zones = statement.get("zones")
    if not isinstance(nodes, list) or not isinstance(zones, list):
        raise _fail("the statement's nodes is not a list")
    named: list[tuple[str, Mapping[str, Any] | None]] = []
    for item in nodes:
        if (
            not isinstance(item, Mapping)
            or set(item) != {"zone", "node"}
            or not isinstance(item["zone"], str)
        ):
            raise _fail("each of the statement's nodes has exactly zone (text) and node")
        node = item["node"]
        if node is not None and (
            not isinstance(node, Mapping) or set(node) != {"key_id", "public_key"}
        ):
            raise _fail(f"zone {item['zone']!r}: a node has exactly key_id and public_key")
        named.append((item["zone"], node))
    if [zone for zone, _ in named] != zones:
        raise _fail("the statement's nodes do not name each of its zones once, in order")
    digests = statement.get("contributions")
    if not isinstance(digests, list) or len(digests) != len(zones):
        raise _fail("the statement commits to no contribution digest for each zone")
    return named


def _check_one(
    zone: str,
    node: Mapping[str, Any],
    signed: Mapping[str, Any] | None,
    committed: object,
    result: Any,
) -> str:
    """Why the node result ``signed`` does not vouch for ``zone``'s contribution ("" if it
    does)."""
    if signed is None:
        return "the bundle carries no signed result of this zone's node"
    if signed.get("key_id") != node["key_id"]:
        return "the signed result is labelled with another node's key id"
    try:
        key = VerifyKey(b64url_decode(str(node["public_key"])))
        envelope = Envelope.model_validate(signed.get("envelope"))
    except (EncodingError, ValueError):
        return "the node's key or result envelope is malformed"
    if key.key_id != node["key_id"]:
        return "the node's public key does not match its key id"
    try:
        payload = verify_envelope(envelope, NODE_RESULT_TYPE, {key.key_id: key})
    except VerificationError as exc:
        return f"the node's signature does not verify ({exc})"
    if not isinstance(payload, dict) or payload.get("node") != key.key_id:
        return "the result is not signed for this node"
    if payload.get("zone") != zone:
        return f"the node signed a result for zone {payload.get('zone')!r}"
    if isinstance(result, Mapping) and payload.get("computation") != result.get("computation"):
        return "the node signed a result for another computation"
    contribution = payload.get("contribution")
    if contribution is None:
        return "the node's result carries no contribution"
    if hashlib.sha256(canonicalize(contribution)).hexdigest() != committed:
        return "the node signed another contribution than the one the statement commits to"
    return ""


def check_nodes(
    bundle: Mapping[str, Any], statement: Mapping[str, Any], result: Any
) -> list[NodeCheck]:
    """Every zone's node check of a receipt whose statement has been verified: one
    :class:`NodeCheck` per zone of a statement with ``nodes``, one for a statement with a
    ``node``, none otherwise. A malformed layout (a node list that does not name the zones, a
    result for a zone without a node, two for one zone) raises :class:`VerificationError`."""
    if "nodes" not in statement:
        if "node_results" in bundle:
            raise _fail("node results without nodes in the statement")
        node = statement.get("node")
        if node is None:
            _check_node_result(bundle, statement, result)
            return []
        zone = ",".join(str(z) for z in statement.get("zones") or ())
        key_id = str(node["key_id"]) if isinstance(node, Mapping) and "key_id" in node else None
        try:
            _check_node_result(bundle, statement, result)
        except VerificationError as exc:
            return [NodeCheck(zone, key_id, False, str(exc).removeprefix("receipt: "))]
        return [NodeCheck(zone, key_id, True, "signed by its node")]
    if "node" in statement or "node_result" in bundle:
        raise _fail("a statement with nodes has no single node or node result")
    named = _named_nodes(statement)
    if "node_results" not in bundle:
        raise _fail("the statement names its zones' nodes but the bundle carries no node_results")
    signed = bundle["node_results"]
    if not isinstance(signed, list) or not all(isinstance(r, Mapping) for r in signed):
        raise _fail("the bundle's node_results is not a list of objects")
    hosted = [zone for zone, node in named if node is not None]
    by_zone: dict[str, Mapping[str, Any]] = {}
    for item in signed:
        if set(item) != {"zone", "key_id", "envelope"}:
            raise _fail("each node result has exactly zone, key_id and envelope")
        zone = item["zone"]
        if zone not in hosted:
            raise _fail(f"a node result for zone {zone!r}, which the statement names no node for")
        if zone in by_zone:
            raise _fail(f"two node results for zone {zone!r}")
        by_zone[zone] = item
    if [z for z in hosted if z in by_zone] != [str(item["zone"]) for item in signed]:
        raise _fail("the node results are not in the statement's order")
    checks: list[NodeCheck] = []
    digests = statement["contributions"]
    for (zone, node), committed in zip(named, digests, strict=True):
        if node is None:
            checks.append(NodeCheck(zone, None, True, "hosted by the exchange"))
            continue
        why = _check_one(zone, node, by_zone.get(zone), committed, result)
        checks.append(
            NodeCheck(zone, str(node["key_id"]), not why, why or "its node signed the contribution")
        )
    return checks


def _check_nodes(bundle: Mapping[str, Any], statement: Mapping[str, Any], result: Any) -> None:
    if "nodes" not in statement and "node_results" not in bundle:
        _check_node_result(bundle, statement, result)  # the single-node form, as it always was
        return
    checks = check_nodes(bundle, statement, result)
    for check in checks:
        if not check.ok:
            raise NodeResultError(
                f"receipt: zone {check.zone!r} (node {check.key_id}): {check.reason}", checks
            )


def check_node_result(bundle: Mapping[str, Any], statement: Mapping[str, Any], result: Any) -> None:
    """The node check of :func:`verify_receipt` alone: the bundle's node result (or every node
    result, for a statement with ``nodes``) verifies under the key ``statement`` names and
    vouches for ``result``. For a client that must trust the node's digests before it has
    checked the whole receipt (a sealed export)."""
    _check_nodes(bundle, statement, result)


def _fail(why: str) -> VerificationError:
    return VerificationError(f"receipt: {why}")


def verify_receipt(
    bundle: Mapping[str, Any], result: Any, log: NoteVerifier
) -> tuple[dict[str, Any], Checkpoint]:
    """Check a receipt bundle and its result offline. Returns the statement and the checkpoint.

    Raises :class:`VerificationError` naming the first check that failed
    (:class:`NodeResultError`, with every zone's check, when a node's failed).
    """
    if not isinstance(bundle, Mapping) or set(bundle) not in (
        _BUNDLE_KEYS,
        _NODE_KEYS,
        _NODES_KEYS,
    ):
        raise _fail(
            f"a bundle has exactly the keys {sorted(_BUNDLE_KEYS)} (and node_result when a "
            "zone node computed the result, or node_results over several zones)"
        )
    if bundle["type"] != BUNDLE_TYPE:
        raise _fail(f"unknown bundle type {bundle['type']!r}")
    try:
        envelope = Envelope.model_validate(bundle["statement"])
    except ValueError as exc:
        raise _fail("the statement is not a DSSE envelope") from exc
    try:
        statement = verify_envelope(envelope, STATEMENT_TYPE, {log.key.key_id: log.key})
    except VerificationError as exc:
        raise _fail(f"the statement signature does not verify under the log key ({exc})") from exc
    if not isinstance(statement, dict) or any(k not in statement for k in _REQUIRED):
        raise _fail("the statement lacks required fields")
    if statement["type"] != "zonex.receipt.v1":
        raise _fail("the statement is not a zonex.receipt.v1")
    if result_digest(result) != statement["result_digest"]:
        raise _fail("the result does not match the statement's result digest")
    _check_nodes(bundle, statement, result)

    note = bundle["checkpoint"]
    if not isinstance(note, str):
        raise _fail("the checkpoint is not text")
    try:
        checkpoint = verify_checkpoint(note, log)
    except (VerificationError, EncodingError) as exc:
        raise _fail(f"the checkpoint does not verify ({exc})") from exc

    try:
        entry = b64url_decode(str(bundle["entry"]))
        parsed = json.loads(entry)
    except (EncodingError, ValueError) as exc:
        raise _fail("the ledger entry is not base64url canonical JSON") from exc
    if not isinstance(parsed, dict) or canonicalize(parsed) != entry:
        raise _fail("the ledger entry is not canonical JSON")
    index = statement["ledger_index"]
    if parsed.get("seq") != index:
        raise _fail("the ledger entry is not at the statement's ledger index")
    if parsed.get("kind") != f"computation.{statement['kind']}":
        raise _fail("the ledger entry records another kind of event")
    digests = parsed.get("digests")
    if not isinstance(digests, dict) or digests.get("statement") != statement_digest(statement):
        raise _fail("the ledger entry does not record this statement")
    if digests.get("result") != statement["result_digest"]:
        raise _fail("the ledger entry records another result")

    inclusion = bundle["inclusion"]
    if not isinstance(inclusion, Mapping) or set(inclusion) != {"index", "size", "proof"}:
        raise _fail("inclusion has exactly index, size and proof")
    if inclusion["index"] != index or inclusion["size"] != checkpoint.size:
        raise _fail("the inclusion proof is for another index or tree size")
    proof_items = inclusion["proof"]
    if not isinstance(proof_items, list):
        raise _fail("the inclusion proof is not a list")
    try:
        proof = [b64url_decode(str(h)) for h in proof_items]
        verify_inclusion(index, checkpoint.size, leaf_hash(entry), proof, checkpoint.root)
    except (EncodingError, VerificationError, ValueError, TypeError) as exc:
        raise _fail(f"the entry is not included in the checkpoint ({exc})") from exc
    return statement, checkpoint
