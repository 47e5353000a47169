"""A zone node's verification of task bundles under attack, and the exchange's check of the
node's answers.

The node trusts nothing the exchange says outside the log: each test hands it a bundle built
from a real ``task.authorized`` entry on a real exchange ledger (as ``exchange.server.dispatch``
builds it) with one thing forged, and asserts the specific refusal. The exchange in turn refuses an
answer not signed by the node's key, or for a task it already terminated.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from sqlalchemy.orm import Session

from crypto.canonical import canonicalize
from crypto.encoding import b64_decode, b64_encode, b64url_decode, b64url_encode
from crypto.keys import SigningKey
from crypto.merkle import MerkleTree, leaf_hash
from crypto.note import (
    ALG_COSIGNATURE_V1,
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    cosign_checkpoint,
    sign_checkpoint,
    verify_checkpoint,
)
from crypto.tlogpolicy import Policy, parse_policy
from exchange.client.sdk import SignatureAuth
from exchange.errors import ConfigurationError, ZoneUnavailableError
from exchange.keyfile import load_private_key
from exchange.node.agent import NodeAgent
from exchange.node.engine import Veto, load_veto
from exchange.node.home import HostedDataset, NodeHome, init_node_dir
from exchange.server import dispatch
from exchange.server.ledger import EntryDraft
from exchange.server.runtime import Exchange
from exchange.tasks import (
    AUTHORIZED_KIND,
    TASK_TYPE,
    TaskRefused,
    Verified,
    build_task_bundle,
    sign_result,
    task_digest,
    verify_task_bundle,
)
from tests.conftest import LiveServer

ZONE = "tax"
SQL = "SELECT COUNT(*) AS n, SUM(tax_paid_2025) AS tax FROM companies"


def _rfc3339(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Log:
    """The exchange's ledger, its real log signer, and the node the tasks are addressed to."""

    ex: Exchange
    signer: NoteSigner
    node: SigningKey

    @property
    def origin(self) -> str:
        return self.signer.name

    def task(self, **changes: Any) -> dict[str, Any]:
        """A task as ``dispatch`` writes it, for this node and zone, due in ten minutes."""
        task: dict[str, Any] = {
            "type": TASK_TYPE,
            "id": secrets.token_hex(16),
            "kind": "aggregate",
            "zone": ZONE,
            "node": self.node.key_id,
            "consumer": "c" * 64,
            "purpose": "credit-assessment",
            "deadline": _rfc3339(datetime.now(UTC) + timedelta(minutes=10)),
            "sql": SQL,
            "dp": True,
            "epsilon": "1",
            "datasets": {"companies": "d" * 64},
        }
        task.update(changes)
        return task

    def authorize(self, task: dict[str, Any], kind: str = AUTHORIZED_KIND) -> int:
        """Ledger an entry of ``kind`` whose ``digests.task`` is the task's digest; its seq."""
        appended = self.ex.ledger.append(
            EntryDraft(
                kind=kind,
                actor=task["consumer"],
                refs={"zone": task["zone"], "node": task["node"], "task": task["id"]},
                digests={"task": task_digest(task)},
                attrs={"kind": task["kind"]},
            )
        )
        return appended.seq

    def bundle(
        self, task: dict[str, Any], seq: int, since: int | None = None, witnessed: bool = True
    ) -> dict[str, Any]:
        """The bundle the exchange hands the node for ``task`` (``exchange.server.dispatch._bundle``
        itself, over a queued row's ``{"task", "index"}``), for a node that asks for witnessed
        checkpoints unless ``witnessed`` is false."""
        row = SimpleNamespace(bundle={"task": task, "index": seq})
        return dispatch._bundle(self.ex, row, since, witnessed)  # type: ignore[arg-type]

    def authorized(self, **changes: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        task = self.task(**changes)
        return task, self.bundle(task, self.authorize(task))

    def sign(self, size: int, root: bytes, key: SigningKey | None = None) -> str:
        """A checkpoint note of (size, root), by the real log key unless ``key`` is given."""
        signer = self.signer if key is None else NoteSigner(self.origin, key)
        return sign_checkpoint(Checkpoint(self.origin, size, root), signer)

    def checkpoint(self) -> Checkpoint:
        """A freshly signed checkpoint of the whole ledger, as the node would hold it."""
        return verify_checkpoint(
            self.ex.ledger.checkpoint(persist=False).note, self.signer.verifier()
        )

    def verify(
        self,
        bundle: object,
        *,
        last: Checkpoint | None = None,
        now: datetime | None = None,
        zone: str = ZONE,
        node: str | None = None,
    ) -> Verified:
        return verify_task_bundle(
            bundle,
            log=self.signer.verifier(),
            zone=zone,
            node=self.node.key_id if node is None else node,
            now=datetime.now(UTC) if now is None else now,
            last=last,
        )


@pytest.fixture
def log(exchange: Exchange, data_dir: Path) -> Log:
    key = load_private_key(data_dir / "log.key")
    return Log(exchange, NoteSigner(exchange.settings.origin, key), SigningKey.generate())


def refused(reason: str, action: Callable[[], object]) -> TaskRefused:
    with pytest.raises(TaskRefused) as exc:
        action()
    assert exc.value.reason == reason, exc.value
    return exc.value


def _fork(size: int) -> bytes:
    """The root of a history of ``size`` entries the real ledger never held."""
    tree = MerkleTree()
    tree.extend(leaf_hash(f"forked entry {i}".encode()) for i in range(size))
    return tree.root(size)


# -- 1. the genuine bundle ------------------------------------------------------------------


def test_a_genuine_bundle_verifies(log: Log) -> None:
    task, bundle = log.authorized()
    verified = log.verify(bundle)
    assert verified.task == task
    entry = json.loads(b64url_decode(bundle["entry"]))
    assert entry["kind"] == AUTHORIZED_KIND and entry["digests"] == {"task": task_digest(task)}
    assert verified.checkpoint.size == bundle["inclusion"]["size"] > entry["seq"]
    # and again from a node that holds an older checkpoint: the bundle proves it extends it
    last = verified.checkpoint
    task2 = log.task()
    bundle2 = log.bundle(task2, log.authorize(task2), since=last.size)
    assert bundle2["consistency"]["from"] == last.size
    assert log.verify(bundle2, last=last).checkpoint.size > last.size


# -- 2. the checkpoint ------------------------------------------------------------------------


def test_a_checkpoint_signed_by_another_key_under_the_logs_name_is_refused(log: Log) -> None:
    """An exchange (or a thief of nothing) signs its own tree head with a fresh key under the
    log's origin: the pinned key does not vouch for it."""
    _, bundle = log.authorized()
    real = log.verify(bundle).checkpoint
    bundle["checkpoint"] = log.sign(real.size, real.root, SigningKey.generate())
    refused("bad_checkpoint", lambda: log.verify(bundle))


def test_the_real_key_under_another_origin_is_refused(log: Log) -> None:
    _, bundle = log.authorized()
    real = log.verify(bundle).checkpoint
    other = NoteSigner("other.zonex/log", log.signer.key)
    bundle["checkpoint"] = sign_checkpoint(Checkpoint(other.name, real.size, real.root), other)
    refused("bad_checkpoint", lambda: log.verify(bundle))


@pytest.mark.parametrize("field", ["size", "root", "origin", "signature"])
def test_a_tampered_checkpoint_text_is_refused(log: Log, field: str) -> None:
    _, bundle = log.authorized()
    real = log.verify(bundle).checkpoint
    note: str = bundle["checkpoint"]
    if field == "size":
        tampered = note.replace(f"\n{real.size}\n", f"\n{real.size + 1}\n", 1)
    elif field == "root":
        tampered = note.replace(b64_encode(real.root), b64_encode(_fork(real.size)), 1)
    elif field == "origin":
        tampered = note.replace(log.origin + "\n", log.origin + "x\n", 1)
    else:  # one bit of the signature
        head, _, line = note.rstrip("\n").rpartition("\n")
        prefix, _, blob = line.rpartition(" ")
        raw = bytearray(b64_decode(blob))
        raw[-1] ^= 1
        forged = b64_encode(bytes(raw))
        tampered = f"{head}\n{prefix} {forged}\n"
    assert tampered != note
    bundle["checkpoint"] = tampered
    refused("bad_checkpoint", lambda: log.verify(bundle))


# -- 3. the entry is on the ledger -------------------------------------------------------------


def test_an_inclusion_proof_for_another_entry_is_refused(log: Log) -> None:
    """The bundle points at another (genuine) entry's position and proof."""
    task = log.task()
    seq = log.authorize(task)
    other = log.task()
    other_seq = log.authorize(other)
    bundle = log.bundle(task, seq)
    size = bundle["inclusion"]["size"]
    assert size > other_seq
    other_proof = [b64url_encode(h) for h in log.ex.ledger.inclusion_proof(other_seq, size)]
    # the other entry's index and proof: the entry is not at that index
    bundle["inclusion"] = {"index": other_seq, "size": size, "proof": other_proof}
    refused("not_on_ledger", lambda: log.verify(bundle))
    # this entry's index with the other's proof: the path does not lead to the root
    bundle["inclusion"] = {"index": seq, "size": size, "proof": other_proof}
    refused("not_on_ledger", lambda: log.verify(bundle))
    # a proof for another tree size than the checkpoint's
    smaller = size - 1
    assert smaller > seq
    bundle["inclusion"] = {
        "index": seq,
        "size": smaller,
        "proof": [b64url_encode(h) for h in log.ex.ledger.inclusion_proof(seq, smaller)],
    }
    refused("not_on_ledger", lambda: log.verify(bundle))


def test_an_authorization_entry_that_is_not_in_the_tree_is_refused(log: Log) -> None:
    """The exchange fabricates an authorization for a task it never ledgered: a well-formed
    ``task.authorized`` entry at a real seq, with the real inclusion proof of that seq."""
    _, bundle = log.authorized()
    forged_task = log.task(epsilon="50")
    entry = json.loads(b64url_decode(bundle["entry"]))
    entry["digests"] = {"task": task_digest(forged_task)}
    entry["refs"]["task"] = forged_task["id"]
    bundle["entry"] = b64url_encode(canonicalize(entry))
    bundle["task"] = forged_task
    refused("not_on_ledger", lambda: log.verify(bundle))


# -- 4. the entry authorizes exactly this task -------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        {"epsilon": "10"},
        {"sql": "SELECT COUNT(*) AS n, SUM(tax_paid_2025) AS tax FROM companies WHERE 1 = 1"},
        {"dp": False},
        {"consumer": "e" * 64},
        {"deadline": "2099-01-01T00:00:00Z"},
        {"datasets": {"companies": "f" * 64}},
        {"extra": "a field the exchange slipped in"},
    ],
    ids=lambda c: next(iter(c)),
)
def test_a_task_changed_after_its_authorization_is_refused(
    log: Log, change: dict[str, Any]
) -> None:
    _, bundle = log.authorized()
    bundle["task"] = {**bundle["task"], **change}
    refused("not_authorized", lambda: log.verify(bundle))


