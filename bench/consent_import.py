"""Recording many consents: one ``zonex consent import`` against one ``zonex consent add`` per row.

Against a live exchange on loopback (SQLite, the embedded default), in one run: imports
``--rows`` consents from one CSV file, records ``--adds`` consents one ``consent add`` at a
time, and projects those to ``--rows``. Both run in this process (typer's runner), which
leaves out the interpreter start every real ``zonex`` call pays; ``--spawn N`` also times N
``consent add`` calls as separate processes, as a shell loop would make them.

    python -P bench/consent_import.py [--rows 10000] [--adds 200] [--spawn 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from typer.testing import CliRunner

from crypto.keys import SigningKey
from exchange.cli import app
from exchange.client.sdk import Client
from exchange.keyfile import load_private_key, write_private_key
from exchange.server.runtime import Exchange, init_data_dir
from exchange.settings import Settings

PURPOSE = "credit-assessment"


@contextmanager
def serving(ex: Exchange) -> Iterator[str]:
    """uvicorn on a free loopback port serving ``ex``, in a thread; yields its URL."""
    import socket

    import uvicorn

    from exchange.server.api.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(
        uvicorn.Config(create_app(exchange=ex), host="127.0.0.1", port=port, log_level="warning")
    )
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000, help="consents in the import")
    parser.add_argument("--adds", type=int, default=200, help="consent add calls timed")
    parser.add_argument("--spawn", type=int, default=5, help="consent add calls as processes")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data_dir = root / "exchange"
        init_data_dir(data_dir, origin="bench.zonex/log")
        ex = Exchange(Settings.from_data_dir(data_dir))
        ex.start()
        try:
            with serving(ex) as url:
                provider, consumer = SigningKey.generate(), SigningKey.generate()
                operator = load_private_key(data_dir / "operator.key")
                with Client(url, operator) as op:
                    op.register_principal("Tax Bureau", "agency", provider.public_key)
                    op.register_principal("City Bank", "enterprise", consumer.public_key)
                with Client(url, provider) as p:
                    p.create_zone("tax", "tax records")
                key = root / "provider.key"
                write_private_key(key, provider)
                common = ["--url", url, "--key", str(key)]
                runner = CliRunner()

                csv_file = root / "consents.csv"
                rows = "".join(f"S{i:08d},City Bank,{PURPOSE},365\n" for i in range(args.rows))
                csv_file.write_text("subject,consumer,purpose,days\n" + rows, "utf-8")
                start = time.perf_counter()
                result = runner.invoke(app, ["consent", "import", "tax", str(csv_file), *common])
                imported = time.perf_counter() - start
                if result.exit_code != 0:
                    raise SystemExit(result.output)

                start = time.perf_counter()
                for i in range(args.adds):
                    result = runner.invoke(
                        app,
                        [
                            *("consent", "add", "tax", "--subject", f"A{i:08d}"),
                            *("--consumer", "City Bank", "--purpose", PURPOSE, *common),
                        ],
                    )
                    if result.exit_code != 0:
                        raise SystemExit(result.output)
                per_add = (time.perf_counter() - start) / args.adds

                spawned: list[float] = []
                for i in range(args.spawn):
                    argv = [sys.executable, "-m", "exchange.cli", "consent", "add", "tax"]
                    argv += ["--subject", f"P{i:08d}", "--consumer", "City Bank"]
                    argv += ["--purpose", PURPOSE, *common]
                    start = time.perf_counter()
                    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
                    spawned.append(time.perf_counter() - start)
        finally:
            ex.close()

    projected = per_add * args.rows
    print(f"{args.rows} consents, one consent import:     {imported:8.2f} s")
    print(f"{args.adds} consent add calls (in process):   {per_add * args.adds:8.2f} s")
    print(f"  projected to {args.rows}:                   {projected:8.2f} s")
    print(f"ratio adds / import (in process): {projected / imported:.1f}")
    if spawned:
        one = statistics.median(spawned)
        print(f"one consent add as a process (median of {len(spawned)}): {one * 1000:.0f} ms")
        print(f"ratio adds / import (one process per add): {one * args.rows / imported:.1f}")


if __name__ == "__main__":
    main()
