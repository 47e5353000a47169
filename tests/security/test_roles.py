"""Privilege escalation between roles: an enterprise on operator routes, a consumer approving
its own request, one zone's provider acting on another's. Each gets its exact refusal, and no
grant, status or record changes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from crypto.encoding import b64url_encode
from crypto.envelope import sign_envelope
from crypto.keys import SigningKey
from exchange.client.sdk import ApiError, Client
from exchange.domain import APPROVAL_TYPE, approval_payload
from tests.security._support import DAY, PURPOSE, World, entries, file_request, state


def _refused(call: Any, status: int, code: str) -> dict[str, Any]:
    with pytest.raises(ApiError) as exc:
        call()
    assert (exc.value.status, exc.value.code) == (status, code), exc.value.body
    assert exc.value.body["type"] == f"urn:zonex:problem:{code}"
    body: dict[str, Any] = exc.value.body
    return body


def _approve_raw(client: Client, request_id: str, approver: str) -> None:
    """Post an approval signed with the client's own key that names ``approver``."""
    req = client.get_request(request_id)
    end = datetime.now(UTC) + timedelta(hours=1)
    payload = approval_payload(req, approver=approver, not_after=end)
    envelope = sign_envelope(APPROVAL_TYPE, payload, [client.key])
    client.request(
        "POST",
        f"/v1/access-requests/{request_id}/approve",
        json={"approval": envelope.model_dump(mode="json")},
    )


def test_enterprise_and_auditor_cannot_use_operator_routes(world: World) -> None:
    server = world.server
    before = state(server)
    newcomer = SigningKey.generate().public_key
    for who in ("consumer", "provider", "auditor"):
        with server.client(world.key(who)) as c:
            _refused(
                lambda c=c: c.register_principal("Mallory", "agency", newcomer), 403, "forbidden"
            )
            _refused(
                lambda c=c: c.register_principal("Boss", "operator", newcomer), 403, "forbidden"
            )
            _refused(
                lambda c=c: c.set_principal_status(world.key("bank2").key_id, "suspended"),
                403,
                "forbidden",
            )
            _refused(lambda c=c: c.set_zone_status("land", "suspended"), 403, "forbidden")
    with server.client(world.key("consumer")) as c:
        _refused(c.list_principals, 403, "forbidden")
        _refused(lambda: c.entry(0), 403, "forbidden")
        # reinstating itself after a suspension is not possible either: it cannot even sign in
    with server.client(server.operator) as op:
        op.set_principal_status(world.key("consumer").key_id, "suspended")
    with server.client(world.key("consumer")) as c:
        _refused(
            lambda: c.set_principal_status(world.key("consumer").key_id, "active"),
            401,
            "verification_failed",
        )
    after = state(server)
    consumer = world.key("consumer").key_id
    assert (consumer, "suspended") in after["principal_status"]
    after["principal_status"] = [
        (k, "active" if k == consumer else s) for k, s in after["principal_status"]
    ]
    assert after == before
    assert not [e for e in entries(server, "principal.registered") if "Mallory" in json.dumps(e)]


def test_consumer_cannot_approve_its_own_request(world: World) -> None:
    server = world.server
    request_id = file_request(world)
    before = state(server)
    consumer = world.key("consumer")
    with server.client(consumer) as c:
        _refused(lambda: c.approve(request_id), 403, "forbidden")
        # claiming the provider as approver, signed with its own key
        _refused(
            lambda: _approve_raw(c, request_id, world.key("provider").key_id),
            403,
            "forbidden",
        )
    # the provider presenting an approval the consumer signed for it
    with server.client(consumer) as c:
        req = c.get_request(request_id)
    end = datetime.now(UTC) + timedelta(hours=1)
    envelope = sign_envelope(
        APPROVAL_TYPE,
        approval_payload(req, approver=world.key("provider").key_id, not_after=end),
        [consumer],
    )
    with server.client(world.key("provider")) as p:
        _refused(
            lambda: p.request(
                "POST",
                f"/v1/access-requests/{request_id}/approve",
                json={"approval": envelope.model_dump(mode="json")},
            ),
            422,
            "invalid_input",
        )
    assert state(server) == before
    assert entries(server, "grant.created") == []
    # a provider filing on its own zone does not approve itself either
    own = file_request(world, "provider")
    with server.client(world.key("provider")) as p:
        _refused(lambda: p.approve(own), 403, "forbidden")
    assert entries(server, "grant.created") == []