def test_a_task_whose_digest_was_never_ledgered_is_refused(log: Log) -> None:
    """Another, never authorized, task rides on a genuine authorization entry."""
    _, bundle = log.authorized()
    bundle["task"] = log.task()
    refused("not_authorized", lambda: log.verify(bundle))


@pytest.mark.parametrize("kind", ["zone.created", "task.terminated", "task.refused"])
def test_an_entry_of_another_kind_holding_the_task_digest_is_refused(log: Log, kind: str) -> None:
    task = log.task()
    bundle = log.bundle(task, log.authorize(task, kind=kind))
    assert json.loads(b64url_decode(bundle["entry"]))["kind"] == kind
    refused("not_authorized", lambda: log.verify(bundle))


# -- 5. and 6. zone, node, deadline ------------------------------------------------------------


def test_a_task_for_another_zone_is_refused(log: Log) -> None:
    _, bundle = log.authorized(zone="health")
    refused("wrong_zone", lambda: log.verify(bundle))
    log.verify(bundle, zone="health")  # the same bundle, at that zone's node


def test_a_task_for_another_node_key_is_refused(log: Log) -> None:
    other = SigningKey.generate()
    _, bundle = log.authorized(node=other.key_id)
    refused("wrong_node", lambda: log.verify(bundle))
    log.verify(bundle, node=other.key_id)


