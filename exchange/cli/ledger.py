"""``zonex ledger``, ``zonex audit`` and ``zonex receipt``: offline, no server needed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from exchange.cli._common import DataDir, app, fail, one_line_errors, out

ledger_app = typer.Typer(help="the ledger, offline (no server needed)", no_args_is_help=True)
audit_app = typer.Typer(help="offline verification", no_args_is_help=True)
receipt_app = typer.Typer(help="computation receipts, offline", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
app.add_typer(audit_app, name="audit")
app.add_typer(receipt_app, name="receipt")


def _offline_exchange(data_dir: Path) -> Any:
    from exchange.node import Exchange
    from exchange.settings import Settings

    return Exchange(Settings.from_data_dir(data_dir))


@ledger_app.command("checkpoint")
@one_line_errors
def ledger_checkpoint(
    data_dir: DataDir,
    out_path: Annotated[Path, typer.Option("--out", help="where to write the checkpoint note")],
) -> None:
    """Write the latest signed checkpoint (signing one if entries are not yet covered)."""
    ex = _offline_exchange(data_dir)
    try:
        cp = ex.ledger.checkpoint()
    finally:
        ex.close()
    out_path.write_text(cp.note, "utf-8")
    out.print(f"checkpoint size {cp.size} written to {out_path}")


@ledger_app.command("export")
@one_line_errors
def ledger_export(
    data_dir: DataDir,
    out_path: Annotated[Path, typer.Option("--out", help="JSON Lines bundle to write")],
) -> None:
    """Export entries and checkpoints as a self-contained JSON Lines bundle."""
    from exchange.ledger import write_export

    ex = _offline_exchange(data_dir)
    try:
        final = write_export(ex.ledger, out_path)
    finally:
        ex.close()
    out.print(f"exported {final.size} entries to {out_path}")


@audit_app.command("verify")
@one_line_errors
def audit_verify(
    bundle: Path,
    log_key: Annotated[Path, typer.Option("--log-key", help="the log's verifier key (log.pub)")],
    trusted: Annotated[
        Path | None, typer.Option(help="a checkpoint saved earlier (rollback/fork check)")
    ] = None,
) -> None:
    """Verify an exported ledger bundle offline. Exit 0 only if everything holds."""
    from crypto.note import NoteVerifier
    from exchange.audit import check_bundle, read_bundle_lines

    verifier = NoteVerifier.from_verifier_key(log_key.read_text("utf-8").strip())
    trusted_note = trusted.read_text("utf-8") if trusted is not None else None
    report = check_bundle(read_bundle_lines(bundle), verifier, trusted_note)
    if not report.ok:
        assert report.fault is not None
        f = report.fault
        fail(f"{bundle}:{f.line}: {f.kind}: {f.message}")
    out.print(
        f"OK: {report.entries} entries, {report.checkpoints} checkpoints verified"
        + (" against the trusted checkpoint" if trusted else "")
    )


@receipt_app.command("verify")
@one_line_errors
def receipt_verify(
    receipt: Path,
    result: Annotated[Path, typer.Option(help="the result file (JSON) the receipt is about")],
    log_key: Annotated[Path, typer.Option("--log-key", help="the log's verifier key (log.pub)")],
) -> None:
    """Verify a computation receipt and its result offline. Exit 0 only if everything holds."""
    from crypto.note import NoteVerifier
    from crypto.receipt import verify_receipt

    verifier = NoteVerifier.from_verifier_key(log_key.read_text("utf-8").strip())
    try:
        bundle = json.loads(receipt.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{receipt}: not a JSON receipt") from None
    try:
        result_doc = json.loads(result.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{result}: not a JSON result") from None
    if isinstance(result_doc, dict) and set(result_doc) == {"result", "receipt"}:
        result_doc = result_doc["result"]  # a whole API response saved as one file
    statement, cp = verify_receipt(bundle, result_doc, verifier)
    out.print(
        f"OK: {statement['kind']} by {statement['consumer'][:16]}… on "
        f"{', '.join(d['zone'] + '/' + d['name'] for d in statement['datasets'])}; "
        f"ledger entry {statement['ledger_index']} included in checkpoint {cp.size}"
    )