def test_provider_of_one_zone_cannot_act_on_another(world: World) -> None:
    server = world.server
    request_id = file_request(world)
    with server.client(world.key("provider")) as p:
        grant_id = p.approve(file_request(world))["grant_id"]
    before = state(server)
    other = world.key("other")
    consumer = world.key("consumer").key_id
    until = datetime.now(UTC) + timedelta(days=1)
    with server.client(other) as o:
        # it cannot even read the request (existence is not disclosed)
        _refused(lambda: o.approve(request_id), 404, "not_found")
        _refused(lambda: o.get_request(request_id), 404, "not_found")
        assert o.requests(zone="tax") == []
        payload = approval_payload(
            {
                "id": request_id,
                "consumer": consumer,
                "zone": "tax",
                "datasets": ["open_companies"],
                "operations": ["export"],
                "purpose": PURPOSE,
                "duration_seconds": DAY,
            },
            approver=other.key_id,
            not_after=until,
        )
        envelope = sign_envelope(APPROVAL_TYPE, payload, [other])
        _refused(
            lambda: o.request(
                "POST",
                f"/v1/access-requests/{request_id}/approve",
                json={"approval": envelope.model_dump(mode="json")},
            ),
            404,
            "not_found",
        )
        # a request or grant it may not see is as absent as one that does not exist
        _refused(lambda: o.reject(request_id, "mine now"), 404, "not_found")
        _refused(lambda: o.revoke(grant_id, "mine now"), 404, "not_found")
        _refused(lambda: o.set_ceilings("tax", {"L2": ["aggregate"]}), 403, "forbidden")
        _refused(
            lambda: o.set_ceilings("tax", {"L2": []}, dataset="open_companies"), 403, "forbidden"
        )
        _refused(
            lambda: o.record_consent("tax", "91310000", consumer, PURPOSE, until), 403, "forbidden"
        )
        _refused(
            lambda: o.set_analysis_rules("tax", "companies", {"min_group_size": 50}),
            403,
            "forbidden",
        )
        _refused(
            lambda: o.request(
                "POST",
                "/v1/zones/tax/uploads",
                content=b"a,b\n1,2\n",
                headers={"content-type": "text/csv"},
            ),
            403,
            "forbidden",
        )
        _refused(
            lambda: o.request(
                "POST",
                "/v1/zones/tax/datasets",
                json={
                    "name": "stolen",
                    "subject_column": "company_id",
                    "levels": {"company_id": "L1"},
                    "upload_id": "0" * 32,
                },
            ),
            403,
            "forbidden",
        )
    assert state(server) == before
    with server.client(world.key("consumer")) as c:
        assert [g["id"] for g in c.grants()] == [grant_id]


def test_important_data_is_not_granted_by_the_provider_alone(world: World) -> None:
    server = world.server
    with server.client(world.key("consumer")) as c:
        request_id = c.request_access(
            "tax", ["strategic"], ["aggregate"], PURPOSE, duration_seconds=DAY, justification="x"
        )["id"]
    with server.client(world.key("provider")) as p:
        assert p.approve(request_id)["status"] == "awaiting_operator"
        _refused(lambda: p.approve(request_id), 403, "forbidden")
    assert entries(server, "grant.created") == []
    with server.client(world.key("consumer")) as c:
        _refused(
            lambda: c.aggregate("tax", "SELECT COUNT(*) FROM strategic", PURPOSE), 403, "denied"
        )


def test_suspended_consumer_cannot_be_granted(world: World) -> None:
    server = world.server
    request_id = file_request(world)
    with server.client(server.operator) as op:
        op.set_principal_status(world.key("consumer").key_id, "suspended")
    before = state(server)
    with server.client(world.key("provider")) as p:
        body = _refused(lambda: p.approve(request_id), 403, "denied")
    assert body["reason"] == "suspended"
    assert state(server) == before


def test_new_principal_cannot_be_registered_with_an_existing_key(world: World) -> None:
    server = world.server
    before = state(server)
    with server.client(server.operator) as op:
        # the consumer's public key under another name would give it a second identity
        _refused(
            lambda: op.request(
                "POST",
                "/v1/principals",
                json={
                    "name": "Shadow Bank",
                    "kind": "agency",
                    "public_key": b64url_encode(world.key("consumer").public_key.raw),
                },
            ),
            409,
            "conflict",
        )
    assert state(server) == before