def test_a_task_past_its_deadline_is_refused(log: Log) -> None:
    task, bundle = log.authorized()
    deadline = datetime.fromisoformat(task["deadline"].replace("Z", "+00:00"))
    log.verify(bundle, now=deadline - timedelta(seconds=1))
    refused("expired", lambda: log.verify(bundle, now=deadline))
    refused("expired", lambda: log.verify(bundle, now=deadline + timedelta(days=1)))


@pytest.mark.parametrize(
    "deadline", ["2099-06-01Z", "2099-06-01 10:00:00Z", "2099-06-01T10:00:00+00:00", "soon"]
)
def test_a_deadline_in_any_other_spelling_is_refused_as_malformed(log: Log, deadline: str) -> None:
    """One instant, one text: a date without a time (which once parsed to a naive datetime and
    crashed the comparison) and every non-canonical spelling are refused."""
    _, bundle = log.authorized(deadline=deadline)
    refused("malformed", lambda: log.verify(bundle))


# -- 7. the checkpoint extends the node's last one ---------------------------------------------


@pytest.mark.parametrize("fork", ["smaller", "same size"])
def test_a_checkpoint_that_does_not_extend_the_nodes_forked_last_one_is_refused(
    log: Log, fork: str
) -> None:
    """The node holds a checkpoint, signed by the real log key, of a history that is not this
    ledger's: the exchange showed it one history and now shows it another."""
    task = log.task()
    seq = log.authorize(task)
    size = log.bundle(task, seq)["inclusion"]["size"]
    fork_size = size - 1 if fork == "smaller" else size
    assert fork_size > 0
    last = verify_checkpoint(log.sign(fork_size, _fork(fork_size)), log.signer.verifier())
    bundle = log.bundle(task, seq, since=last.size)
    assert bundle["consistency"]["from"] == last.size
    refused("inconsistent_checkpoint", lambda: log.verify(bundle, last=last))


