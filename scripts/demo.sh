#!/usr/bin/env bash
# Set up (once) and run the showcase on the embedded default (SQLite, no server to install):
# the city's financial public-data zone on a real server on loopback — zones, classified
# datasets, grants, a private join, encrypted scoring, a secure sum, denials, revocation and
# the auditor's offline checks.
# Usage: scripts/demo.sh [DATA_DIR] [PORT]     (or --data-dir DIR, --port PORT; defaults
#        demo-data and 8421). A busy port is named in one line, with how to pick another.
set -euo pipefail
usage="usage: scripts/demo.sh [DATA_DIR] [PORT]  (or --data-dir DIR --port PORT)"
data_dir="demo-data"
port="8421"
positional=()
while [ $# -gt 0 ]; do
  case "$1" in
    --port) [ $# -ge 2 ] || { echo "✗ --port needs a number; $usage" >&2; exit 2; }
            port="$2"; shift 2 ;;
    --port=*) port="${1#--port=}"; shift ;;
    --data-dir) [ $# -ge 2 ] || { echo "✗ --data-dir needs a directory; $usage" >&2; exit 2; }
                data_dir="$2"; shift 2 ;;
    --data-dir=*) data_dir="${1#--data-dir=}"; shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    -*) echo "✗ unknown option $1; $usage" >&2; exit 2 ;;
    *) positional+=("$1"); shift ;;
  esac
done
[ ${#positional[@]} -ge 1 ] && data_dir="${positional[0]}"
[ ${#positional[@]} -ge 2 ] && port="${positional[1]}"
if [ ${#positional[@]} -gt 2 ]; then
  echo "✗ too many arguments; $usage" >&2
  exit 2
fi
case "$port" in
  ''|*[!0-9]*) echo "✗ port '$port' is not a number (1-65535); $usage" >&2; exit 2 ;;
esac
# a DATA_DIR given is taken from where the script was called; the default lives in the checkout
if [ "$data_dir" != "demo-data" ]; then
  case "$data_dir" in
    /*) ;;
    *) data_dir="$PWD/$data_dir" ;;
  esac
fi
# before any installing: something already answering on the port (the showcase checks again)
if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
  echo "✗ port $port on 127.0.0.1 is busy (something is listening there); pick another:" \
    "scripts/demo.sh DATA_DIR PORT (or --port PORT), e.g. $((port + 1))" >&2
  exit 2
fi
cd "$(dirname "$0")/.."
scripts/setup.sh server
exec .venv/bin/python examples/financial_zone/financial_zone.py --data-dir "$data_dir" \
  --port "$port"
