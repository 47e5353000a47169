"""``zonex console``: a local web console for auditors and the operator (the ``audit`` extra).

Over an exported ledger bundle (the auditor): the bundle is verified when the console opens it
and its fault, if any, is shown on every page; an overview, a ledger explorer (filtered, paged),
each entry with its inclusion proof against the bundle's last checkpoint, and an offline receipt
check. Over the live exchange (the operator): approvals awaiting the operator, principals and
zones with suspend and reinstate. The operator's key stays in the console's process; the
console listens on loopback and refuses forms that do not come from its own pages
(:mod:`exchange.audit.console.security`). Server-rendered (FastAPI, Jinja2 autoescaped, htmx);
every asset ships in the package.

    from exchange.audit.console import create_console_app, open_bundle

    app = create_console_app(bundle=open_bundle("ledger.jsonl", log))
"""

from __future__ import annotations

from exchange.audit.console.app import create_console_app
from exchange.audit.console.bundle import LedgerBundle, open_bundle
from exchange.audit.console.operator import OperatorDesk

__all__ = ["LedgerBundle", "OperatorDesk", "create_console_app", "open_bundle"]
