"""A witness's data directory.

::

    W/witness.json   {"name": ...} and any limit overridden (WitnessSettings)
    W/witness.key    the cosigning key, PKCS#8 PEM, mode 0600
    W/witness.pub    the cosignature verifier key (vkey, type 0x04) to give to logs
    W/witness.db     the state (exchange.server.witness.store)
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from crypto.errors import EncodingError
from crypto.keys import SigningKey
from crypto.note import NoteSigner
from exchange.errors import ConfigurationError
from exchange.keyfile import load_private_key, write_private_key
from exchange.server.witness.service import Witness
from exchange.server.witness.settings import CONFIG, WitnessSettings
from exchange.server.witness.store import WitnessStore

__all__ = ["DATABASE", "KEY", "PUBLIC", "init_witness_dir", "open_witness"]

KEY = "witness.key"
PUBLIC = "witness.pub"
DATABASE = "witness.db"


def init_witness_dir(data_dir: Path, name: str) -> NoteSigner:
    """Create a witness directory: its key (0600), verifier key, configuration and database.

    Refuses a directory that already holds a witness."""
    if (data_dir / CONFIG).exists() or (data_dir / KEY).exists():
        raise ConfigurationError(f"{data_dir} already holds a witness")
    try:
        signer = NoteSigner(name, SigningKey.generate())
    except EncodingError as exc:
        raise ConfigurationError(
            f"--name {name!r}: a witness name is text without spaces or '+', "
            "e.g. witness.district.example"
        ) from exc
    data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(data_dir, 0o700)
    write_private_key(data_dir / KEY, signer.key)
    (data_dir / PUBLIC).write_text(signer.cosignature_verifier_key() + "\n", "utf-8")
    WitnessStore(data_dir / DATABASE)
    # written last: its presence marks a complete directory
    (data_dir / CONFIG).write_text(json.dumps({"name": name}, indent=2) + "\n", "utf-8")
    return signer


def open_witness(data_dir: Path) -> tuple[Witness, WitnessSettings]:
    """The witness of an initialized directory, ready to serve."""
    settings = WitnessSettings.from_data_dir(data_dir)
    signer = NoteSigner(settings.name, load_private_key(data_dir / KEY))
    store = WitnessStore(data_dir / DATABASE)
    return Witness(signer, store, settings, clock=time.time), settings
