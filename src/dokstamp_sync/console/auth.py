"""Who may use the console, their session cookie and the CSRF token of every form.

Two logins, each ``user:password``: ``DOKSTAMP_SYNC_CONSOLE_AUTH`` (may replay and discard) and
``DOKSTAMP_SYNC_CONSOLE_READONLY_AUTH`` (sees every page, changes nothing). A login gives a
cookie ``user|role|expiry|nonce|mac`` signed with a key drawn when the console starts (a restart
logs everyone out); it is ``HttpOnly`` and ``SameSite=Strict``. Every form carries a CSRF token,
an HMAC of the session cookie under the same key: a POST without it, or with another
session's, is refused (403). Logging out ends the session in this console process: its nonce
is kept (in memory, until the cookie would have expired) and a cookie bearing it is refused,
a copy included.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from pydantic import SecretStr

COOKIE = "dokstamp_console"
LIFETIME = 8 * 3600  # s a login lasts
READONLY, OPERATOR = "read-only", "operator"


class AuthMissing(Exception):
    """The console has no operator login configured: it refuses to start."""


@dataclass(frozen=True)
class User:
    name: str
    role: str

    @property
    def may_change(self) -> bool:
        return self.role == OPERATOR


def _pair(secret: SecretStr | None, variable: str) -> tuple[str, str] | None:
    if secret is None or not secret.get_secret_value().strip():  # `NAME=`: not set
        return None
    user, _, password = secret.get_secret_value().partition(":")
    if not user or not password or "|" in user:
        raise AuthMissing(f"{variable} must be user:password (no | in the user)")
    return user, password


class Logins:
    """The configured logins and the key that signs sessions and CSRF tokens."""

    def __init__(self, operator: SecretStr | None, readonly: SecretStr | None = None, *,
                 key: bytes | None = None) -> None:
        pair = _pair(operator, "DOKSTAMP_SYNC_CONSOLE_AUTH")
        if pair is None:
            raise AuthMissing("refusing to start the console without a password: set "
                              "DOKSTAMP_SYNC_CONSOLE_AUTH=user:password")
        self.accounts = {pair[0]: (pair[1], OPERATOR)}
        ro = _pair(readonly, "DOKSTAMP_SYNC_CONSOLE_READONLY_AUTH")
        if ro is not None:
            self.accounts.setdefault(ro[0], (ro[1], READONLY))
        self.key = key or secrets.token_bytes(32)
        self.ended: dict[str, int] = {}  # nonce of a logged-out session -> its expiry

    def check(self, name: str, password: str) -> User | None:
        """The user when the password is right (compared in constant time)."""
        expected, role = self.accounts.get(name, ("", ""))
        ok = hmac.compare_digest(password.encode(), expected.encode()) and bool(expected)
        return User(name, role) if ok else None

    def _mac(self, text: str) -> str:
        digest = hmac.new(self.key, text.encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).decode().rstrip("=")

    def cookie(self, user: User) -> str:
        # A fresh nonce: two logins never share a cookie, hence never a CSRF token.
        nonce = secrets.token_urlsafe(12)
        body = f"{user.name}|{user.role}|{int(time.time()) + LIFETIME}|{nonce}"
        return f"{body}|{self._mac(body)}"

    def _session(self, cookie: str | None) -> tuple[User, int, str] | None:
        """A valid cookie's user, expiry and nonce (even if logged out); None otherwise."""
        if not cookie or cookie.count("|") != 4:
            return None
        body, _, mac = cookie.rpartition("|")
        name, role, expiry, nonce = body.split("|")
        if not hmac.compare_digest(mac, self._mac(body)) or not expiry.isdigit():
            return None
        if int(expiry) <= time.time():
            return None
        return User(name, role), int(expiry), nonce

    def user(self, cookie: str | None) -> User | None:
        """The user a session cookie belongs to, or None (absent, forged, expired, logged
        out)."""
        session = self._session(cookie)
        if session is None or session[2] in self.ended:
            return None
        return session[0]

    def end(self, cookie: str | None) -> None:
        """Log the session out: its cookie is refused from now on (in this process)."""
        now = time.time()
        for nonce in [n for n, expiry in self.ended.items() if expiry <= now]:
            del self.ended[nonce]  # expired anyway: refused without the list
        session = self._session(cookie)
        if session is not None:
            self.ended[session[2]] = session[1]

    def csrf(self, cookie: str) -> str:
        return self._mac(f"csrf|{cookie}")

    def csrf_ok(self, cookie: str | None, token: str | None) -> bool:
        return bool(cookie and token) and hmac.compare_digest(
            str(token), self.csrf(str(cookie)))
