"""Every way a DokStamp call can fail, split by what the caller must do.

::

    DokStampError
    ├── TransientError           retry later, with backoff; the data is fine
    │   ├── TransportError       connection refused/reset, DNS, protocol error
    │   │   └── Timeout          connect/read/write/pool timeout: the write MAY have happened
    │   ├── RateLimited          HTTP 429; ``retry_after`` seconds from ``Retry-After`` (or None)
    │   └── ServerError          HTTP 5xx: the write MAY have happened (a lost response)
    └── PermanentError           do not retry: dead-letter with ``status``/``message``/``errors``
        ├── AuthenticationError  401 that survived one token renewal, or refused credentials
        ├── PermissionDenied     403
        ├── NotFound             404 (also: another tenant's resource)
        ├── ValidationFailed     422, with DokStamp's field ``errors``
        └── ClientError          any other 4xx (400, 405, 409, ...)

Foreign exceptions (httpx) are translated in exactly one place: :func:`from_httpx_error` and
:func:`from_response`. No exception here ever carries a token, a password or a client secret:
only the method, the path (without query string), the status and DokStamp's own error body.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import httpx


class DokStampError(Exception):
    """Base of every error raised by the DokStamp client."""

    def __init__(self, message: str, *, method: str = "", path: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.method = method
        self.path = path

    def __str__(self) -> str:
        where = f"{self.method} {self.path}: " if self.method else ""
        return f"{where}{self.message}"


class TransientError(DokStampError):
    """The call may succeed if retried later; nothing is wrong with the data."""


class TransportError(TransientError):
    """The request did not get an HTTP answer (connection refused, reset, DNS...)."""


class Timeout(TransportError):
    """No answer in time. A write may have been applied even though we saw no response."""


class HTTPStatusError(DokStampError):
    """An error answer from DokStamp; ``body`` is its JSON error body (or ``{}``)."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message, method=method, path=path)
        self.status = status
        self.body: dict[str, Any] = dict(body or {})

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}: {self.message}"


class RateLimited(HTTPStatusError, TransientError):
    """HTTP 429. ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one."""

    def __init__(self, message: str, *, retry_after: float | None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(HTTPStatusError, TransientError):
    """HTTP 5xx. The write may have been applied before the failure: search before re-creating."""


class PermanentError(HTTPStatusError):
    """A 4xx other than 429: the request itself is wrong and retrying will not help.

    ``errors`` is DokStamp's field errors, e.g. ``{"course_uuid": ["The selected course uuid is
    invalid."]}``; empty when the body had none.
    """

    @property
    def errors(self) -> dict[str, list[str]]:
        raw = self.body.get("errors")
        if not isinstance(raw, dict):
            return {}
        return {str(k): [str(m) for m in v] if isinstance(v, list) else [str(v)]
                for k, v in raw.items()}


class AuthenticationError(PermanentError):
    """401 after a token renewal, or credentials DokStamp refuses."""


class PermissionDenied(PermanentError):
    """403: the token is valid but lacks permission."""


class NotFound(PermanentError):
    """404: no such resource in this tenant (another tenant's resource looks the same)."""


class ValidationFailed(PermanentError):
    """422: DokStamp rejected the payload; see ``errors``."""


class ClientError(PermanentError):
    """Any other 4xx."""


_PERMANENT_BY_STATUS: dict[int, type[PermanentError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    422: ValidationFailed,
}


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(0.0, seconds)


def _json_body(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {"data": body}


def from_response(response: httpx.Response) -> HTTPStatusError:
    """Translate an error response (status >= 400) into the matching exception."""
    method, path = response.request.method, response.request.url.path
    status = response.status_code
    body = _json_body(response)
    # DokStamp says "message"; its OAuth endpoint also says "error_description".
    message = str(body.get("message") or body.get("error_description")
                  or response.reason_phrase or f"HTTP {status}")
    kw: dict[str, Any] = {"status": status, "method": method, "path": path, "body": body}
    if status == 429:
        return RateLimited(message, retry_after=parse_retry_after(
            response.headers.get("Retry-After")), **kw)
    if status >= 500:
        return ServerError(message, **kw)
    return _PERMANENT_BY_STATUS.get(status, ClientError)(message, **kw)


def from_httpx_error(exc: httpx.HTTPError, request: httpx.Request) -> TransportError:
    """Translate an httpx transport failure. The message names the failure, never headers."""
    method, path = request.method, request.url.path
    kind = type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"{kind}: no answer in time", method=method, path=path)
    return TransportError(f"{kind}: {exc}", method=method, path=path)