def test_a_bundle_without_a_consistency_proof_from_the_nodes_last_checkpoint_is_refused(
    log: Log,
) -> None:
    _, bundle = log.authorized()
    last = log.verify(bundle).checkpoint
    task = log.task()
    seq = log.authorize(task)
    bundle = log.bundle(task, seq)  # the node said nothing of what it holds
    assert "consistency" not in bundle and bundle["inclusion"]["size"] > last.size
    refused("inconsistent_checkpoint", lambda: log.verify(bundle, last=last))
    # a proof from another size than the node's
    assert last.size > 1
    wrong = log.bundle(task, seq, since=last.size - 1)
    assert wrong["consistency"]["from"] == last.size - 1
    refused("inconsistent_checkpoint", lambda: log.verify(wrong, last=last))
    # a proof from the right size whose hashes are garbled
    good = log.bundle(task, seq, since=last.size)
    garbled = json.loads(json.dumps(good))
    proof = garbled["consistency"]["proof"]
    garbled["consistency"]["proof"] = [b64url_encode(b"\x00" * 32), *proof[1:]]
    refused("inconsistent_checkpoint", lambda: log.verify(garbled, last=last))
    log.verify(good, last=last)  # the genuine one


def test_a_checkpoint_older_than_the_nodes_last_one_is_refused(log: Log) -> None:
    """The exchange rolls the node back to an older tree head (to hide later entries)."""
    _, bundle = log.authorized()
    log.authorize(log.task())
    log.authorize(log.task())
    last = log.checkpoint()
    assert last.size > bundle["inclusion"]["size"]
    refused("stale_checkpoint", lambda: log.verify(bundle, last=last))


# -- 8. replay, in the node's own directory ------------------------------------------------------


@pytest.fixture
def node_dir(log: Log, tmp_path: Path) -> Path:
    d = tmp_path / "tax-node"
    init_node_dir(
        d,
        zone=ZONE,
        exchange="http://127.0.0.1:9",  # never dialled: the tests hand bundles in
        log_key=log.signer.verifier_key(),
        key=log.node,
    )
    return d


@pytest.fixture
def agent(node_dir: Path) -> Iterator[Callable[[], NodeAgent]]:
    """Open the node directory as a fresh process would (each call a new NodeHome and agent)."""
    opened: list[NodeAgent] = []

    def open_agent() -> NodeAgent:
        opened.append(NodeAgent(NodeHome(node_dir)))
        return opened[-1]

    yield open_agent
    for a in opened:
        a.close()
        a.home.close()


def test_a_replayed_bundle_is_refused_even_after_a_restart(
    log: Log, agent: Callable[[], NodeAgent]
) -> None:
    task, bundle = log.authorized()
    node = agent()
    node.verify(bundle)
    assert node.home.answered(task["id"])
    assert node.home.last_checkpoint() == log.verify(bundle).checkpoint
    refused("replayed", lambda: node.verify(bundle))
    # the node restarts on the same directory
    restarted = agent()
    refused("replayed", lambda: restarted.verify(bundle))
    # a new task still runs there, and the old one is still refused after it
    task2 = log.task()
    last = restarted.home.last_checkpoint()
    assert last is not None
    bundle2 = log.bundle(task2, log.authorize(task2), since=last.size)
    restarted.verify(bundle2)
    replay = log.bundle(task, bundle["inclusion"]["index"], since=bundle2["inclusion"]["size"])
    refused("replayed", lambda: restarted.verify(replay))
    refused("replayed", lambda: agent().verify(replay))


def test_the_node_refuses_a_bundle_against_the_checkpoint_it_stored(
    log: Log, agent: Callable[[], NodeAgent]
) -> None:
    """After a restart the node still holds its last checkpoint: a bundle that does not prove
    it extends that one is refused."""
    _, bundle = log.authorized()
    agent().verify(bundle)
    _, later = log.authorized()  # no `since`: no consistency proof
    refused("inconsistent_checkpoint", lambda: agent().verify(later))


