"""A witness's settings: its name and every limit, in one frozen object (``W/witness.json``)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from exchange.errors import ConfigurationError

__all__ = ["CONFIG", "WitnessSettings"]

#: the configuration file in a witness directory; its presence marks a complete directory
CONFIG = "witness.json"


class WitnessSettings(BaseModel):
    """A witness's name and limits, from ``W/witness.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data_dir: Path
    #: the witness's key name, on every cosignature line (a schema-less URL is recommended)
    name: str
    #: an add-checkpoint body: a note (at most 64 KiB), 63 proof lines and the old size line
    max_body_bytes: int = 80 * 1024
    #: refused but log-signed checkpoints kept per log, as possible evidence of a fork
    max_evidence_per_log: int = 1000
    #: how often one request re-decides after losing a race to another before it gives up
    swap_attempts: int = 8

    @classmethod
    def from_data_dir(cls, data_dir: Path) -> WitnessSettings:
        path = data_dir / CONFIG
        if not path.is_file():
            raise ConfigurationError(
                f"{data_dir} is not a witness directory; run: zonex witness init "
                f"--data-dir {data_dir} --name NAME"
            )
        try:
            values = json.loads(path.read_text("utf-8"))
            return cls.model_validate({**values, "data_dir": data_dir})
        except (ValueError, ValidationError) as exc:
            raise ConfigurationError(f"{path}: not a valid witness configuration") from exc
