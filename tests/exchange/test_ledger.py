"""The ledger service: group commit, gap-free sequencing, atomic state changes, checkpoints."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from crypto.canonical import canonicalize
from crypto.errors import VerificationError
from crypto.merkle import verify_consistency, verify_inclusion
from crypto.note import NoteVerifier, verify_checkpoint
from exchange.audit import check_bundle, read_bundle_lines
from exchange.cli import app
from exchange.errors import ConflictError, InvalidInputError, LedgerError
from exchange.server.ledger import (
    EntryDraft,
    Refusal,
    RejectionCounter,
    entry_body,
    entry_parts,
    write_export,
)
from exchange.server.models import LedgerEntryRow, LedgerTileRow, PrincipalRow
from exchange.server.runtime import Exchange
from tests.conftest import settings_for


def verifier(data_dir: Path) -> NoteVerifier:
    return NoteVerifier.from_verifier_key((data_dir / "log.pub").read_text().strip())


def entries(ex: Exchange) -> list[dict[str, object]]:
    with Session(ex.engine) as s:
        return [
            json.loads(b)
            for b in s.execute(select(LedgerEntryRow.body).order_by(LedgerEntryRow.seq)).scalars()
        ]


def test_concurrent_appends_are_gap_free_and_verify(exchange: Exchange, tmp_path: Path) -> None:
    results: list[int] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(100):
            seq = exchange.ledger.append(EntryDraft(kind="test.append", attrs={"n": n, "i": i})).seq
            with lock:
                results.append(seq)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == list(range(1, 801))  # seq 0 is log.initialized
    rows = entries(exchange)
    assert [e["seq"] for e in rows] == list(range(801))
    bundle = tmp_path / "bundle.jsonl"
    write_export(exchange.ledger, bundle)
    report = check_bundle(read_bundle_lines(bundle), verifier(exchange.settings.data_dir))
    assert report.ok, report.fault
    assert report.entries == 801


def test_a_failed_change_is_not_recorded_and_does_not_spoil_its_batch(exchange: Exchange) -> None:
    def conflict(session: Session, draft: EntryDraft) -> None:
        raise ConflictError("no")

    errors: list[BaseException] = []

    def bad() -> None:
        try:
            exchange.ledger.append(EntryDraft(kind="test.bad"), conflict)
        except ConflictError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=bad) for _ in range(5)]
    threads += [
        threading.Thread(target=exchange.ledger.append, args=(EntryDraft(kind="test.good"),))
        for _ in range(20)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kinds = [e["kind"] for e in entries(exchange)]
    assert kinds.count("test.good") == 20
    assert "test.bad" not in kinds
    assert len(errors) == 5


def test_state_change_and_entry_commit_together(exchange: Exchange) -> None:
    def add_then_fail(session: Session, draft: EntryDraft) -> None:
        session.add(
            PrincipalRow(
                key_id="f" * 64,
                name="ghost",
                kind="agency",
                public_key=b"\x01" * 32,
                status="active",
            )
        )
        session.flush()
        raise RuntimeError("crash in the middle of a change")

    with pytest.raises(RuntimeError):
        exchange.ledger.append(EntryDraft(kind="test.ghost"), add_then_fail)
    with Session(exchange.engine) as s:
        assert s.get(PrincipalRow, "f" * 64) is None


def test_unrecordable_entries_are_refused(exchange: Exchange) -> None:
    with pytest.raises(Exception, match="cannot be recorded"):
        exchange.ledger.append(EntryDraft(kind="test.float", attrs={"x": 1.5}))  # type: ignore[dict-item]


def _refusal(actor: str, reason: str = "row_level_output") -> Refusal:
    return Refusal(actor, "POST /v1/zones/{zone}/aggregate", "query_rejected", reason, 422)


def _settled(ex: Exchange) -> list[dict[str, object]]:
    ex.ledger.append(EntryDraft(kind="test.barrier"))  # committed after everything queued
    return entries(ex)


def test_refusals_are_bounded_per_key_then_summarized(exchange: Exchange) -> None:
    counter = RejectionCounter(exchange.ledger, per_key_limit=2)
    a, b = "a" * 64, "b" * 64
    digests: list[str] = []

    def digest() -> str:
        digests.append("d" * 64)
        return digests[-1]

    kept = [counter.record_refusal(_refusal(a), digest) for _ in range(5)]
    kept.append(counter.record_refusal(_refusal(b, "parse_error")))
    assert kept == [True, True, False, False, False, True]
    # the query is digested only for the entries of their own
    assert len(digests) == 2
    individual = [e for e in _settled(exchange) if e["kind"] == "request.refused"]
    assert [e["actor"] for e in individual] == [a, a, b]
    assert individual[0]["digests"] == {"query": "d" * 64}
    assert individual[2]["digests"] == {}
    assert individual[0]["attrs"] == {
        "route": "POST /v1/zones/{zone}/aggregate",
        "code": "query_rejected",
        "reason": "row_level_output",
        "status": 422,
    }
    counter.flush()
    (summary,) = [e for e in _settled(exchange) if e["kind"] == "request.refused.summary"]
    assert summary["actor"] == "-"
    attrs = dict(summary["attrs"])
    assert attrs.pop("since")
    assert attrs == {"count.query_rejected.row_level_output": 3, f"actor.{a}": 3}
    # a new interval: individual entries again, and nothing to summarize
    assert counter.record_refusal(_refusal(a))
    counter.flush()
    kinds = [e["kind"] for e in _settled(exchange)]
    assert kinds.count("request.refused") == 4
    assert kinds.count("request.refused.summary") == 1


def test_rejections_in_a_key_s_name_leave_its_refusal_quota_alone(exchange: Exchange) -> None:
    counter = RejectionCounter(exchange.ledger, per_key_limit=2)
    victim = "c" * 64
    for _ in range(5):  # anyone can claim the victim's key id with a bad signature
        counter.record("bad_signature", victim, "GET /v1/catalog")
    assert counter.record_refusal(_refusal(victim))
    assert counter.record_refusal(_refusal(victim))
    assert not counter.record_refusal(_refusal(victim))
    found = _settled(exchange)
    assert sum(e["kind"] == "request.rejected" for e in found) == 2
    assert sum(e["kind"] == "request.refused" for e in found) == 2


def test_sequence_survives_a_restart(data_dir: Path) -> None:
    settings = settings_for(data_dir)
    with Exchange(settings) as ex:
        first = [ex.ledger.append(EntryDraft(kind="test.a")).seq for _ in range(3)]
    with Exchange(settings) as ex:
        second = [ex.ledger.append(EntryDraft(kind="test.b")).seq for _ in range(3)]
        rows = entries(ex)
    assert first + second == list(range(1, 7))
    assert [e["seq"] for e in rows] == list(range(7))
    for prev, entry in itertools.pairwise(rows):
        assert entry["prev"] != prev["prev"]


def test_two_processes_share_one_sequence(data_dir: Path) -> None:
    settings = settings_for(data_dir)
    with Exchange(settings) as a, Exchange(settings) as b:

        def run(ex: Exchange) -> None:
            for _ in range(50):
                ex.ledger.append(EntryDraft(kind="test.shared"))

        threads = [threading.Thread(target=run, args=(x,)) for x in (a, b, a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rows = entries(a)
        assert [e["seq"] for e in rows] == list(range(201))
        assert a.ledger.checkpoint().root == b.ledger.checkpoint().root


def test_checkpoints_are_consistent_and_signed(exchange: Exchange, data_dir: Path) -> None:
    exchange.ledger.append(EntryDraft(kind="test.one"))
    first = exchange.ledger.checkpoint()
    for _ in range(10):
        exchange.ledger.append(EntryDraft(kind="test.more"))
    second = exchange.ledger.checkpoint()
    v = verifier(data_dir)
    assert verify_checkpoint(first.note, v).size == first.size
    assert verify_checkpoint(second.note, v).size == second.size
    proof = exchange.ledger.consistency_proof(first.size, second.size)
    verify_consistency(first.size, second.size, first.root, second.root, proof)


def test_releases_share_a_checkpoint_that_covers_their_entries(data_dir: Path) -> None:
    """A receipt's checkpoint may be one signed for another release, but only if it already
    includes the receipt's own entry; the inclusion proof then verifies against it."""
    # no periodic checkpoint in between
    with Exchange(settings_for(data_dir, checkpoint_interval_seconds=3600)) as exchange:
        _share(exchange, verifier(data_dir))


