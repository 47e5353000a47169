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
from collections.abc import Mapping
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
    "build_bundle",
    "check_node_result",
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
) -> dict[str, Any]:
    """Assemble a receipt bundle (the exchange's side; verification is :func:`verify_receipt`).

    ``node_result``: the zone node's signed result envelope, when a node computed the result;
    the statement's ``node`` field then names the node's key.
    """
    bundle = {
        "type": BUNDLE_TYPE,
        "statement": statement.model_dump(mode="json"),
        "entry": b64url_encode(entry),
        "inclusion": {"index": index, "size": size, "proof": [b64url_encode(h) for h in proof]},
        "checkpoint": checkpoint,
    }
    if node_result is not None:
        bundle["node_result"] = dict(node_result)
    return bundle


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


def check_node_result(bundle: Mapping[str, Any], statement: Mapping[str, Any], result: Any) -> None:
    """The node check of :func:`verify_receipt` alone: the bundle's node result verifies under
    the key ``statement`` names and its released values are ``result``'s. For a client that
    must trust the node's digests before it has checked the whole receipt (a sealed export)."""
    _check_node_result(bundle, statement, result)


def _fail(why: str) -> VerificationError:
    return VerificationError(f"receipt: {why}")


def verify_receipt(
    bundle: Mapping[str, Any], result: Any, log: NoteVerifier
) -> tuple[dict[str, Any], Checkpoint]:
    """Check a receipt bundle and its result offline. Returns the statement and the checkpoint.

    Raises :class:`VerificationError` naming the first check that failed.
    """
    if not isinstance(bundle, Mapping) or set(bundle) not in (_BUNDLE_KEYS, _NODE_KEYS):
        raise _fail(
            f"a bundle has exactly the keys {sorted(_BUNDLE_KEYS)} (and node_result when a "
            "zone node computed the result)"
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
    _check_node_result(bundle, statement, result)

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
