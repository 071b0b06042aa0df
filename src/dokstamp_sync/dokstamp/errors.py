"""Every way a DokStamp call can fail, split by what the caller must do.

::

    DokStampError
    ├── TransientError           retry later, with backoff (at least ``retry_after`` when set)
    │   ├── TransportError       connection refused/reset, DNS, protocol error (``sent``: False
    │   │   │                    when nothing left: no connection made)
    │   │   └── Timeout          connect/read/write/pool timeout: the write MAY have happened,
    │   │                        and may still (:func:`may_land_later`)
    │   ├── RateLimited          slow down: wait ``retry_after`` seconds (or back off if None)
    │   │   ├── TooManyRequests  HTTP 429, ``retry_after`` from its ``Retry-After``
    │   │   └── Paused           not sent: the fleet's limiter holds the tenant (after a 429)
    │   │                        for longer than it may wait
    │   ├── CircuitOpen          not sent: the fleet's circuit breaker is open (DokStamp kept
    │   │                        failing); ``retry_after`` until its next probe. A wait, not a
    │   │                        failed try
    │   ├── ServerError          HTTP 5xx (``Retry-After`` kept): the write MAY have happened
    │   └── MalformedResponse    a 2xx whose body is not what the docs show (not JSON, empty,
    │       │                    wrong shape): the write MAY have happened, search first
    │       └── UploadMismatch   ``POST /files`` records do not match the files sent (count,
    │                            size, name): upload them one per request instead
    └── PermanentError           do not retry: dead-letter with ``status``/``message``/``errors``
        ├── AuthenticationError  401 that survived one token renewal, or refused credentials
        ├── PermissionDenied     403
        ├── NotFound             404 (also: another tenant's resource)
        ├── Conflict             409 (undocumented): e.g. a duplicate; search and adopt a match
        ├── ValidationFailed     422, with DokStamp's field ``errors``
        └── ClientError          any other 4xx (400, 405, ...)

Foreign exceptions (httpx) are translated in exactly one place, :func:`exchange`, which sends a
request and turns transport failures (:func:`from_httpx_error`) and error statuses
(:func:`from_response`) into this tree; :func:`malformed` classifies a success answer whose body
is unusable. :func:`exchange` also bounds every answer it reads: a body larger than its
``max_bytes`` (read as a stream, abandoned past the cap) or JSON nested deeper than
:data:`MAX_JSON_DEPTH` levels (checked before any parser recurses) is a
:class:`MalformedResponse` when the status was a success, and an error status without its body
otherwise. No exception here ever carries a token, a password or a client secret: only the
method, the path (without query string), the status, DokStamp's own error body and, for a
malformed answer, a short excerpt that is never taken from a body holding a secret.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import httpx

from dokstamp_sync.limits import MAX_DEPTH as MAX_JSON_DEPTH  # DokStamp nests a few levels
from dokstamp_sync.limits import RESPONSE_MAX_BYTES as MAX_BODY_BYTES
from dokstamp_sync.limits import scan

EXCERPT_CHARS = 200  # of a malformed body, to recognise it (an HTML error page, a proxy's text)
# Keys whose values are secrets: a JSON body holding any of them is never excerpted, and the
# console shows their values as REDACTED (:func:`redact`). A key is one when its name, in lower
# case with ``-`` as ``_``, is listed or ends with one of SECRET_ENDINGS (``db_password``,
# ``x_api_key``, ``access_token``).
SECRET_KEYS = frozenset({"access_token", "refresh_token", "token", "id_token", "password",
                         "client_secret", "secret", "authorization", "api_key", "apikey",
                         "private_key", "passwd", "cookie", "set_cookie"})
SECRET_ENDINGS = ("password", "passwd", "secret", "token", "api_key", "apikey", "private_key")
REDACTED = "***"


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
    """The call may succeed if retried later; nothing is wrong with the data.

    ``retry_after`` is how many seconds the server (its ``Retry-After``, on a 429 or a 5xx) or
    our own rate limiter asked us to wait, or ``None`` when nobody said: back off as usual.
    """

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class TransportError(TransientError):
    """The request did not get an HTTP answer (connection refused, reset, DNS...).

    ``sent`` is False when it never left (no connection could be made, none was free in the
    pool): nothing can have been applied."""

    def __init__(self, message: str, *, sent: bool = True, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.sent = sent


class Timeout(TransportError):
    """No answer in time. A write may have been applied even though we saw no response."""


class HTTPStatusError(DokStampError):
    """An error answer from DokStamp; ``body`` is its JSON error body (or ``{}``)."""

    def __init__(self, message: str, *, status: int, body: Mapping[str, Any] | None = None,
                 **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status = status
        self.body: dict[str, Any] = dict(body or {})

    def __str__(self) -> str:
        return f"{self.method} {self.path} -> {self.status}: {self.message}"


class RateLimited(TransientError):
    """Too many requests for the tenant: wait ``retry_after`` seconds (or back off if None)."""


class TooManyRequests(HTTPStatusError, RateLimited):
    """HTTP 429. ``retry_after`` is the server's ``Retry-After`` in seconds, when it sent one."""


