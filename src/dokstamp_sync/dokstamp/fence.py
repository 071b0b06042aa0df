"""The last check before a write leaves: :class:`FencedTransport`, the innermost transport.

A worker may stall anywhere (a rate-limiter wait, a token renewal, the breaker's probe, a
SIGSTOP, a long GC, a VM pause) for longer than its locks last; meanwhile another worker takes
the same event over. A check made before those waits proves nothing about the moment the
request is sent, so the check runs here, under every other transport (the breaker and the rate
limiter wrap this one): after every wait, just before the bytes go out. What ``check`` raises
(the sync walk's :class:`redis.exceptions.LockNotOwnedError`) aborts the request unsent and
passes through :func:`~.errors.exchange` untouched. Reads are never fenced: they change nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from dokstamp_sync.dokstamp.breaker import SAFE

Fence = Callable[[str, str], None]  # (method, path): raises to stop the request


class FencedTransport(httpx.BaseTransport):
    """Calls ``check(method, path)`` right before sending each request that may change
    something (every method but GET, HEAD, OPTIONS), then sends it with ``transport``."""

    def __init__(self, transport: httpx.BaseTransport, check: Fence) -> None:
        self.transport = transport
        self.check = check

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.method not in SAFE:
            self.check(request.method, request.url.path)
        return self.transport.handle_request(request)

    def close(self) -> None:
        self.transport.close()
