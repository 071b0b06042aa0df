"""Where a file event's bytes come from: ``url`` (allow-listed hosts only), ``path`` (under the
configured folder, no escapes) or ``content_base64``; never more than the size limit.

A source that is forbidden or broken raises :class:`FileSourceError` (permanent: dead letter);
a document server that is down raises a transient DokStamp-style error so the event is retried.
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
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if parts.scheme not in ("http", "https") or not host:
        raise FileSourceError(f"data.url must be an http(s) URL, got scheme {parts.scheme!r}")
    if host not in policy.allowed_hosts:
        raise FileSourceError(f"host {host!r} is not in DOKSTAMP_SYNC_FILE_HOSTS")
    request = http.build_request("GET", url)
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
    return b"".join(chunks)


def _from_path(path: str, policy: FilePolicy) -> bytes:
    if policy.root is None:
        raise FileSourceError("data.path is not allowed: DOKSTAMP_SYNC_FILE_ROOT is not set")
    root = policy.root.resolve()
    target = (root / path).resolve()
    if not target.is_relative_to(root):
        raise FileSourceError("data.path escapes DOKSTAMP_SYNC_FILE_ROOT")
    if not target.is_file():
        raise FileSourceError(f"no such file under DOKSTAMP_SYNC_FILE_ROOT: {path}")
    if target.stat().st_size > policy.max_bytes:
        raise FileSourceError(f"file is larger than the limit of {policy.max_bytes} bytes")
    return target.read_bytes()


def _from_base64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FileSourceError("data.content_base64 is not valid base64") from None


def load(data: dict[str, Any], policy: FilePolicy, http: httpx.Client) -> tuple[bytes, str]:
    """The file's bytes and MIME type."""
    if data.get("url"):
        content = _from_url(str(data["url"]), policy, http)
    elif data.get("path"):
        content = _from_path(str(data["path"]), policy)
    else:
        content = _from_base64(str(data.get("content_base64", "")))
    mime = data.get("content_type") or mimetypes.guess_type(str(data.get("filename", "")))[0]
    return _check_size(content, policy), str(mime or "application/pdf")