class Paused(RateLimited):
    """The request was not sent: after a 429 the shared limiter pauses every process of the
    tenant, and the pause (``retry_after`` seconds left) is longer than this process may wait
    with its locks held. Park the work for ``retry_after`` rather than sleep."""


class CircuitOpen(TransientError):
    """Not sent: DokStamp kept failing and the fleet's circuit breaker holds every request
    (see :mod:`.breaker`); ``retry_after`` is when its next probe may go out."""


class ServerError(HTTPStatusError, TransientError):
    """HTTP 5xx. The write may have been applied before the failure: search before re-creating.
    ``retry_after`` is the answer's ``Retry-After`` (a 503 may send one), else ``None``."""


class MalformedResponse(TransientError):
    """A success status whose body is unusable: not JSON (an HTML page), empty where an entity
    was due, or ``data`` of the wrong shape. The server may be misbehaving for a while; the
    write may have been applied, so search before re-creating.

    ``excerpt`` is the body's first characters (for recognising, say, a proxy's HTML page); it is
    empty when the body could hold a secret (a JSON body with a token, any token-endpoint JSON).
    """

    def __init__(self, message: str, *, status: int, excerpt: str = "", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.status = status
        self.excerpt = excerpt

    def __str__(self) -> str:
        shown = f" [{self.excerpt!r}]" if self.excerpt else ""
        return f"{self.method} {self.path} -> {self.status}: {self.message}{shown}"


class UploadMismatch(MalformedResponse):
    """``POST /files`` answered, but its records do not match the files sent (how many, their
    sizes, their names): which UUID belongs to which file is unknown. The files may well be
    stored (uploads are deduplicated by content), so upload them again one per request."""


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


class Conflict(PermanentError):
    """409, which the docs never list: most plausibly a duplicate (a unique key taken). Sending
    the same request again will not help; search for the existing entity and adopt an exact
    match."""


class ValidationFailed(PermanentError):
    """422: DokStamp rejected the payload; see ``errors``."""


class ClientError(PermanentError):
    """Any other 4xx."""


_PERMANENT_BY_STATUS: dict[int, type[PermanentError]] = {
    401: AuthenticationError,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
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
    except (ValueError, RecursionError):
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
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    if status == 429:
        return TooManyRequests(message, retry_after=retry_after, **kw)
    if status >= 500:
        return ServerError(message, retry_after=retry_after, **kw)
    return _PERMANENT_BY_STATUS.get(status, ClientError)(message, **kw)


# Failures raised before a byte of the request left: no connection made, none free in the pool.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)


def from_httpx_error(exc: httpx.HTTPError, request: httpx.Request) -> TransportError:
    """Translate an httpx transport failure. The message names the failure, never headers."""
    method, path = request.method, request.url.path
    kind = type(exc).__name__
    sent = not isinstance(exc, _NOT_SENT)
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"{kind}: no answer in time", method=method, path=path, sent=sent)
    return TransportError(f"{kind}: {exc}", method=method, path=path, sent=sent)


# What a gateway in front of an API answers when it gave up waiting for the API, which may still
# be working on the request: 504, and the non-standard 524 (a CDN's origin timeout) and 598/599
# (a proxy's network read timeout).
GATEWAY_TIMEOUTS = frozenset({504, 524, 598, 599})
# Some gateways that give up waiting for a working API say so with a 502 or 503 instead (a
# PaaS router's 503, a cloud load balancer's 502), after their own timeout: 15 s or more by
# default, and longer ones reach us as our own read timeout. A 5xx answered within this many
# seconds of sending was no such give-up.
ANSWERED_WITHIN = 2.0


def may_land_later(exc: DokStampError, took: float | None = None) -> bool:
    """Whether a failed write may still be applied AFTER we saw it fail: it was sent and got no
    answer (a timeout, a connection dropped), or a gateway answered that it gave up waiting (a
    gateway-timeout status, or any 5xx that took ``took`` >= :data:`ANSWERED_WITHIN` seconds,
    or whose time is unknown). Any other answer ends the request: a prompt 5xx, or a success
    status with an unusable body, was given once the server (or the proxy that refused it) was
    done with it; whatever it wrote is there now, for a search to find."""
    if isinstance(exc, TransportError):
        return exc.sent
    if isinstance(exc, ServerError):
        return exc.status in GATEWAY_TIMEOUTS or took is None or took >= ANSWERED_WITHIN
    return not isinstance(exc, MalformedResponse)


def is_secret_key(name: Any) -> bool:
    """Whether a JSON key's value is a secret (see :data:`SECRET_KEYS`)."""
    key = str(name).lower().replace("-", "_")
    return key in SECRET_KEYS or key.endswith(SECRET_ENDINGS)


def redact(value: Any) -> Any:
    """``value`` (parsed JSON) with every secret-named key's value replaced by
    :data:`REDACTED`, at any depth."""
    if isinstance(value, dict):
        return {k: REDACTED if is_secret_key(k) else redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


# A JSON member in text that may not parse (a malformed stream entry): "key": value.
_MEMBER = re.compile(r'"((?:[^"\\]|\\.){1,200})"(\s*:\s*)("(?:[^"\\]|\\.)*"?|[^,}\]\s]+)')


def redact_text(text: str) -> str:
    """``text`` with the value of every ``"secret-named key": value`` it holds replaced by
    ``"***"``: for text that is not JSON, or not whole (a malformed entry's raw text)."""
    def hide(m: re.Match[str]) -> str:
        return f'"{m[1]}"{m[2]}"{REDACTED}"' if is_secret_key(m[1]) else m[0]

    return _MEMBER.sub(hide, text)


def _holds_secret(value: Any) -> bool:
    if isinstance(value, dict):
        return any(is_secret_key(k) or _holds_secret(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_secret(v) for v in value)
    return False


def excerpt(response: httpx.Response, *, json_may_hold_secrets: bool = False) -> str:
    """The first :data:`EXCERPT_CHARS` characters of the body, on one line; empty when the body
    is JSON holding a secret-named key, or is any JSON at all when ``json_may_hold_secrets``
    (the token endpoints: their JSON is a token, malformed or not)."""
    text = response.text
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    else:
        if json_may_hold_secrets or _holds_secret(parsed):
            return ""
    return " ".join(text[:EXCERPT_CHARS].split())


def malformed(response: httpx.Response, reason: str, *,
              json_may_hold_secrets: bool = False) -> MalformedResponse:
    """A success answer whose body is unusable (``reason`` says how), as an exception."""
    return MalformedResponse(reason, status=response.status_code, method=response.request.method,
               path=response.request.url.path,
               excerpt=excerpt(response, json_may_hold_secrets=json_may_hold_secrets))


def is_error(status: int) -> bool:
    """Statuses :func:`exchange` raises for by default: every 4xx and 5xx."""
    return status >= 400


def _read_bounded(response: httpx.Response, max_bytes: int) -> bool:
    """Read a streamed body into the response, as ``response.read()`` would, unless it is
    larger than ``max_bytes`` (decoded: a small compressed body may inflate): then stop reading
    and answer False, the body left unread."""
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            return False
        chunks.append(chunk)
    response._content = b"".join(chunks)  # where Response.read() keeps a body it has read
    return True


def _bounded_problem(response: httpx.Response, max_bytes: int) -> str | None:
    """Read the body within the caps; the reason it is unusable (too large, too deep), or None.
    An unusable body is replaced by an empty one, so nothing parses it afterwards."""
    if not _read_bounded(response, max_bytes):
        response._content = b""
        return f"the answer is larger than {max_bytes} bytes (DOKSTAMP_MAX_RESPONSE_BYTES)"
    if scan(response.text)[0] is not None:  # counted without recursing, before json.loads
        response._content = b""
        return f"the answer is JSON nested deeper than {MAX_JSON_DEPTH} levels"
    return None


@contextmanager
def exchange(http: httpx.Client, request: httpx.Request, *, auth: httpx.Auth | None = None,
             stream: bool = False, max_bytes: int = MAX_BODY_BYTES,
             failed: Callable[[int], bool] = is_error) -> Iterator[httpx.Response]:
    """Send ``request`` with ``http`` and hand over the response: the one place where httpx's
    exceptions become ours.

    A transport failure, during the send or while the block reads a streamed body, raises
    :class:`TransportError` (or :class:`Timeout`); a status for which ``failed`` is true raises
    :func:`from_response`'s class. Anything else raised in the block (our own errors, the
    limiter's :class:`Paused`) passes through. The response is closed on leaving the block.

    Unless ``stream`` (the block reads the body itself, and bounds it), the body is read here
    within ``max_bytes`` and :data:`MAX_JSON_DEPTH`: a success answer past either is a
    :class:`MalformedResponse` (transient: the write may have happened, search first); an
    error answer past either keeps its status and loses its body.
    """
    try:
        # Always streamed from the network: the body is read here, chunk by chunk, bounded.
        response = http.send(request, stream=True) if auth is None \
            else http.send(request, auth=auth, stream=True)
        try:
            problem = None if stream else _bounded_problem(response, max_bytes)
            if failed(response.status_code):
                if stream:
                    _bounded_problem(response, max_bytes)  # an error page, within the caps
                raise from_response(response)
            if problem is not None:
                raise MalformedResponse(problem, status=response.status_code,
                                        method=request.method, path=request.url.path)
            yield response
        finally:
            response.close()
    except httpx.HTTPError as exc:
        raise from_httpx_error(exc, request) from None
