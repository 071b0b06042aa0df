"""Serving the sandbox with uvicorn: in a background thread (tests, demo) or in the foreground.

:class:`SandboxServer` binds its socket itself before starting, so ``port=0`` picks a free port
with no race, and ``url`` is known as soon as :meth:`start` returns.
"""

from __future__ import annotations

import socket
import threading
import time
from types import TracebackType

import uvicorn
from starlette.applications import Starlette

from dokstamp_sync.sandbox.app import Sandbox, SandboxConfig, create_app


def _config(app: Starlette, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          lifespan="off", timeout_keep_alive=30)


class SandboxServer:
    """A sandbox served on ``host:port`` from a daemon thread; a context manager."""

    def __init__(self, sandbox: Sandbox | None = None, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.sandbox = sandbox or Sandbox()
        self.app = create_app(self.sandbox)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Without it, answers on loopback wait ~40 ms for delayed ACKs (Nagle).
        self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket.bind((host, port))
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(_config(self.app, self.host, self.port))
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]},
                                        name="dokstamp-sandbox", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> SandboxServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the sandbox did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()

    def __enter__(self) -> SandboxServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def serve(config: SandboxConfig, *, host: str = "127.0.0.1", port: int = 8400) -> None:
    """Run the sandbox in the foreground until interrupted."""
    uvicorn.Server(_config(create_app(Sandbox(config)), host, port)).run()