def test_a_replay_is_refused_whatever_the_deadlines_spelling(
    log: Log, agent: Callable[[], NodeAgent]
) -> None:
    now = datetime.now(UTC)
    due = now + timedelta(minutes=2)
    if due.date() != now.date():
        pytest.skip("too close to midnight UTC for a same-day deadline")
    # a space-separated deadline once sorted before the canonical "T" form and was pruned
    # from the answered tasks early; such a spelling is now refused outright
    _, spaced = log.authorized(deadline=f"{due:%Y-%m-%d %H:%M:%S}Z")
    refused("malformed", lambda: agent().verify(spaced))
    task, bundle = log.authorized(deadline=f"{due:%Y-%m-%dT%H:%M:%S}Z")
    node = agent()
    node.verify(bundle)
    last = node.home.last_checkpoint()
    assert last is not None
    other = log.task()
    node.verify(log.bundle(other, log.authorize(other), since=last.size))
    last = node.home.last_checkpoint()
    assert last is not None
    replay = log.bundle(task, bundle["inclusion"]["index"], since=last.size)
    refused("replayed", lambda: node.verify(replay))


def test_the_answered_journal_survives_a_crash_and_is_compacted(
    log: Log, node_dir: Path, agent: Callable[[], NodeAgent]
) -> None:
    """Each accepted task is one line appended to answered.log (state.json is not rewritten per
    task); a node killed without closing still refuses the replay, a line cut short by the
    crash is ignored, opening the directory folds the journal into state.json, and a damaged
    line in the middle stops the node (fails closed) instead of forgetting what it answered."""
    task, bundle = log.authorized()
    node = agent()
    state_before = (node_dir / "state.json").read_bytes()
    node.verify(bundle)
    assert (node_dir / "state.json").read_bytes() == state_before  # not rewritten per task
    (line,) = (node_dir / "answered.log").read_text("utf-8").splitlines()
    assert json.loads(line)["task"] == task["id"]
    # the process dies (no close) mid-way through appending the next line
    with (node_dir / "answered.log").open("ab") as f:
        f.write(b'{"task":"cut-sh')
    restarted = NodeAgent(NodeHome(node_dir))
    try:
        refused("replayed", lambda: restarted.verify(bundle))
        state = json.loads((node_dir / "state.json").read_text("utf-8"))
        assert task["id"] in state["answered"] and "cut-sh" not in json.dumps(state)
        assert state["checkpoint"] == bundle["checkpoint"]
        assert (node_dir / "answered.log").read_bytes() == b""  # folded in
        last = restarted.home.last_checkpoint()
        assert last is not None
        task2 = log.task()
        restarted.verify(log.bundle(task2, log.authorize(task2), since=last.size))
    finally:
        restarted.close()
    # a line in the middle that is not a record: the directory does not open
    journal = (node_dir / "answered.log").read_bytes()
    (node_dir / "answered.log").write_bytes(b"garbage\n" + journal)
    with pytest.raises(ConfigurationError, match="line 1 is damaged"):
        NodeHome(node_dir).answered(task2["id"])


def test_cached_local_files_see_every_change(node_dir: Path) -> None:
    """The catalog, veto and witness policy are parsed once per change of their file, not per
    task: a new dataset, an edited veto and a removed policy all apply to the next task, also
    when the edit keeps the file's size and times (it was made within the racy window)."""
    home = NodeHome(node_dir)
    try:
        assert home.datasets() == {} and home.veto() == Veto()
        dataset = HostedDataset("tax", "company_id", (), "sha256:" + "0" * 64, 1, "import")
        home.add_dataset(dataset)
        assert home.datasets() == {"tax": dataset}
        home.datasets()["other"] = dataset  # a caller's copy: the cache is not changed
        assert set(home.datasets()) == {"tax"}
        veto = node_dir / "veto.toml"
        veto.write_text("min_k = 20\n", "utf-8")
        assert home.veto().min_k == 20
        stat = veto.stat()
        veto.write_text("min_k = 30\n", "utf-8")  # same size; times put back as they were
        os.utime(veto, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        assert home.veto().min_k == 30
        os.utime(veto, ns=(0, 0))  # an old modification time: still this file's content
        assert home.veto().min_k == 30
        veto.write_text("min_k = 40\n", "utf-8")
        assert home.veto().min_k == 40
        veto.unlink()
        assert home.veto() == Veto()
        home.remove_dataset("tax")
        assert home.datasets() == {}
    finally:
        home.close()


# -- 9. local veto rules -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "max_k = 20\n",  # unknown key
        'max_epsilon = "0.5"\nrefuse_kinds = ["aggregate"]\n',
        "max_epsilon = 0.5\n",  # a float, not a decimal string
        'max_epsilon = "-1"\n',
        'max_epsilon = "0"\n',
        'max_epsilon = "one"\n',
        'max_epsilon = "NaN"\n',
        'max_epsilon = "Infinity"\n',
        'refuse = ["psi"]\n',
        'refuse = "aggregate"\n',
        "min_k = -1\n",
        "min_k = true\n",
        'min_k = "20"\n',
        "min_k = 20\nmin_k = 30\n",  # not TOML
    ],
)
def test_a_bad_veto_file_fails_closed(tmp_path: Path, text: str) -> None:
    path = tmp_path / "veto.toml"
    path.write_text(text, "utf-8")
    with pytest.raises(ValueError, match=r"veto\.toml"):
        load_veto(path)


