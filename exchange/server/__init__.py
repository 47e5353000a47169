"""The exchange: API, authentication, registry, access workflow, budgets, ledger, task
dispatch to zone nodes, and the computations' exchange side. Installed with
``pip install zonex[server]``; the client and the auditor never import it."""
