"""A scripted abuse run against a real loopback exchange: the monitor (``zonex monitor --once``)
reads the verified log, its detectors catch each abuse, and the responses the configuration
names take effect (throttle: 429 ``throttled``; suspend: 401). Then the monitor's limits, the
two-person reinstatement and a hostile log the monitor refuses to act on.

One exchange (SQLite) serves the whole module: the abuse is scripted once, the checks read it.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from crypto.httpsig import sign_request
from crypto.keys import SigningKey
from crypto.note import NoteSigner
from exchange.audit.monitor import LogFollower, LogVerificationError
from exchange.cli import app
from exchange.client.sdk import ApiError, Client
from exchange.keyfile import write_private_key
from exchange.server import querydiff
from exchange.server.ledger import EntryDraft
from tests.conftest import (
    L2_LEVELS,
    LiveServer,
    live_exchange,
    tax_bureau_and_bank,
)
from tests.exchange.test_access import PURPOSE, granted

# one world for the module, its tests in order on one worker
pytestmark = pytest.mark.xdist_group(name="incidents")

CONFIG = """
throttle_seconds = 600

[responses]
epsilon_burn = "throttle"
denial_ratio = "suspend"

[epsilon_burn]
max_epsilon = "0.5"

[denial_ratio]
min_denials = 5

[differencing]
max_near_duplicates = 2