def test_a_veto_file_parses_and_only_makes_releases_stricter(tmp_path: Path) -> None:
    from decimal import Decimal

    path = tmp_path / "veto.toml"
    assert load_veto(path) == Veto()  # no file: no extra rules
    path.write_text('min_k = 20\nmax_epsilon = "0.5"\nrefuse = ["secure_sum"]\n', "utf-8")
    veto = load_veto(path)
    assert veto == Veto(min_k=20, max_epsilon=Decimal("0.5"), refuse=frozenset({"secure_sum"}))
    assert veto.k(5) == 20 and veto.k(50) == 50
    veto.check("aggregate", Decimal("0.5"))
    veto.check("aggregate", None)
    refused("vetoed", lambda: veto.check("aggregate", Decimal("0.50001")))
    refused("vetoed", lambda: veto.check("secure_sum", None))
    refused("vetoed", lambda: veto.check("secure_sum", Decimal("0.1")))


# -- 10. witness cosignatures (a node that pinned a witness policy) -----------------------------

#: a fixed cosignature time: the node checks who cosigned, not when
COSIGNED_AT = 1_790_000_000
DISTRICTS = [NoteSigner(f"district-{i}.test/witness", SigningKey.generate()) for i in range(3)]
CITY = NoteSigner("city.test/witness", SigningKey.generate())
STRANGER = NoteSigner("stranger.test/witness", SigningKey.generate())


def _vkey(witness: NoteSigner) -> str:
    return NoteVerifier(
        witness.name, witness.key.public_key, signature_type=ALG_COSIGNATURE_V1
    ).to_verifier_key()


def _policy(log: Log, *, nested: bool = False) -> Policy:
    """2 of the three districts; ``nested``: the city's witness AND 2 of the districts."""
    text = f"log {log.signer.verifier_key()}\n" + "".join(
        f"witness d{i} {_vkey(w)}\n" for i, w in enumerate(DISTRICTS)
    )
    text += "group districts 2 d0 d1 d2\n"
    if nested:
        text += f"witness city {_vkey(CITY)}\ngroup both all city districts\nquorum both\n"
    else:
        text += "quorum districts\n"
    return parse_policy(text)


def _cosigned(bundle: dict[str, Any], *witnesses: NoteSigner) -> dict[str, Any]:
    note = bundle["checkpoint"]
    for witness in witnesses:
        note = cosign_checkpoint(note, witness, COSIGNED_AT)
    return {**bundle, "checkpoint": note}


def _forged(note: str, claimed: NoteSigner) -> str:
    """A cosignature line in ``claimed``'s name and key ID, signed by another key."""
    body = note[: note.rfind("\n\n") + 1].encode("utf-8")
    signature = SigningKey.generate().sign(b"cosignature/v1\ntime %d\n" % COSIGNED_AT + body)
    blob = claimed.cosignature_key_hash + COSIGNED_AT.to_bytes(8, "big") + signature
    return f"\u2014 {claimed.name} {b64_encode(blob)}\n"


def _witnessed(log: Log, bundle: dict[str, Any], policy: Policy) -> Verified:
    return verify_task_bundle(
        bundle,
        log=log.signer.verifier(),
        zone=ZONE,
        node=log.node.key_id,
        now=datetime.now(UTC),
        last=None,
        policy=policy,
    )


def test_a_checkpoint_needs_the_policys_quorum_of_genuine_cosignatures(log: Log) -> None:
    policy = _policy(log)
    task, bundle = log.authorized()
    assert log.verify(bundle).task == task  # no policy: the log's signature is enough
    detail = refused("unwitnessed", lambda: _witnessed(log, bundle, policy)).detail
    assert detail == (
        "quorum districts not met: group districts: 0 of 3 witnessed, 2 needed (missing d0, d1, d2)"
    )
    # too few
    one = _cosigned(bundle, DISTRICTS[0])
    assert "1 of 3 witnessed" in refused("unwitnessed", lambda: _witnessed(log, one, policy)).detail
    # a second line forged in d1's name (its key ID, another key) does not count
    forged = {**one, "checkpoint": one["checkpoint"] + _forged(one["checkpoint"], DISTRICTS[1])}
    detail = refused("unwitnessed", lambda: _witnessed(log, forged, policy)).detail
    assert "1 of 3 witnessed" in detail and "do not verify: d1" in detail
    # a genuine cosignature by a key outside the policy counts for nothing
    foreign = _cosigned(bundle, DISTRICTS[0], STRANGER)
    assert "1 of 3" in refused("unwitnessed", lambda: _witnessed(log, foreign, policy)).detail
    # d1's and d2's genuine cosignatures of ANOTHER checkpoint, replayed onto this one
    _, later = log.authorized()
    assert later["inclusion"]["size"] > bundle["inclusion"]["size"]
    other = _cosigned(later, DISTRICTS[1], DISTRICTS[2])["checkpoint"]
    lines = other[other.index("\n\n") + 2 :].splitlines(keepends=True)
    replayed = {**one, "checkpoint": one["checkpoint"] + "".join(lines[1:])}
    assert "1 of 3" in refused("unwitnessed", lambda: _witnessed(log, replayed, policy)).detail
    # two genuine: the task verifies, cosignature lines and all
    both = _cosigned(bundle, DISTRICTS[0], DISTRICTS[2], STRANGER)
    assert _witnessed(log, both, policy).task == task


