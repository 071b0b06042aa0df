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
import math
import time
from collections.abc import Callable, Generator
from typing import Any, Protocol

import httpx
from cryptography.fernet import Fernet, InvalidToken

from dokstamp_sync.dokstamp import errors
from dokstamp_sync.dokstamp.fence import LOGIN_REQUEST
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


def _obtain(http: httpx.Client, path: str, now: float, **kw: Any) -> CachedToken:
    """POST to a token endpoint and return the token it gave; errors translated, secrets never
    shown. A success answer without a usable token (HTML, not an object, no ``access_token``,
    an ``expires_in`` that is not a number of seconds) is :class:`~.errors.MalformedResponse`,
    excerpted only when it is not JSON (JSON from here may hold a token)."""
    request = http.build_request("POST", path, headers={"Accept": "application/json"}, **kw)
    request.extensions[LOGIN_REQUEST] = True  # not a write of DokStamp's data: not fenced
    with errors.exchange(http, request) as response:
        try:
            body = response.json()
        except ValueError:
            raise errors.malformed(response, "token endpoint answered with a body that is "
                                   "not JSON", json_may_hold_secrets=True) from None
        if not isinstance(body, dict):
            body = {}
        token, refresh = body.get("access_token"), body.get("refresh_token")
        raw = body.get("expires_in")  # not sent: assume an hour, renewal fixes any mistake
        lifetime = 3600.0 if raw is None else _seconds(raw)
        if not isinstance(token, str) or not token:
            raise errors.malformed(response, "token endpoint answered without an access_token",
                                   json_may_hold_secrets=True)
        if lifetime is None or not isinstance(refresh, str | None):
            raise errors.malformed(response, "token endpoint answered with an unusable "
                                   "expires_in or refresh_token", json_may_hold_secrets=True)
        return CachedToken(access_token=token, expires_at=now + lifetime,
                           refresh_token=refresh or None, obtained_at=now)


def _seconds(value: Any) -> float | None:
    """``expires_in`` as seconds (0 or more), or None when it is not a finite number."""
    if isinstance(value, bool):
        return None
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


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
                return _obtain(http, "/auth/refresh", now,
                               json={"refresh_token": previous.refresh_token})
            except errors.PermanentError:
                pass  # rotated away or revoked: a full login is the documented remedy
        return _obtain(http, "/auth/login", now,
                       json={"email": self.email, "password": self._password})


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
        return _obtain(http, "/oauth/token", now, data={
            "grant_type": "client_credentials", "client_id": self.client_id,
            "client_secret": self._client_secret})


MEMO_SECONDS = 30.0  # how long a process reuses the token it read without reading it again


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
        # Secrets are never stored in clear (docs/configuration.md): the shared cache holds
        # ciphertext.
        self._fernet = Fernet(credentials.cache_key())
        # The token last read or obtained, reused for MEMO_SECONDS without reading the shared
        # cache again (a Redis round trip and a decryption per request otherwise). A token
        # another process renewed meanwhile is picked up then, or at once on a 401.
        self._memo: tuple[CachedToken, float] | None = None  # (token, time.monotonic() read)

    def _remember(self, token: CachedToken) -> None:
        self._memo = (token, time.monotonic())

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
        memo = self._memo
        if memo is not None and time.monotonic() - memo[1] < MEMO_SECONDS \
                and self._fresh(memo[0]):
            return memo[0].access_token
        cached = self._load()
        if self._fresh(cached):
            assert cached is not None
            self._remember(cached)
            return cached.access_token
        return self._renew(stale=cached.access_token if cached else None)

    def invalidate(self, rejected: str) -> str:
        """The API refused ``rejected`` (401): renew unless another process already did."""
        self._memo = None
        return self._renew(stale=rejected, force=True)

    def _renew(self, *, stale: str | None, force: bool = False) -> str:
        with self._store.lock(self.key):
            current = self._load()
            # Fresh and not the token just refused: someone renewed while we waited for the lock.
            if current is not None and self._fresh(current) \
                    and (not force or current.access_token != stale):
                self._remember(current)
                return current.access_token
            token = self._credentials.obtain(self._http, current, self._clock())
            self._save(token)
            self._remember(token)
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
