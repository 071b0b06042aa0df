"""Logging in to DokStamp, both documented ways, and keeping the token fresh.

* :class:`PasswordLogin` (older docs): ``POST /auth/login`` with email and password; renew with
  ``POST /auth/refresh`` and the rotating refresh token, falling back to a fresh login when the
  refresh token is refused.
* :class:`ClientCredentials` (newer docs): ``POST /oauth/token`` (form-encoded, client
  credentials); there is no refresh token, so renewal requests a new token.

:class:`TokenManager` caches the token in a :class:`~.tokens.TokenStore`, renews it
``renew_margin`` seconds (default 60) before expiry, and makes renewal single-flight across
processes. :class:`BearerAuth` plugs it into httpx: it adds the header, and on a 401 renews once
and replays the request once.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

import httpx
from cryptography.fernet import Fernet, InvalidToken

from dokstamp_sync.dokstamp import errors
from dokstamp_sync.dokstamp.tokens import CachedToken, TokenStore


class Credentials(Protocol):
    """One way of obtaining a token from DokStamp."""

    @property
    def identity(self) -> str:
        """A non-secret name of these credentials (the email or client id)."""
        ...

    def cache_key(self) -> bytes:
        """A key derived from the secret: only holders of the credentials can read the cache."""
        ...

    def obtain(self, http: httpx.Client, previous: CachedToken | None,
               now: float) -> CachedToken:
        """Return a fresh token; ``previous`` may be used to refresh instead of logging in."""
        ...


def _post(http: httpx.Client, path: str, **kw: Any) -> dict[str, Any]:
    """POST to an auth endpoint and return its JSON; errors translated, secrets never shown."""
    request = http.build_request("POST", path, headers={"Accept": "application/json"}, **kw)
    try:
        response = http.send(request)
    except httpx.HTTPError as exc:
        raise errors.from_httpx_error(exc, request) from None
    if response.status_code >= 400:
        raise errors.from_response(response)
    body = response.json()
    if not isinstance(body, dict) or not body.get("access_token"):
        raise errors.AuthenticationError(
            "token endpoint answered without an access_token", status=response.status_code,
            method="POST", path=path)
    return body


def _token_from(body: dict[str, Any], now: float) -> CachedToken:
    lifetime = body.get("expires_in")
    return CachedToken(access_token=str(body["access_token"]),
                       expires_at=now + (3600.0 if lifetime is None else float(lifetime)),
                       refresh_token=body.get("refresh_token"), obtained_at=now)


def _derive(identity: str, secret: str) -> bytes:
    """A Fernet key from the credentials (PBKDF2 keeps the secret out of reach of the key)."""
    raw = hashlib.pbkdf2_hmac("sha256", secret.encode(), b"dokstamp-sync token cache|"
                              + identity.encode(), 100_000)
    return base64.urlsafe_b64encode(raw)


class PasswordLogin:
    """Email and password (``POST /auth/login``), renewed via the rotating refresh token."""

    def __init__(self, email: str, password: str) -> None:
        self.email = email
        self._password = password

    def __repr__(self) -> str:
        return f"PasswordLogin(email={self.email!r})"

    @property
    def identity(self) -> str:
        return self.email

    def cache_key(self) -> bytes:
        return _derive(self.email, self._password)

    def obtain(self, http: httpx.Client, previous: CachedToken | None,
               now: float) -> CachedToken:
        if previous is not None and previous.refresh_token:
            try:
                body = _post(http, "/auth/refresh",
                             json={"refresh_token": previous.refresh_token})
                return _token_from(body, now)
            except errors.PermanentError:
                pass  # rotated away or revoked: a full login is the documented remedy
        body = _post(http, "/auth/login", json={"email": self.email, "password": self._password})
        return _token_from(body, now)


class ClientCredentials:
    """OAuth2 client credentials (``POST /oauth/token``); no refresh token, so ask anew."""

    def __init__(self, client_id: str, client_secret: str) -> None:
        self.client_id = client_id
        self._client_secret = client_secret

    def __repr__(self) -> str:
        return f"ClientCredentials(client_id={self.client_id!r})"

    @property
    def identity(self) -> str:
        return self.client_id

    def cache_key(self) -> bytes:
        return _derive(self.client_id, self._client_secret)

    def obtain(self, http: httpx.Client, previous: CachedToken | None,
               now: float) -> CachedToken:
        body = _post(http, "/oauth/token", data={
            "grant_type": "client_credentials", "client_id": self.client_id,
            "client_secret": self._client_secret})
        return _token_from(body, now)


class TokenManager:
    """Hands out a valid access token, renewing it at most once per staleness, fleet-wide."""

    def __init__(self, http: httpx.Client, credentials: Credentials, store: TokenStore, *,
                 renew_margin: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self._http = http
        self._credentials = credentials
        self._store = store
        self._margin = renew_margin
        self._clock = clock
        # One cache entry per (API, identity): two tenants' workers on one Redis do not collide.
        ident = f"{http.base_url}|{type(credentials).__name__}|{credentials.identity}"
        self.key = hashlib.sha256(ident.encode()).hexdigest()[:32]
        self.renewals = 0  # how many times this process obtained a token (for tests and metrics)
        # CONTRACT §1: secrets are never stored in clear, so the shared cache holds ciphertext.
        self._fernet = Fernet(credentials.cache_key())

    def _load(self) -> CachedToken | None:
        stored = self._store.get(self.key)
        if stored is None:
            return None
        try:
            return CachedToken(
                self._fernet.decrypt(stored.access_token).decode(), stored.expires_at,
                self._fernet.decrypt(stored.refresh_token).decode()
                if stored.refresh_token else None, stored.obtained_at)
        except InvalidToken:
            return None  # written under other credentials (e.g. a rotated secret): renew

    def _save(self, token: CachedToken) -> None:
        self._store.set(self.key, CachedToken(
            self._fernet.encrypt(token.access_token.encode()).decode(), token.expires_at,
            self._fernet.encrypt(token.refresh_token.encode()).decode()
            if token.refresh_token else None, token.obtained_at))

    def _fresh(self, token: CachedToken | None) -> bool:
        if token is None:
            return False
        # A token living less than twice the margin is renewed at half its life instead.
        margin = min(self._margin, max(0.0, token.expires_at - token.obtained_at) / 2)
        return token.expires_at - margin > self._clock()

    def token(self) -> str:
        """A token valid for at least ``renew_margin`` more seconds."""
        cached = self._load()
        if self._fresh(cached):
            assert cached is not None
            return cached.access_token
        return self._renew(stale=cached.access_token if cached else None)

    def invalidate(self, rejected: str) -> str:
        """The API refused ``rejected`` (401): renew unless another process already did."""
        return self._renew(stale=rejected, force=True)

    def _renew(self, *, stale: str | None, force: bool = False) -> str:
        with self._store.lock(self.key):
            current = self._load()
            # Fresh and not the token just refused: someone renewed while we waited for the lock.
            if current is not None and self._fresh(current) \
                    and (not force or current.access_token != stale):
                return current.access_token
            token = self._credentials.obtain(self._http, current, self._clock())
            self._save(token)
            self.renewals += 1
            return token.access_token


class BearerAuth(httpx.Auth):
    """httpx auth flow: Bearer header, and one renewal + one replay on a 401."""

    requires_request_body = True  # a multipart upload must be replayable after the 401

    def __init__(self, tokens: TokenManager) -> None:
        self._tokens = tokens

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        token = self._tokens.token()
        request.headers["Authorization"] = f"Bearer {token}"
        response = yield request
        if response.status_code == 401:
            request.headers["Authorization"] = f"Bearer {self._tokens.invalidate(token)}"
            yield request
