#!/usr/bin/env bash
# Set up (once) and run every check: lint, format, types, tests (SQLite; PostgreSQL too when
# ZONEX_TEST_DATABASE_URL points at a server, as .ci/run arranges).
# Extra arguments go to pytest, e.g. scripts/test.sh -k ledger
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh dev
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
# Tests run in two worker processes (pytest-xdist; CI has two cores), a module's tests on one
# worker in file order (--dist loadscope: a module's world is set up once and its tests build on
# it). Serial run: scripts/test.sh -n 0
.venv/bin/python -m pytest -n 2 --dist loadscope --durations=25 "$@"
