"""Backup and restore of an exchange: control plane, zone stores, keys and configuration.

An archive is a gzip-compressed tar with three parts:

- ``data/...``: the data directory's files (``config.json``, ``operator.key``, ``log.key``, the
  public keys, every zone's ``zone.key``, subject salt and dataset files, registered HE contexts,
  staged uploads) with their permission bits. Transient state is left out: private-join
  sessions (``psi/`` and ``zones/*/psi/``, they expire within minutes anyway), query spill
  space, unfinished imports, the metrics directory.
- ``db/``: a consistent snapshot of the control-plane database.
  SQLite: ``db/control.db``, made with SQLite's online backup API, which copies a single
  read transaction's view page by page while writers continue (WAL), so the copy is exactly
  the database as of one commit.
  PostgreSQL: ``db/tables/<table>.jsonl``, one JSON object per row, read table by table inside
  one ``REPEATABLE READ`` transaction (one snapshot for all tables). We dump through
  SQLAlchemy rather than ``pg_dump`` because ``pg_dump`` must match the server's major version
  and may not be installed where zonex runs, and because a dump of our own tables restores
  through our own migrations into any supported database (a PostgreSQL backup restores into
  SQLite and back). Columns are encoded by their declared type (bytes as base64, times as
  RFC 3339).
- ``manifest.json`` (last): the format, the schema revision, the ledger size and the newest
  signed checkpoint in the snapshot, and the SHA-256 and size of every other member.

The database is snapshotted before the files are read; dataset files are immutable once
published and a dataset file registered after the snapshot is left out, so files and rows
agree. The manifest detects corruption; the ledger is authenticated by its signed checkpoints
(restore verifies the restored ledger against the manifest's checkpoint and ``log.pub``).
Keep the archive's SHA-256, printed by ``zonex backup``, apart from the archive if you need to
detect a wholesale substitution.

The archive holds every secret of the exchange (operator, log and zone keys, subject salts):
it is written with mode 0600; store it like the keys themselves.

Restore refuses a member path that is absolute or climbs out (``..``), anything but regular
files and directories, a member the manifest does not list or a digest that does not match,
and a non-empty target directory or database. It builds the new data directory next to the
target and moves it into place only after the restored ledger verifies; on any failure the
target is left as it was (a database it had begun to fill is emptied again).
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import hashlib
import json
import os
import shutil
import sqlite3
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path, PurePosixPath
from typing import IO, Any

from alembic import command
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, Table, create_engine, insert, inspect, select, text
from sqlalchemy import types as sqltypes
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from exchange.errors import ZonexError
from exchange.settings import CONFIG_FILE, Settings

__all__ = [
    "BackupError",
    "BackupInfo",
    "RestoreInfo",
    "create_backup",
    "restore_backup",
]

FORMAT = "zonex-backup-v1"
MANIFEST = "manifest.json"
DATA = "data/"
DB_FILE = "db/control.db"
DB_TABLES = "db/tables/"
#: data-directory entries that are transient or rebuilt (relative, POSIX)
SKIP_TOP = frozenset({"psi", "metrics"})
SKIP_NAMES = frozenset({"spill"})
CHUNK = 1 << 20
INSERT_BATCH = 1000


class BackupError(ZonexError):
    """A backup could not be made, or an archive was refused."""

    code = "backup_refused"
    status = 422
    title = "Backup refused"


@dataclass(frozen=True)
class BackupInfo:
    path: Path
    sha256: str
    members: int
    ledger_size: int
    checkpoint_size: int
    checkpoint: str


@dataclass(frozen=True)
class RestoreInfo:
    data_dir: Path
    database: str
    ledger_size: int
    checkpoint_size: int
    checkpoint: str


# -- backup ------------------------------------------------------------------------------------


def create_backup(settings: Settings, out: Path) -> BackupInfo:
    """Write a backup archive of the exchange at ``settings.data_dir`` to ``out`` (mode 0600).

    Safe while the exchange serves: it signs a checkpoint of what is committed, snapshots the
    database, then reads the files."""
    from crypto.note import NoteSigner
    from exchange.keyfile import load_private_key
    from exchange.server.ledger import Ledger
    from exchange.server.runtime import LOG_KEY
    from exchange.server.storage import create_control_engine

    data_dir = settings.data_dir.resolve()
    if not (data_dir / CONFIG_FILE).is_file():
        raise BackupError(f"{data_dir} is not an initialized data directory")
    out = out.resolve()
    if out == data_dir or data_dir in out.parents:
        raise BackupError("write the backup outside the data directory")
    if out.exists():
        raise BackupError(f"{out} exists; refusing to overwrite it")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent} is not a directory")
    url = settings.resolved_database_url
    engine = create_control_engine(url)
    try:
        signer = NoteSigner(settings.origin, load_private_key(data_dir / LOG_KEY))
        try:
            Ledger(engine, signer).checkpoint()  # the snapshot then holds a checkpoint of it all
        except SQLAlchemyError as exc:
            raise BackupError(f"the control-plane database is not reachable: {exc}") from exc
        with tempfile.TemporaryDirectory(prefix=".zonex-backup-", dir=out.parent) as work:
            workdir = Path(work)
            if engine.dialect.name == "sqlite":
                db_members, facts = _snapshot_sqlite(url, workdir)
            else:
                db_members, facts = _dump_tables(engine, workdir)
            files = list(_data_files(data_dir, url, facts["datasets"]))
            manifest: dict[str, Any] = {
                "format": FORMAT,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "database": {"kind": facts["kind"], "schema_revision": facts["revision"]},
                "ledger": {
                    "size": facts["size"],
                    "checkpoint_size": facts["checkpoint_size"],
                    "checkpoint": facts["checkpoint"],
                },
                "members": {},
            }
            partial = out.with_name(out.name + ".partial")
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as raw:
                    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                        for name, path in [*db_members, *files]:
                            entry = _add_file(tar, name, path)
                            if entry is not None:
                                manifest["members"][name] = entry
                        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
                        _add_bytes(tar, MANIFEST, body)
                    raw.flush()
                    os.fsync(raw.fileno())
                partial.replace(out)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
    finally:
        engine.dispose()
    return BackupInfo(
        path=out,
        sha256=_file_sha256(out),
        members=len(manifest["members"]),
        ledger_size=facts["size"],
        checkpoint_size=facts["checkpoint_size"],
        checkpoint=facts["checkpoint"],
    )


def _snapshot_sqlite(url: str, workdir: Path) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    source = make_url(url).database
    if not source:
        raise BackupError("cannot back up an in-memory database")
    snapshot = workdir / "control.db"
    try:
        src = sqlite3.connect(source, timeout=30)
        try:
            dst = sqlite3.connect(snapshot)
            try:
                src.backup(dst)  # one read transaction: the database as of one commit
                dst.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
            finally:
                dst.close()
        finally:
            src.close()
    except sqlite3.Error as exc:
        raise BackupError(f"the SQLite snapshot failed: {exc}") from exc
    engine = create_engine(f"sqlite:///{snapshot}")
    try:
        with engine.connect() as conn:
            facts = _facts(conn)
    finally:
        engine.dispose()
    facts["kind"] = "sqlite-file"
    return [(DB_FILE, snapshot)], facts


def _dump_tables(engine: Engine, workdir: Path) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    tables = _tables()
    members = []
    snapshot = engine.connect().execution_options(isolation_level="REPEATABLE READ")
    # one REPEATABLE READ transaction: every table as of the same snapshot
    with snapshot as conn, conn.begin():
        facts = _facts(conn)
        if facts["revision"] != _head_revision():
            raise BackupError(
                f"the database schema is at {facts['revision']}, this zonex expects "
                f"{_head_revision()}; start the exchange once to migrate, then back up"
            )
        present = set(inspect(conn).get_table_names()) - {"alembic_version"}
        unknown = present - {t.name for t in tables}
        if unknown:
            raise BackupError(f"unknown tables in the database: {', '.join(sorted(unknown))}")
        for table in tables:
            path = workdir / f"{table.name}.jsonl"
            with path.open("w", encoding="utf-8") as f:
                for row in conn.execute(select(table)).mappings():
                    encoded = {c.name: _encode(row[c.name]) for c in table.columns}
                    f.write(json.dumps(encoded, sort_keys=True, ensure_ascii=False) + "\n")
            members.append((f"{DB_TABLES}{table.name}.jsonl", path))
    facts["kind"] = "tables-jsonl"
    return members, facts


def _facts(conn: Connection) -> dict[str, Any]:
    """Ledger size, newest checkpoint, schema revision and embedded datasets of a snapshot."""
    from exchange.server.models import CheckpointRow, DatasetRow, LedgerHeadRow

    revision = MigrationContext.configure(conn).get_current_revision()
    head = conn.execute(select(LedgerHeadRow.size).where(LedgerHeadRow.id == 1)).scalar()
    cp = conn.execute(
        select(CheckpointRow.size, CheckpointRow.note).order_by(CheckpointRow.size.desc()).limit(1)
    ).first()
    datasets = {
        (zone, name)
        for zone, name in conn.execute(
            select(DatasetRow.zone, DatasetRow.name).where(DatasetRow.source == "import")
        )
    }
    return {
        "revision": revision,
        "size": int(head or 0),
        "checkpoint_size": int(cp[0]) if cp else 0,
        "checkpoint": str(cp[1]) if cp else "",
        "datasets": datasets,
    }


def _data_files(
    data_dir: Path, url: str, datasets: set[tuple[str, str]]
) -> Iterator[tuple[str, Path]]:
    from exchange.node.store import TABLE_SUFFIX, TEMP_PREFIX

    parsed = make_url(url)
    db_path = (
        Path(parsed.database).resolve()
        if parsed.get_backend_name() == "sqlite" and parsed.database
        else None
    )
    for root, dirs, names in os.walk(data_dir, followlinks=False):
        here = Path(root)
        rel_dir = here.relative_to(data_dir)
        parts = rel_dir.parts
        dirs[:] = sorted(
            d
            for d in dirs
            if not (not parts and d in SKIP_TOP)
            and d not in SKIP_NAMES
            and not (len(parts) == 2 and parts[0] == "zones" and d == "psi")
        )
        for name in sorted(names):
            path = here / name
            if not path.is_file() or path.is_symlink():
                continue
            if (
                db_path is not None
                and path.resolve().parent == db_path.parent
                and name.startswith(db_path.name)  # the database and its -wal, -shm, -journal
            ):
                continue
            if name.endswith(".partial") or name.startswith(TEMP_PREFIX):
                continue
            if (
                len(parts) == 3
                and parts[0] == "zones"
                and parts[2] == "tables"
                and name.endswith(TABLE_SUFFIX)
                and (parts[1], name[: -len(TABLE_SUFFIX)]) not in datasets
            ):
                continue  # published after the snapshot: not in this backup's catalog
            yield DATA + (rel_dir / name).as_posix().removeprefix("./"), path


class _HashingReader:
    def __init__(self, raw: IO[bytes]) -> None:
        self.raw = raw
        self.digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> dict[str, Any] | None:
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return None  # removed since the walk (a staged upload that was just registered)
    with f:
        st = os.fstat(f.fileno())
        info = tarfile.TarInfo(name)
        info.size = st.st_size
        info.mode = st.st_mode & 0o700 or 0o600
        info.mtime = int(st.st_mtime)
        reader = _HashingReader(f)
        tar.addfile(info, reader)
    return {"sha256": reader.digest.hexdigest(), "size": info.size, "mode": info.mode}


def _add_bytes(tar: tarfile.TarFile, name: str, body: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(body)
    info.mode = 0o600
    info.mtime = int(time.time())
    tar.addfile(info, io.BytesIO(body))


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


# -- restore -----------------------------------------------------------------------------------


def restore_backup(
    archive: Path, data_dir: Path, *, database_url: str | None = None
) -> RestoreInfo:
    """Restore ``archive`` into ``data_dir`` (new or empty) and the database ``database_url``
    (default: the backed-up configuration's database, else SQLite inside ``data_dir``).

    The restored ledger is verified offline against the archive's signed checkpoint before
    the new data directory is moved into place."""
    target = data_dir.resolve()
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise BackupError(f"{target} is not empty; restore only into a new or empty directory")
    if not target.parent.is_dir():
        raise BackupError(f"{target.parent} does not exist")
    if not archive.is_file():
        raise BackupError(f"{archive}: no such file")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restore-", dir=target.parent))
    cleanup: list[Callable[[], None]] = []
    try:
        manifest = _extract(archive, staging)
        new_dir = staging / DATA.rstrip("/")
        if not (new_dir / CONFIG_FILE).is_file():
            raise BackupError(f"the archive has no {DATA}{CONFIG_FILE}")
        config = json.loads((new_dir / CONFIG_FILE).read_text("utf-8"))
        url = database_url or config.get("database_url")
        kind = manifest["database"]["kind"]
        if url is None and kind == "sqlite-file":
            (staging / DB_FILE).replace(new_dir / "control.db")
            shown = "SQLite (in the data directory)"
        else:
            target_url = url or f"sqlite:///{new_dir / 'control.db'}"
            rows = (
                _rows_from_snapshot(staging / DB_FILE)
                if kind == "sqlite-file"
                else _rows_from_jsonl(staging / DB_TABLES.rstrip("/"))
            )
            _load(target_url, manifest["database"]["schema_revision"], rows, cleanup)
            shown = make_url(target_url).render_as_string(hide_password=True)
        if url != config.get("database_url"):
            if url is None:
                config.pop("database_url", None)
            else:
                config["database_url"] = url
            (new_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", "utf-8")
        size = _verify_restored(new_dir, url, manifest, staging)
        os.chmod(new_dir, 0o700)
        if target.exists():
            target.rmdir()
        new_dir.rename(target)
        cleanup.clear()
    except BackupError:
        _undo(cleanup)
        raise
    except (OSError, SQLAlchemyError, ValueError, KeyError, TypeError) as exc:
        _undo(cleanup)
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise BackupError(f"restore failed: {first}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    ledger = manifest["ledger"]
    return RestoreInfo(
        data_dir=target,
        database=shown,
        ledger_size=size,
        checkpoint_size=int(ledger["checkpoint_size"]),
        checkpoint=str(ledger["checkpoint"]),
    )


def _undo(cleanup: list[Callable[[], None]]) -> None:
    for action in reversed(cleanup):
        # best effort: the original error is what the caller needs to see
        with contextlib.suppress(Exception):
            action()


def _member_path(name: str) -> PurePosixPath:
    """The member's relative path, or :class:`BackupError` for anything that could escape."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        raise BackupError(f"refusing archive member {name!r}: not a plain relative path")
    path = PurePosixPath(name)
    raw_parts = name.rstrip("/").split("/")
    if path.is_absolute() or any(p in ("..", ".", "") for p in raw_parts) or ":" in raw_parts[0]:
        raise BackupError(f"refusing archive member {name!r}: the path leaves the archive")
    if not (name == MANIFEST or name.startswith(DATA) or name.startswith("db/")):
        raise BackupError(f"refusing archive member {name!r}: not part of a zonex backup")
    return path


def _extract(archive: Path, staging: Path) -> dict[str, Any]:
    """Extract into ``staging`` after checking every name; verify against the manifest."""
    # the whole gzip stream first: tarfile stops quietly at a damaged header past the first
    try:
        with gzip.open(archive, "rb") as stream:
            while stream.read(CHUNK):
                pass
    except (OSError, EOFError, zlib.error) as exc:
        raise BackupError(f"{archive} is damaged or not a backup archive: {exc}") from exc
    seen: dict[str, tuple[str, int, int]] = {}
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            for member in tar:
                rel = _member_path(member.name)
                if member.isdir():
                    continue
                if not member.isfile():
                    raise BackupError(
                        f"refusing archive member {member.name!r}: not a regular file"
                    )
                if member.name in seen:
                    raise BackupError(f"archive member {member.name!r} appears twice")
                dest = staging.joinpath(*rel.parts)
                if staging.resolve() not in dest.resolve().parents:
                    raise BackupError(f"refusing archive member {member.name!r}")
                dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                source = tar.extractfile(member)
                assert source is not None
                digest = hashlib.sha256()
                fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    while chunk := source.read(CHUNK):
                        digest.update(chunk)
                        f.write(chunk)
                seen[member.name] = (digest.hexdigest(), member.size, member.mode)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise BackupError(f"{archive} is damaged or not a backup archive: {exc}") from exc
    if MANIFEST not in seen:
        raise BackupError(f"{archive} has no manifest; not a zonex backup")
    try:
        manifest = json.loads((staging / MANIFEST).read_text("utf-8"))
        members: dict[str, dict[str, Any]] = manifest["members"]
        if manifest["format"] != FORMAT:
            raise BackupError(f"unsupported backup format {manifest['format']!r}")
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{archive}: the manifest is unreadable") from exc
    del seen[MANIFEST]
    for name in sorted(set(seen) | set(members)):
        if name not in members:
            raise BackupError(f"archive member {name!r} is not listed in the manifest")
        if name not in seen:
            raise BackupError(f"archive member {name!r} listed in the manifest is missing")
        got, size, _mode = seen[name]
        if got != members[name]["sha256"] or size != members[name]["size"]:
            raise BackupError(f"archive member {name!r} does not match its manifest digest")
        mode = int(members[name].get("mode", 0o600)) & 0o700
        os.chmod(staging / name, mode or 0o600)
    return dict(manifest)


def _tables() -> list[Table]:
    import exchange.server.models
    import exchange.server.policystore  # noqa: F401 - registers the policy tables
    from exchange.server.db import Base

    return list(Base.metadata.sorted_tables)


def _head_revision() -> str | None:
    from alembic.config import Config

    from exchange.server.storage import MIGRATIONS

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(cfg).get_current_head()


RowBatches = Iterator[tuple[Table, list[dict[str, Any]]]]


def _rows_from_jsonl(directory: Path) -> RowBatches:
    for table in _tables():
        path = directory / f"{table.name}.jsonl"
        if not path.is_file():
            raise BackupError(f"the archive has no dump of table {table.name}")
        batch: list[dict[str, Any]] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                raw = json.loads(line)
                batch.append({c.name: _decode(c.type, raw.get(c.name)) for c in table.columns})
                if len(batch) >= INSERT_BATCH:
                    yield table, batch
                    batch = []
        if batch:
            yield table, batch


def _rows_from_snapshot(path: Path) -> RowBatches:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            for table in _tables():
                batch: list[dict[str, Any]] = []
                for row in conn.execute(select(table)).mappings():
                    batch.append(dict(row))
                    if len(batch) >= INSERT_BATCH:
                        yield table, batch
                        batch = []
                if batch:
                    yield table, batch
    finally:
        engine.dispose()


def _load(
    url: str, revision: str | None, rows: RowBatches, cleanup: list[Callable[[], None]]
) -> None:
    """Create the schema at the backup's revision in an empty database, load, migrate."""
    from exchange.server.storage import alembic_config, create_control_engine, migrate

    if revision is None:
        raise BackupError("the backup does not name its schema revision")
    engine = create_control_engine(url)
    try:
        existing = inspect(engine).get_table_names()
        if existing:
            raise BackupError("the target database is not empty; restore into an empty database")

        def drop_all() -> None:
            tables = _tables()
            with engine.begin() as conn:
                for table in reversed(tables):
                    table.drop(conn, checkfirst=True)
                conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
            engine.dispose()

        cleanup.append(drop_all)
        command.upgrade(alembic_config(engine), revision)
        with engine.begin() as conn:
            for table in reversed(_tables()):  # rows the migrations seeded; the backup has them
                conn.execute(table.delete())
            for table, batch in rows:
                conn.execute(insert(table), batch)
            if engine.dialect.name == "postgresql":
                _reset_sequences(conn)
        migrate(engine)
    finally:
        engine.dispose()


def _reset_sequences(conn: Connection) -> None:
    """Serial primary keys continue after the restored rows (PostgreSQL)."""
    for table in _tables():
        pk = list(table.primary_key.columns)
        if len(pk) != 1 or not isinstance(pk[0].type, sqltypes.Integer):
            continue
        if pk[0].autoincrement is False:
            continue
        seq = conn.execute(
            text("SELECT pg_get_serial_sequence(:t, :c)"), {"t": table.name, "c": pk[0].name}
        ).scalar()
        if seq:
            conn.execute(
                text(
                    f'SELECT setval(:s, COALESCE((SELECT MAX("{pk[0].name}") FROM "{table.name}"),'
                    " 0) + 1, false)"
                ),
                {"s": seq},
            )


def _verify_restored(
    new_dir: Path, url: str | None, manifest: dict[str, Any], staging: Path
) -> int:
    """Open the restored exchange and audit its ledger against the backup's checkpoint."""
    from crypto.note import NoteVerifier
    from exchange.audit import check_bundle, read_bundle_lines
    from exchange.server.ledger import write_export
    from exchange.server.runtime import LOG_PUB, Exchange

    settings = Settings.from_data_dir(new_dir, database_url=url)
    if url is None:
        settings = settings.model_copy(update={"database_url": None})
    ex = Exchange(settings)
    try:
        size = ex.ledger.size()
        expected = int(manifest["ledger"]["size"])
        if size != expected:
            raise BackupError(
                f"the restored ledger has {size} entries, the manifest says {expected}"
            )
        bundle = staging / "ledger-check.jsonl"
        write_export(ex.ledger, bundle)
    finally:
        ex.close()
    verifier = NoteVerifier.from_verifier_key((new_dir / LOG_PUB).read_text("utf-8").strip())
    trusted = manifest["ledger"]["checkpoint"] or None
    report = check_bundle(read_bundle_lines(bundle), verifier, trusted)
    if not report.ok:
        raise BackupError(f"the restored ledger does not verify: {report.fault}")
    return size


# -- column encoding for the table dump ------------------------------------------------------


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def _decode(kind: sqltypes.TypeEngine[Any], value: Any) -> Any:
    if value is None:
        return None
    impl = kind.impl if isinstance(kind, sqltypes.TypeDecorator) else kind
    if isinstance(impl, sqltypes.LargeBinary):
        return base64.b64decode(value)
    if isinstance(impl, sqltypes.DateTime):
        moment = datetime.fromisoformat(value)
        return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    if isinstance(impl, sqltypes.Date):
        return date.fromisoformat(value)
    if isinstance(impl, sqltypes.Numeric) and not isinstance(impl, sqltypes.Float):
        return Decimal(value) if isinstance(value, str) else value
    return value