def test_a_nested_quorum_needs_every_branch(log: Log) -> None:
    policy = _policy(log, nested=True)
    _, bundle = log.authorized()
    districts = _cosigned(bundle, DISTRICTS[0], DISTRICTS[1])
    detail = refused("unwitnessed", lambda: _witnessed(log, districts, policy)).detail
    assert detail == ("quorum both not met: group both: 1 of 2 witnessed, 2 needed (missing city)")
    city = _cosigned(bundle, CITY, DISTRICTS[2])
    detail = refused("unwitnessed", lambda: _witnessed(log, city, policy)).detail
    assert "group both: 1 of 2" in detail and "group districts: 1 of 3 witnessed" in detail
    _witnessed(log, _cosigned(bundle, CITY, DISTRICTS[1], DISTRICTS[2]), policy)


def test_the_witness_check_comes_after_the_log_signature_and_before_the_rest(log: Log) -> None:
    policy = _policy(log)
    # a checkpoint the pinned key never signed is bad whatever cosigns it
    _, bundle = log.authorized()
    real = log.verify(bundle).checkpoint
    fake = {**bundle, "checkpoint": log.sign(real.size, real.root, SigningKey.generate())}
    refused("bad_checkpoint", lambda: _witnessed(log, _cosigned(fake, *DISTRICTS), policy))
    # an unwitnessed checkpoint is refused before the task itself is looked at
    _, other_zone = log.authorized(zone="elsewhere")
    refused("unwitnessed", lambda: _witnessed(log, other_zone, policy))
    refused("wrong_zone", lambda: _witnessed(log, _cosigned(other_zone, *DISTRICTS), policy))
    # a policy for another log (even one pinned by mistake) refuses every checkpoint
    stranger_log = NoteSigner(log.origin, SigningKey.generate())
    foreign_policy = parse_policy(
        f"log {stranger_log.verifier_key()}\nwitness d0 {_vkey(DISTRICTS[0])}\nquorum d0\n"
    )
    detail = refused(
        "unwitnessed", lambda: _witnessed(log, _cosigned(bundle, *DISTRICTS), foreign_policy)
    ).detail
    assert "does not list the log" in detail


def test_the_node_applies_its_pinned_policy_and_fails_closed(
    log: Log, node_dir: Path, agent: Callable[[], NodeAgent]
) -> None:
    node = agent()
    text = f"log {log.signer.verifier_key()}\nwitness d0 {_vkey(DISTRICTS[0])}\nquorum d0\n"
    assert node.home.set_witness_policy(text.encode()) is not None
    assert (node_dir / "witness.policy").read_text() == text
    _, bundle = log.authorized()
    refused("unwitnessed", lambda: node.verify(bundle))
    node.verify(_cosigned(bundle, DISTRICTS[0]))
    # a damaged policy file stops the node from verifying anything (it never runs unwitnessed)
    (node_dir / "witness.policy").write_text("quorum nobody\n")
    _, later = log.authorized()
    with pytest.raises(ConfigurationError, match="witness policy"):
        node.verify(_cosigned(later, DISTRICTS[0]))
    # removed: the log's signature is enough again
    node.home.set_witness_policy(None)
    assert node.home.witness_policy() is None
    last = node.home.last_checkpoint()
    assert last is not None
    task = log.task()
    node.verify(log.bundle(task, log.authorize(task), since=last.size))


# -- 11. the exchange refuses answers not from the node, or too late -----------------------------


@dataclass
class Approved:
    """An approved node for zone ``tax`` on a live exchange, its key and a signed HTTP client."""

    server: LiveServer
    key: SigningKey
    provider: SigningKey


