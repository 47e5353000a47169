"""Computations over zone data (DESIGN, "Computations"): each one authenticates, authorizes every
step through :func:`exchange.server.access.authorize`, runs under the zone's analysis rules,
records a ledger entry and returns."""
