"""``zonex witness init|trust|list|serve`` (run a C2SP tlog-witness) and ``zonex ledger witness
add|list`` (the witnesses an exchange submits its checkpoints to).

Both run on the machine that holds the directory; nothing here talks to an exchange's API.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from exchange.cli._common import (
    DataDir,
    Json,
    app,
    fail,
    offline_exchange,
    one_line_errors,
    out,
    print_json,
    verifier_key_text,
)
from exchange.cli.ledger import ledger_app

witness_app = typer.Typer(
    help="run a transparency-log witness (C2SP tlog-witness) that cosigns logs' checkpoints",
    no_args_is_help=True,
)
app.add_typer(witness_app, name="witness")
ledger_witness_app = typer.Typer(
    help="the witnesses this exchange asks to cosign its checkpoints", no_args_is_help=True
)
ledger_app.add_typer(ledger_witness_app, name="witness")

WitnessDir = Annotated[Path, typer.Option("--data-dir", "-d", help="the witness's directory")]


@witness_app.command("init")
@one_line_errors
def witness_init(
    data_dir: WitnessDir,
    name: Annotated[
        str,
        typer.Option(help="the witness's name on its cosignatures, e.g. witness.district.example"),
    ],
) -> None:
    """Create a witness directory with its key (witness.key, mode 0600) and print the
    witness's cosignature verifier key, which logs and auditors configure.

    Example:
      zonex witness init --data-dir W --name witness.district.example
    """
    from exchange.server.witness.home import PUBLIC, init_witness_dir

    signer = init_witness_dir(data_dir, name)
    out.print(f"initialized witness {signer.name} in {data_dir}", highlight=False)
    out.print(f"cosignature verifier key (also in {data_dir / PUBLIC}):", highlight=False)
    out.print(signer.cosignature_verifier_key(), highlight=False)


@witness_app.command("trust")
@one_line_errors
def witness_trust(
    data_dir: WitnessDir,
    log_keys: Annotated[
        list[str],
        typer.Option(
            "--log-key",
            help="a log's verifier key, or the file holding it (the exchange's log.pub); "
            "repeat for several",
        ),
    ],
) -> None:
    """Cosign a log's checkpoints: trust its verifier key for its origin. Idempotent; works
    while the witness serves.

    Example:
      zonex witness trust --data-dir W --log-key city/log.pub --log-key district/log.pub
    """
    from crypto.note import ALG_ED25519, NoteVerifier
    from exchange.server.witness.home import DATABASE
    from exchange.server.witness.settings import WitnessSettings
    from exchange.server.witness.store import WitnessStore

    WitnessSettings.from_data_dir(data_dir)  # an initialized directory
    verifiers = []
    for given in log_keys:
        text = verifier_key_text(given, "--log-key")
        try:
            verifier = NoteVerifier.from_verifier_key(text)
        except ValueError as exc:
            raise ValueError(f"--log-key {given}: not a log verifier key ({exc})") from None
        if verifier.signature_type != ALG_ED25519:
            raise ValueError(
                f"--log-key {given}: a cosignature (witness) key, not a log key; give the "
                "log's log.pub"
            )
        verifiers.append(verifier)
    store = WitnessStore(data_dir / DATABASE)
    for verifier in verifiers:
        added = store.trust(verifier, int(time.time()))
        state = "now trusted" if added else "already trusted"
        out.print(f"log {verifier.name} (key {verifier.key_hash.hex()}): {state}", highlight=False)


@witness_app.command("list")
@one_line_errors
def witness_list(data_dir: WitnessDir, as_json: Json = False) -> None:
    """The logs this witness cosigns and the size of the latest checkpoint it cosigned.

    Example:
      zonex witness list --data-dir W
    """
    from exchange.server.witness.home import DATABASE
    from exchange.server.witness.settings import WitnessSettings
    from exchange.server.witness.store import WitnessStore

    WitnessSettings.from_data_dir(data_dir)
    logs = WitnessStore(data_dir / DATABASE).logs()
    if as_json:
        print_json(
            [
                {"origin": log.origin, "verifier_keys": list(log.verifier_keys), "size": log.size}
                for log in logs
            ]
        )
        return
    if not logs:
        out.print("no trusted logs yet: zonex witness trust --data-dir W --log-key LOG.pub")
        return
    table = Table("origin", "cosigned size", "keys")
    for log in logs:
        table.add_row(
            log.origin, "-" if log.size is None else str(log.size), str(len(log.verifier_keys))
        )
    out.print(table)


@witness_app.command("serve")
@one_line_errors
def witness_serve(
    data_dir: WitnessDir,
    host: Annotated[str, typer.Option(help="bind address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port")] = 8422,
    log_format: Annotated[
        str, typer.Option("--log-format", help="json (one object per line) or text")
    ] = "json",
) -> None:
    """Serve the witness (POST /add-checkpoint, GET /<origin hash>/checkpoint) under uvicorn.

    Example:
      zonex witness serve --data-dir W --port 8422
    """
    import uvicorn

    from exchange.server.observability import logging_config
    from exchange.server.witness.app import create_witness_app
    from exchange.server.witness.home import open_witness

    if log_format not in ("json", "text"):
        fail("--log-format must be json or text")
    witness, _ = open_witness(data_dir.resolve())
    uvicorn.run(
        create_witness_app(witness),
        host=host,
        port=port,
        log_level="info",
        log_config=logging_config(log_format),
        access_log=False,
    )


# -- the exchange's witnesses ----------------------------------------------------------------


@ledger_witness_app.command("add")
@one_line_errors
def ledger_witness_add(
    data_dir: DataDir,
    url: Annotated[str, typer.Option(help="the witness's URL (its submission prefix)")],
    key: Annotated[
        str,
        typer.Option(
            "--key", help="the witness's cosignature verifier key, or the file holding it"
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="the exchange's name for it (default: the key's name)")
    ] = None,
) -> None:
    """Ask a witness to cosign this exchange's checkpoints (recorded on the ledger). The
    running exchange starts submitting within a second; its log key must be trusted by the
    witness (zonex witness trust --log-key D/log.pub).

    Example:
      zonex ledger witness add --data-dir D --url http://127.0.0.1:8422 --key W/witness.pub
    """
    from exchange.server.cosigning import add_witness

    text = verifier_key_text(key, "--key")
    ex = offline_exchange(data_dir)
    try:
        if ex.cosigner is not None:
            ex.cosigner.close()  # this process only records the witness; the server submits
        ex.ledger.start()
        try:
            info = add_witness(ex.engine, ex.ledger, ex.operator_key_id(), url, text, name)
        finally:
            ex.ledger.close()
    finally:
        ex.close()
    out.print(f"witness {info.name} at {info.url} added", highlight=False)
    out.print(f"key: {info.verifier_key}", highlight=False)


@ledger_witness_app.command("cosign")
@one_line_errors
def ledger_witness_cosign(
    data_dir: DataDir,
    timeout: Annotated[
        float, typer.Option(min=0, help="seconds to wait for every witness's cosignature")
    ] = 30.0,
) -> None:
    """Sign a checkpoint of every entry and have each witness cosign it now (the running
    exchange does this on its own, within seconds): a quiet exchange's next export then ends
    with a cosigned checkpoint. Exit 1 if a witness did not cosign it in time.

    Example:
      zonex ledger witness cosign --data-dir D && zonex ledger export --data-dir D --out b.jsonl
    """
    ex = offline_exchange(data_dir)
    try:
        if ex.cosigner is None:
            raise ValueError(f"{data_dir} has no log key (log.key or log.pub)")
        ex.ledger.checkpoint()
        result = ex.cosigner.cosign_latest(timeout)
    finally:
        ex.close()
    if result is None or not (result.cosigned or result.missing):
        raise ValueError(
            "no witnesses: zonex ledger witness add --data-dir D --url URL --key WITNESS.pub"
        )
    size = result.checkpoint.size
    for w in result.cosigned:
        out.print(f"{w.name}: cosigned checkpoint {size}", highlight=False)
    if result.missing:
        raise ValueError(
            "; ".join(
                f"{w.name} did not cosign checkpoint {size} within {timeout:g} s"
                + (f" ({w.last_error})" if w.last_error else "")
                for w in result.missing
            )
        )


@ledger_witness_app.command("list")
@one_line_errors
def ledger_witness_list(data_dir: DataDir, as_json: Json = False) -> None:
    """The witnesses this exchange submits its checkpoints to, and how far each got.

    Example:
      zonex ledger witness list --data-dir D
    """
    from exchange.server.cosigning import list_witnesses

    ex = offline_exchange(data_dir)
    try:
        witnesses = list_witnesses(ex.engine)
    finally:
        ex.close()
    if as_json:
        print_json(
            [
                {
                    "name": w.name,
                    "url": w.url,
                    "verifier_key": w.verifier_key,
                    "cosigned_size": w.cosigned_size,
                    "cosigned_at": None if w.cosigned_at is None else w.cosigned_at.isoformat(),
                    "failures": w.failures,
                    "last_error": w.last_error,
                }
                for w in witnesses
            ]
        )
        return
    if not witnesses:
        out.print("no witnesses: zonex ledger witness add --data-dir D --url URL --key WITNESS.pub")
        return
    table = Table("name", "url", "cosigned size", "cosigned at", "failures", "last error")
    for w in witnesses:
        table.add_row(
            w.name,
            w.url,
            "-" if w.cosigned_size is None else str(w.cosigned_size),
            "-" if w.cosigned_at is None else w.cosigned_at.strftime("%Y-%m-%d %H:%M:%S"),
            str(w.failures),
            w.last_error or "-",
        )
    out.print(table)