def approve(server: LiveServer) -> Approved:
    provider, key = SigningKey.generate(), SigningKey.generate()
    with server.client(server.operator) as op:
        op.register_principal("Tax Bureau", "agency", provider.public_key)
    with server.client(provider) as p:
        p.create_zone(ZONE, "tax records")
        p.request(
            "POST",
            "/v1/nodes",
            json={"zone": ZONE, "public_key": b64url_encode(key.public_key.raw)},
        )
    with server.client(server.operator) as op:
        op.request("POST", f"/v1/nodes/{key.key_id}/approve")
    return Approved(server, key, provider)


@pytest.fixture
def approved(server: LiveServer) -> Approved:
    return approve(server)


class Dispatched:
    """``exchange.server.dispatch.dispatch`` waiting in a thread, as a consumer's request would."""

    def __init__(self, ex: Exchange) -> None:
        with Session(ex.engine) as s:
            row = dispatch.node_for_zone(s, ZONE)
            assert row is not None
            s.expunge(row)
        self.outcome: object = None
        fields = {"consumer": "c" * 64, "purpose": "credit-assessment", "sql": SQL}

        def run() -> None:
            try:
                self.outcome = dispatch.dispatch(ex, row, "aggregate", fields)
            except Exception as exc:
                self.outcome = exc

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def join(self) -> object:
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        return self.outcome


BODY = {"result": {"columns": ["n"], "rows": [[240]]}, "sql": SQL, "k": 5, "epsilon": "1"}


def _claim(http: httpx.Client) -> dict[str, Any]:
    response = http.post("/v1/node/poll", json={"since": None, "wait": 5})
    assert response.status_code == 200, response.text
    bundle: dict[str, Any] = response.json()
    return bundle


def test_the_exchange_refuses_a_result_not_signed_by_the_node(approved: Approved) -> None:
    server = approved.server
    with httpx.Client(base_url=server.url, auth=SignatureAuth(approved.key), timeout=30) as http:
        assert http.post("/v1/node/poll", json={"wait": 0}).status_code == 204  # online
        waiting = Dispatched(server.exchange)
        bundle = _claim(http)
        task = bundle["task"]
        # the live exchange's bundle verifies at the node
        verify_task_bundle(
            bundle,
            log=server.log_verifier(),
            zone=ZONE,
            node=approved.key.key_id,
            now=datetime.now(UTC),
            last=None,
        )
        url = f"/v1/node/tasks/{task['id']}/outcome"

        def answer(envelope: Any) -> httpx.Response:
            return http.post(url, json={"result": envelope.model_dump(mode="json")})

        for forged in (
            sign_result(SigningKey.generate(), task, BODY),  # another key
            sign_result(approved.provider, task, BODY),  # the zone's provider, not its node
            sign_result(approved.key, {**task, "epsilon": "9"}, BODY),  # another task
        ):
            response = answer(forged)
            assert response.status_code == 422, response.text
            assert response.json()["reason"] == "bad_result"
        assert waiting.thread.is_alive()  # nothing was released
        assert answer(sign_result(approved.key, task, BODY)).status_code == 204
        result = waiting.join()
        assert isinstance(result, dispatch.NodeResult), result
        assert result.payload["task"] == task["id"]
        # answered once: a second answer is refused
        assert answer(sign_result(approved.key, task, BODY)).status_code == 409


def test_the_exchange_refuses_an_answer_to_a_terminated_task(approved: Approved) -> None:
    server = approved.server
    with httpx.Client(base_url=server.url, auth=SignatureAuth(approved.key), timeout=30) as http:
        assert http.post("/v1/node/poll", json={"wait": 0}).status_code == 204
        waiting = Dispatched(server.exchange)
        task = _claim(http)["task"]
        assert dispatch._terminate(server.exchange, task["id"], "deadline")
        assert isinstance(waiting.join(), ZoneUnavailableError)
        url = f"/v1/node/tasks/{task['id']}/outcome"
        late = http.post(
            url, json={"result": sign_result(approved.key, task, BODY).model_dump(mode="json")}
        )
        assert late.status_code == 409, late.text
        assert late.json()["code"] == "conflict"
        refusal = http.post(url, json={"refused": {"reason": "vetoed", "detail": "late"}})
        assert refusal.status_code == 409


def test_a_bundle_built_by_hand_matches_the_exchanges(log: Log) -> None:
    """The helper the tests forge from is the exchange's own format: rebuilt from the ledger
    with ``build_task_bundle``, the genuine bundle is identical."""
    task = log.task()
    seq = log.authorize(task)
    bundle = log.bundle(task, seq)
    size = bundle["inclusion"]["size"]
    rebuilt = build_task_bundle(
        task,
        log.ex.ledger.entry(seq),
        seq,
        size,
        log.ex.ledger.inclusion_proof(seq, size),
        bundle["checkpoint"],
    )
    assert rebuilt == bundle
