"""A DokStamp client on an ``httpx.MockTransport``, for answers the sandbox never gives
(malformed bodies, odd pagination, 409, a 503 with ``Retry-After``): httpx's own seam, the
client code above it runs unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from dokstamp_sync.dokstamp import DokStampClient, MemoryTokenStore, PasswordLogin, TokenManager

Handler = Callable[[httpx.Request], httpx.Response]


def login_then(handler: Handler) -> Handler:
    """``handler`` for resource calls; ``POST /auth/login`` answers a token."""

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/auth/login":
            return httpx.Response(200, json={"access_token": "tok-SECRET", "expires_in": 3600})
        return handler(request)

    return answer


@pytest.fixture
def mock_api() -> Iterator[Callable[..., DokStampClient]]:
    """``mock_api(handler)``: a client whose resource calls ``handler`` answers, the login
    answered for it (``login=False``: ``handler`` answers the token endpoint too)."""
    opened: list[httpx.Client] = []

    def factory(handler: Handler, *, login: bool = True) -> DokStampClient:
        http = httpx.Client(base_url="https://api.example", transport=httpx.MockTransport(
            login_then(handler) if login else handler))
        opened.append(http)
        return DokStampClient(http, tenant="t", tokens=TokenManager(
            http, PasswordLogin("a@b.c", "pw"), MemoryTokenStore()))

    yield factory
    for http in opened:
        http.close()
