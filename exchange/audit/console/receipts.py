"""A computation receipt checked offline, as ``zonex receipt verify`` checks it
(:func:`crypto.receipt.verify_receipt`), and, when a bundle is open, against that bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from crypto.encoding import b64url_decode
from crypto.errors import CryptoError
from crypto.note import NoteVerifier
from crypto.receipt import verify_receipt
from exchange.audit.console.bundle import LedgerBundle

#: the largest receipt or result file the console reads
MAX_FILE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ReceiptCheck:
    """What the check found: ``ok`` and the statement's main fields, or the reason it failed."""

    ok: bool
    message: str
    statement: dict[str, Any] = field(default_factory=dict)
    checkpoint_size: int | None = None
    in_bundle: bool | None = None  # None: no bundle open, or the bundle does not reach it


def _json(data: bytes, what: str) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"the {what} is not a JSON file") from None


def check_receipt(
    receipt: bytes,
    result: bytes | None,
    log: NoteVerifier,
    bundle: LedgerBundle | None = None,
) -> ReceiptCheck:
    """Check a receipt file and its result file offline. ``result`` may be left out when the
    receipt file is a command's whole output (``{"result": ..., "receipt": ...}``)."""
    try:
        document = _json(receipt, "receipt")
        result_doc: Any
        if isinstance(document, dict) and set(document) >= {"result", "receipt"}:
            result_doc = document["result"]  # a command's stdout saved as one file
            document = document["receipt"]
        elif result is None:
            return ReceiptCheck(
                False,
                "a receipt is checked with its result: give the result file too (or the "
                "command's whole output, which holds both)",
            )
        if result is not None:
            result_doc = _json(result, "result")
            if isinstance(result_doc, dict) and set(result_doc) >= {"result", "receipt"}:
                result_doc = result_doc["result"]  # a whole API response saved as one file
        statement, cp = verify_receipt(document, result_doc, log)
    except (CryptoError, ValueError) as exc:
        return ReceiptCheck(False, str(exc))
    in_bundle: bool | None = None
    index = statement.get("ledger_index")
    if bundle is not None and isinstance(index, int):
        held = bundle.entry_bytes(index)
        if held is not None:
            in_bundle = held == b64url_decode(str(document["entry"]))
    zones = ", ".join(f"{d['zone']}/{d['name']}" for d in statement.get("datasets", []))
    return ReceiptCheck(
        True,
        f"{statement['kind']} by {statement['consumer']} on {zones}; ledger entry "
        f"{index} included in checkpoint {cp.size}",
        statement,
        cp.size,
        in_bundle,
    )
