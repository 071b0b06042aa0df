"""The last check before a write leaves: :class:`FencedTransport`, the innermost transport.

A worker may stall anywhere (a rate-limiter wait, a token renewal, the breaker's probe, a
SIGSTOP, a long GC, a VM pause) for longer than its locks last; meanwhile another worker takes
the same event over. A check made before those waits proves nothing about the moment the
request is sent, so the check runs here, under every other transport (the breaker and the rate
limiter wrap this one): after every wait, just before the bytes go out. What ``check`` raises
(the sync walk's :class:`redis.exceptions.LockNotOwnedError`) aborts the request unsent and
passes through :func:`~.errors.exchange` untouched. Reads and token requests (a login, marked
:data:`LOGIN_REQUEST`) are never fenced: they change nothing DokStamp holds.

With the rate limiter right above it, the check rides on the limiter's round trip instead
(:func:`writes_only` makes the rider): the token script runs it the moment it grants the
token, and nothing waits between that and the request leaving; this transport then sees the
request marked :data:`~.ratelimit.FENCED` and checks nothing more.
"""

from __future__ import annotations

from collections.abc import Callable

import httpx

from dokstamp_sync.dokstamp.breaker import SAFE
from dokstamp_sync.dokstamp.ratelimit import FENCED, Ride, Rider

Fence = Callable[[str, str], None]  # (method, path): raises to stop the request
# A request extension: a token request (a login, a refresh). It changes nothing DokStamp holds,
# so, like a read, it is not fenced (and never sets what a write's check sets).
LOGIN_REQUEST = "dokstamp.login_request"


def fenced(request: httpx.Request) -> bool:
    return request.method not in SAFE and not request.extensions.get(LOGIN_REQUEST)
Riding = Callable[[str, str], Rider | None]  # (method, path): the fence's check as a rider


def writes_only(riding: Riding) -> Ride:
    """The limiter's :data:`~.ratelimit.Ride`: ``riding``'s rider for a write, none for a read."""
    def ride(request: httpx.Request) -> Rider | None:
        return riding(request.method, request.url.path) if fenced(request) else None
    return ride


class FencedTransport(httpx.BaseTransport):
    """Calls ``check(method, path)`` right before sending each request that may change
    something (every method but GET, HEAD, OPTIONS; a token request changes nothing DokStamp
    holds), then sends it with ``transport``."""

    def __init__(self, transport: httpx.BaseTransport, check: Fence) -> None:
        self.transport = transport
        self.check = check

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if fenced(request) and not request.extensions.pop(FENCED, False):
            self.check(request.method, request.url.path)
        return self.transport.handle_request(request)

    def close(self) -> None:
        self.transport.close()
