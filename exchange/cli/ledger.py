"""``zonex ledger``, ``zonex log``, ``zonex audit`` and ``zonex receipt``.

Audit and receipt checks are offline; the ledger export and checkpoint run offline from the
data directory or over the signed API, so an auditor needs no access to the operator's disk.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from exchange.cli._common import (
    Json,
    KeyPath,
    Url,
    app,
    client,
    err,
    fail,
    is_stdout,
    offline_exchange,
    one_line_errors,
    out,
    print_json,
    profile_url,
)

if TYPE_CHECKING:
    from crypto.receipt import NodeCheck

ledger_app = typer.Typer(
    help="the ledger: export and checkpoints, offline (--data-dir) or over the API (--url)",
    no_args_is_help=True,
)
log_app = typer.Typer(help="the exchange's log, over the API", no_args_is_help=True)
audit_app = typer.Typer(help="offline verification", no_args_is_help=True)
receipt_app = typer.Typer(help="computation receipts, offline", no_args_is_help=True)
app.add_typer(ledger_app, name="ledger")
app.add_typer(audit_app, name="audit")
app.add_typer(receipt_app, name="receipt")
app.add_typer(log_app, name="log")

OptDataDir = Annotated[
    Path | None,
    typer.Option("--data-dir", "-d", help="exchange data directory (offline, no server)"),
]
OptUrl = Annotated[
    str | None, typer.Option("--url", envvar="ZONEX_URL", help="exchange base URL (over the API)")
]
AuditorKey = Annotated[
    Path, typer.Option("--key", envvar="ZONEX_KEY", help="your private key file (with --url)")
]


def _source(data_dir: Path | None, url: str | None) -> str:
    """Which form a ledger command runs in: ``"offline"`` (the data directory) or ``"api"``.
    A URL that only comes from ``ZONEX_URL`` or a profile gives way to an explicit
    ``--data-dir``."""
    explicit_url = url is not None and url != os.environ.get("ZONEX_URL")
    if data_dir is not None and explicit_url:
        raise ValueError(
            "give --data-dir (offline, on the exchange's machine) or --url (over the API), not both"
        )
    if data_dir is not None:
        return "offline"
    if url is not None or profile_url() is not None:
        return "api"
    raise ValueError(
        "give --data-dir DIR (offline, on the exchange's machine) or --url URL --key KEY "
        "(over the API, as the operator or an auditor)"
    )


def _write_text(out_path: Path | None, text: str) -> None:
    if out_path is None or is_stdout(out_path):
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()
    else:
        out_path.write_text(text, "utf-8")


@ledger_app.command("checkpoint")
@one_line_errors
def ledger_checkpoint(
    data_dir: OptDataDir = None,
    url: OptUrl = None,
    key: AuditorKey = Path("auditor.key"),
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="where to write the checkpoint note (default or -: stdout)"),
    ] = None,
    as_json: Json = False,
) -> None:
    """Write the latest signed checkpoint: offline from the data directory (signing one if
    entries are not yet covered), or over the API with --url and --key.

    Examples:
      zonex ledger checkpoint --url https://exchange.example --key auditor.key --out cp.txt
      zonex ledger checkpoint --data-dir ./exchange --out cp.txt
      zonex ledger checkpoint --url https://exchange.example --key auditor.key --json
    """
    if _source(data_dir, url) == "offline":
        assert data_dir is not None
        ex = offline_exchange(data_dir)
        try:
            cp = ex.ledger.checkpoint()
        finally:
            ex.close()
        note, size = cp.note, cp.size
    else:
        with client(url, key) as c:
            got = c.checkpoint()
        note, size = str(got["note"]), int(got["size"])
    if as_json and (out_path is None or is_stdout(out_path)):
        print_json({"size": size, "note": note})
        return
    _write_text(out_path, note)
    if out_path is not None and not is_stdout(out_path):
        out.print(f"checkpoint size {size} written to {out_path}")


@ledger_app.command("export")
@one_line_errors
def ledger_export(
    out_path: Annotated[Path, typer.Option("--out", help="JSON Lines bundle to write")],
    data_dir: OptDataDir = None,
    url: OptUrl = None,
    key: AuditorKey = Path("auditor.key"),
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs",
            min=1,
            help="processes for a large ledger, offline (default: every core; 1: this one)",
        ),
    ] = None,
) -> None:
    """Export entries and checkpoints as a self-contained JSON Lines bundle: offline from the
    data directory, or streamed over the API with --url and --key (operator or auditor). The
    bundle ends with a checkpoint signed for it, cosigned by the configured witnesses that
    answer in time. Offline, a ledger of a million entries or more is written by every core.
    Check it with: zonex audit verify BUNDLE --log-key log.pub

    Examples:
      zonex ledger export --url https://exchange.example --key auditor.key --out ledger.jsonl
      zonex ledger export --data-dir ./exchange --out ledger.jsonl
    """
    from exchange.audit._stream import default_jobs
    from exchange.server.cosigning import export_checkpoint
    from exchange.server.ledger import write_export

    if is_stdout(out_path):
        raise ValueError("--out takes a file: a bundle is written whole or not at all")
    if _source(data_dir, url) == "offline":
        assert data_dir is not None
        ex = offline_exchange(data_dir)
        try:
            final = export_checkpoint(ex.ledger, ex.cosigner, ex.settings.witness_timeout_seconds)
            size = write_export(ex.ledger, out_path, final, jobs=jobs or default_jobs()).size
        finally:
            ex.close()
    else:
        # written beside the target and renamed once complete: never a truncated bundle
        partial = out_path.with_name(out_path.name + ".partial")
        try:
            with client(url, key) as c, partial.open("wb") as f:
                size = c.export_ledger(f)
            partial.replace(out_path)
        finally:
            partial.unlink(missing_ok=True)
    out.print(f"exported {size} entries to {out_path}")


@log_app.command("key")
@one_line_errors
def log_key(
    out_path: Annotated[
        Path | None,
        typer.Option("--out", help="where to write the verifier key (default or -: stdout)"),
    ] = None,
    url: Url = "http://127.0.0.1:8421",
    key: KeyPath = Path("auditor.key"),
    as_json: Json = False,
) -> None:
    """Fetch the log's verifier key (what log.pub holds), for zonex audit verify and zonex
    receipt verify. Any registered principal may fetch it; compare the key hash printed with
    the one your operator publishes before you trust it.

    Example:
      zonex log key --url https://exchange.example --key bank.key --out log.pub
    """
    from crypto.note import NoteVerifier

    with client(url, key) as c:
        verifier_key = c.log_key()
    verifier = NoteVerifier.from_verifier_key(verifier_key)  # refuse a malformed key
    if as_json and (out_path is None or is_stdout(out_path)):
        print_json(
            {
                "verifier_key": verifier_key,
                "origin": verifier.name,
                "key_hash": verifier.key_hash.hex(),
            }
        )
        return
    _write_text(out_path, verifier_key + "\n")
    if out_path is not None and not is_stdout(out_path):
        out.print(
            f"log {verifier.name} key hash {verifier.key_hash.hex()} written to {out_path} "
            "(compare the key hash with the one your operator publishes)"
        )


@audit_app.command("verify")
@one_line_errors
def audit_verify(
    bundle: Path,
    log_key: Annotated[Path, typer.Option("--log-key", help="the log's verifier key (log.pub)")],
    trusted: Annotated[
        Path | None, typer.Option(help="a checkpoint saved earlier (rollback/fork check)")
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option(
            help="a C2SP tlog-policy file: the witness quorum the final (and trusted) "
            "checkpoint must meet"
        ),
    ] = None,
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", min=1, help="processes for a large bundle (default: every core; 1: this one)"
        ),
    ] = None,
    rules: Annotated[
        bool,
        typer.Option(
            "--rules",
            help="also check the compliance rules: grants, releases, privacy budgets, consents, "
            "suspensions (every violation listed with its line)",
        ),
    ] = False,
) -> None:
    """Verify an exported ledger bundle offline. Exit 0 only if everything holds.

    With --rules, once the bundle verifies, also check what the entries record: every
    computation under a grant live at the time and covering it, every release after its
    opening, ε within budget and equal to the releases, scores on live consents only, and
    nothing done by or on a suspended principal or zone.

    Examples:
      zonex audit verify ledger.jsonl --log-key D/log.pub --trusted cp.txt
      zonex audit verify ledger.jsonl --log-key D/log.pub --policy witnesses.policy
      zonex audit verify ledger.jsonl --log-key D/log.pub --rules
    """
    from rich.markup import escape

    from crypto.note import NoteVerifier
    from crypto.tlogpolicy import PolicyError, parse_policy
    from exchange.audit import AuditReport, check_bundle, read_bundle_lines
    from exchange.audit.quorum import QuorumAuditReport, check_bundle_quorum, require_policy_log

    verifier = NoteVerifier.from_verifier_key(log_key.read_text("utf-8").strip())
    trusted_note = trusted.read_text("utf-8") if trusted is not None else None
    report: AuditReport | QuorumAuditReport
    quorum = ""
    if policy is None:
        report = check_bundle(read_bundle_lines(bundle), verifier, trusted_note, jobs=jobs)
    else:
        try:
            witnesses = parse_policy(policy.read_bytes())
            require_policy_log(witnesses, verifier)
        except PolicyError as exc:
            where = policy if exc.line is None else f"{policy}:{exc.line}"
            raise ValueError(f"{where}: {exc.reason}") from None
        report = check_bundle_quorum(
            read_bundle_lines(bundle), verifier, witnesses, trusted_note, jobs=jobs
        )
        if report.final is not None:
            quorum = f"; {report.final.explain()}"
    if not report.ok:
        assert report.fault is not None
        f = report.fault
        fail(escape(f"{bundle}:{f.line}: {f.kind}: {f.message}"))
    checked = ""
    if rules:
        from exchange.audit.rules import check_rules

        found = check_rules(read_bundle_lines(bundle))
        if not found.ok:
            for fault in found.faults:
                err.print(
                    f"{bundle}:{fault.line}: {fault.kind}: {fault.message}",
                    markup=False,
                    highlight=False,
                )
            total = len(found.faults) + found.omitted
            kinds = sorted({str(fault.kind) for fault in found.faults})
            more = f" ({found.omitted} not listed)" if found.omitted else ""
            fail(
                escape(
                    f"{bundle}: {total} compliance faults{more}: {', '.join(kinds)}; the "
                    f"bundle itself verifies ({report.entries} entries)"
                )
            )
        checked = "; compliance rules hold"
    out.print(
        f"OK: {report.entries} entries, {report.checkpoints} checkpoints verified"
        + (" against the trusted checkpoint" if trusted else "")
        + quorum
        + checked,
        markup=False,
    )


@audit_app.command("chain")
@one_line_errors
def audit_chain(
    bundle: Annotated[Path, typer.Argument(help="the child exchange's ledger bundle")],
    log_key: Annotated[Path, typer.Option("--log-key", help="the child's log key (its log.pub)")],
    parent_bundle: Annotated[
        Path, typer.Option("--parent-bundle", help="the parent exchange's ledger bundle")
    ],
    parent_key: Annotated[
        Path, typer.Option("--parent-key", help="the parent's log key (its log.pub)")
    ],
    child_name: Annotated[
        str, typer.Option("--child-name", help="the parent's name for the child (chain list)")
    ],
) -> None:
    """Check a parent exchange's records of a child against the child's own bundle, offline
    (the catalog chain): both bundles verify, and every checkpoint of the child the parent
    recorded is the child's root at that size. A fork is shown as the two signed checkpoints
    that prove it; forks the parent recorded are shown too. Exit 0 only if everything holds.

    Example:
      zonex audit chain d1.jsonl --log-key d1.pub --child-name district-1 \\
        --parent-bundle city.jsonl --parent-key city.pub
    """
    from crypto.encoding import b64_encode
    from crypto.note import NoteVerifier
    from exchange.audit import read_bundle_lines
    from exchange.audit.chain import ChainFindingKind, check_chain

    child_log = NoteVerifier.from_verifier_key(log_key.read_text("utf-8").strip())
    parent_log = NoteVerifier.from_verifier_key(parent_key.read_text("utf-8").strip())
    report = check_chain(
        read_bundle_lines(bundle),
        child_log,
        read_bundle_lines(parent_bundle),
        parent_log,
        child_name,
    )
    if report.ok:
        assert report.child_bundle is not None
        out.print(
            f"OK: {report.checked} checkpoints of {child_name} recorded in {parent_bundle} "
            f"({report.parent.entries} entries) equal the child's history in {bundle} "
            f"({report.child_bundle.entries} entries); no fork recorded",
            markup=False,
            highlight=False,
        )
        return
    evidence = (ChainFindingKind.FORK, ChainFindingKind.RECORDED_FORK)
    for finding in report.findings:
        where = bundle if finding.kind == ChainFindingKind.CHILD_BUNDLE else parent_bundle
        place = f"{where}:{finding.line}" if finding.line else str(where)
        out.print(f"{place}: {finding.kind}: {finding.message}", markup=False, highlight=False)
        if finding.kind not in evidence:
            continue
        size = "" if finding.size is None else f" of size {finding.size}"
        if finding.recorded_note is not None:
            out.print(
                f"--- the child's checkpoint{size} the parent recorded (signed by "
                f"{child_log.name}) ---",
                markup=False,
                highlight=False,
            )
            out.print(finding.recorded_note, end="", markup=False, highlight=False)
        if finding.child_note is not None:
            title = (
                f"the child's own checkpoint covering size {finding.size}, from {bundle}"
                if finding.kind == ChainFindingKind.FORK
                else "the child's checkpoint the parent saw next, not accepted"
            )
            out.print(f"--- {title} ---", markup=False, highlight=False)
            out.print(finding.child_note, end="", markup=False, highlight=False)
        if finding.child_root is not None:
            out.print(
                f"--- the child's root at size {finding.size}, from its entries in {bundle}: "
                f"{b64_encode(finding.child_root)}",
                markup=False,
                highlight=False,
            )
        if finding.proof and finding.child_note is not None:
            top = finding.child_note.split("\n", 2)[1]
            out.print(
                f"--- the consistency proof from size {finding.size} to {top} in the child's "
                "tree (RFC 9162), binding that root to the root the child signed at "
                f"{top}: {' '.join(b64_encode(h) for h in finding.proof)}",
                markup=False,
                highlight=False,
            )
    kinds = sorted({str(f.kind) for f in report.findings})
    fail(f"{child_name}: {len(report.findings)} findings ({', '.join(kinds)})")


@receipt_app.command("verify")
@one_line_errors
def receipt_verify(
    receipt: Path,
    result: Annotated[Path, typer.Option(help="the result file (JSON) the receipt is about")],
    log_key: Annotated[Path, typer.Option("--log-key", help="the log's verifier key (log.pub)")],
) -> None:
    """Verify a computation receipt and its result offline. Exit 0 only if everything holds.

    A receipt a zone node vouched for is checked under the node's key; a secure sum's lists
    each zone: hosted by the exchange, or its node's signed contribution checked.

    Example:
      zonex receipt verify rows.json.receipt --result rows.json --log-key D/log.pub
    """
    from crypto.note import NoteVerifier
    from crypto.receipt import NodeResultError, check_nodes, verify_receipt

    verifier = NoteVerifier.from_verifier_key(log_key.read_text("utf-8").strip())
    try:
        bundle = json.loads(receipt.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{receipt}: not a JSON receipt") from None
    if isinstance(bundle, dict) and set(bundle) >= {"result", "receipt"}:
        bundle = bundle["receipt"]  # a command's stdout saved as one file
    try:
        result_doc = json.loads(result.read_text("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{result}: not a JSON result") from None
    if isinstance(result_doc, dict) and set(result_doc) >= {"result", "receipt"}:
        result_doc = result_doc["result"]  # a whole API response saved as one file
    try:
        statement, cp = verify_receipt(bundle, result_doc, verifier)
    except NodeResultError as exc:
        for check in exc.checks:
            _print_node_check(check)
        raise
    out.print(
        f"OK: {statement['kind']} by {statement['consumer']} on "
        f"{', '.join(d['zone'] + '/' + d['name'] for d in statement['datasets'])}; "
        f"ledger entry {statement['ledger_index']} included in checkpoint {cp.size}"
    )
    for check in check_nodes(bundle, statement, result_doc):
        _print_node_check(check)


def _print_node_check(check: NodeCheck) -> None:
    """One line per zone of a receipt: who computed its part and whether its node's check held."""
    node = "no node" if check.key_id is None else f"node {check.key_id[:16]}"
    verdict = "ok" if check.ok else "FAILED"
    out.print(f"  zone {check.zone} ({node}): {verdict}: {check.reason}", markup=False)
