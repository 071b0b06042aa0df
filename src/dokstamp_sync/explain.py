"""What went wrong, in one line an operator can act on: the CLI's one place where foreign
exceptions (SQLAlchemy, psycopg, redis-py, the file system) become a sentence and an exit code.

=====================================  =====================================================  ====
failure                                the line says                                          exit
=====================================  =====================================================  ====
:class:`CommandError`                  its own message (a bad argument, an unknown entity...)  its
:class:`~.config.ConfigError`          the variable and what is wrong with it                  2
:class:`~.migrate.SchemaNotCurrent`    "run dokstamp-sync db upgrade" (or: newer schema)       1
database unreachable or refusing       the redacted DATABASE_URL, the driver's first line      1
Redis unreachable or refusing          the redacted REDIS_URL, redis-py's first line           1
a file that cannot be read             the file and why                                        1
input that is not UTF-8 text           that, and that nothing was sent                          2
a port in use                          to pick another with --port                              2
DokStamp refused / unreachable         the status and DokStamp's message                       1
the worker must not start              why (credentials, tenant, schema)                       1
anything else                          its type and first line, and to rerun with --debug      1
=====================================  =====================================================  ====

No line ever holds a secret: URLs go through :func:`~.config.redact_url`, and a driver's
message is cut to its first line (psycopg names host, port and user, never the password).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

import redis
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from dokstamp_sync.config import ConfigError, redact_url
from dokstamp_sync.dokstamp.errors import DokStampError
from dokstamp_sync.migrate import SchemaNotCurrent
from dokstamp_sync.ops.check import StartRefused


class CommandError(Exception):
    """A command refuses its input; the message is one line, ``status`` its exit code."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Where:
    """The URLs the command used, to name them (redacted) in the line."""

    database_url: str | None = None
    redis_url: str | None = None


@dataclass(frozen=True)
class Explained:
    line: str
    status: int


def first_line(exc: BaseException) -> str:
    """The exception's class and the first line of its message, short."""
    cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
    text = (str(cause).strip().splitlines() or [""])[0][:200].rstrip(".")
    return f"{type(cause).__name__}: {text}" if text else type(cause).__name__


_MISSING_TABLE = ("no such table", "does not exist", "undefinedtable")


def explain(exc: BaseException, where: Where = Where()) -> Explained:
    """One line and an exit code for ``exc`` (see the module's table)."""
    if isinstance(exc, CommandError):
        return Explained(str(exc), exc.status)
    if isinstance(exc, ConfigError):
        return Explained(str(exc), 2)
    if isinstance(exc, SchemaNotCurrent | StartRefused):
        return Explained(str(exc), 1)
    if isinstance(exc, SQLAlchemyError):
        return Explained(_database(exc, where.database_url), 1)
    if isinstance(exc, redis.RedisError):
        return Explained(_redis(exc, where.redis_url), 1)
    if isinstance(exc, OSError) and exc.filename is not None:
        return Explained(f"cannot read {exc.filename}: {exc.strerror or first_line(exc)}", 1)
    if isinstance(exc, UnicodeDecodeError):  # read before anything is sent: nothing was
        return Explained(f"the input is not UTF-8 text (byte {exc.start} of a line cannot be "
                         "read): nothing was sent; events are JSON lines in UTF-8", 2)
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return Explained("the port is in use by another program: pick another with --port", 2)
    if isinstance(exc, DokStampError):
        return Explained(f"DokStamp error: {exc}", 1)
    return Explained(f"unexpected error: {first_line(exc)} (run again with --debug, or "
                     "DOKSTAMP_SYNC_DEBUG=1, for the traceback)", 1)


def _database(exc: SQLAlchemyError, url: str | None) -> str:
    at = f" at {redact_url(url)}" if url else ""
    text = first_line(exc)
    if any(marker in text.lower() for marker in _MISSING_TABLE):
        return (f"the database{at} has no dokstamp-sync schema ({text}): "
                "run dokstamp-sync db upgrade")
    if isinstance(exc, DBAPIError) and not _connection_failed(exc):
        return f"the database{at} refused a statement: {text}"
    return (f"cannot use the database{at}: {text}; check DATABASE_URL and that PostgreSQL "
            "is running")


def _connection_failed(exc: DBAPIError) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


def _redis(exc: redis.RedisError, url: str | None) -> str:
    at = f" at {redact_url(url)}" if url else ""
    if isinstance(exc, redis.AuthenticationError):
        return f"Redis{at} refused the credentials: check the password in REDIS_URL"
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return (f"cannot reach Redis{at}: {first_line(exc)}; check REDIS_URL and that Redis "
                "is running")
    return f"Redis{at} refused the request: {first_line(exc)}"
