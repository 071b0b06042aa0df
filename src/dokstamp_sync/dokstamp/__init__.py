"""The DokStamp API client: :class:`DokStampClient`, its auth and its error tree."""

from __future__ import annotations

import httpx

from dokstamp_sync.config import ConfigError, Settings
from dokstamp_sync.dokstamp.auth import ClientCredentials, Credentials, PasswordLogin, TokenManager
from dokstamp_sync.dokstamp.client import (
    DokStampClient,
    Entity,
    Page,
    Upload,
    build_http_client,
)
from dokstamp_sync.dokstamp.tokens import CachedToken, MemoryTokenStore, RedisTokenStore, TokenStore

__all__ = [
    "CachedToken", "ClientCredentials", "Credentials", "DokStampClient", "Entity",
    "MemoryTokenStore", "Page", "PasswordLogin", "RedisTokenStore", "TokenManager", "TokenStore",
    "Upload", "build_http_client", "client_from_settings", "credentials_from_settings",
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
                         http: httpx.Client | None = None) -> DokStampClient:
    """A ready client for ``settings``; ``store`` shares tokens between processes (Redis)."""
    client = http or build_http_client(settings.dokstamp_api_url,
                                       timeout=settings.dokstamp_timeout)
    tokens = TokenManager(client, credentials_from_settings(settings),
                          store or MemoryTokenStore())
    return DokStampClient(client, tenant=settings.dokstamp_tenant, tokens=tokens,
                          issue_style=settings.dokstamp_issue_style)