def _share(exchange: Exchange, v: NoteVerifier) -> None:
    ledger = exchange.ledger
    first = ledger.append(EntryDraft(kind="test.release"))
    signed = ledger.checkpoint(persist=False, covering=first.seq)
    assert signed.size > first.seq
    second = ledger.append(EntryDraft(kind="test.release"))
    assert ledger.checkpoint(persist=False, covering=first.seq) is signed  # shared
    newer = ledger.checkpoint(persist=False, covering=second.seq)  # not covered: a new one
    assert newer.size > second.seq
    for appended, checkpoint in ((first, signed), (first, newer), (second, newer)):
        note = verify_checkpoint(checkpoint.note, v)
        proof = ledger.inclusion_proof(appended.seq, checkpoint.size)
        verify_inclusion(appended.seq, note.size, appended.leaf_hash, proof, note.root)
    with pytest.raises(VerificationError):
        verify_inclusion(
            second.seq,
            signed.size,
            second.leaf_hash,
            ledger.inclusion_proof(first.seq, signed.size),
            signed.root,
        )


def test_log_refuses_to_sign_an_inconsistent_checkpoint(data_dir: Path) -> None:
    settings = settings_for(data_dir)
    with Exchange(settings) as ex:
        for _ in range(4):
            ex.ledger.append(EntryDraft(kind="test.x"))
        ex.ledger.checkpoint()
    # someone rewrites history under the checkpoint (level 0 of the tree is the leaf hashes)
    with Exchange(settings) as ex:
        with Session(ex.engine) as s, s.begin():
            s.execute(
                update(LedgerEntryRow).where(LedgerEntryRow.seq == 2).values(leaf_hash=b"\x00" * 32)
            )
        ex.ledger.append(EntryDraft(kind="test.after"))
        with pytest.raises(LedgerError):
            ex.ledger.checkpoint()


