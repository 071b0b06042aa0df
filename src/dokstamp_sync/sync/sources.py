"""Where a file event's bytes come from: ``url`` (allow-listed hosts only), ``path`` (under the
configured folder, no escapes) or ``content_base64``; never more than the size limit.

Failures are classified per file, like DokStamp's: a source that is forbidden or broken (a 4xx,
a malformed URL, a missing or unreadable path) raises :class:`FileSourceError` (permanent: dead
letter); a document server that fails for now (a 5xx, a 429, a timeout, a refused connection)
raises :class:`SourceUnavailable`, a :class:`~dokstamp_sync.dokstamp.errors.TransientError`, so
the event is retried later (``Retry-After`` kept). Nothing else escapes :func:`load`.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from dokstamp_sync.dokstamp import errors


class FileSourceError(ValueError):
    """The file cannot be obtained, and retrying will not change that."""


class SourceUnavailable(errors.TransientError):
    """The document server (or the file system) failed for now: retry the event later. Not
    DokStamp's failure: the fleet's circuit breaker never sees it. ``unreachable``: no answer
    at all (a timeout, a refused connection), not an error answer about this one file."""

    def __init__(self, message: str, *, unreachable: bool = False, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.unreachable = unreachable


@dataclass(frozen=True)
class FilePolicy:
    allowed_hosts: frozenset[str]
    root: Path | None
    max_bytes: int


def _check_size(content: bytes, policy: FilePolicy) -> bytes:
    if len(content) > policy.max_bytes:
        raise FileSourceError(f"file is larger than the limit of {policy.max_bytes} bytes")
    if not content:
        raise FileSourceError("file is empty")
    return content


def _from_url(url: str, policy: FilePolicy, http: httpx.Client) -> bytes:
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
    except ValueError:  # e.g. "http://[::1/x": no retry will parse it
        raise FileSourceError("data.url is not a valid URL") from None
    if parts.scheme not in ("http", "https") or not host:
        raise FileSourceError(f"data.url must be an http(s) URL, got scheme {parts.scheme!r}")
    if host not in policy.allowed_hosts:
        raise FileSourceError(f"host {host!r} is not in DOKSTAMP_SYNC_FILE_HOSTS")
    try:
        request = http.build_request("GET", url)
    except httpx.InvalidURL:  # not an httpx.HTTPError: exchange would not translate it
        raise FileSourceError("data.url is not a valid URL") from None
    try:
        with errors.exchange(http, request, stream=True,
                             failed=lambda status: status >= 500 or status == 429) as response:
            if response.status_code >= 300:  # redirects are not followed: never upload them
                raise FileSourceError(f"document server answered {response.status_code} for "
                                      f"{parts.path}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > policy.max_bytes:
                    raise FileSourceError(
                        f"file is larger than the limit of {policy.max_bytes} bytes")
                chunks.append(chunk)
    except errors.TransientError as exc:  # 5xx, 429, timeout, connection: the server's, for now
        raise SourceUnavailable(f"document server {host}: {exc}", retry_after=exc.retry_after,
                                unreachable=isinstance(exc, errors.TransportError),
                                method="GET", path=parts.path) from None
    return b"".join(chunks)


def _from_path(path: str, policy: FilePolicy) -> bytes:
    if policy.root is None:
        raise FileSourceError("data.path is not allowed: DOKSTAMP_SYNC_FILE_ROOT is not set")
    root = policy.root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise FileSourceError("data.path escapes DOKSTAMP_SYNC_FILE_ROOT")
    try:
        if not target.is_file():
            raise FileSourceError(f"no such file under DOKSTAMP_SYNC_FILE_ROOT: {path}")
        if target.stat().st_size > policy.max_bytes:
            raise FileSourceError(f"file is larger than the limit of {policy.max_bytes} bytes")
        return target.read_bytes()
    except PermissionError:
        raise FileSourceError(f"cannot read {path} under DOKSTAMP_SYNC_FILE_ROOT: permission "
                              "denied") from None
    except OSError as exc:  # an I/O error, a network file system away: may pass
        raise SourceUnavailable(f"cannot read {path} under DOKSTAMP_SYNC_FILE_ROOT: "
                                f"{exc.strerror or type(exc).__name__}") from None


def _from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FileSourceError("data.content_base64 is not valid base64") from None


def load(data: dict[str, Any], policy: FilePolicy, http: httpx.Client) -> tuple[bytes, str]:
    """The file's bytes and MIME type; :class:`FileSourceError` or :class:`SourceUnavailable`
    when they cannot be had."""
    if data.get("url"):
        content = _from_url(str(data["url"]), policy, http)
    elif data.get("path"):
        content = _from_path(str(data["path"]), policy)
    else:
        content = _from_base64(str(data.get("content_base64", "")))
    mime = data.get("content_type") or mimetypes.guess_type(str(data.get("filename", "")))[0]
    return _check_size(content, policy), str(mime or "application/pdf")
