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
# Tests run in two worker processes (pytest-xdist; CI has two cores). Tests marked
# @pytest.mark.xdist_group(name) share one worker, in file order (a module whose tests build on
# one world marks itself so). Serial run: scripts/test.sh -n 0
.venv/bin/python -m pytest -n 2 --dist loadgroup --durations=25 "$@"