def test_periodic_checkpoints_follow_appends(exchange: Exchange) -> None:
    import time

    exchange.ledger.append(EntryDraft(kind="test.tick"))
    size = exchange.ledger.size()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        latest = exchange.ledger.latest_checkpoint()
        if latest is not None and latest.size >= size:
            break
        time.sleep(0.05)
    else:
        pytest.fail("no checkpoint within 5 s")


def test_cli_export_and_verify(data_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    bundle = tmp_path / "ledger.jsonl"
    cp = tmp_path / "cp.txt"
    result = runner.invoke(
        app, ["ledger", "checkpoint", "--data-dir", str(data_dir), "--out", str(cp)]
    )
    assert result.exit_code == 0, result.output
    with Exchange(settings_for(data_dir)) as ex:
        for _ in range(5):
            ex.ledger.append(EntryDraft(kind="test.more"))
    result = runner.invoke(
        app, ["ledger", "export", "--data-dir", str(data_dir), "--out", str(bundle)]
    )
    assert result.exit_code == 0, result.output
    log_pub = str(data_dir / "log.pub")
    ok = runner.invoke(
        app, ["audit", "verify", str(bundle), "--log-key", log_pub, "--trusted", str(cp)]
    )
    assert ok.exit_code == 0, ok.output
    # one flipped byte: non-zero exit and one line naming the line and the fault
    lines = bundle.read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"kind":"', b'"kind":"X', 1)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b"\n".join(lines))
    result = runner.invoke(app, ["audit", "verify", str(bad), "--log-key", log_pub])
    assert result.exit_code != 0
    assert f"{bad}:3:" in result.output.replace("\n", "")
    # truncated tail detected against the trusted checkpoint saved after more entries
    cp2 = tmp_path / "cp2.txt"
    runner.invoke(app, ["ledger", "checkpoint", "--data-dir", str(data_dir), "--out", str(cp2)])
    truncated = tmp_path / "old.jsonl"
    with Exchange(settings_for(data_dir)) as ex:
        ex.ledger.append(EntryDraft(kind="test.later"))
        cp3 = ex.ledger.checkpoint()
    (tmp_path / "cp3.txt").write_text(cp3.note)
    truncated.write_bytes(bundle.read_bytes())
    result = runner.invoke(
        app,
        [
            "audit",
            "verify",
            str(truncated),
            "--log-key",
            log_pub,
            "--trusted",
            str(tmp_path / "cp3.txt"),
        ],
    )
    assert result.exit_code != 0
    assert "rollback" in result.output


_text = st.text(max_size=12)  # any Unicode but lone surrogates: escapes, non-ASCII, controls
_flat = st.dictionaries(_text, _text, max_size=4)
_attrs = st.dictionaries(_text, st.one_of(_text, st.integers(-(2**53) + 1, 2**53 - 1)), max_size=4)


@given(
    kind=_text,
    actor=_text,
    refs=_flat,
    digests=_flat,
    attrs=_attrs,
    seq=st.integers(0, 2**53 - 1),
    prev=st.sampled_from(["0" * 64, "ab" * 32]),
)
def test_entry_bodies_assembled_from_parts_are_the_canonical_encoding(
    kind: str,
    actor: str,
    refs: dict[str, str],
    digests: dict[str, str],
    attrs: dict[str, str | int],
    seq: int,
    prev: str,
) -> None:
    draft = EntryDraft(kind=kind, actor=actor, refs=refs, digests=digests, attrs=attrs)
    time = "2026-12-07T20:00:00.123Z"
    entry = {
        "seq": seq,
        "time": time,
        "kind": kind,
        "actor": actor,
        "refs": refs,
        "digests": digests,
        "attrs": attrs,
        "prev": prev,
    }
    assert entry_body(entry_parts(draft), seq, time, prev) == canonicalize(entry)


def test_a_draft_that_cannot_be_encoded_is_refused_and_the_ledger_goes_on(
    exchange: Exchange,
) -> None:
    with pytest.raises(InvalidInputError, match="cannot be recorded"):
        exchange.ledger.append(EntryDraft(kind="test.bad", attrs={"n": 2**60}))
    appended = exchange.ledger.append(EntryDraft(kind="test.good"))
    assert b'"kind":"test.good"' in exchange.ledger.entry(appended.seq)


def test_a_tampered_upper_tile_is_refused_at_the_next_checkpoint(data_dir: Path) -> None:
    settings = settings_for(data_dir)
    with Exchange(settings) as ex:
        ex.ledger.append_batch_sync([EntryDraft(kind="test.x") for _ in range(600)])
        ex.ledger.checkpoint()
    with Exchange(settings) as ex:  # a fresh process: nothing cached
        with Session(ex.engine) as s, s.begin():
            tile = s.get(LedgerTileRow, (1, 0))
            assert tile is not None and len(tile.hashes) == 2 * 32
            tile.hashes = bytes(32) + tile.hashes[32:]
        ex.ledger.append(EntryDraft(kind="test.after"))
        with pytest.raises(LedgerError):
            ex.ledger.checkpoint()


def test_a_receipt_for_an_entry_just_committed_reads_nothing_from_the_database(
    exchange: Exchange,
) -> None:
    """The checkpoint and inclusion proof of a receipt come from the writer's own state."""
    ledger = exchange.ledger
    warm = ledger.append(EntryDraft(kind="test.warm"))
    ledger.checkpoint(persist=False, covering=warm.seq)  # this process has signed before
    appended = ledger.append(EntryDraft(kind="test.released"))
    caller = threading.get_ident()
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        if threading.get_ident() == caller:
            statements.append(statement)

    event.listen(exchange.engine, "before_cursor_execute", record)
    try:
        signed = ledger.checkpoint(persist=False, covering=appended.seq)
        proof = ledger.inclusion_proof(appended.seq, signed.size)
    finally:
        event.remove(exchange.engine, "before_cursor_execute", record)
    assert statements == []
    note = verify_checkpoint(signed.note, exchange.log_signer.verifier())  # type: ignore[union-attr]
    verify_inclusion(appended.seq, note.size, appended.leaf_hash, proof, note.root)
