"""Backup and restore: a round trip on SQLite and PostgreSQL, and refusals of bad archives."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select, text
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.client.sdk import ApiError
from exchange.server.backup import BackupError, create_backup, restore_backup
from exchange.server.ledger import EntryDraft
from exchange.server.models import DatasetRow, PrincipalRow
from exchange.server.runtime import Exchange, init_data_dir
from tests.conftest import (
    L3_LEVELS,
    LiveServer,
    fresh_postgres_database,
    settings_for,
    tax_bureau_and_bank,
)


def cli(*args: str | Path) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(code: int, output: str, *expected: str) -> None:
    assert code != 0
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert lines[0].startswith("error:"), output
    for word in expected:
        assert word in lines[0], output


@pytest.fixture
def empty_database(database_url: str | None) -> Iterator[str | None]:
    """A second, empty database on the same backend to restore into (None: SQLite default)."""
    if database_url is None:
        yield None
        return
    with fresh_postgres_database("zonex_r_") as url:
        yield url


def populate(server: LiveServer) -> tuple[SigningKey, SigningKey]:
    provider, consumer = tax_bureau_and_bank(server, L3_LEVELS)
    with server.client(consumer) as c, pytest.raises(ApiError):
        c.request(
            "POST", "/v1/zones/tax/datasets/companies/export", json={"purpose": "credit-assessment"}
        )
    return provider, consumer


def test_backup_restore_round_trip(
    server: LiveServer, tmp_path: Path, empty_database: str | None
) -> None:
    provider, _ = populate(server)
    archive = tmp_path / "backup.tar.gz"
    # taken while the server runs
    code, output = cli("backup", "--data-dir", server.data_dir, "--out", archive)
    assert code == 0, output
    assert "private keys" in output
    assert os.stat(archive).st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert names[-1] == "manifest.json"
    for member in ("data/config.json", "data/log.key", "data/operator.key", "data/log.pub"):
        assert member in manifest["members"]
    assert "data/zones/tax/zone.key" in manifest["members"]
    assert "data/zones/tax/tables/companies.duckdb" in manifest["members"]
    assert manifest["ledger"]["size"] == manifest["ledger"]["checkpoint_size"]
    assert manifest["ledger"]["size"] >= 5
    kind = manifest["database"]["kind"]
    assert kind == ("sqlite-file" if empty_database is None else "tables-jsonl")
    backed_up = manifest["ledger"]["size"]

    # the exchange goes on after the backup; the restore shows the state as of the backup
    with server.client(server.operator) as op:
        op.register_principal("Late Corp", "enterprise", SigningKey.generate().public_key)

    target = tmp_path / "restored"
    trusted = tmp_path / "backup-checkpoint.txt"
    args = ["restore", archive, "--data-dir", target, "--checkpoint-out", trusted]
    if empty_database is not None:
        args += ["--database-url", empty_database]
    code, output = cli(*args)
    assert code == 0, output
    assert f"{backed_up} entries" in output
    assert os.stat(target).st_mode & 0o777 == 0o700
    assert os.stat(target / "log.key").st_mode & 0o777 == 0o600
    assert trusted.read_text() == manifest["ledger"]["checkpoint"]

    ex = Exchange(settings_for(target, checkpoint_interval_seconds=0.2))
    ex.start()
    try:
        assert ex.ledger.size() == backed_up
        with Session(ex.engine) as session:
            names_now = set(session.execute(select(PrincipalRow.name)).scalars())
            ds = session.execute(select(DatasetRow)).scalar_one()
        assert {"operator", "Tax Bureau", "City Bank"} <= names_now
        assert "Late Corp" not in names_now
        assert ex.zone_store("tax").describe("companies").digest == ds.digest
        # new appends continue the same chain
        for i in range(3):
            ex.ledger.append(EntryDraft(kind="test.after_restore", attrs={"i": i}))
        if ex.engine.dialect.name == "postgresql":  # serial keys continue after restored rows
            with ex.engine.connect() as conn:
                next_id = conn.execute(
                    text("SELECT nextval(pg_get_serial_sequence('datasets', 'id'))")
                ).scalar_one()
            assert next_id > ds.id
    finally:
        ex.close()

    bundle = tmp_path / "ledger.jsonl"
    code, output = cli("ledger", "export", "--data-dir", target, "--out", bundle)
    assert code == 0, output
    code, output = cli(
        "audit", "verify", bundle, "--log-key", target / "log.pub", "--trusted", trusted
    )
    assert code == 0, output
    assert f"{backed_up + 3} entries" in output
    assert "against the trusted checkpoint" in output

    restored = Exchange(settings_for(target))
    try:
        assert restored.ledger.size() == backed_up + 3
        with Session(restored.engine) as session:
            assert session.get(PrincipalRow, provider.key_id) is not None
    finally:
        restored.close()


@pytest.mark.postgres
def test_restore_refuses_a_non_empty_database(tmp_path: Path) -> None:
    with fresh_postgres_database("zonex_r_") as url:
        source = tmp_path / "source"
        init_data_dir(source, database_url=url)
        archive = tmp_path / "b.tar.gz"
        create_backup(settings_for(source), archive)
        # default target: the backed-up URL, which is in use
        code, output = cli("restore", archive, "--data-dir", tmp_path / "restored")
        assert_one_line_error(code, output, "not empty")
        assert not (tmp_path / "restored").exists()
        # a PostgreSQL backup restores into SQLite too
        code, output = cli(
            "restore",
            archive,
            "--data-dir",
            tmp_path / "lite",
            "--database-url",
            f"sqlite:///{tmp_path / 'lite-control.db'}",
        )
        assert code == 0, output


# -- refusals (SQLite; the archive checks do not depend on the backend) ---------------------


@pytest.fixture(scope="module")
def good_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("backup")
    init_data_dir(base / "source", origin="test.zonex/log")
    archive = base / "good.tar.gz"
    create_backup(settings_for(base / "source"), archive)
    return archive


def rewrite(
    archive: Path, out: Path, change: dict[str, bytes | None], extra: list[tarfile.TarInfo]
) -> None:
    """Copy ``archive`` changing member contents (None drops a member) and adding members."""
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for member in src:
            data = src.extractfile(member).read()  # type: ignore[union-attr]
            if member.name in change:
                replacement = change[member.name]
                if replacement is None:
                    continue
                data = replacement
                member.size = len(data)
            dst.addfile(member, io.BytesIO(data))
        for info in extra:
            dst.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)


def test_restore_refuses_a_corrupted_archive(good_archive: Path, tmp_path: Path) -> None:
    raw = bytearray(good_archive.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 64):
        raw[i] ^= 0xFF
    bad = tmp_path / "corrupt.tar.gz"
    bad.write_bytes(bytes(raw))
    target = tmp_path / "restored"
    code, output = cli("restore", bad, "--data-dir", target)
    assert_one_line_error(code, output, "damaged")
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["corrupt.tar.gz"]
    # truncated, and not an archive at all
    bad.write_bytes(good_archive.read_bytes()[:300])
    assert_one_line_error(*cli("restore", bad, "--data-dir", target))
    bad.write_bytes(b"hello")
    assert_one_line_error(*cli("restore", bad, "--data-dir", target), "damaged")
    assert not target.exists()


@pytest.mark.parametrize(
    "name",
    ["../escape", "data/../../escape", "/tmp/escape", "data/./x", "elsewhere/x"],
)
def test_restore_refuses_path_traversal(good_archive: Path, tmp_path: Path, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.size = 1
    bad = tmp_path / "traversal.tar.gz"
    rewrite(good_archive, bad, {}, [info])
    target = tmp_path / "sub" / "restored"
    target.parent.mkdir()
    code, output = cli("restore", bad, "--data-dir", target)
    assert_one_line_error(code, output, "refusing archive member")
    assert not (tmp_path / "escape").exists()
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


def test_restore_refuses_links(good_archive: Path, tmp_path: Path) -> None:
    link = tarfile.TarInfo("data/zones/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    bad = tmp_path / "link.tar.gz"
    rewrite(good_archive, bad, {}, [link])
    code, output = cli("restore", bad, "--data-dir", tmp_path / "restored")
    assert_one_line_error(code, output, "not a regular file")


def test_restore_refuses_digest_mismatch_and_unlisted_members(
    good_archive: Path, tmp_path: Path
) -> None:
    bad = tmp_path / "tampered.tar.gz"
    rewrite(good_archive, bad, {"data/config.json": b'{"origin": "evil/log"}\n'}, [])
    code, output = cli("restore", bad, "--data-dir", tmp_path / "r1")
    assert_one_line_error(code, output, "data/config.json", "digest")
    extra = tarfile.TarInfo("data/zones/planted.key")
    extra.size = 3
    rewrite(good_archive, bad, {}, [extra])
    code, output = cli("restore", bad, "--data-dir", tmp_path / "r2")
    assert_one_line_error(code, output, "not listed in the manifest")
    rewrite(good_archive, bad, {"data/log.key": None}, [])
    code, output = cli("restore", bad, "--data-dir", tmp_path / "r3")
    assert_one_line_error(code, output, "missing")
    rewrite(good_archive, bad, {"manifest.json": None}, [])
    code, output = cli("restore", bad, "--data-dir", tmp_path / "r4")
    assert_one_line_error(code, output, "no manifest")
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


def test_restore_refuses_a_non_empty_target(good_archive: Path, tmp_path: Path) -> None:
    target = tmp_path / "busy"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    code, output = cli("restore", good_archive, "--data-dir", target)
    assert_one_line_error(code, output, "not empty")
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    # an empty directory is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    info = restore_backup(good_archive, empty)
    assert info.ledger_size == 1
    assert (empty / "config.json").is_file()


def test_backup_refusals(good_archive: Path, tmp_path: Path) -> None:
    code, output = cli("backup", "--data-dir", tmp_path / "nothing", "--out", tmp_path / "x.tgz")
    assert_one_line_error(code, output, "not an initialized data directory")
    with pytest.raises(BackupError, match="refusing to overwrite"):
        source = good_archive.parent / "source"
        create_backup(settings_for(source), good_archive)
    with pytest.raises(BackupError, match="outside the data directory"):
        create_backup(settings_for(source), source / "inside.tgz")


def test_restore_leaves_target_untouched_when_the_ledger_does_not_verify(
    data_dir: Path, tmp_path: Path, empty_database: str | None
) -> None:
    """A consistent archive (digests recomputed) whose ledger was altered: the database is
    loaded, the audit fails, and the target directory and database are left empty."""
    archive = tmp_path / "b.tar.gz"
    create_backup(settings_for(data_dir), archive)
    work = tmp_path / "work"
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    forged = b'{"kind":"log.initialized","forged":true}'
    if (work / "db" / "control.db").exists():
        with sqlite3.connect(work / "db" / "control.db") as conn:
            conn.execute("UPDATE ledger_entries SET body = ? WHERE seq = 0", (forged,))
        conn.close()
        changed = "db/control.db"
    else:
        path = work / "db" / "tables" / "ledger_entries.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[0]["body"] = base64.b64encode(forged).decode()
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        changed = "db/tables/ledger_entries.jsonl"
    manifest = json.loads((work / "manifest.json").read_text())
    data = (work / changed).read_bytes()
    manifest["members"][changed] = {
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "mode": 0o600,
    }
    (work / "manifest.json").write_text(json.dumps(manifest))
    bad = tmp_path / "forged.tar.gz"
    with tarfile.open(bad, "w:gz") as tar:
        for name in [*manifest["members"], "manifest.json"]:
            tar.add(work / name, arcname=name)

    target = tmp_path / "restored"
    args = ["restore", bad, "--data-dir", target]
    if empty_database is not None:
        args += ["--database-url", empty_database]
    code, output = cli(*args)
    assert_one_line_error(code, output, "does not verify")
    assert not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".restored")]
    if empty_database is not None:
        engine = create_engine(empty_database)
        try:
            assert inspect(engine).get_table_names() == []
        finally:
            engine.dispose()
