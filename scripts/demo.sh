#!/usr/bin/env bash
# Set up (once) and run the showcase on the embedded default (SQLite, no server to install):
# the city's financial public-data zone on a real server on loopback — zones, classified
# datasets, grants, a private join, encrypted scoring, a secure sum, denials, revocation and
# the auditor's offline checks.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python examples/financial_zone/financial_zone.py --data-dir "${1:-demo-data}"
