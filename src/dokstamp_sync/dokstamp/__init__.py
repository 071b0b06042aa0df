"""The DokStamp API client: :class:`DokStampClient`, its auth and its error tree."""

from __future__ import annotations

import httpx

from dokstamp_sync.config import ConfigError, Settings
from dokstamp_sync.dokstamp.auth import ClientCredentials, Credentials, PasswordLogin, TokenManager
from dokstamp_sync.dokstamp.breaker import CircuitBreaker
from dokstamp_sync.dokstamp.client import (
    DokStampClient,
    Entity,
    IssueStyle,
    build_http_client,
    tenant_domain,
)
from dokstamp_sync.dokstamp.fence import Fence, Riding
from dokstamp_sync.dokstamp.pages import Listing, Page
from dokstamp_sync.dokstamp.ratelimit import RateLimitedTransport, RateLimiter
from dokstamp_sync.dokstamp.tokens import CachedToken, MemoryTokenStore, RedisTokenStore, TokenStore
from dokstamp_sync.dokstamp.uploads import Upload, check_upload

__all__ = [
    "CachedToken", "ClientCredentials", "Credentials", "DokStampClient", "Entity", "Listing",
    "MemoryTokenStore", "Page", "PasswordLogin", "RateLimitedTransport", "RateLimiter",
    "RedisTokenStore", "TokenManager", "TokenStore", "Upload", "build_http_client",
    "check_upload", "client_from_settings", "credentials_from_settings", "tenant_domain",
]


def credentials_from_settings(settings: Settings) -> Credentials:
    """Client credentials when configured (the newer scheme), else the password login."""
    if settings.dokstamp_client_id and settings.dokstamp_client_secret:
        return ClientCredentials(settings.dokstamp_client_id,
                                 settings.dokstamp_client_secret.get_secret_value())
    email, password = settings.dokstamp_email, settings.dokstamp_password
    if not (email and password):
        raise ConfigError("configuration error: no DokStamp credentials")
    return PasswordLogin(email, password.get_secret_value())


def client_from_settings(settings: Settings, store: TokenStore | None = None,
                         http: httpx.Client | None = None,
                         limiter: RateLimiter | None = None,
                         breaker: CircuitBreaker | None = None,
                         transport: httpx.BaseTransport | None = None,
                         fence: Fence | None = None,
                         riding: Riding | None = None) -> DokStampClient:
    """A ready client for ``settings``; ``store`` shares tokens between processes (Redis);
    ``limiter`` paces every request it sends (fleet-wide), ``breaker`` holds them while
    DokStamp keeps failing (fleet-wide); ``fence`` is called just before each write leaves
    (see :mod:`.fence`; ``riding``: the same check, run in the limiter's round trip). A given
    ``http`` is used as it is,
    so it cannot be combined with ``limiter``: build it with :func:`build_http_client`'s.
    ``transport`` replaces the network (a measuring wrapper around it, a mock in tests)."""
    if http is not None and (limiter, breaker, fence) != (None, None, None):
        raise TypeError("pass the limiter to build_http_client when giving your own http")
    client = http or build_http_client(settings.dokstamp_api_url,
                                       timeout=settings.dokstamp_timeout, limiter=limiter,
                                       breaker=breaker, transport=transport, fence=fence,
                                       riding=riding)
    tokens = TokenManager(client, credentials_from_settings(settings),
                          store or MemoryTokenStore())
    # Settings resolve "auto" (the credential scheme's style) when they are read.
    style: IssueStyle = "finish" if settings.dokstamp_issue_style == "finish" else "status"
    api = DokStampClient(client, tenant=settings.dokstamp_tenant, tokens=tokens,
                         issue_style=style)
    api.max_response_bytes = settings.dokstamp_max_response_bytes
    return api
