"""Request authentication under attack: forged, replayed, stale, retargeted and spoofed
signatures. Each gets the one collapsed 401 ``verification_failed``, its precise reason lands
on the ledger, and the request changes nothing."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from crypto.encoding import b64_encode, b64url_encode
from crypto.httpsig import SignatureInput, content_digest, signature_base
from crypto.keys import SigningKey
from exchange.server.runtime import Exchange
from tests.conftest import BACKENDS, LiveServer, free_port, serving, settings_for
from tests.security._support import (
    DAY,
    PURPOSE,
    World,
    assert_problem,
    entries,
    file_request,
    files_under,
    rejected_reasons,
    send,
    signed,
    state,
)


def _401(response: httpx.Response) -> None:
    body = assert_problem(response, 401, "verification_failed")
    # collapsed: the caller never learns which check failed
    assert body["detail"] == "Request signature could not be verified"
    assert "reason" not in body


def _zone_body(name: str) -> bytes:
    return json.dumps({"name": name, "description": "x"}).encode()


def handmade(
    method: str,
    url: str,
    key: SigningKey,
    body: bytes = b"",
    *,
    keyid: str,
    components: tuple[str, ...] = ("@method", "@target-uri", "content-digest"),
    created: int | None = None,
    nonce: str | None = None,
) -> httpx.Request:
    """Sign with ``key`` whatever the parameters claim (another principal's keyid, fewer
    covered components)."""
    created = int(time.time()) if created is None else created
    nonce = nonce or f"h-{time.time_ns()}"
    inner = " ".join(f'"{c}"' for c in components)
    params = f'({inner});created={created};nonce="{nonce}";keyid="{keyid}";alg="ed25519"'
    headers = {"content-digest": content_digest(body)}
    if body:
        headers["content-type"] = "application/json"
    sig_input = SignatureInput("sig1", components, created, keyid, nonce, "ed25519", None, params)
    signature = key.sign(signature_base(method, url, headers, sig_input))
    headers["signature-input"] = f"sig1={params}"
    headers["signature"] = f"sig1=:{b64_encode(signature)}:"
    return httpx.Request(method, url, headers=headers, content=body)


# -- forged ------------------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_signature_by_another_key_is_rejected(parties: World) -> None:
    server = parties.server
    before = state(server)
    url = parties.url("/v1/zones")
    genuine = signed("POST", url, parties.key("provider"), _zone_body("forged-zone"))
    forged = signed("POST", url, SigningKey.generate(), _zone_body("forged-zone"))
    # the provider's Signature-Input (its keyid), an outsider's signature over the same bytes
    genuine.headers["signature"] = forged.headers["signature"]
    _401(send(genuine))
    assert "bad_signature" in rejected_reasons(server)
    assert state(server) == before
    assert "forged-zone" not in json.dumps(entries(server))


def test_bit_flipped_signatures_are_rejected(parties: World) -> None:
    server = parties.server
    before = state(server)
    url = parties.url("/v1/zones")
    for i, position in enumerate((0, 17, 31, 32, 63)):
        request = signed(
            "POST", url, parties.key("provider"), _zone_body(f"flip-{i}"), nonce=f"flip-{i}"
        )
        label, _, value = request.headers["signature"].partition("=")
        raw = bytearray(base64.b64decode(value.strip(":")))
        raw[position] ^= 0x01
        request.headers["signature"] = f"{label}=:{base64.b64encode(bytes(raw)).decode()}:"
        _401(send(request))
    # a flipped bit in the signed parameters (created) breaks the signature as well
    request = signed("POST", url, parties.key("provider"), _zone_body("flip-params"))
    created = int(time.time())
    request.headers["signature-input"] = request.headers["signature-input"].replace(
        f"created={created}", f"created={created - 1}"
    )
    _401(send(request))
    reasons = rejected_reasons(server, 6)
    assert reasons.count("bad_signature") == 6
    assert state(server) == before


def test_unsigned_and_malformed_signatures_are_rejected(parties: World) -> None:
    server = parties.server
    url = parties.url("/v1/catalog")
    _401(httpx.get(url))
    good = signed("GET", url, parties.key("consumer"))
    for name, value in (
        ("signature", "sig1=:not base64!:"),
        ("signature", "sig1=:" + "A" * 6000 + ":"),
        ("signature-input", 'sig1=("@method");created=1;keyid="x";keyid="y"'),
        ("signature-input", "garbage"),
    ):
        request = httpx.Request("GET", url, headers={**good.headers, name: value})
        _401(send(request))
    reasons = rejected_reasons(server, 5)
    assert reasons.count("missing") == 1 and len(reasons) == 5


# -- replay and time ---------------------------------------------------------------------------


@pytest.mark.parametrize("database_url", BACKENDS, indirect=True)
def test_replayed_request_is_rejected_and_acts_once(world: World) -> None:
    server = world.server
    body = json.dumps(
        {
            "zone": "tax",
            "datasets": ["open_companies"],
            "operations": ["export"],
            "purpose": PURPOSE,
            "duration_seconds": DAY,
            "justification": "replay me",
        }
    ).encode()
    url = world.url("/v1/access-requests")
    request = signed("POST", url, world.key("consumer"), body, nonce="once-only")
    assert send(request).status_code == 201
    after_first = state(server)
    _401(send(request))
    # the same nonce under a fresh signature and timestamp is a replay too
    again = signed(
        "POST", url, world.key("consumer"), body, nonce="once-only", created=int(time.time()) - 5
    )
    _401(send(again))
    assert rejected_reasons(server, 2).count("replayed") == 2
    assert state(server) == after_first
    assert len(entries(server, "access.requested")) == 1
    # another principal may use the same nonce: nonces are per key
    assert send(signed("GET", world.url("/v1/catalog"), world.key("bank2"), nonce="once-only"))


def test_stale_and_future_requests_are_rejected(parties: World) -> None:
    server = parties.server
    before = state(server)
    # past the ±300 s window by a margin a slow machine cannot close
    offsets = (-360, 360, -86400, 10**6)
    for i, offset in enumerate(offsets):
        request = signed(
            "POST",
            parties.url("/v1/zones"),
            parties.key("provider"),
            _zone_body("late-zone"),
            created=int(time.time()) + offset,
            nonce=f"late-{i}",
        )
        _401(send(request))
    assert rejected_reasons(server, len(offsets)) == ["stale"] * len(offsets)
    assert state(server) == before


def test_created_at_the_epoch_is_rejected(parties: World) -> None:
    request = signed("GET", parties.url("/v1/catalog"), parties.key("consumer"), created=0)
    _401(send(request))
    assert "stale" in rejected_reasons(parties.server)


# -- a signature reused elsewhere --------------------------------------------------------------


def test_signature_for_one_path_is_refused_on_another(world: World) -> None:
    server = world.server
    mine = file_request(world, justification="mine")
    victim = file_request(world, justification="victim")
    before = state(server)
    body = json.dumps({"reason": "withdrawn"}).encode()
    request = signed(
        "POST", world.url(f"/v1/access-requests/{mine}/reject"), world.key("consumer"), body
    )
    moved = httpx.Request(
        "POST",
        world.url(f"/v1/access-requests/{victim}/reject"),
        headers=request.headers,
        content=body,
    )
    _401(send(moved))
    # the query string is covered as well
    listing = signed("GET", world.url("/v1/access-requests?zone=tax"), world.key("provider"))
    _401(
        send(
            httpx.Request(
                "GET", world.url("/v1/access-requests?zone=land"), headers=listing.headers
            )
        )
    )
    # and the host: a signature made for another exchange
    elsewhere = signed("GET", "http://exchange.invalid/v1/catalog", world.key("consumer"))
    headers = {k: v for k, v in elsewhere.headers.items() if k != "host"}
    _401(send(httpx.Request("GET", world.url("/v1/catalog"), headers=headers)))
    assert state(server) == before
    assert rejected_reasons(server, 3).count("bad_signature") == 3


def test_signature_for_one_method_is_refused_for_another(parties: World) -> None:
    server = parties.server
    before = state(server)
    key = SigningKey.generate()
    body = json.dumps(
        {"name": "Mallory", "kind": "agency", "public_key": b64url_encode(key.public_key.raw)}
    ).encode()
    # the operator's signed listing, replayed as a registration with a body
    listing = signed("GET", parties.url("/v1/principals"), parties.key("operator"))
    headers = {**listing.headers, "content-type": "application/json"}
    headers["content-digest"] = content_digest(body)
    _401(send(httpx.Request("POST", parties.url("/v1/principals"), headers=headers, content=body)))
    assert state(server) == before


def test_signature_for_one_body_is_refused_with_another(parties: World) -> None:
    server = parties.server
    before = state(server)
    url = parties.url("/v1/zones")
    request = signed("POST", url, parties.key("provider"), _zone_body("zone-a"))
    other = _zone_body("zone-b")
    # with the old digest, and with a digest recomputed for the new body
    for digest in (request.headers["content-digest"], content_digest(other)):
        headers = {**request.headers, "content-digest": digest}
        _401(send(httpx.Request("POST", url, headers=headers, content=other)))
    reasons = rejected_reasons(server, 2)
    assert sorted(reasons) == ["bad_signature", "digest_mismatch"]
    assert state(server) == before


def test_a_large_tampered_body_is_refused_too(parties: World) -> None:
    """Bodies over 64 KiB are hashed and checked off the event loop: the same refusals."""
    server = parties.server
    before = state(server)
    url = parties.url("/v1/zones/tax/uploads")
    body = b"company_id,amount\n" + b"".join(b"c%06d,%d\n" % (i, i) for i in range(20_000))
    assert len(body) > 64 * 1024
    request = signed(
        "POST", url, parties.key("provider"), body, headers={"content-type": "text/csv"}
    )
    tampered = body[:-2] + b"8\n"  # the last amount, 19999, becomes 19998
    assert tampered != body
    for digest in (request.headers["content-digest"], content_digest(tampered)):
        headers = {**request.headers, "content-digest": digest}
        _401(send(httpx.Request("POST", url, headers=headers, content=tampered)))
    assert sorted(rejected_reasons(server, 2)) == ["bad_signature", "digest_mismatch"]
    assert state(server) == before
    staging = server.data_dir / "staging"
    assert not staging.exists() or not files_under(staging)
    # the genuine request goes through
    assert send(request).status_code == 201


def test_signature_that_does_not_cover_the_body_or_target_is_refused(parties: World) -> None:
    server = parties.server
    before = state(server)
    url = parties.url("/v1/zones")
    provider = parties.key("provider")
    for components in (("@method", "@target-uri"), ("@method", "content-digest"), ("@method",)):
        request = handmade(
            "POST", url, provider, _zone_body("thin"), keyid=provider.key_id, components=components
        )
        _401(send(request))
    assert rejected_reasons(server, 3).count("components") == 3
    assert state(server) == before


# -- key ids -----------------------------------------------------------------------------------


def test_keyid_of_another_principal_with_own_key_is_rejected(parties: World) -> None:
    server = parties.server
    before = state(server)
    mallory = parties.key("consumer")
    newcomer = SigningKey.generate()
    body = json.dumps(
        {
            "name": "Mallory Two",
            "kind": "agency",
            "public_key": b64url_encode(newcomer.public_key.raw),
        }
    ).encode()
    # the operator's key id, the consumer's key: an operator route
    request = handmade(
        "POST",
        parties.url("/v1/principals"),
        mallory,
        body,
        keyid=parties.key("operator").key_id,
    )
    _401(send(request))
    # the provider's key id, the consumer's key: the provider's zone
    request = handmade(
        "POST",
        parties.url("/v1/zones/tax/status"),
        mallory,
        json.dumps({"status": "suspended"}).encode(),
        keyid=parties.key("provider").key_id,
    )
    _401(send(request))
    assert rejected_reasons(server, 2).count("bad_signature") == 2
    assert state(server) == before
    # ledger rejections are attributed to the key id claimed, not to the signer
    rejected = entries(server, "request.rejected")
    assert {e["actor"] for e in rejected} <= {
        parties.key("operator").key_id,
        parties.key("provider").key_id,
    }


def test_unknown_or_malformed_keyids_are_rejected(parties: World) -> None:
    keyids = ["", "0" * 64, "Z" * 64, "../" * 21 + "x", "' OR '1'='1", "a" * 5000]
    for keyid in keyids:
        request = handmade("GET", parties.url("/v1/catalog"), SigningKey.generate(), keyid=keyid)
        _401(send(request))
    reasons = rejected_reasons(parties.server, len(keyids))
    assert len(reasons) == len(keyids)
    assert set(reasons) <= {"unknown_key", "malformed"}
    # none names a known key, so none is ledgered one by one
    assert entries(parties.server, "request.rejected") == []


def test_only_the_holder_of_a_suspended_key_is_told_it_is_suspended(parties: World) -> None:
    consumer = parties.key("consumer")
    with parties.server.client(parties.key("operator")) as op:
        op.set_principal_status(consumer.key_id, "suspended")
    own = send(handmade("GET", parties.url("/v1/catalog"), consumer, keyid=consumer.key_id))
    body = assert_problem(own, 401, "verification_failed")
    assert body["reason"] == "suspended" and "suspended" in body["detail"]
    # anyone else naming that key id, and a replay of the holder's request, learn nothing
    forged = handmade(
        "GET", parties.url("/v1/catalog"), SigningKey.generate(), keyid=consumer.key_id
    )
    _401(send(forged))
    replayed = handmade(
        "GET", parties.url("/v1/catalog"), consumer, keyid=consumer.key_id, nonce="once-only"
    )
    send(replayed)
    _401(send(replayed))


@pytest.fixture
def pinned(data_dir: Path) -> Iterator[LiveServer]:
    """A server that knows its public origin (``public_base_url``)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    settings = settings_for(data_dir, public_base_url=url, checkpoint_interval_seconds=0.2)
    with Exchange(settings) as ex, serving(ex, data_dir, port) as live:
        yield live


