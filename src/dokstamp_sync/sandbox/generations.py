"""The two generations of the DokStamp documentation, as a sandbox follows one of them.

The docs exist in two generations that disagree (docs reference notes §0, §2, §6, §18):

==========  ==========================================  ==========================================
            generation ``"a"`` (older, api.dokstamp.eu)  generation ``"b"`` (newer, .com)
==========  ==========================================  ==========================================
login       ``POST /auth/login`` (email, password) and  ``POST /oauth/token`` (form-encoded client
            ``POST /auth/refresh`` (rotating refresh)   credentials); no refresh token
issuing     ``"status": "issued"`` (+ ``issued_at``);   ``"finish": true`` (the platform stamps
            ``finish`` is ignored: a draft              ``issued_at``); ``status`` is ignored: a
                                                        draft
errors      ``{"message", "errors"?}``; a 404 names     ``{"success": false, "message", ...}``;
            the model (``No query results ...``)        a 404 says ``Resource not found.``
/auth/me    integer ``id`` on the user and tenant       ``uuid`` on the user and tenant
==========  ==========================================  ==========================================

Logging in the other generation's way answers **404** (Laravel's ``The route oauth/token could
not be found.``; in generation b with ``success: false`` and ``Resource not found.``): each
generation lists only its own login among the public endpoints (§2a, §2b), so a server of that
generation has no such route. ``/auth/me`` and ``/auth/logout`` exist in both (the newer
multitenancy page still exempts ``/auth/*`` from ``X-Tenant``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dokstamp_sync.sandbox.store import ApiError, IssueBy

Generation = Literal["a", "b"]
LOGIN_ROUTES = ("/auth/login", "/auth/refresh", "/oauth/token")


@dataclass(frozen=True)
class Docs:
    """What one generation of the docs promises."""

    generation: Generation
    logins: frozenset[str]  # the login routes it has (of LOGIN_ROUTES)
    issue_by: IssueBy
    success_false: bool  # error bodies carry "success": false
    not_found: str | None  # the message of every 404, or None to keep the specific one
    id_key: Literal["id", "uuid"]  # how /auth/me names the user's and tenant's identifiers


GENERATIONS: dict[str, Docs] = {
    "a": Docs("a", frozenset({"/auth/login", "/auth/refresh"}), "status",
              success_false=False, not_found=None, id_key="id"),
    "b": Docs("b", frozenset({"/oauth/token"}), "finish",
              success_false=True, not_found="Resource not found.", id_key="uuid"),
}


def docs_for(generation: str) -> Docs:
    """The :class:`Docs` of ``generation`` (``"a"`` or ``"b"``); a ValueError otherwise."""
    try:
        return GENERATIONS[generation]
    except KeyError:
        raise ValueError("generation must be 'a' or 'b'") from None


def check_login_route(docs: Docs, route: str) -> None:
    """Raise the 404 a server of this generation answers for a login route it does not have."""
    if route not in docs.logins:
        raise ApiError(404, f"The route {route.lstrip('/')} could not be found.")
