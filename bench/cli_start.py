"""How fast a client command of the ``zonex`` CLI starts, against the floor of its own libraries.

Runs, side by side and interleaved in one run, ``zonex catalog --help`` (as ``python -m
exchange.cli``) and ``python -c "import typer, httpx, rich"``, each in a fresh interpreter,
and prints the medians and their ratio. The goal is a ratio of at most 2: a client command
must not pay for the server stack (FastAPI, SQLAlchemy, DuckDB, TenSEAL, OpenDP, Casbin).

    python bench/cli_start.py [--runs 15] [--command "catalog --help"]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def _time(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs of each (interleaved)")
    parser.add_argument("--command", default="catalog --help", help="zonex arguments")
    args = parser.parse_args()

    zonex = [sys.executable, "-m", "exchange.cli", *args.command.split()]
    floor = [sys.executable, "-c", "import typer, httpx, rich"]
    bare = [sys.executable, "-c", "pass"]
    for argv in (zonex, floor, bare):  # warm the file cache once, not measured
        _time(argv)
    times: dict[str, list[float]] = {"zonex": [], "floor": [], "bare": []}
    for _ in range(args.runs):
        times["zonex"].append(_time(zonex))
        times["floor"].append(_time(floor))
        times["bare"].append(_time(bare))
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"{args.runs} runs each, interleaved; medians:")
    print(f"  zonex {args.command:<22} {med['zonex'] * 1000:7.1f} ms")
    print(f"  import typer, httpx, rich     {med['floor'] * 1000:7.1f} ms")
    print(f"  python -c pass                {med['bare'] * 1000:7.1f} ms")
    ratio = med["zonex"] / med["floor"]
    print(f"ratio zonex / libraries: {ratio:.2f} (goal <= 2.00)")


if __name__ == "__main__":
    main()
