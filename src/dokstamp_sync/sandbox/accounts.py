"""Sandbox accounts and tokens: both documented login schemes, expiring tokens, rotation.

Each :class:`Account` belongs to one tenant and has both kinds of credentials: email/password
(``/auth/login``, with a rotating refresh token) and client credentials (``/oauth/token``, no
refresh token). Which login route exists is the generation's choice (:mod:`.generations`), made
by the HTTP layer. Access tokens expire after ``token_ttl`` seconds; a used refresh token is
spent.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from dokstamp_sync.sandbox.store import ApiError


@dataclass(frozen=True)
class Account:
    """A sandbox login. Defaults are the well-known sandbox credentials from the README."""

    tenant: str = "demo-university"
    tenant_name: str = "Demo University"
    name: str = "Sandbox Admin"
    email: str = "admin@demo-university.edu"
    password: str = field(default="sandbox-password", repr=False)
    client_id: str = "sandbox-client"
    client_secret: str = field(default="sandbox-secret", repr=False)


@dataclass
class Grant:
    """What a token stands for: an account, until an absolute time."""

    account: Account
    expires_at: float


class Authority:
    """Issues and checks tokens."""

    def __init__(self, accounts: list[Account], *, token_ttl: float) -> None:
        self.accounts = accounts
        self.token_ttl = token_ttl
        self.access: dict[str, Grant] = {}
        self.refresh: dict[str, Account] = {}
        self.issued = 0  # tokens handed out: tests count logins with it

    def _grant(self, account: Account, *, with_refresh: bool) -> dict[str, object]:
        token = secrets.token_urlsafe(32)
        self.access[token] = Grant(account, time.time() + self.token_ttl)
        self.issued += 1
        body: dict[str, object] = {"token_type": "Bearer", "access_token": token,
                                   "expires_in": int(self.token_ttl)}
        if with_refresh:
            refresh = secrets.token_urlsafe(32)
            self.refresh[refresh] = account
            body["refresh_token"] = refresh
        return body

    def login(self, email: object, password: object) -> dict[str, object]:
        errors = {name: [f"The {name} field is required."]
                  for name, value in (("email", email), ("password", password)) if not value}
        if errors:
            raise ApiError(422, "The given data was invalid.", errors)
        for account in self.accounts:
            if account.email == email and secrets.compare_digest(account.password,
                                                                 str(password)):
                return self._grant(account, with_refresh=True)
        raise ApiError(401, "These credentials do not match our records.")

    def refresh_token(self, refresh: object) -> dict[str, object]:
        account = self.refresh.pop(str(refresh), None) if refresh else None
        if account is None:
            raise ApiError(401, "The refresh token is invalid.")
        return self._grant(account, with_refresh=True)

    def client_credentials(self, grant_type: object, client_id: object,
                           client_secret: object) -> dict[str, object]:
        if grant_type != "client_credentials":
            error = ApiError(400, "The authorization grant type is not supported.")
            error.body |= {"error": "unsupported_grant_type",
                           "error_description": error.body["message"]}
            raise error
        for account in self.accounts:
            if account.client_id == client_id and secrets.compare_digest(
                    account.client_secret, str(client_secret or "")):
                return self._grant(account, with_refresh=False)
        error = ApiError(401, "Client authentication failed")
        error.body |= {"error": "invalid_client", "error_description": "Client authentication "
                                                                       "failed"}
        raise error

    def check(self, authorization: str | None) -> tuple[str, Account]:
        """The token and account behind an ``Authorization`` header, or a 401."""
        scheme, _, token = (authorization or "").partition(" ")
        grant = self.access.get(token) if scheme.lower() == "bearer" else None
        if grant is None or grant.expires_at <= time.time():
            raise ApiError(401, "Unauthenticated.")
        return token, grant.account

    def logout(self, token: str) -> None:
        self.access.pop(token, None)

    def expire_all(self) -> int:
        """Make every access token expired now (refresh tokens stay usable)."""
        for grant in self.access.values():
            grant.expires_at = 0.0
        return len(self.access)
