"""Receipts over several zones that carry every zone node's signed result (``node_results``).

Built here without a server: a log key signs the statement and a one-entry checkpoint; three
zones, ``a`` hosted by the exchange (no node), ``b`` and ``c`` on nodes with their own keys, each
node signing a result that carries its zone's contribution. A receipt verifies only when every
node's envelope is present, signed by the key the statement names for its zone and carries the
contribution whose digest the statement commits to; the single-node form is unchanged.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

import pytest

from crypto.canonical import canonicalize
from crypto.encoding import b64url_decode, b64url_encode
from crypto.envelope import sign_envelope
from crypto.errors import VerificationError
from crypto.keys import SigningKey
from crypto.merkle import leaf_hash
from crypto.note import Checkpoint, NoteSigner, NoteVerifier, sign_checkpoint
from crypto.receipt import (
    NODE_RESULT_TYPE,
    STATEMENT_TYPE,
    NodeResultError,
    build_bundle,
    check_nodes,
    result_digest,
    statement_digest,
    verify_receipt,
)

LOG = NoteSigner("zonex.test/log", SigningKey.generate())
NODES = {"b": SigningKey.generate(), "c": SigningKey.generate()}
ZONES = ["a", "b", "c"]
COMPUTATION = "ss-0123"


def _contribution(zone: str) -> dict[str, Any]:
    # stands for the zone's DSSE-signed contribution: only its canonical digest matters here
    return {"payloadType": "application/vnd.zonex.contribution+json", "zone": zone, "n": 7}


def _node_result(zone: str, key: SigningKey, /, **changes: Any) -> dict[str, Any]:
    payload = {
        "type": "zonex.node-result.v1",
        "task": f"task-{zone}",
        "task_digest": "00" * 32,
        "zone": zone,
        "node": key.key_id,
        "computation": COMPUTATION,
        "contribution": _contribution(zone),
        **changes,
    }
    return sign_envelope(NODE_RESULT_TYPE, payload, [key]).model_dump(mode="json")


def _digest(obj: Any) -> str:
    return hashlib.sha256(canonicalize(obj)).hexdigest()


def _receipt(
    statement_changes: dict[str, Any] | None = None,
    node_results: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A valid secure-sum-like receipt and its result (what a test changes is applied before
    the log signs, as an exchange that misbehaves would)."""
    result = {"computation": COMPUTATION, "total": "42"}
    statement: dict[str, Any] = {
        "type": "zonex.receipt.v1",
        "kind": "secure_sum",
        "consumer": "f" * 64,
        "zones": ZONES,
        "datasets": [{"zone": z, "name": "firms", "snapshot": "0" * 64} for z in ZONES],
        "query_digest": "1" * 64,
        "grant": "grant:x",
        "policy_version": 1,
        "output_level": "L3",
        "result_digest": result_digest(result),
        "time": "2026-01-01T00:00:00.000000Z",
        "contributions": [_digest(_contribution(z)) for z in ZONES],
        "nodes": [
            {
                "zone": z,
                "node": None
                if z not in NODES
                else {
                    "key_id": NODES[z].key_id,
                    "public_key": b64url_encode(NODES[z].public_key.raw),
                },
            }
            for z in ZONES
        ],
        **(statement_changes or {}),
    }
    entry = canonicalize(
        {
            "seq": 0,
            "kind": "computation.secure_sum",
            "digests": {"statement": statement_digest(statement), "result": result_digest(result)},
        }
    )
    signed = sign_envelope(STATEMENT_TYPE, {**statement, "ledger_index": 0}, [LOG.key])
    note = sign_checkpoint(Checkpoint(LOG.name, 1, leaf_hash(entry)), LOG)
    if node_results is None:
        node_results = [
            {"zone": z, "key_id": k.key_id, "envelope": _node_result(z, k)}
            for z, k in NODES.items()
        ]
    bundle = build_bundle(signed, entry, 0, 1, [], note, node_results=node_results)
    return bundle, result


@pytest.fixture(scope="module")
def log() -> NoteVerifier:
    return LOG.verifier()