[small_psi_sessions]
max_sessions = 4
"""

FILTERS = [
    "founded_year > 2000",
    "founded_year > 2000 AND employees > 100",  # one term added
    "founded_year > 2000 AND employees > 200",  # one constant changed
]


@dataclass
class Run:
    server: LiveServer
    keys: dict[str, SigningKey]
    ids: dict[str, str]
    files: dict[str, Path]
    output: str
    incidents: list[dict[str, Any]]

    def client(self, who: str) -> Client:
        key = self.server.operator if who == "operator" else self.keys[who]
        return self.server.client(key)

    def by_detector(self, detector: str) -> list[dict[str, Any]]:
        return [i for i in self.incidents if i["detector"] == detector]


def forged_request(url: str, claimed: str) -> httpx.Response:
    """A request signed with a fresh key but naming ``claimed`` as its key id."""
    forger = SigningKey.generate()
    target = f"{url}/v1/principals/me"
    headers = sign_request(
        "GET", target, {}, b"", forger, created=int(time.time()), nonce=secrets.token_urlsafe(18)
    )
    headers["Signature-Input"] = headers["Signature-Input"].replace(forger.key_id, claimed)
    return httpx.get(target, headers=headers)


def run_monitor(run_dir: Path, url: str, *extra: str, log_key: str = "log.pub") -> Any:
    return CliRunner().invoke(
        app,
        [
            "monitor",
            "--exchange",
            url,
            "--key",
            str(run_dir / "monitor.key"),
            "--log-key",
            str(run_dir / log_key),
            "--once",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    base = tmp_path_factory.mktemp("incidents")
    data_dir = base / "exchange"
    with live_exchange(data_dir) as server:
        yield _script(server, base)


def _script(server: LiveServer, base: Path) -> Run:
    provider, bank = tax_bureau_and_bank(server, L2_LEVELS)
    keys = {
        "provider": provider,
        "consumer": bank,
        "prober": SigningKey.generate(),
        "victim": SigningKey.generate(),
        "auditor": SigningKey.generate(),
        "monitor": SigningKey.generate(),
    }
    with server.client(server.operator) as op:
        op.register_principal("Probe Ltd", "enterprise", keys["prober"].public_key)
        op.register_principal("Victim Co", "enterprise", keys["victim"].public_key)
        op.register_principal("Audit Office", "auditor", keys["auditor"].public_key)
        op.register_principal("Log Monitor", "monitor", keys["monitor"].public_key)
    ids = {name: key.key_id for name, key in keys.items()}
    granted(server, keys, ["companies"], ["aggregate"])
    ex = server.exchange
    # epsilon burn and differencing: three aggregates at epsilon 0.2 (0.6 > 0.5 in the hour),
    # each a neighbour of the one before
    with server.client(bank) as c:
        for where in FILTERS:
            c.aggregate(
                "tax",
                f"SELECT district, COUNT(*) FROM companies WHERE {where} GROUP BY district",
                PURPOSE,
                epsilon="0.2",
            )
    # a denial storm: six aggregates without a grant
    with server.client(keys["prober"]) as p:
        for _ in range(6):
            with pytest.raises(ApiError) as denied:
                p.aggregate("tax", "SELECT COUNT(*) FROM companies", PURPOSE)
            assert denied.value.status == 403
    # a burst of forged signatures naming the victim's key
    for _ in range(8):
        assert forged_request(server.url, ids["victim"]).status_code == 401
    # a stream of small PSI sessions, a fork of a child log and an entry of an unknown shape,
    # as synthetic entries (real PSI sessions would take most of the time budget)
    for _ in range(4):
        ex.ledger.append(
            EntryDraft(
                kind="psi.session_opened",
                actor=ids["consumer"],
                refs={"zone": "tax", "dataset": "companies", "session": secrets.token_hex(8)},
                attrs={"mode": "cardinality", "x_count": 2},
            )
        )
    querydiff.flush(ex)  # the near-duplicate comparisons run off the request path
    ex.ledger.append(EntryDraft(kind="chain.fork", refs={"child": "district"}))
    ex.ledger.append(EntryDraft(kind="Legacy Entry", attrs={"v": 0}))
    ex.ledger.checkpoint()  # the rejections queued before are committed ahead of these
    files = {"config": base / "monitor.toml"}
    files["config"].write_text(CONFIG)
    write_private_key(base / "monitor.key", keys["monitor"])
    (base / "log.pub").write_text((server.data_dir / "log.pub").read_text())
    result = run_monitor(base, server.url, "--config", str(files["config"]))
    assert result.exit_code == 0, result.output
    with server.client(keys["auditor"]) as a:
        found = a.incidents()
    return Run(server, keys, ids, {"dir": base, **files}, result.output, found)


def test_each_abuse_is_caught_and_answered_as_configured(run: Run) -> None:
    ids = run.ids
    expected = {
        "epsilon_burn": (ids["consumer"], "throttle"),
        "differencing": (ids["consumer"], "alert"),
        "denial_ratio": (ids["prober"], "suspend"),
        "signature_failures": (ids["victim"], "alert"),
        "small_psi_sessions": (ids["consumer"], "alert"),
        "witness_conflict": (None, "alert"),
        "unparseable_entry": (None, "alert"),
    }
    got = {i["detector"]: (i["principal"], i["response"]) for i in run.incidents}
    assert got == expected, run.output
    assert len(run.incidents) == len(expected)  # nothing else fired on the scripted traffic
    for incident in run.incidents:
        assert incident["opened_by"] == ids["monitor"]
        assert incident["status"] == "open" and incident["label"] is None
        assert incident["first_seq"] <= incident["last_seq"] < incident["opened_seq"]
    (burn,) = run.by_detector("epsilon_burn")
    assert burn["throttled_until"] is not None
    assert "epsilon_burn" in run.output and "throttle -> opened" in run.output


def test_the_responses_are_on_the_ledger(run: Run) -> None:
    ex = run.server.exchange
    entries = [json.loads(ex.ledger.entry(i)) for i in range(ex.ledger.size())]
    opened = [e for e in entries if e["kind"] == "incident.opened"]
    assert len(opened) == len(run.incidents)
    (burn,) = run.by_detector("epsilon_burn")
    (throttled,) = [e for e in entries if e["kind"] == "principal.throttled"]
    assert throttled["refs"] == {"principal": run.ids["consumer"], "incident": burn["id"]}
    assert throttled["attrs"]["until"].endswith("Z")
    (storm,) = run.by_detector("denial_ratio")
    suspended = [e for e in entries if e["kind"] == "principal.suspended"]
    assert [e["refs"] for e in suspended] == [
        {"principal": run.ids["prober"], "incident": storm["id"]}
    ]
    near = [e for e in entries if e["kind"] == "query.near_duplicate"]
    assert [e["attrs"]["difference"] for e in near] == ["term", "constant"]
    # the fact only: no digest of the query or its parts
    assert all(e["digests"] == {} for e in near)


def test_throttle_answers_429_and_suspension_401(run: Run) -> None:
    with run.client("consumer") as c, pytest.raises(ApiError) as throttled:
        c.aggregate("tax", "SELECT district, COUNT(*) FROM companies GROUP BY district", PURPOSE)
    assert throttled.value.status == 429 and throttled.value.code == "throttled"
    assert throttled.value.body["type"] == "urn:zonex:problem:throttled"
    with run.client("consumer") as c:
        assert c.whoami().key_id == run.ids["consumer"]  # only computations are throttled
    with run.client("prober") as p, pytest.raises(ApiError) as suspended:
        p.whoami()
    assert suspended.value.status == 401


def test_a_second_run_opens_nothing_twice(run: Run) -> None:
    result = run_monitor(run.files["dir"], run.server.url, "--config", str(run.files["config"]))
    assert result.exit_code == 0, result.output
    assert "-> opened" not in result.output and "-> existing" in result.output
    with run.client("auditor") as a:
        assert len(a.incidents()) == len(run.incidents)


def test_the_monitor_may_respond_and_nothing_else(run: Run) -> None:
    with run.client("consumer") as c:
        request = c.request_access(
            "tax", ["companies"], ["export"], PURPOSE, duration_seconds=3600, justification="x"
        )
    with run.client("monitor") as m:
        for call in (
            lambda: m.approve(request["id"], not_after=None),
            lambda: m.aggregate("tax", "SELECT COUNT(*) FROM companies", PURPOSE),
            lambda: m.set_principal_status(run.ids["prober"], "active"),
            lambda: m.approve_reinstatement(run.ids["prober"]),
            lambda: m.label_incident(run.incidents[0]["id"], True),
            lambda: m.register_principal("Another", "enterprise", SigningKey.generate().public_key),
        ):
            with pytest.raises(ApiError) as refused:
                call()
            # a request it may not see is not acknowledged to exist (404), the rest is 403
            assert refused.value.status in (403, 404), refused.value
            assert refused.value.body["type"].startswith("urn:zonex:problem:")
        # throttling or suspending the operator, an auditor or another monitor is refused
        with pytest.raises(ApiError) as refused:
            m.open_incident("denial_ratio", "high", "suspend", 0, 1, principal=run.ids["auditor"])
        assert refused.value.status == 403
    # a consumer cannot open or read incidents
    with run.client("consumer") as c:
        for call in (
            lambda: c.incidents(),
            lambda: c.open_incident("epsilon_burn", "high", "alert", 0, 1),
        ):
            with pytest.raises(ApiError) as refused:
                call()
            assert refused.value.status == 403


def test_people_label_incidents(run: Run) -> None:
    (fork,) = run.by_detector("witness_conflict")
    with run.client("auditor") as a:
        labelled = a.label_incident(fork["id"], False)
    assert (labelled["label"], labelled["labelled_by"]) == ("false", run.ids["auditor"])
    result = CliRunner().invoke(
        app,
        [
            "incident",
            "list",
            "--url",
            run.server.url,
            "--key",
            str(run.files["dir"] / "monitor.key"),
        ],
    )
    assert result.exit_code == 0 and fork["id"] in result.output
    bad = CliRunner().invoke(
        app,
        ["incident", "label", fork["id"], "maybe", "--url", run.server.url],
    )
    assert bad.exit_code != 0 and "give true or false" in bad.output
    assert "Traceback" not in bad.output


def test_two_people_reinstate_what_the_monitor_suspended(run: Run) -> None:
    prober = run.ids["prober"]
    with run.client("operator") as op:
        with pytest.raises(ApiError) as alone:
            op.set_principal_status(prober, "active")
        assert (alone.value.status, alone.value.reason) == (409, "second_approval_needed")
        assert alone.value.body["type"] == "urn:zonex:problem:conflict"
        op.approve_reinstatement(prober)  # the operator's own approval is not a second person
        with pytest.raises(ApiError) as same:
            op.set_principal_status(prober, "active")
        assert (same.value.status, same.value.reason) == (409, "same_person")
    with run.client("prober") as p, pytest.raises(ApiError) as own:
        p.approve_reinstatement(prober)  # the suspended key is refused before anything else
    assert own.value.status == 401
    with run.client("auditor") as a:
        approval = a.approve_reinstatement(prober)
        assert approval["approver"] == run.ids["auditor"]
        with pytest.raises(ApiError) as not_suspended:
            a.approve_reinstatement(run.ids["victim"])
        assert not_suspended.value.status == 409
    with run.client("operator") as op:
        assert op.set_principal_status(prober, "active")["status"] == "active"
        op.set_principal_status(prober, "suspended")  # the operator's own suspension ...
        op.set_principal_status(prober, "active")  # ... is lifted by the operator alone
    with run.client("prober") as p:
        assert p.whoami().key_id == prober
    with run.client("auditor") as a:
        (storm,) = [i for i in a.incidents() if i["detector"] == "denial_ratio"]
    assert storm["status"] == "resolved"
    ex = run.server.exchange
    tail = [json.loads(ex.ledger.entry(i)) for i in range(ex.ledger.size())]
    approvals = [e for e in tail if e["kind"] == "principal.reinstatement_approved"]
    assert [e["actor"] for e in approvals] == [run.server.operator.key_id, run.ids["auditor"]]
    reinstated = [e for e in tail if e["kind"] == "principal.reinstated"]
    assert reinstated[0]["refs"] == {"principal": prober, "approval": approval["id"]}


class TamperingProxy(httpx.BaseTransport):
    """Forwards to the real exchange and flips one byte of every entry bundle it passes on."""

    def __init__(self) -> None:
        self.inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = self.inner.handle_request(request)
        if "/tile/entries/" not in request.url.path:
            return response
        body = bytearray(response.read())
        response.close()
        body[-3] ^= 0x01
        return httpx.Response(response.status_code, headers=response.headers, content=bytes(body))

    def close(self) -> None:
        self.inner.close()


def test_the_monitor_acts_only_on_a_log_its_checkpoint_vouches_for(run: Run) -> None:
    verifier = run.server.log_verifier()
    tampered = Client(run.server.url, run.keys["monitor"], transport=TamperingProxy())
    with tampered as c, pytest.raises(LogVerificationError, match="do not hash to the checkpoint"):
        LogFollower(c, verifier).poll()
    # from the middle of the log: the entries before come from hash tiles, and still verify
    with run.client("monitor") as c:
        follower = LogFollower(c, verifier, from_seq=300 % run.server.exchange.ledger.size())
        entries = follower.poll()
        assert entries and entries[0][0] == 300 % run.server.exchange.ledger.size()
    # another log's key: nothing is read
    wrong = run.files["dir"] / "wrong.pub"
    wrong.write_text(NoteSigner("test.zonex/log", SigningKey.generate()).verifier_key() + "\n")
    result = run_monitor(run.files["dir"], run.server.url, log_key="wrong.pub")
    assert result.exit_code != 0
    assert "checkpoint does not verify" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize(
    ("a", "b", "difference"),
    [
        ("industry = 'retail'", "industry = 'retail' AND company_id <> 'C1'", "term"),
        ("employees > 10 AND industry = 'retail'", "industry = 'retail'", "term"),
        (
            "employees > 10 AND industry = 'retail'",
            "industry = 'retail' AND employees > 11",
            "constant",
        ),
        ("employees > 10", "founded_year > 10", None),  # another column: not a neighbour
        ("employees > 10", "employees > 10", None),  # the same query
        ("employees > 10", "employees > 10 AND industry = 'a' AND district = 'b'", None),
    ],
)
def test_near_duplicate_queries(a: str, b: str, difference: str | None) -> None:
    from exchange.server.querydiff import QueryShape, near_duplicate

    first = QueryShape.of(f"SELECT district, COUNT(*) FROM companies WHERE {a} GROUP BY district")
    second = QueryShape.of(f"SELECT district, COUNT(*) FROM companies WHERE {b} GROUP BY district")
    assert first is not None and second is not None
    assert near_duplicate(first, second) == difference
    other = QueryShape.of(
        f"SELECT district, SUM(employees) FROM companies WHERE {b} GROUP BY district"
    )
    assert other is not None and near_duplicate(first, other) is None  # another computation
