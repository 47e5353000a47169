"""One key per use, and no keyed digest of caller input in any answer (DESIGN, "Privacy
defaults").

The attack these tests carry: the zone's subject salt once keyed both the consent digests
(HMAC(salt, subject)) and the L2 export pseudonyms (HMAC(salt, key id || 0x00 || subject)), and a
refused ``he_score`` named the keyed digests of the ids the caller chose. Asking to score the
string ``"<my key id>\\x00<guess>"`` and comparing the refused digest with a pseudonym from an
export reversed the pseudonym. Here the consumer runs that attack, and every call of the
consent, export and scoring paths (accepted and refused) is recorded and searched for every
keyed digest of every string its caller sent, under the raw salt and every derived key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import insert
from sqlalchemy.orm import Session

from crypto import he
from crypto.canonical import canonicalize
from crypto.errors import VerificationError
from crypto.keys import SigningKey
from crypto.receipt import verify_receipt
from exchange import subjects
from exchange.client import he as he_client
from exchange.client.sdk import ApiError, Client
from exchange.server import access
from exchange.server.models import ConsentRow
from tests.conftest import EXAMPLES, L2_LEVELS, LiveServer
from tests.exchange import test_he_compute as he_tests
from tests.exchange.test_access import entries
from tests.exchange.test_he_compute import CONSENTED, PURPOSE, _model, _upload_weights

bank = he_tests.bank

#: every label a zone derives a key under; a label added to exchange.subjects must be added here
#: (test_every_derived_key_is_searched) so that these tests search its digests too
LABELS = (b"zonex/v1/consent-digest", b"zonex/v1/pseudonym")
#: the shortest hex prefix searched for: a chance match of a given 16-hex string among the
#: < 10^6 hex windows of the recorded answers has probability < 10^6 / 16^16 < 10^-13
PREFIX = 16
#: characters an id may not hold (Unicode Cc, Cf, Cs, Zl, Zp), one of each kind and more
BAD_CHARACTERS = ["\x00", "\x1f", "\x7f", "\x85", "\u200b", "\u202e", "\ufeff", "\u2028", "\u2029"]


# -- a client that keeps every exchange of bytes ----------------------------------------------


@dataclass
class Recorder(httpx.BaseTransport):
    """An httpx transport that records each request body and each response (status, headers,
    body) before handing the response on."""

    inner: httpx.HTTPTransport = field(default_factory=httpx.HTTPTransport)
    seen: list[tuple[bytes, int, str]] = field(default_factory=list)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        body = response.read()
        headers = [(k, v) for k, v in response.headers.items() if k != "content-encoding"]
        text = "\n".join(f"{k}: {v}" for k, v in headers) + "\n" + body.decode("utf-8", "replace")
        self.seen.append((request.content, response.status_code, text))
        return httpx.Response(response.status_code, headers=headers, content=body, request=request)

    def close(self) -> None:
        self.inner.close()

    def sent_strings(self) -> set[str]:
        """Every string the caller put in a JSON body (keys and values) or a URL."""
        found: set[str] = set()

        def walk(value: object) -> None:
            if isinstance(value, str):
                found.add(value)
            elif isinstance(value, list):
                for v in value:
                    walk(v)
            elif isinstance(value, dict):
                for k, v in value.items():
                    found.add(k)
                    walk(v)

        for body, _, _ in self.seen:
            try:
                walk(json.loads(body))
            except ValueError:
                continue  # a binary upload (context, ciphertexts): nothing the caller typed
        return found

    def id_lists(self) -> list[list[str]]:
        lists = []
        for body, _, _ in self.seen:
            try:
                doc = json.loads(body)
            except ValueError:
                continue
            if isinstance(doc, dict) and isinstance(doc.get("ids"), list):
                lists.append([str(i) for i in doc["ids"]])
        return lists

    def answers(self, start: int = 0) -> str:
        """Every answer from the ``start``-th on, lowercased, headers and body."""
        return "\n".join(text for _, _, text in self.seen[start:]).lower()


def recording(server: LiveServer, key: SigningKey) -> tuple[Client, Recorder]:
    recorder = Recorder()
    return Client(server.url, key, transport=recorder), recorder


# -- every keyed digest of the caller's strings ----------------------------------------------


def _lp(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(8, "big") + p for p in parts)


def zone_keys(server: LiveServer, zone: str) -> dict[str, bytes]:
    """The zone's raw subject salt and every key derived from it (HKDF-SHA256, RFC 5869,
    computed here independently of crypto.kdf)."""
    salt = (server.exchange.zones_dir / zone / "subject.salt").read_bytes()
    keys = {"raw salt": salt}
    for label in LABELS:
        keys[label.decode()] = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=label
        ).derive(salt)
    return keys


def keyed_digests(
    keys: dict[str, bytes], strings: set[str], principals: list[str], id_lists: list[list[str]]
) -> dict[str, str]:
    """hex digest -> how it was made: under every key, each string alone (raw and length
    prefixed), each string bound to each principal's key id (0x00-separated and length
    prefixed), and the SHA-256 over the ordered digests of each id list sent."""
    out: dict[str, str] = {}
    for name, key in keys.items():
        for s in strings:
            try:
                b = s.encode()
            except UnicodeEncodeError:
                b = s.encode("utf-8", "surrogatepass")
            forms = {"raw": b, "lp": _lp(b)}
            for p in principals:
                forms[f"{p[:8]}+0x00"] = p.encode() + b"\x00" + b
                forms[f"lp({p[:8]})"] = _lp(p.encode(), b)
            for form, message in forms.items():
                digest = hmac.new(key, message, hashlib.sha256).hexdigest()
                out[digest] = f"HMAC({name}, {form} of {s!r})"
        for ids in id_lists:
            for form in ("raw", "lp"):
                each = [
                    hmac.new(
                        key,
                        i.encode("utf-8", "surrogatepass")
                        if form == "raw"
                        else _lp(i.encode("utf-8", "surrogatepass")),
                        hashlib.sha256,
                    ).hexdigest()
                    for i in ids
                ]
                joined = hashlib.sha256("\n".join(each).encode()).hexdigest()
                out[joined] = f"SHA-256 over HMAC({name}, {form}) of {len(ids)} ids"
    return out


def echoed(answers: str, digests: dict[str, str]) -> list[str]:
    """The digests whose 16-hex prefix (or the base64url of its first 12 bytes) appears."""
    hits = []
    for hexdigest, how in digests.items():
        b64 = base64.urlsafe_b64encode(bytes.fromhex(hexdigest)[:12]).decode().rstrip("=")
        if hexdigest[:PREFIX] in answers or b64.lower() in answers:
            hits.append(how)
    return hits


# -- the zone: the bank fixture's scoring dataset plus an L2 dataset the bank may export -------


@pytest.fixture
def zone(server: LiveServer, bank: dict[str, Any]) -> Iterator[dict[str, Any]]:
    keys = bank["keys"]
    with server.client(keys["provider"]) as p:
        p.register_dataset(
            "tax",
            "companies",
            levels=L2_LEVELS,
            subject_column="company_id",
            file=EXAMPLES / "companies.csv",
        )
    with server.client(keys["bank"]) as c:
        req = c.request_access(
            "tax",
            ["companies"],
            ["export"],
            PURPOSE,
            duration_seconds=24 * 3600,
            justification="applicant registry review",
        )
    with server.client(keys["provider"]) as p:
        p.approve(req["id"])
    yield bank


def _score_body(c: Client, model: he_client.Model, ids: list[str]) -> dict[str, Any]:
    c.commit_model(model.document())
    context, weights = _upload_weights(c, he.new_context(he.CKKS_DEFAULT), list(model.weights))
    return {
        "zone": "tax",
        "dataset": "firms",
        "purpose": PURPOSE,
        "model": model.commitment,
        "context": context,
        "weights": weights,
        "ids": ids,
    }


def _problem(call: Any) -> ApiError:
    with pytest.raises(ApiError) as exc:
        call()
    return exc.value


# -- the attack -------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_refusal_oracle_does_not_reverse_export_pseudonyms(
    server: LiveServer, zone: dict[str, Any]
) -> None:
    me = zone["keys"]["bank"]
    c, recorder = recording(server, me)
    with c:
        exported = c.export("tax", "companies", PURPOSE)["result"]
        index = exported["columns"].index("company_id")
        pseudonyms = {row[index] for row in exported["rows"]}
        assert exported["masked"] == ["company_id"] and len(pseudonyms) == 240
        start = len(recorder.seen)
        # the attacker's dictionary: the ids it suspects (here the true ones) and decoys
        with (EXAMPLES / "companies.csv").open() as f:
            guesses = [line.split(",")[0] for line in f.readlines()[1:21]] + ["decoy-1", "decoy-2"]
        body = _score_body(c, _model(11), [f"{me.key_id}\x00{g}" for g in guesses])
        first = _problem(lambda: c.he_score(**body))
        second = _problem(lambda: c.he_score(**{**body, "ids": guesses}))
    answers = recorder.answers(start)
    reversed_ = {p for p in pseudonyms if p.lower() in answers}
    assert reversed_ == set(), f"the answers reverse {len(reversed_)} pseudonyms"
    # the 0x00-joined guesses are refused as ids before anything else; the plain ones by
    # position and count only
    assert first.status == 422 and first.body["reason"] == "bad_subject_id"
    assert second.status == 403 and second.body["reason"] == "no_consent"
    assert "refused" not in second.body
    assert second.body["refused_count"] == len(guesses)
    assert second.body["refused_positions"] == ",".join(str(i) for i in range(len(guesses)))


@pytest.mark.slow
def test_no_answer_carries_a_keyed_digest_of_caller_input(
    server: LiveServer, zone: dict[str, Any]
) -> None:
    keys, firms = zone["keys"], zone["firms"]
    ids = [f["company_id"] for f in firms]
    until = datetime.now(UTC) + timedelta(days=3)
    provider, provider_seen = recording(server, keys["provider"])
    consumer, consumer_seen = recording(server, keys["bank"])
    statuses: list[int] = []
    with provider:
        # consents: recorded (one for an id with no row), refused, listed, withdrawn twice
        provider.record_consent("tax", ids[0], keys["bank"].key_id, PURPOSE, until)
        provider.record_consent("tax", "91319999999", keys["bank"].key_id, PURPOSE, until)
        extra = provider.record_consent("tax", ids[1], keys["other"].key_id, PURPOSE, until)
        for bad in ("x\x00y", "\u202egnp.exe", "a" * 513, ""):
            e = _problem(
                lambda b=bad: provider.record_consent("tax", b, keys["bank"].key_id, PURPOSE, until)
            )
            statuses.append(e.status)
        provider.consents("tax")
        provider.withdraw_consent(extra["id"])
        statuses.append(_problem(lambda: provider.withdraw_consent(extra["id"])).status)
    with consumer:
        consumer.export("tax", "companies", PURPOSE)
        consumer.consents("tax")
        model = _model(12)
        body = _score_body(consumer, model, ids[:5])
        accepted = consumer.he_score(**body)
        assert accepted["result"]["entities"] == 5
        for bad_ids in (
            ids[CONSENTED - 2 : CONSENTED + 2],  # two without consent
            [ids[2], "91319999999"],  # consented, no row
            [ids[3], "x\x00y"],  # a control character
            [ids[4], ids[4]],  # twice
            [ids[5], "z" * 513],  # too long
        ):
            statuses.append(
                _problem(lambda b=bad_ids: consumer.he_score(**{**body, "ids": b})).status
            )
        # the whole consented set through the client (it checks the commitment it is shown)
        out = he_client.score(
            consumer, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids[:CONSENTED]
        )
        assert len(out.scores) == CONSENTED
    assert statuses == [422, 422, 422, 422, 409, 403, 422, 422, 422, 422]

    principals = [k.key_id for k in keys.values()] + [server.operator.key_id]
    for recorder in (provider_seen, consumer_seen):
        digests = keyed_digests(
            zone_keys(server, "tax"), recorder.sent_strings(), principals, recorder.id_lists()
        )
        # the search is not vacuous: it holds the digests the exchange does make of these ids
        assert access.subject_digest(server.exchange, "tax", ids[0]) in digests
        pseudonym = subjects.ZoneSubjects.of(server.exchange.zones_dir / "tax").pseudonym
        assert any(d.startswith(pseudonym(keys["bank"].key_id, ids[0])) for d in digests)
        assert echoed(recorder.answers(), digests) == []


def test_every_derived_key_is_searched() -> None:
    assert set(subjects.LABELS.values()) <= set(LABELS)


# -- ids the digest would not tell apart from others ------------------------------------------


def test_subject_ids_with_control_or_format_characters_are_refused(server: LiveServer) -> None:
    provider, consumer = SigningKey.generate(), SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", provider.public_key)
        op.register_principal("City Bank", "enterprise", consumer.public_key)
    until = datetime.now(UTC) + timedelta(days=1)
    with server.client(provider) as p, server.client(consumer) as c:
        p.create_zone("tax", "tax records")
        for char in BAD_CHARACTERS:
            subject = f"9131{char}0001"
            e = _problem(
                lambda s=subject: p.record_consent("tax", s, consumer.key_id, PURPOSE, until)
            )
            assert (e.status, e.body["reason"]) == (422, "bad_subject_id"), repr(char)
            # refused before authorization, the model or the context are looked at
            e = _problem(
                lambda s=subject: c.he_score(
                    zone="tax",
                    dataset="firms",
                    purpose=PURPOSE,
                    model="0" * 64,
                    context="0" * 64,
                    weights="0" * 64,
                    ids=["91310001", s],
                )
            )
            assert (e.status, e.body["reason"]) == (422, "bad_subject_id"), repr(char)
            assert "position 1" in e.detail
        # a lone surrogate (category Cs) cannot even be encoded: escaped JSON is how it arrives
        consent = {"subject": "9131\ud8000001", "consumer": consumer.key_id, "purpose": PURPOSE}
        consent["expires_at"] = until.isoformat()
        e = _problem(
            lambda: p.request(
                "POST",
                "/v1/zones/tax/consents",
                content=json.dumps(consent).encode(),
                headers={"content-type": "application/json"},
            )
        )
        assert e.status == 422
        body = {"zone": "tax", "dataset": "firms", "purpose": PURPOSE, "ids": ["1", "9131\ud800"]}
        body |= {"model": "0" * 64, "context": "0" * 64, "weights": "0" * 64}
        e = _problem(
            lambda: c.request(
                "POST",
                "/v1/he/score",
                content=json.dumps(body).encode(),
                headers={"content-type": "application/json"},
            )
        )
        assert (e.status, e.body.get("reason")) == (
            422,
            "bad_subject_id",
        ) and "position 1" in e.detail
        assert p.consents("tax") == []


# -- consents recorded before the keys were separated -----------------------------------------


def _consent_row(server: LiveServer, bank: dict[str, Any], consent_id: str, digest: str) -> None:
    """A consent row as the code before migration 0008 wrote it (digest_version 0)."""
    keys = bank["keys"]
    with Session(server.exchange.engine) as session:
        session.execute(
            insert(ConsentRow),
            [
                {
                    "id": consent_id,
                    "zone": "tax",
                    "subject_digest": digest,
                    "digest_version": 0,
                    "consumer": keys["bank"].key_id,
                    "purpose": PURPOSE,
                    "expires_at": datetime.now(UTC) + timedelta(days=1),
                    "status": "active",
                    "recorded_by": keys["provider"].key_id,
                    "created_at": datetime.now(UTC),
                }
            ],
        )
        session.commit()


def _consent_id(server: LiveServer, version: int, digest: str) -> str:
    with Session(server.exchange.engine) as session:
        (found,) = [
            r.id
            for r in session.query(ConsentRow)
            if (r.digest_version, r.subject_digest) == (version, digest)
        ]
        return found


@pytest.mark.slow
def test_a_legacy_consent_still_gates_scoring_until_withdrawn(
    server: LiveServer, bank: dict[str, Any]
) -> None:
    keys, firms = bank["keys"], bank["firms"]
    consented, legacy = firms[0]["company_id"], firms[CONSENTED]["company_id"]
    zk = zone_keys(server, "tax")
    raw = zk["raw salt"]
    _consent_row(
        server, bank, "consent-legacy-1", hmac.new(raw, legacy.encode(), "sha256").hexdigest()
    )
    model = _model(13)
    with server.client(keys["bank"]) as c:
        c.commit_model(model.document())
        out = he_client.score(
            c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=[consented, legacy]
        )
        assert len(out.scores) == 2
        with server.client(keys["provider"]) as p:
            p.withdraw_consent("consent-legacy-1")
        e = _problem(
            lambda: he_client.score(
                c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=[legacy]
            )
        )
    assert (e.status, e.body["reason"], e.body["refused_positions"]) == (403, "no_consent", "0")
    # the ledger names the consent rows used, in request order: a new one and the legacy one
    current = hmac.new(zk["zonex/v1/consent-digest"], _lp(consented.encode()), "sha256")
    used = [_consent_id(server, 1, current.hexdigest()), "consent-legacy-1"]
    (scored,) = entries(server, "computation.he_score")
    assert scored["digests"]["consents"] == hashlib.sha256(canonicalize(used)).hexdigest()


def test_a_digest_counts_only_under_the_key_its_version_names(
    server: LiveServer, bank: dict[str, Any]
) -> None:
    """A legacy digest stored as version 1, or a current one stored as version 0, is no
    consent: each version's digest is compared with that version's key only."""
    firms, bank_id = bank["firms"], bank["keys"]["bank"].key_id
    a, b = firms[CONSENTED]["company_id"], firms[CONSENTED + 1]["company_id"]
    zk = zone_keys(server, "tax")
    _consent_row(
        server, bank, "consent-v0-as-v1", hmac.new(zk["raw salt"], a.encode(), "sha256").hexdigest()
    )
    _consent_row(
        server,
        bank,
        "consent-v1-as-v0",
        hmac.new(zk["zonex/v1/consent-digest"], _lp(b.encode()), "sha256").hexdigest(),
    )
    with Session(server.exchange.engine) as session:
        row = session.get(ConsentRow, "consent-v0-as-v1")
        assert row is not None
        row.digest_version = 1
        session.commit()
    ex = server.exchange
    assert access.has_live_consent(ex, "tax", [a, b], bank_id, PURPOSE) == {a: False, b: False}


# -- the commitment to the scored ids --------------------------------------------------------


@pytest.mark.slow
def test_the_scored_ids_are_committed_and_the_client_checks_the_commitment(
    server: LiveServer, bank: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    keys, firms = bank["keys"], bank["firms"]
    ids = [f["company_id"] for f in firms[:3]]
    model = _model(14)
    with server.client(keys["bank"]) as c:
        c.commit_model(model.document())
        out = he_client.score(c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids)
        (response,) = out.responses
        nonce = base64.urlsafe_b64decode(response["subjects_nonce"] + "=")
        opened = hashlib.sha256(nonce + canonicalize(ids)).hexdigest()
        assert response["result"]["subjects"] == opened
        statement, _ = verify_receipt(
            response["receipt"], response["result"], server.log_verifier()
        )
        assert statement["subjects"] == opened
        # the nonce is the consumer's alone: the ledger entry the receipt carries cites the
        # commitment's statement, never the nonce
        assert response["subjects_nonce"] not in json.dumps(entries(server))

        # a hostile exchange that scored other ids (or in another order) is caught
        real = Client.he_score

        def swapped(self: Client, **body: Any) -> dict[str, Any]:
            return real(self, **{**body, "ids": list(reversed(body["ids"]))})

        monkeypatch.setattr(Client, "he_score", swapped)
        with pytest.raises(VerificationError, match="ids"):
            he_client.score(c, zone="tax", dataset="firms", purpose=PURPOSE, model=model, ids=ids)