def test_signature_for_another_origin_is_refused_whatever_the_host_header(
    pinned: LiveServer,
) -> None:
    """A key registered with two exchanges: a request signed for the other one, replayed here
    with the other one's Host header, is refused when the server knows its own origin."""
    operator = pinned.operator
    elsewhere = signed("GET", "http://exchange.invalid/v1/principals/me", operator)
    assert elsewhere.headers["host"] == "exchange.invalid"
    _401(send(httpx.Request("GET", pinned.url + "/v1/principals/me", headers=elsewhere.headers)))
    assert rejected_reasons(pinned) == ["bad_signature"]
    # the genuine request, signed for this origin, is accepted
    assert send(signed("GET", pinned.url + "/v1/principals/me", operator)).status_code == 200


def test_without_a_configured_origin_a_request_for_another_host_is_refused(
    server: LiveServer,
) -> None:
    """No ``public_base_url``: the server still refuses a request signed for another exchange
    and replayed here under that exchange's name, because the Host header does not name the
    address the connection arrived on. The replay is refused before its signature is even
    checked, so no nonce is spent."""
    operator = server.operator
    port = server.url.rsplit(":", 1)[1]
    me = server.url + "/v1/principals/me"

    def signed_for(origin: str) -> httpx.Request:
        """Signed for ``origin`` (its Host header too), sent to this server."""
        request = signed("GET", origin + "/v1/principals/me", operator)
        return httpx.Request("GET", me, headers=request.headers)

    for other in (f"http://exchange.invalid:{port}", "http://exchange.invalid", "http://10.9.8.7"):
        _401(send(signed_for(other)))
    assert rejected_reasons(server, 3).count("wrong_origin") == 3
    # the same exchange under its loopback names, and its own address, is accepted
    for name in (f"http://localhost:{port}", server.url):
        response = send(signed_for(name))
        assert response.status_code == 200, response.text
    # a Host header that names this address on another port is another origin too
    _401(send(signed_for("http://127.0.0.1:1")))
    assert rejected_reasons(server, 4).count("wrong_origin") == 4
