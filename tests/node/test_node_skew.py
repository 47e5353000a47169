"""A zone node whose clock is wrong: the exchange refuses its signed polls (a signature's
``created`` must be within ``max_skew_seconds`` of the exchange's clock, so a captured request
cannot be replayed later), and ``zonex node doctor`` says so before the provider finds out.

Only the node's clock is moved: the name ``time`` in the module that reads it is replaced by a
copy whose ``time()`` is off, so the exchange serving in this process keeps the true time.
"""

from __future__ import annotations

import time
import types
from pathlib import Path

import httpx
import pytest

import exchange.cli.node
import exchange.client.sdk
from exchange.client.sdk import SignatureAuth
from exchange.node.agent import NodeAgent
from exchange.node.home import NodeHome, init_node_dir
from tests.conftest import LiveServer
from tests.node.test_task_bundle import ZONE, Approved
from tests.node.test_task_bundle import approved as approved  # a fixture
from tests.security._support import assert_problem, rejected_reasons


def skewed(seconds: float) -> types.ModuleType:
    """The ``time`` module, but its ``time()`` runs ``seconds`` off."""
    clock = types.ModuleType("time")
    clock.__dict__.update(vars(time))
    clock.time = lambda: time.time() + seconds  # type: ignore[attr-defined]
    return clock


@pytest.fixture
def node_dir(approved: Approved, tmp_path: Path) -> Path:
    d = tmp_path / "tax-node"
    server = approved.server
    init_node_dir(
        d,
        zone=ZONE,
        exchange=server.url,
        log_key=server.log_verifier().to_verifier_key(),
        key=approved.key,
    )
    return d


def _poll(server: LiveServer, approved: Approved) -> httpx.Response:
    with httpx.Client(base_url=server.url, auth=SignatureAuth(approved.key), timeout=30) as http:
        return http.post("/v1/node/poll", json={"since": None, "wait": 0})


@pytest.mark.parametrize("skew", [400, -400, 3600])
def test_a_poll_signed_by_a_skewed_clock_is_refused(
    approved: Approved, monkeypatch: pytest.MonkeyPatch, skew: int
) -> None:
    server = approved.server
    assert server.exchange.settings.max_skew_seconds == 300
    monkeypatch.setattr(exchange.client.sdk, "time", skewed(skew))
    response = _poll(server, approved)
    monkeypatch.undo()  # the provider's clock is right
    body = assert_problem(response, 401, "verification_failed")
    assert "reason" not in body  # collapsed: the node's operator reads the ledger, not the 401
    assert "stale" in rejected_reasons(server)
    # and the node was not marked online by it
    with server.client(approved.provider) as p:
        (node,) = p.request("GET", "/v1/nodes")
    assert node["last_seen"] is None and not node["online"]


@pytest.mark.parametrize("skew", [0, 200, -200])
def test_a_poll_within_the_allowed_skew_is_served(
    approved: Approved, monkeypatch: pytest.MonkeyPatch, skew: int
) -> None:
    monkeypatch.setattr(exchange.client.sdk, "time", skewed(skew))
    assert _poll(approved.server, approved).status_code == 204


def test_the_node_agents_own_poll_is_refused_when_its_clock_is_off(
    node_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = NodeHome(node_dir)
    agent = NodeAgent(home, poll_wait=0)
    try:
        assert agent.poll() is None  # in time: served, nothing queued
        monkeypatch.setattr(exchange.client.sdk, "time", skewed(400))
        with pytest.raises(Exception, match="401") as exc:
            agent.poll()
        assert type(exc.value).__name__ == "_PollError"
    finally:
        agent.close()
        home.close()


def _clock(checks: list[dict[str, object]]) -> dict[str, object]:
    (clock,) = [c for c in checks if c["check"] == "clock"]
    return clock


def test_doctor_reports_a_skewed_clock(node_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checks = exchange.cli.node.run_doctor(node_dir, None)
    assert _clock(checks)["ok"] is True, checks
    assert all(c["ok"] for c in checks), checks
    for skew in (400, -400):
        monkeypatch.setattr(exchange.cli.node, "time", skewed(skew))
        clock = _clock(exchange.cli.node.run_doctor(node_dir, None))
        assert clock["ok"] is False, clock
        assert "NTP" in str(clock["detail"])
        # the exchange is ahead when the node is behind, and the other way round
        assert str(clock["detail"]).startswith("-" if skew > 0 else "+"), clock
