"""A ledger exported by several processes is byte for byte the one-process export."""

from __future__ import annotations

from pathlib import Path

import pytest

from crypto.note import NoteVerifier
from exchange.audit import check_bundle, read_bundle_lines
from exchange.server import ledger as ledger_module
from exchange.server.ledger import EntryDraft, write_export
from exchange.server.runtime import Exchange


def _fill(ex: Exchange, count: int) -> None:
    drafts = [
        EntryDraft(
            kind="catalog.read",
            actor="ab" * 32,
            digests={"catalog": f"{i:064x}"},
            # entries of different lengths: the ranges' byte offsets are not multiples
            attrs={"registry_version": i, "pad": "x" * (i % 37)},
        )
        for i in range(count)
    ]
    for at in range(0, count, 250):
        ex.ledger.append_batch_sync(drafts[at : at + 250])
        if at % 500 == 0:
            ex.ledger.checkpoint()


def test_a_parallel_export_is_the_same_bytes(
    exchange: Exchange, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(exchange, 1_001)
    final = exchange.ledger.checkpoint()
    one = tmp_path / "one.jsonl"
    write_export(exchange.ledger, one, final)
    monkeypatch.setattr(ledger_module, "PARALLEL_EXPORT_MIN", 100)
    for jobs in (2, 3):
        many = tmp_path / f"jobs{jobs}.jsonl"
        write_export(exchange.ledger, many, final, jobs=jobs)
        assert many.read_bytes() == one.read_bytes()
        assert not many.with_name(many.name + ".partial").exists()
    verifier = NoteVerifier.from_verifier_key(
        (exchange.settings.data_dir / "log.pub").read_text("utf-8").strip()
    )
    report = check_bundle(read_bundle_lines(tmp_path / "jobs2.jsonl"), verifier)
    assert report.ok, report.fault
    assert report.entries == final.size


def test_the_streamed_lines_are_the_exported_bytes(exchange: Exchange, tmp_path: Path) -> None:
    _fill(exchange, 300)
    final = exchange.ledger.checkpoint()
    out = tmp_path / "bundle.jsonl"
    write_export(exchange.ledger, out, final)
    assert b"".join(exchange.ledger.export_lines(final)) == out.read_bytes()


def test_a_failed_export_leaves_no_partial_bundle(
    exchange: Exchange, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fill(exchange, 10)
    final = exchange.ledger.checkpoint()

    def broken(self: object, out: object, final: object = None) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ledger_module.Ledger, "export", broken)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="disk full"):
        write_export(exchange.ledger, out / "bundle.jsonl", final)
    assert list(out.iterdir()) == []  # neither the bundle nor its .partial
