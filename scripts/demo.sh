#!/usr/bin/env bash
# Set up (once) and run the main scenario on the embedded default (SQLite, no server to
# install): a real server on loopback, zones, datasets, catalog, rejected calls, offline audit.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python examples/quickstart.py --data-dir "${1:-demo-data}"
