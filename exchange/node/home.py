"""A zone node's data directory: its key, its configuration, its store, and what it has seen.

::

    NODE_DIR/
      node.key        the node's Ed25519 key (0600); its public half is registered for the zone
      node.json       {"zone", "exchange", "log_key", "key_id"}: where it dials, what it trusts
      veto.toml       the provider's local veto rules (optional; see exchange.node.engine.Veto)
      witness.policy  the witness policy the provider pinned (optional, C2SP tlog-policy): a
                      task's checkpoint must carry cosignatures meeting its quorum
      catalog.json    the datasets this node hosts: columns, levels, subject column, snapshot
                      digest, and where the rows are (imported here, or an attached URL that
                      never leaves this machine)
      state.json      the last checkpoint the node accepted and the tasks it has answered,
                      as of the last compaction
      answered.log    what the node accepted since: one JSON line per task (its id, deadline
                      and, if newer, the checkpoint), appended before the task runs; folded
                      into state.json when the node opens the directory, closes it, or the
                      log outgrows the tasks still in their deadline window
      store/          the embedded DuckDB store of imported datasets
      subject.salt    the zone's subject secret (0600, created on first use): its consent
                      digests and export pseudonyms are keyed from it (exchange.subjects)
      xborder/subject.salt  the secret of its cross-border subject digests (exchange.node.export)

Files are written to a temporary name and renamed, so a crash never leaves half a file
(answered.log is appended to: a line cut short by a crash is the last one, and is ignored).
The local rules and the catalog are parsed again whenever their file changes (its inode,
size, modification or change time); a file modified in the last two seconds is always read.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import TableClause, column, table
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from crypto.errors import EncodingError, VerificationError
from crypto.keys import SigningKey
from crypto.note import Checkpoint, NoteVerifier, verify_checkpoint
from crypto.tlogpolicy import MAX_POLICY_BYTES, Policy, PolicyError, parse_policy
from exchange.errors import ConfigurationError, InvalidInputError
from exchange.keyfile import load_private_key, write_private_key, write_public_key
from exchange.node.engine import Veto, load_veto
from exchange.node.store import ZoneStore, ZoneStoreError, attach
from exchange.tasks import parse_time

__all__ = ["NodeHome", "check_witness_policy", "init_node_dir"]

NODE_KEY = "node.key"
NODE_PUB = "node.pub"
CONFIG = "node.json"
CATALOG = "catalog.json"
STATE = "state.json"
JOURNAL = "answered.log"
VETO = "veto.toml"
WITNESS_POLICY = "witness.policy"

VETO_TEMPLATE = """\
# Local veto rules: this node applies them on top of the exchange's analysis rules, before it
# reads a row. They can only make releases stricter. Uncomment to use.
# min_k = 20                 # no group smaller than this, whatever the exchange's rules say
# max_epsilon = "0.5"        # the largest epsilon one task may spend on this node
# refuse = ["secure_sum"]    # task kinds never run here (aggregate, secure_sum, psi_zone,
#                            # psi_epoch_prepare, psi_epoch_answer, he_score, export)
"""


#: the journal is folded into state.json once it has this many lines more than the tasks
#: still in their deadline window (so each task costs one appended line, amortized)
JOURNAL_SLACK = 4096

#: a file modified this recently (ns) is read again even if its stamp did not change: an
#: edit within the file system's timestamp granularity could leave size and times unchanged
RACY_NS = 2_000_000_000

_T = TypeVar("_T")


def own(url: str) -> str:
    """The prefix that admits exactly ``url``: on its own node, a provider may attach any table
    of its own databases (the exchange's operator-set prefixes do not apply here)."""
    try:
        return make_url(url).render_as_string(hide_password=False)
    except (ArgumentError, ValueError, TypeError) as exc:
        raise InvalidInputError("not a database URL") from exc


def _write_bytes(path: Path, data: bytes, *, durable: bool = False) -> None:
    """Replace ``path`` with ``data`` atomically; ``durable``: synced (file, then directory)
    before returning, for a write that something deleted next depends on."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
    with open(tmp, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if durable:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_json(path: Path, data: Any, *, durable: bool = False) -> None:
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    _write_bytes(path, text.encode("utf-8"), durable=durable)


def check_witness_policy(text: bytes, log: NoteVerifier) -> Policy:
    """A witness policy a node can pin: it parses and lists the node's log (name and key);
    :class:`ConfigurationError` naming the fault otherwise."""
    if len(text) > MAX_POLICY_BYTES:
        raise ConfigurationError(f"the witness policy is larger than {MAX_POLICY_BYTES} bytes")
    try:
        policy = parse_policy(text)
    except PolicyError as exc:
        raise ConfigurationError(f"the witness policy: {exc}") from exc
    if not policy.lists_log(log):
        raise ConfigurationError(
            f"the witness policy does not list this node's log ({log.name}, key "
            f"{log.to_verifier_key()}): add a `log` line with that key"
        )
    return policy


def init_node_dir(
    data_dir: Path,
    *,
    zone: str,
    exchange: str,
    log_key: str,
    key: SigningKey | None = None,
    witness_policy: bytes | None = None,
) -> SigningKey:
    """Lay out a new node directory; refuses an initialized one. Returns the node's key.

    ``witness_policy`` (a tlog-policy file's bytes) is checked with
    :func:`check_witness_policy` before anything is written, and pinned."""
    try:
        log = NoteVerifier.from_verifier_key(log_key)
    except (EncodingError, ValueError) as exc:
        raise ConfigurationError(f"the exchange's log key is not a verifier key: {exc}") from exc
    if witness_policy is not None:
        check_witness_policy(witness_policy, log)
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    if (data_dir / CONFIG).exists():
        raise ConfigurationError(f"{data_dir} is already a node directory")
    key = key or SigningKey.generate()
    if not (data_dir / NODE_KEY).exists():
        write_private_key(data_dir / NODE_KEY, key)
        write_public_key(data_dir / NODE_PUB, key.public_key)
    (data_dir / "store").mkdir(exist_ok=True)
    if not (data_dir / VETO).exists():
        (data_dir / VETO).write_text(VETO_TEMPLATE, "utf-8")
    _write_json(data_dir / CATALOG, {"datasets": {}})
    _write_json(data_dir / STATE, {"checkpoint": None, "answered": {}})
    if witness_policy is not None:
        _write_bytes(data_dir / WITNESS_POLICY, witness_policy)
    # written last: its presence marks a complete initialization
    _write_json(
        data_dir / CONFIG,
        {
            "zone": zone,
            "exchange": exchange,
            "log_key": log.to_verifier_key(),
            "key_id": key.key_id,
        },
    )
    return key


@dataclass(frozen=True)
class HostedDataset:
    """One dataset as the node keeps it (the rows, or where they are, never leave the node)."""

    name: str
    subject_column: str
    columns: tuple[dict[str, str], ...]
    digest: str
    row_count: int
    source: str  # "import" | "attach"
    attach_url: str | None = None
    attach_table: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "subject_column": self.subject_column,
            "columns": list(self.columns),
            "digest": self.digest,
            "row_count": self.row_count,
            "source": self.source,
            "attach_url": self.attach_url,
            "attach_table": self.attach_table,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HostedDataset:
        return cls(
            name=data["name"],
            subject_column=data["subject_column"],
            columns=tuple(data["columns"]),
            digest=data["digest"],
            row_count=int(data["row_count"]),
            source=data["source"],
            attach_url=data.get("attach_url"),
            attach_table=data.get("attach_table"),
        )


class NodeHome:
    """An initialized node directory, opened by one process."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        config_path = data_dir / CONFIG
        if not config_path.is_file():
            raise ConfigurationError(
                f"{data_dir} is not a node directory; run: zonex node init --data-dir {data_dir} "
                "--zone ZONE --url EXCHANGE_URL --key PROVIDER_KEY"
            )
        try:
            config = json.loads(config_path.read_text("utf-8"))
            self.zone: str = config["zone"]
            self.exchange: str = config["exchange"]
            self.log = NoteVerifier.from_verifier_key(config["log_key"])
        except (ValueError, KeyError, EncodingError) as exc:
            raise ConfigurationError(f"{config_path} is damaged: {exc}") from exc
        self.key = load_private_key(data_dir / NODE_KEY)
        self._lock = threading.Lock()
        self._store: ZoneStore | None = None
        self._seen: dict[str, Any] | None = None
        self._last: Checkpoint | None = None
        self._journaled = 0  # lines in the journal since the last compaction
        self._files: dict[str, tuple[tuple[int, ...], Any]] = {}
        self._files_lock = threading.Lock()

    @property
    def key_id(self) -> str:
        return self.key.key_id

    # -- files read per task ------------------------------------------------------------------

    def _parsed(self, name: str, parse: Callable[[Path], _T], absent: _T) -> _T:
        """``parse(path)`` of the file ``name`` as it is now, or ``absent`` if there is none:
        parsed again only when its stamp changed (or it was modified within ``RACY_NS``), so
        an edit applies to the next task without every task paying for a parse."""
        path = self.dir / name
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return absent
        except OSError as exc:
            raise ConfigurationError(f"{path}: {exc}") from exc
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        racy = time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS
        with self._files_lock:
            found = self._files.get(name)
        if found is not None and found[0] == stamp and not racy:
            value: _T = found[1]
            return value
        value = parse(path)  # stamped before the read: a change while reading reads again
        with self._files_lock:
            if racy:
                self._files.pop(name, None)
            else:
                self._files[name] = (stamp, value)
        return value

    # -- local rules --------------------------------------------------------------------------

    def veto(self) -> Veto:
        """The veto rules as the file says now (an edit applies to the next task)."""
        try:
            return self._parsed(VETO, load_veto, Veto())
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from exc

    # -- the witness policy -------------------------------------------------------------------

    def witness_policy(self) -> Policy | None:
        """The pinned witness policy, or ``None`` (a change applies to the next task). A file
        that no longer parses or lists the log raises :class:`ConfigurationError`: the node
        fails closed rather than run tasks unwitnessed."""

        def parse(path: Path) -> Policy | None:
            try:
                text = path.read_bytes()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise ConfigurationError(f"{path}: {exc}") from exc
            return check_witness_policy(text, self.log)

        return self._parsed(WITNESS_POLICY, parse, None)

    def set_witness_policy(self, text: bytes | None) -> Policy | None:
        """Pin ``text`` as the witness policy (checked first; replaces any), or with ``None``
        remove it. Returns the policy now in force."""
        path = self.dir / WITNESS_POLICY
        with self._lock:
            if text is None:
                path.unlink(missing_ok=True)
                return None
            policy = check_witness_policy(text, self.log)
            _write_bytes(path, text)
            return policy

    # -- datasets -----------------------------------------------------------------------------

    @property
    def store(self) -> ZoneStore:
        with self._lock:
            if self._store is None:
                self._store = ZoneStore(self.dir / "store")
            return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None
            if self._seen is not None and self._journaled:
                self._compact(self._seen)

    def datasets(self) -> dict[str, HostedDataset]:
        """The hosted datasets as catalog.json says now."""

        def parse(path: Path) -> dict[str, HostedDataset]:
            data = json.loads(path.read_text("utf-8"))
            return {n: HostedDataset.from_json(d) for n, d in data["datasets"].items()}

        none: dict[str, HostedDataset] = {}
        return dict(self._parsed(CATALOG, parse, none))

    def add_dataset(self, dataset: HostedDataset) -> None:
        with self._lock:
            data = json.loads((self.dir / CATALOG).read_text("utf-8"))
            data["datasets"][dataset.name] = dataset.to_json()
            _write_json(self.dir / CATALOG, data)

    def remove_dataset(self, name: str) -> None:
        with self._lock:
            data = json.loads((self.dir / CATALOG).read_text("utf-8"))
            data["datasets"].pop(name, None)
            _write_json(self.dir / CATALOG, data)

    @contextmanager
    def source(self, dataset: HostedDataset) -> Iterator[tuple[Any, TableClause, str]]:
        """(engine, relation, dialect) to read ``dataset`` where it lives."""
        names = [c["name"] for c in dataset.columns]
        if dataset.source == "import":
            relation = table(dataset.name, *(column(n) for n in names))
            yield self.store.engine, relation, "duckdb"
            return
        assert dataset.attach_url is not None and dataset.attach_table is not None
        try:
            attached = attach(
                dataset.attach_url,
                dataset.attach_table,
                allowed_prefixes=(own(dataset.attach_url),),
            )
        except ZoneStoreError as exc:
            raise InvalidInputError(f"the attached table is unavailable: {exc}") from exc
        try:
            relation = table(attached.table, *(column(n) for n in names), schema=attached.schema)
            yield attached.engine, relation, attached.engine.dialect.name
        finally:
            attached.close()

    # -- what the node has seen ---------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """What the node has seen: state.json and the journal after it, read once (and
        compacted) when first needed, then written through (one process owns the directory;
        every change is on disk before the task it concerns runs)."""
        if self._seen is None:
            seen: dict[str, Any] = json.loads((self.dir / STATE).read_text("utf-8"))
            seen["answered"] = dict(seen.get("answered") or {})
            journaled = self._replay(seen)
            note = seen.get("checkpoint")
            if note is not None:
                try:
                    self._last = verify_checkpoint(note, self.log)
                except (VerificationError, EncodingError) as exc:
                    raise ConfigurationError(
                        f"{self.dir / STATE}: the stored checkpoint: {exc}"
                    ) from exc
            if journaled:
                self._compact(seen)
            self._seen = seen
        return self._seen

    def _replay(self, seen: dict[str, Any]) -> int:
        """Apply the journal's lines to ``seen``; returns how many there were. Only a last
        line cut short (no newline) is skipped: anything else unreadable fails closed."""
        path = self.dir / JOURNAL
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return 0
        lines = data.split(b"\n")
        for number, line in enumerate(lines[:-1], 1):  # lines[-1]: after the last newline
            try:
                record = json.loads(line)
                task_id, deadline = str(record["task"]), str(record["deadline"])
                note = record.get("checkpoint")
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigurationError(f"{path}: line {number} is damaged") from exc
            seen["answered"][task_id] = deadline
            if note is not None:
                seen["checkpoint"] = str(note)
        # a cut line counts: compacting removes it before anything is appended after it
        return len(lines) - 1 + (1 if lines[-1] else 0)

    def _compact(self, seen: dict[str, Any]) -> None:
        """Fold the journal into state.json, dropping tasks whose deadline has passed: the
        new state.json is in place before the journal is emptied (a crash between the two
        replays the same lines again, to the same state)."""
        now = datetime.now(UTC)
        seen["answered"] = {t: d for t, d in seen["answered"].items() if _still_due(d, now)}
        _write_json(self.dir / STATE, seen, durable=True)
        with open(self.dir / JOURNAL, "wb"):
            pass
        self._journaled = 0

    def last_checkpoint(self) -> Checkpoint | None:
        with self._lock:
            self._state()
            return self._last

    def answered(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._state().get("answered", {})

    def accept(self, checkpoint: Checkpoint, note: str, task_id: str, deadline: str) -> None:
        """Remember a verified checkpoint (if newer) and a task as answered, before the task
        runs: the same task is never run twice, even across a restart."""
        with self._lock:
            state = self._state()
            record: dict[str, Any] = {"task": task_id, "deadline": deadline}
            newer = self._last is None or checkpoint.size >= self._last.size
            if newer:
                record["checkpoint"] = note
            line = (json.dumps(record, separators=(",", ":")) + "\n").encode("utf-8")
            # one write of one line, on disk (as far as the OS is concerned) before the task runs
            fd = os.open(self.dir / JOURNAL, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                if os.write(fd, line) != len(line):
                    raise ConfigurationError(f"{self.dir / JOURNAL}: short write")
            finally:
                os.close(fd)
            state["answered"][task_id] = deadline
            if newer:
                state["checkpoint"] = note
                self._last = checkpoint
            self._journaled += 1
            if self._journaled > JOURNAL_SLACK + len(state["answered"]) // 2:
                self._compact(state)


def _still_due(deadline: str, now: datetime) -> bool:
    """Keep a task's id until its deadline has passed (after it, the bundle is refused as
    expired anyway); an unreadable deadline is kept, never dropped."""
    try:
        return parse_time(deadline) > now
    except ValueError:
        return True
