"""What must hold before the worker runs: ``dokstamp-sync check`` (docs/operator-guide.md) and
the worker's own start-up check.

Each check gives one :class:`Line` (ok or FAIL with a reason, never a secret): DokStamp reachable,
the credentials accepted, the tenant right (``GET /auth/me``: its ``tenant.domain`` is the value
the docs say to send as ``X-Tenant``, so a typo in ``DOKSTAMP_TENANT`` is caught here instead of
every lookup answering 404, which a delete would take for "already gone"), the issue style,
PostgreSQL reachable with its schema at the head revision, and Redis reachable. :func:`refusal`
is the worker's subset: the tenant and the credentials; a DokStamp that cannot be reached at
start is no reason to refuse (events wait).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis
from sqlalchemy import text

from dokstamp_sync.config import Settings, redact_url
from dokstamp_sync.dokstamp import DokStampClient, client_from_settings, tenant_domain
from dokstamp_sync.dokstamp.errors import (
    AuthenticationError,
    DokStampError,
    HTTPStatusError,
    PermanentError,
    PermissionDenied,
    TransientError,
)


@dataclass(frozen=True)
class Line:
    """One check's verdict, printed as ``ok    name: detail`` or ``FAIL  name: detail``."""

    name: str
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


class StartRefused(Exception):
    """The worker must not start; the message is one line for the operator."""


def dokstamp_lines(client: DokStampClient, settings: Settings) -> list[Line]:
    """DokStamp reachable, credentials accepted, tenant right, issue style (one call:
    ``GET /auth/me``, after the login it needs)."""
    url = settings.dokstamp_api_url
    try:
        me = client.me()
    except (AuthenticationError, PermissionDenied) as exc:
        return [Line("dokstamp", True, f"reachable at {url}"),
                Line("credentials", False, f"refused by DokStamp ({exc.status}: {exc.message})"),
                Line("tenant", False, "not checked: the credentials were refused"),
                _style(settings)]
    except PermanentError as exc:
        return [Line("dokstamp", False, f"GET /auth/me at {url} answered {exc.status}: "
                                        f"{exc.message}"), _style(settings)]
    except TransientError as exc:
        return [Line("dokstamp", False, f"not reachable at {url}: {exc}"), _style(settings)]
    domain = tenant_domain(me)
    tenant = settings.dokstamp_tenant
    return [Line("dokstamp", True, f"reachable at {url}"),
            Line("credentials", True, f"accepted ({_scheme(settings)})"),
            Line("tenant", domain == tenant,
                 f"{tenant} is the credentials' tenant (GET /auth/me)" if domain == tenant
                 else f"DOKSTAMP_TENANT is {tenant!r} but these credentials belong to tenant "
                      f"{domain!r} (GET /auth/me tenant.domain)"),
            _style(settings)]


def _scheme(settings: Settings) -> str:
    return "client credentials" if settings.dokstamp_client_id else "password login"


def _style(settings: Settings) -> Line:
    style = settings.dokstamp_issue_style
    how = "finish: true" if style == "finish" else "status: issued + issued_at"
    return Line("issue style", True, f"{style} ({how}; DOKSTAMP_ISSUE_STYLE)")


def database_lines(database_url: str) -> list[Line]:
    """The database reachable, and its schema at this version's head revision (a database
    never migrated, or migrated by an older version, is not ready)."""
    from dokstamp_sync.db import make_engine
    from dokstamp_sync.migrate import NEWER_SCHEMA, newer_than_this, revisions

    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        found = revisions(engine)
    except Exception as exc:  # any failure is the answer; the reason is shown without secrets
        return [Line("database", False, f"{redact_url(database_url)}: {_reason(exc)}"),
                Line("schema", False, "not checked: the database is not reachable")]
    finally:
        engine.dispose()
    reachable = Line("database", True, f"reachable at {redact_url(database_url)}")
    if found.at_head:
        return [reachable, Line("schema", True, f"at the newest revision ({found.head})")]
    if newer_than_this(database_url, found.current):
        return [reachable, Line("schema", False, f"at revision {found.current}, {NEWER_SCHEMA}")]
    what = "no dokstamp-sync schema" if found.current is None else \
        f"at revision {found.current}, this version needs {found.head}"
    return [reachable, Line("schema", False, f"{what}: run dokstamp-sync db upgrade")]


def redis_line(redis_url: str) -> Line:
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        return Line("redis", False, f"{redact_url(redis_url)}: {_reason(exc)}")
    finally:
        client.close()
    return Line("redis", True, f"reachable at {redact_url(redis_url)}")


def _reason(exc: BaseException) -> str:
    """The exception's class and the first line of its message (a driver's message names the
    host and port, never the password)."""
    cause = getattr(exc, "orig", None) or exc
    first = (str(cause).strip().splitlines() or [""])[0]
    return f"{type(cause).__name__}: {first[:200]}"


def run_checks(settings: Settings, *,
               client_factory: Callable[[Settings], DokStampClient] = client_from_settings,
               ) -> list[Line]:
    """Every check of ``dokstamp-sync check``, in order."""
    client = client_factory(settings)
    try:
        lines = dokstamp_lines(client, settings)
    finally:
        client.http.close()
    return [*lines, *database_lines(settings.database_url), redis_line(settings.redis_url)]


def refusal(client: DokStampClient, settings: Settings) -> str | None:
    """Why the worker must not start (one line), or ``None``: credentials refused or the wrong
    tenant. A DokStamp unreachable for now is no reason: the events wait for it."""
    try:
        me = client.me()
    except (AuthenticationError, PermissionDenied) as exc:
        return (f"refusing to start: DokStamp refused the credentials ({exc.status}: "
                f"{exc.message})")
    except HTTPStatusError as exc:
        if isinstance(exc, PermanentError):
            return f"refusing to start: GET /auth/me answered {exc.status}: {exc.message}"
        return None
    except DokStampError:
        return None
    domain = tenant_domain(me)
    if domain != settings.dokstamp_tenant:
        return (f"refusing to start: DOKSTAMP_TENANT is {settings.dokstamp_tenant!r} but the "
                f"credentials belong to tenant {domain!r} (GET /auth/me tenant.domain)")
    return None