def _refused(bundle: dict[str, Any], result: dict[str, Any], log: NoteVerifier) -> str:
    with pytest.raises(VerificationError) as exc:
        verify_receipt(bundle, result, log)
    return str(exc.value)


def test_every_node_is_checked_and_the_in_process_zone_is_named_as_such(
    log: NoteVerifier,
) -> None:
    bundle, result = _receipt()
    statement, _ = verify_receipt(bundle, result, log)
    checks = check_nodes(bundle, statement, result)
    assert [(c.zone, c.key_id, c.ok) for c in checks] == [
        ("a", None, True),
        ("b", NODES["b"].key_id, True),
        ("c", NODES["c"].key_id, True),
    ]
    assert checks[0].reason == "hosted by the exchange"


def test_a_removed_node_envelope_is_refused(log: NoteVerifier) -> None:
    bundle, result = _receipt()
    bundle["node_results"] = bundle["node_results"][:1]  # c's is gone
    with pytest.raises(NodeResultError) as exc:
        verify_receipt(bundle, result, log)
    assert "zone 'c'" in str(exc.value) and "no signed result" in str(exc.value)
    assert [c.ok for c in exc.value.checks] == [True, True, False]
    # and all of them gone, or the whole list gone
    bundle["node_results"] = []
    assert "zone 'b'" in _refused(bundle, result, log)
    del bundle["node_results"]
    assert "carries no node_results" in _refused(bundle, result, log)


def test_envelopes_swapped_between_zones_are_refused(log: NoteVerifier) -> None:
    bundle, result = _receipt()
    b, c = bundle["node_results"]
    # c's envelope under b's label: c's key signed it, not the key the statement names for b
    swapped = copy.deepcopy(bundle)
    swapped["node_results"] = [{**b, "envelope": c["envelope"]}, {**c, "envelope": b["envelope"]}]
    assert "zone 'b'" in _refused(swapped, result, log)
    assert "signature does not verify" in _refused(swapped, result, log)
    # c's whole entry relabelled as b's (key id included): not the node the statement names
    relabelled = copy.deepcopy(bundle)
    relabelled["node_results"] = [{**c, "zone": "b"}, {**b, "zone": "c"}]
    assert "another node's key id" in _refused(relabelled, result, log)
    # out of order
    reordered = copy.deepcopy(bundle)
    reordered["node_results"] = [c, b]
    assert "statement's order" in _refused(reordered, result, log)
    # the in-process zone given an envelope it does not have
    extra = copy.deepcopy(bundle)
    extra["node_results"].append({"zone": "a", "key_id": b["key_id"], "envelope": b["envelope"]})
    assert "names no node for" in _refused(extra, result, log)


def test_a_node_result_re_signed_by_another_key_is_refused(log: NoteVerifier) -> None:
    intruder = SigningKey.generate()
    forged = _node_result("b", intruder, node=NODES["b"].key_id)
    bundle, result = _receipt(
        node_results=[
            {"zone": "b", "key_id": NODES["b"].key_id, "envelope": forged},
            {"zone": "c", "key_id": NODES["c"].key_id, "envelope": _node_result("c", NODES["c"])},
        ]
    )
    why = _refused(bundle, result, log)
    assert "zone 'b'" in why and "signature does not verify" in why


def test_a_tampered_contribution_digest_is_refused(log: NoteVerifier) -> None:
    # the node signed another contribution than the statement commits to
    other = {**_contribution("c"), "n": 8}
    bundle, result = _receipt(
        node_results=[
            {"zone": "b", "key_id": NODES["b"].key_id, "envelope": _node_result("b", NODES["b"])},
            {
                "zone": "c",
                "key_id": NODES["c"].key_id,
                "envelope": _node_result("c", NODES["c"], contribution=other),
            },
        ]
    )
    assert "zone 'c'" in (why := _refused(bundle, result, log))
    assert "another contribution than the one the statement commits to" in why
    # the statement (signed by the log) commits to another digest for b
    digests = [_digest(_contribution(z)) for z in ZONES]
    digests[1] = "9" * 64
    bundle, result = _receipt({"contributions": digests})
    assert "zone 'b'" in (why := _refused(bundle, result, log))
    assert "another contribution" in why
    # one byte of the statement's digest changed after signing: the log's signature fails
    bundle, result = _receipt()
    bundle["statement"]["payload"] = bundle["statement"]["payload"][:-2] + "AA"
    assert "statement signature" in _refused(bundle, result, log)


