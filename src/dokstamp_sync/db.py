"""Engine and session factories, and the declarative ``Base`` with a constraint naming
convention (so Alembic migrations name constraints the same way on every database).

Sessions belong to the edge (a task, a CLI command): :func:`session_scope` commits or rolls
back; domain code receives a session and never commits.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from enum import StrEnum
from typing import Any, TypeVar

from sqlalchemy import Dialect, Engine, MetaData, String, Table, create_engine, event, text
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker
from sqlalchemy.types import TypeDecorator

T = TypeVar("T")
E = TypeVar("E", bound=StrEnum)
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class EnumText(TypeDecorator[E]):
    """A ``StrEnum`` column: stored as its plain value in a VARCHAR (the schema and its CHECK
    constraint are unchanged), read back as the enum's member."""

    impl = String
    cache_ok = True

    def __init__(self, enum: type[E], length: int) -> None:
        super().__init__(length)
        self.enum = enum

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        # A bad value is left to the CHECK constraint, as before the column was typed.
        return None if value is None else str(value)

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        return None if value is None else self.enum(value)


def make_engine(url: str, **kw: Any) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout (several processes share it)."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30}, **kw)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        return engine
    # No pool_pre_ping: it costs a round trip per checkout (one per transaction). Disconnects
    # are handled optimistically instead: a dead connection fails one transaction, SQLAlchemy
    # then invalidates the pool, the engine parks the event and retries it, and the first
    # transaction of a run or an ingested batch is tried once more (once_more_if_disconnected).
    engine = create_engine(url, **kw)

    @event.listens_for(engine, "connect")
    def _custom_plans(dbapi_conn: Any, _record: Any) -> None:
        # psycopg prepares a statement after 5 runs, and PostgreSQL may then keep one generic
        # plan for it. One made while a table was nearly empty (a first import) scans the
        # table as it grows, until an ANALYZE: measured, 2,434 scans of 14.4 M mappings rows in
        # a 3,000-certificate first load. Planned with each run's values and the table's size
        # instead (the walk's statements plan in well under a millisecond).
        autocommit = dbapi_conn.autocommit
        dbapi_conn.autocommit = True
        with dbapi_conn.cursor() as cursor:
            cursor.execute("SET plan_cache_mode = force_custom_plan")
        dbapi_conn.autocommit = autocommit

    return engine


def once_more_if_disconnected(fn: Callable[[], T]) -> T:
    """Run ``fn``; run it once more if it failed on a connection the database had dropped
    (without pre-ping the pool finds out on use, and has discarded its connections since)."""
    try:
        return fn()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
        return fn()


def connection_lost(exc: BaseException) -> bool:
    """Whether ``exc`` says the database connection failed (dropped, refused, reset), not
    that a statement was wrong: the same work can simply be done again on a new connection."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated or isinstance(exc, InterfaceError):
        return True
    # SQLSTATE class 08: connection exception; 57P: the server ended it (shutdown, crash).
    state = str(getattr(exc.orig, "sqlstate", None) or "")
    return isinstance(exc, OperationalError) and state.startswith(("08", "57P"))


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def reader_of(sessions: sessionmaker[Session]) -> sessionmaker[Session]:
    """Sessions for reads only, on the same pool, with no transaction around them on
    PostgreSQL (autocommit): at READ COMMITTED each statement sees what was committed when it
    began, in a transaction or not, so a BEGIN and a COMMIT around reads would only cost two
    round trips. Nothing read this way is locked (no ``FOR UPDATE``). SQLite: ``sessions``."""
    bind = sessions.kw.get("bind")
    if not isinstance(bind, Engine) or bind.dialect.name != "postgresql":
        return sessions
    return sessionmaker(bind.execution_options(isolation_level="AUTOCOMMIT"),
                        expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose transaction commits on success and rolls back on error."""
    with factory() as session, session.begin():
        yield session


# An advisory transaction lock per waiting tag (class 7301: dokstamp-sync's), held to the commit.
_TAG_LOCK = text("SELECT pg_advisory_xact_lock(7301, hashtext(:tag))")


def lock_tag(session: Session, tag: str) -> None:
    """Serialise waking the events waiting for ``tag`` (``course:CRS-1``, ``held:student:S-1``)
    with parking one more on it, until the session's transaction ends.

    Without it a wake-up is lost: an event reads what it waits for as not there, that changes
    and wakes the waiters before the event's park committed (the wake does not see that row),
    and the event sleeps out its whole delay. With it, a park either commits before the wake
    (which then sees it) or looks after the wake committed (``sync/statements._ready``). Every
    transaction takes the tag's lock before it writes an event row, so that the lock and the
    rows are always taken in one order. PostgreSQL only: SQLite has one writer at a time."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_TAG_LOCK, {"tag": tag})


def dialect_insert(dialect: str) -> Any:
    """The dialect's ``insert`` (it has ON CONFLICT): ``postgresql`` or ``sqlite``."""
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
    return insert


def insert_ignore(session: Session, table: Table, values: dict[str, Any],
                  conflict: Sequence[str]) -> int | None:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING id; the new id, or None if it existed."""
    insert = dialect_insert(session.get_bind().dialect.name)
    stmt = insert(table).values(**values).on_conflict_do_nothing(index_elements=list(conflict))
    new_id: int | None = session.scalar(stmt.returning(table.c.id))
    return new_id
