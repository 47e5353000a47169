"""A transparency-log witness (c2sp.org/tlog-witness) and a log's client for it.

A witness keeps, per log it trusts, the latest checkpoint it cosigned, and cosigns a new one
only if the log signed it and it is consistent with that one; so two witnesses that cosigned
two checkpoints of one log saw one history. The exchange runs its side in
:mod:`exchange.server.cosigning`; ``zonex witness init|trust|serve`` runs a witness.

- :mod:`.protocol`: the wire format (request body, 409 size body, cosignature lines).
- :mod:`.decision`: :func:`decide`, pure: stored state + request -> new state or refusal.
- :mod:`.store`: the state in SQLite, changed only by compare-and-swap.
- :mod:`.service`: :class:`Witness`, decide, swap, cosign.
- :mod:`.app`: the HTTP interface (Starlette).
- :mod:`.client`: :func:`submit_checkpoint` for a log.
- :mod:`.home`, :mod:`.settings`: the witness's directory, key and limits.
"""

from exchange.server.witness.app import create_witness_app
from exchange.server.witness.client import (
    WitnessConflictError,
    WitnessError,
    WitnessRefusedError,
    WitnessUnreachableError,
    submit_checkpoint,
)
from exchange.server.witness.decision import Accepted, LogState, Refusal, RefusalKind, decide
from exchange.server.witness.home import init_witness_dir, open_witness
from exchange.server.witness.protocol import (
    AddCheckpointRequest,
    ProtocolError,
    format_add_checkpoint,
    parse_add_checkpoint,
)
from exchange.server.witness.service import Cosigned, Witness
from exchange.server.witness.settings import WitnessSettings
from exchange.server.witness.store import WitnessStore

__all__ = [
    "Accepted",
    "AddCheckpointRequest",
    "Cosigned",
    "LogState",
    "ProtocolError",
    "Refusal",
    "RefusalKind",
    "Witness",
    "WitnessConflictError",
    "WitnessError",
    "WitnessRefusedError",
    "WitnessSettings",
    "WitnessStore",
    "WitnessUnreachableError",
    "create_witness_app",
    "decide",
    "format_add_checkpoint",
    "init_witness_dir",
    "open_witness",
    "parse_add_checkpoint",
    "submit_checkpoint",
]