def test_a_node_result_for_another_zone_or_computation_is_refused(log: NoteVerifier) -> None:
    b = NODES["b"]
    for changes, reason in (
        ({"zone": "c"}, "for zone 'c'"),
        ({"computation": "ss-other"}, "another computation"),
    ):
        bundle, result = _receipt(
            node_results=[
                {"zone": "b", "key_id": b.key_id, "envelope": _node_result("b", b, **changes)},
                {
                    "zone": "c",
                    "key_id": NODES["c"].key_id,
                    "envelope": _node_result("c", NODES["c"]),
                },
            ]
        )
        assert reason in _refused(bundle, result, log)


def test_a_statement_whose_nodes_do_not_name_its_zones_is_refused(log: NoteVerifier) -> None:
    bundle, result = _receipt(
        {"nodes": [{"zone": "a", "node": None}, {"zone": "b", "node": None}]},
        node_results=[],
    )
    assert "each of its zones once" in _refused(bundle, result, log)
    both, result = _receipt({"node": None})
    assert "no single node" in _refused(both, result, log)


def test_a_single_node_bundle_with_node_results_is_refused(log: NoteVerifier) -> None:
    bundle, result = _receipt()
    bundle["node_result"] = bundle["node_results"][0]["envelope"]
    assert "exactly the keys" in _refused(bundle, result, log)


def test_a_receipt_without_nodes_still_verifies_and_reports_no_node(log: NoteVerifier) -> None:
    # the form of secure-sum receipts issued before nodes existed: contribution digests only
    bundle, result = _receipt({"nodes": None})
    statement_only = _strip_nodes(bundle)
    statement, _ = verify_receipt(statement_only, result, log)
    assert check_nodes(statement_only, statement, result) == []
    # node results without nodes in the statement are refused
    statement_only["node_results"] = bundle["node_results"]
    assert "node results without nodes" in _refused(statement_only, result, log)


def test_the_single_node_form_is_reported_as_one_check(log: NoteVerifier) -> None:
    key = NODES["b"]
    node = {"key_id": key.key_id, "public_key": b64url_encode(key.public_key.raw)}
    released = {"computation": COMPUTATION, "total": "42"}
    bundle, result = _receipt({"nodes": None, "node": node, "zones": ["b"]})
    single = _strip_nodes(bundle)
    single["node_result"] = _node_result("b", key, result=released)
    statement, _ = verify_receipt(single, result, log)
    (check,) = check_nodes(single, statement, result)
    assert (check.zone, check.key_id, check.ok) == ("b", key.key_id, True)
    single["node_result"] = _node_result("b", key, result={**released, "total": "43"})
    assert "not what the node signed" in _refused(single, result, log)


def _strip_nodes(bundle: dict[str, Any]) -> dict[str, Any]:
    """The bundle re-signed with the statement's ``nodes`` removed (what ``_receipt`` given
    ``nodes: None`` signed is a statement with ``"nodes": null``: rebuild it without the key)."""
    envelope = bundle["statement"]
    statement = json.loads(b64url_decode(envelope["payload"]))
    del statement["nodes"]
    entry = json.loads(b64url_decode(bundle["entry"]))
    entry["digests"]["statement"] = statement_digest(statement)
    entry_bytes = canonicalize(entry)
    signed = sign_envelope(STATEMENT_TYPE, statement, [LOG.key])
    note = sign_checkpoint(Checkpoint(LOG.name, 1, leaf_hash(entry_bytes)), LOG)
    return build_bundle(signed, entry_bytes, 0, 1, [], note)
