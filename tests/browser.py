"""A real headless Chromium for the console's pages (Playwright driving Debian's
/usr/bin/chromium; no browser download) and the console served on loopback in a thread."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn

from exchange.audit.console import create_console_app

CHROMIUM = Path("/usr/bin/chromium")
#: no sandbox as root; no background connections (the machine's network is closed)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # running in a thread
        pass


@dataclass
class Console:
    url: str
    server: _Server
    thread: threading.Thread
    sock: socket.socket

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)
        self.sock.close()


def start_console(**kwargs: Any) -> Console:
    """A console app served by uvicorn on a loopback port the kernel picked, in a thread."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = int(sock.getsockname()[1])
    config = uvicorn.Config(
        create_console_app(bind="127.0.0.1", **kwargs),
        host="127.0.0.1",
        port=port,
        log_level="warning",
    )
    srv = _Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("console did not start")
        time.sleep(0.02)
    return Console(f"http://127.0.0.1:{port}", srv, thread, sock)


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (a Playwright ``Browser``)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
