"""Routes for auditors who do not hold the operator's disk: the log's verifier key and the
ledger export bundle over the signed API.

``GET /v1/log/key`` answers any registered principal with the verifier key (``log.pub``) that
checks the log's checkpoints and every receipt's inclusion proof. ``GET /v1/log/export``
streams the JSON Lines bundle ``zonex ledger export --data-dir`` writes (the same bytes for
the same final checkpoint) to the operator and auditors only; anyone else is refused with 403,
and the refusal is ledgered like every other. The export itself is ledgered first
(``ledger.exported``), so the bundle shows who took it. ``GET /v1/log/witnesses`` names the
witnesses that cosign the log's checkpoints and their keys, for k-of-n checks.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from exchange.domain import PrincipalKind
from exchange.errors import ForbiddenError, NotFoundError
from exchange.server.api.deps import Actor, Ex
from exchange.server.api.schemas import Out
from exchange.server.cosigning import export_checkpoint, list_witnesses
from exchange.server.ledger import EntryDraft
from exchange.server.runtime import LOG_PUB, Exchange

__all__ = ["BUNDLE_MEDIA_TYPE", "SIZE_HEADER", "LogKeyOut", "WitnessOut", "router"]

router = APIRouter(prefix="/v1")

#: JSON Lines (one canonical JSON object per line)
BUNDLE_MEDIA_TYPE = "application/jsonl"
#: the size of the final checkpoint the streamed bundle ends with
SIZE_HEADER = "Zonex-Log-Size"
#: lines are sent in chunks of about this many bytes
CHUNK_BYTES = 64 * 1024

AUDIT_KINDS = (PrincipalKind.OPERATOR, PrincipalKind.AUDITOR)


class LogKeyOut(Out):
    #: the C2SP signed-note verifier key, as in ``log.pub``
    verifier_key: str
    #: the log's origin (the checkpoints' first line)
    origin: str
    #: the key hash (hex) a checkpoint signature line names
    key_hash: str


class WitnessOut(Out):
    #: the exchange's name for the witness
    name: str
    #: the C2SP vkey (cosignature type 0x04) that checks its cosignature lines
    verifier_key: str
    #: the size of the latest checkpoint of this log it cosigned (null: none yet)
    cosigned_size: int | None
    #: when the exchange stored that cosignature
    cosigned_at: datetime | None


def verifier_key(ex: Exchange) -> str:
    """The log's verifier key string: from the signer this process holds, else ``log.pub``."""
    if ex.log_signer is not None:
        return ex.log_signer.verifier_key()
    path = ex.settings.data_dir / LOG_PUB
    if not path.is_file():
        raise NotFoundError("this exchange publishes no log verifier key")
    return path.read_text("utf-8").strip()


@router.get(
    "/log/key",
    response_model=LogKeyOut,
    summary="The log's verifier key",
    description=(
        "The C2SP signed-note verifier key (`name+keyhash+base64`) that checks the log's "
        "checkpoints and every receipt's inclusion proof: what `zonex init` writes to "
        "`log.pub`. Any registered principal may read it. Compare `key_hash` with the value "
        "the operator publishes out of band before trusting it."
    ),
)
def log_key(actor: Actor, ex: Ex) -> LogKeyOut:
    key = verifier_key(ex)
    name, key_hash, _ = key.split("+", 2)
    return LogKeyOut(verifier_key=key, origin=name, key_hash=key_hash)


@router.get(
    "/log/witnesses",
    response_model=list[WitnessOut],
    summary="The witnesses that cosign the log's checkpoints",
    description=(
        "The witnesses this exchange submits its checkpoints to (C2SP tlog-witness): each "
        "one's name, cosignature verifier key and the size of the latest checkpoint it "
        "cosigned. Their cosignatures are extra signature lines on the checkpoint notes of "
        "the export bundle; check k of n with `crypto.note.check_cosignatures`. Any "
        "registered principal may read it."
    ),
)
def log_witnesses(actor: Actor, ex: Ex) -> list[WitnessOut]:
    return [
        WitnessOut(
            name=w.name,
            verifier_key=w.verifier_key,
            cosigned_size=w.cosigned_size,
            cosigned_at=w.cosigned_at,
        )
        for w in list_witnesses(ex.engine)
    ]


def _chunks(lines: Iterator[bytes]) -> Iterator[bytes]:
    buffer = bytearray()
    for line in lines:
        buffer += line
        if len(buffer) >= CHUNK_BYTES:
            yield bytes(buffer)
            buffer.clear()
    if buffer:
        yield bytes(buffer)


@router.get(
    "/log/export",
    response_class=StreamingResponse,
    summary="The ledger export bundle (operator and auditors)",
    description=(
        "Streams the self-contained JSON Lines bundle (every entry, then every checkpoint with a "
        "consistency proof from the one before), ending with a checkpoint signed for this "
        "export and, when witnesses are configured, cosigned by those that answer within "
        "`witness_timeout_seconds`; the header `Zonex-Log-Size` gives its size. Verify it "
        "offline with "
        "`zonex audit verify BUNDLE --log-key log.pub`. Only the operator and auditors may "
        "export; the export is recorded on the ledger before it is answered."
    ),
    responses={200: {"content": {BUNDLE_MEDIA_TYPE: {}}, "description": "the bundle"}},
)
def export_bundle(actor: Actor, ex: Ex) -> StreamingResponse:
    if actor.kind not in AUDIT_KINDS:
        raise ForbiddenError(
            "only the operator and auditors export the ledger", reason="not_auditor"
        )
    ex.ledger.append(EntryDraft(kind="ledger.exported", actor=actor.key_id))
    final = export_checkpoint(ex.ledger, ex.cosigner, ex.settings.witness_timeout_seconds)
    return StreamingResponse(
        _chunks(ex.ledger.export_lines(final)),
        media_type=BUNDLE_MEDIA_TYPE,
        headers={SIZE_HEADER: str(final.size)},
    )
