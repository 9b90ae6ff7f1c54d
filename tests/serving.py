"""A real tensorgate server on a free loopback port, run on its own thread and event loop.

Its own loop lets blocking clients (tritonclient's sync API, our stubs on a sync channel) and grpc.aio clients in
the test's loop talk to it alike.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from tensorgate.server import ServerSettings, TensorgateServer

T = TypeVar("T")


class ServerThread:
    """`with ServerThread(repo) as s:` starts the server; `s.address` is "127.0.0.1:PORT"."""

    def __init__(self, repository: Path, **settings: Any) -> None:
        settings.setdefault("grpc_port", 0)
        settings.setdefault("shutdown_grace_s", 5.0)
        settings.setdefault("metrics_port", 0)  # never the fixed default: tests run side by side
        self.settings = ServerSettings(model_repository=repository, **settings)
        self.app = TensorgateServer(self.settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tensorgate-test-server", daemon=True)
        self.address = ""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        """Run a coroutine on the server's loop (e.g. `s.run(s.app.repository.load("m"))`) and wait for it."""
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        port = self.run(self.app.start())
        self.address = f"127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.run(self.app.stop(grace=2.0))
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
