"""The ``zonex`` command line: one module per command group, all registered on :data:`app`.

The CLI is the only place that prints or exits.
"""

from __future__ import annotations

import sys

from exchange.cli._common import app

# each module registers its commands on app; this order is the order of ``zonex --help``
# isort: off
from exchange.cli import admin, keys, principals, zones, datasets  # noqa: F401
from exchange.cli import access, compute, ledger, he, psi  # noqa: F401
from exchange.cli import node, profile, witness  # noqa: F401
from exchange.cli import chain, xborder  # noqa: F401
from exchange.cli import report, console, monitor  # noqa: F401
# isort: on

__all__ = ["app", "main"]


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # pragma: no cover
        sys.exit(130)
