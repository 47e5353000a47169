"""Zone nodes that accept only witnessed checkpoints: the exchange serving on loopback (SQLite),
the node as its own ``zonex node serve`` process with a 1-of-1 witness policy, and a witness as
its own ``zonex witness serve`` process.

Covered here: a node initialized with ``--witness-policy`` refuses (``unwitnessed``) a task
whose checkpoint no witness cosigned, so the consumer gets 409 ``node_refused`` and nothing is
charged; once the exchange has a witness, the same node runs the aggregate and the checkpoint it
accepted carries the witness's cosignature; ``zonex node witness-policy`` and ``zonex node init
--witness-policy`` refuse a policy that does not list the log, or a file they cannot read, in
one line; on the exchange's side, tasks handed out together share one cosigning round (a real
witness process, its submissions counted), and a bundle still goes out when the witness is down.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crypto.keys import SigningKey
from crypto.note import Checkpoint, NoteSigner, NoteVerifier
from crypto.receipt import verify_receipt
from crypto.tlogpolicy import Policy, check_quorum, parse_policy
from exchange.cli import app
from exchange.cli.node import run_doctor
from exchange.client.sdk import ApiError
from exchange.keyfile import load_private_key, write_private_key
from exchange.node.home import NodeHome, init_node_dir
from exchange.server.cosigning import add_witness
from exchange.server.models import BudgetRow, NodeTaskRow
from exchange.server.runtime import Exchange, init_data_dir
from exchange.tasks import Verified, verify_task_bundle
from tests.conftest import EXAMPLES, L3_LEVELS, live_exchange, settings_for
from tests.exchange.test_access import granted
from tests.exchange.test_aggregate import _rules
from tests.node.test_node_flow import SQL, node_process, wait_online
from tests.node.test_task_bundle import ZONE, Log, refused
from tests.witness._support import init_witness, serving_witness, trust

runner = CliRunner()


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def one_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    return lines[0]


def policy_text(log_key: str, witness_key: str) -> str:
    return f"# the exchange's log, cosigned by the district\nlog {log_key}\n" + (
        f"witness district {witness_key}\nquorum district\n"
    )


def test_a_node_refuses_an_unwitnessed_checkpoint_then_runs_once_the_exchange_is_witnessed(
    tmp_path: Path,
) -> None:
    witness_dir = tmp_path / "witness"
    witness_key = init_witness(witness_dir, "district.test/witness")
    with live_exchange(tmp_path / "exchange", witness_interval_seconds=0.2) as server:
        ex = server.exchange
        log_key = (server.data_dir / "log.pub").read_text("utf-8").strip()
        trust(witness_dir, log_key)
        keys = {"provider": SigningKey.generate(), "consumer": SigningKey.generate()}
        with server.client(server.operator) as op:
            op.register_principal("Tax Bureau", "agency", keys["provider"].public_key)
            op.register_principal("City Bank", "enterprise", keys["consumer"].public_key)
        with server.client(keys["provider"]) as p:
            p.create_zone("tax", "tax records")
        provider_key = tmp_path / "provider.key"
        write_private_key(provider_key, keys["provider"])
        node_dir = tmp_path / "tax-node"
        init = ("node", "init", "--data-dir", str(node_dir), "--zone", "tax",
                "--url", server.url, "--key", str(provider_key))  # fmt: skip

        # a policy for another log: one line, and nothing registered or written
        foreign = tmp_path / "foreign.policy"
        foreign.write_text(policy_text(_other_log_key(), witness_key))
        code, output = run(*init, "--witness-policy", str(foreign))
        assert code == 1 and "does not list this node's log" in one_line(output)
        assert not (node_dir / "node.json").exists()
        with server.client(keys["provider"]) as p:
            assert p.request("GET", "/v1/nodes") == []

        policy_file = tmp_path / "district.policy"
        policy_file.write_text(policy_text(log_key, witness_key))
        code, output = run(*init, "--witness-policy", str(policy_file))
        assert code == 0, output
        assert "witness policy pinned" in output
        key_id = output.split()[1]
        operator_key = server.data_dir / "operator.key"
        assert (
            run("node", "approve", key_id, "--url", server.url, "--key", str(operator_key))[0] == 0
        )
        code, output = run(
            "dataset", "register", "tax", "companies", "--node", str(node_dir),
            "--file", str(EXAMPLES / "companies.csv"), "--subject-column", "company_id",
            *(f"--level={c}={lv}" for c, lv in L3_LEVELS.items()),
        )  # fmt: skip
        assert code == 0, output
        with server.client(keys["provider"]) as p:
            p.set_analysis_rules("tax", "companies", _rules())
        granted(server, keys, ["companies"], ["aggregate"])
        consumer = keys["consumer"]

        with serving_witness(witness_dir) as witness, node_process(node_dir):
            wait_online(server, consumer)
            # 1. the exchange has no witness: its checkpoint carries no cosignature
            with server.client(consumer) as c, pytest.raises(ApiError) as exc:
                c.aggregate("tax", SQL, "credit-assessment", epsilon="1")
            assert exc.value.status == 409 and exc.value.code == "node_refused"
            assert "unwitnessed" in (exc.value.detail or "")
            with Session(ex.engine) as s:
                assert s.execute(select(BudgetRow)).scalars().all() == []
                (task,) = s.execute(select(NodeTaskRow)).scalars().all()
                assert task.status == "refused"
                assert task.outcome is not None
                assert task.outcome["refused"]["reason"] == "unwitnessed"
                assert "quorum district not met" in task.outcome["refused"]["detail"]
            state = json.loads((node_dir / "state.json").read_text("utf-8"))
            assert state["checkpoint"] is None  # nothing accepted from an unwitnessed view

            # 2. the operator configures the witness: the same node now runs the task
            add_witness(ex.engine, ex.ledger, server.operator.key_id, witness.url, witness_key)
            with server.client(consumer) as c:
                out = c.aggregate("tax", SQL, "credit-assessment", epsilon="1")
            doctor = {c["check"]: c for c in run_doctor(node_dir, None)}

        verify_receipt(out.receipt, out.result, server.log_verifier())
        with Session(ex.engine) as s:
            spent = {r.dataset: Decimal(r.spent) for r in s.execute(select(BudgetRow)).scalars()}
        assert spent == {"companies": Decimal("1")}
        # the checkpoint the node accepted with the task carries the witness's cosignature
        policy = parse_policy(policy_file.read_text())
        state = json.loads((node_dir / "state.json").read_text("utf-8"))
        report = check_quorum(state["checkpoint"], policy, NoteVerifier.from_verifier_key(log_key))
        assert report.ok and [c.name for c in report.cosigned] == ["district"], report.explain()
        assert doctor["witness policy"]["ok"]
        assert doctor["witness policy"]["detail"] == "quorum district over 1 witness(es)"
        # met, or (a checkpoint stored since, not yet cosigned) not met: either way judged
        assert doctor["witnessed"]["detail"].startswith("checkpoint ")
        assert "quorum district" in doctor["witnessed"]["detail"]


def _witnessed(
    log: Log, bundle: dict[str, Any], policy: Policy, last: Checkpoint | None = None
) -> Verified:
    return verify_task_bundle(
        bundle,
        log=log.signer.verifier(),
        zone=ZONE,
        node=log.node.key_id,
        now=datetime.now(UTC),
        last=last,
        policy=policy,
    )


def _other_log_key() -> str:
    from crypto.note import NoteSigner

    return NoteSigner("test.zonex/log", SigningKey.generate()).verifier_key()


# -- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def node_dir(tmp_path: Path) -> tuple[Path, str]:
    """A node directory pinned to a fresh log key (no exchange needed to change its policy)."""
    log_key = _other_log_key()
    d = tmp_path / "node"
    init_node_dir(d, zone="tax", exchange="http://127.0.0.1:9", log_key=log_key)
    return d, log_key


def _witness_key() -> str:
    from crypto.note import ALG_COSIGNATURE_V1

    key = SigningKey.generate().public_key
    return NoteVerifier(
        "district.test/witness", key, signature_type=ALG_COSIGNATURE_V1
    ).to_verifier_key()


def test_witness_policy_set_replace_and_clear(node_dir: tuple[Path, str], tmp_path: Path) -> None:
    d, log_key = node_dir
    good = tmp_path / "good.policy"
    good.write_text(policy_text(log_key, _witness_key()))
    code, output = run("node", "witness-policy", "--data-dir", str(d), str(good))
    assert code == 0 and "quorum district over 1 witness(es)" in one_line(output)
    assert (d / "witness.policy").read_bytes() == good.read_bytes()
    assert NodeHome(d).witness_policy() is not None
    # replaced by a 2-of-2 policy
    two = tmp_path / "two.policy"
    two.write_text(
        f"log {log_key}\nwitness a {_witness_key()}\nwitness b {_witness_key()}\n"
        "group both all a b\nquorum both\n"
    )
    code, output = run("node", "witness-policy", "--data-dir", str(d), str(two))
    assert code == 0 and "quorum both over 2 witness(es)" in output
    assert (d / "witness.policy").read_bytes() == two.read_bytes()
    code, output = run("node", "witness-policy", "--data-dir", str(d), "--clear")
    assert code == 0 and "removed" in output
    assert not (d / "witness.policy").exists() and NodeHome(d).witness_policy() is None


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("foreign", "does not list this node's log"),
        ("no log", "does not list this node's log"),
        ("malformed", "the witness policy: line 2"),
        ("missing", "missing.policy: No such file or directory"),
        ("directory", "directory.policy: Is a directory"),
        ("both", "give a policy FILE to pin, or --clear"),
        ("neither", "give a policy FILE to pin, or --clear"),
    ],
)
def test_witness_policy_errors_are_one_line_and_change_nothing(
    node_dir: tuple[Path, str], tmp_path: Path, policy: str, message: str
) -> None:
    d, log_key = node_dir
    kept = tmp_path / "kept.policy"
    kept.write_text(policy_text(log_key, _witness_key()))
    assert run("node", "witness-policy", "--data-dir", str(d), str(kept))[0] == 0
    path = tmp_path / f"{policy.replace(' ', '-')}.policy"
    texts = {
        "foreign": policy_text(_other_log_key(), _witness_key()),
        "no log": f"witness district {_witness_key()}\nquorum district\n",
        "malformed": f"log {log_key}\nquorum nobody\n",
    }
    if policy in texts:
        path.write_text(texts[policy])
    elif policy == "directory":
        path.mkdir()
    args = ["node", "witness-policy", "--data-dir", str(d)]
    args += {"both": [str(kept), "--clear"], "neither": []}.get(policy, [str(path)])
    code, output = run(*args)
    assert code == 1
    assert message in one_line(output)
    assert (d / "witness.policy").read_bytes() == kept.read_bytes()


# -- the exchange's side: one cosigning round for the tasks handed out together ----------------


def test_tasks_handed_out_together_share_one_cosigning_round(tmp_path: Path) -> None:
    data_dir = tmp_path / "exchange"
    init_data_dir(data_dir, origin="test.zonex/log")
    witness_dir = tmp_path / "witness"
    witness_key = init_witness(witness_dir, "district.test/witness")
    trust(witness_dir, str(data_dir / "log.pub"))
    log_key = (data_dir / "log.pub").read_text("utf-8").strip()
    policy = parse_policy(policy_text(log_key, witness_key))
    # the ticker's checkpoints and rounds stay out of the way: every round here is dispatch's
    ex = Exchange(
        settings_for(data_dir, checkpoint_interval_seconds=600, witness_interval_seconds=600)
    )
    ex.start()
    try:
        assert ex.cosigner is not None
        log = Log(ex, NoteSigner(ex.settings.origin, load_private_key(data_dir / "log.key")),
                  SigningKey.generate())  # fmt: skip
        submitted: list[str] = []
        submit = ex.cosigner._submit

        def counting(url: str, note: str, *args: Any, **kwargs: Any) -> tuple[str, ...]:
            submitted.append(note)  # the real submission, counted
            return submit(url, note, *args, **kwargs)

        ex.cosigner._submit = counting
        with serving_witness(witness_dir) as witness:
            add_witness(ex.engine, ex.ledger, ex.operator_key_id(), witness.url, witness_key)
            tasks = [log.task() for _ in range(4)]
            seqs = [log.authorize(task) for task in tasks]
            start = threading.Barrier(len(tasks))
            bundles: dict[int, dict[str, Any]] = {}

            def take(i: int) -> None:
                start.wait()
                bundles[i] = log.bundle(tasks[i], seqs[i])

            threads = [threading.Thread(target=take, args=(i,)) for i in range(len(tasks))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=60)
            assert len(bundles) == len(tasks)
            # one round, one checkpoint for all four, cosigned
            assert len(submitted) == 1
            assert len({b["checkpoint"] for b in bundles.values()}) == 1
            last = None
            for i, task in enumerate(tasks):
                verified = _witnessed(log, bundles[i], policy)
                assert verified.task == task and bundles[i]["inclusion"]["index"] == seqs[i]
                last = verified.checkpoint
            assert last is not None
            # a newer checkpoint stored since (as the ticker stores them), not cosigned yet,
            # costs no round for a task the cosigned one already includes
            log.authorize(log.task())
            assert ex.ledger.checkpoint().size > last.size
            again = log.bundle(tasks[0], seqs[0])
            assert again["checkpoint"] == bundles[0]["checkpoint"] and len(submitted) == 1
            # a task authorized after that round needs a new one; its bundle proves the new
            # checkpoint extends the node's last
            later = log.task()
            bundle = log.bundle(later, log.authorize(later), since=last.size)
            assert len(submitted) == 2 and bundle["consistency"]["from"] == last.size
            assert _witnessed(log, bundle, policy, last=last).task == later
            # a node without a witness policy does not ask: no round, no wait for one
            unpinned = log.task()
            plain = log.bundle(unpinned, log.authorize(unpinned), witnessed=False)
            assert len(submitted) == 2 and log.verify(plain).task == unpinned
        # the witness is down: the bundle still goes out, as signed; the node decides
        down = log.task()
        bundle = log.bundle(down, log.authorize(down))
        assert log.verify(bundle).task == down
        detail = refused("unwitnessed", lambda: _witnessed(log, bundle, policy)).detail
        assert detail == "quorum district not met: no valid cosignature from witness district"
    finally:
        ex.close()
