"""The one typed settings object, read once from the environment and ``.env``; the only module
that reads the environment (a test fails on any other read in ``src/``).

Every variable is listed in docs/configuration.md (the extensions never change the meaning of
the original ones). Secrets are ``SecretStr``: printing, logging or
``repr``-ing the settings shows ``**********``. :func:`load_settings` turns a validation failure
into one :class:`ConfigError` line naming the variable, never its value.
"""

from __future__ import annotations

import os
import re
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from dokstamp_sync.limits import (
    FILE_MAX_BYTES,
    INGEST_BATCH_BYTES,
    RESPONSE_MAX_BYTES,
    largest_entry,
)
from dokstamp_sync.redis_keys import EVENTS_STREAM, RESULTS_STREAM

S = TypeVar("S", bound="StoreSettings")


class ConfigError(Exception):
    """The configuration is unusable; the message is one line meant for the operator."""


class StoreSettings(BaseSettings):
    """Where the queue and the mapping store are: all that operator commands need."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", case_sensitive=False)

    # URLs may carry a password: kept out of repr(); show them with `redact_url`.
    redis_url: str = Field(default="redis://localhost:6379/0", repr=False)
    database_url: str = Field(default="postgresql+psycopg://postgres@localhost/dokstamp_sync",
                              repr=False)
    dokstamp_sync_stream: str = EVENTS_STREAM
    # The outcome stream (docs/erp-guide.md) and its approximate length.
    dokstamp_sync_results_stream: str = RESULTS_STREAM
    dokstamp_sync_results_maxlen: int = Field(default=100_000, gt=0)
    # Prefixes every other Redis name (group, queue, locks...): `wiring.redis_keys` builds the
    # process's `RedisKeys` from it, handed to every part that touches Redis.
    dokstamp_sync_namespace: str = ""
    dokstamp_sync_visibility_timeout: float = Field(default=600.0, gt=0)  # s
    dokstamp_sync_log_json: bool = False  # one JSON object per log line
    # The worker serves /metrics and /healthz on this port (`worker --metrics-port` sets it).
    dokstamp_sync_metrics_port: int | None = Field(default=None, gt=0, lt=65536)
    # ...on this address: loopback unless told (docker-compose sets 0.0.0.0 for Prometheus).
    dokstamp_sync_metrics_address: str = "127.0.0.1"
    # Final events older than this many days are deleted (docs/monitoring.md "Inbox
    # retention": what deduplication needs is kept); unset keeps every event.
    dokstamp_sync_inbox_retention_days: float | None = Field(default=None, ge=0)
    # The dead-letter console's logins, "user:password" (`dokstamp-sync console` refuses to
    # start without the first); the read-only one sees everything and changes nothing.
    dokstamp_sync_console_auth: SecretStr | None = None
    dokstamp_sync_console_readonly_auth: SecretStr | None = None
    # Flower's basic auth, "user:password" (`dokstamp-sync flower` refuses to start without).
    dokstamp_sync_flower_auth: SecretStr | None = None
    # The change guard (docs/guard.md): destructive events (deletes, revokes) are
    # counted per entity kind over the window; past the threshold (a share of the kind's
    # active mappings, never below the minimum) they are held for an operator. Each is applied
    # no sooner than the delay after it arrived, so a burst is seen whole first. 100 % turns
    # the guard off (no count, no delay).
    dokstamp_sync_guard_window: float = Field(default=3600.0, gt=0)  # s
    dokstamp_sync_guard_threshold: float = Field(default=10.0, gt=0, le=100)  # % of mappings
    dokstamp_sync_guard_min: int = Field(default=20, ge=0)
    dokstamp_sync_guard_delay: float = Field(default=60.0, ge=0)  # s

    @field_validator("dokstamp_sync_guard_threshold", mode="before")
    @classmethod
    def _percent(cls, value: object) -> object:
        # "10%" and "10" both mean ten per cent
        return value.strip().removesuffix("%").strip() if isinstance(value, str) else value

    @field_validator("redis_url")
    @classmethod
    def _usable_redis_url(cls, value: str) -> str:
        # redis-py's own ValueError would come at first use, as an "unexpected error".
        scheme = value.partition("://")[0].lower() if "://" in value else ""
        if scheme not in ("redis", "rediss", "unix"):
            shown = f"the scheme {scheme}://" if scheme else "it has no scheme"
            raise ValueError(f"{shown} is not Redis's: write redis://HOST:6379/0 (rediss:// "
                             "for TLS, unix:///PATH for a socket)")
        return value

    @field_validator("database_url")
    @classmethod
    def _usable_database_url(cls, value: str) -> str:
        # Caught here, as one line, instead of SQLAlchemy's NoSuchModuleError at first use.
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            url = make_url(value)
        except ArgumentError:
            raise ValueError("not a database URL: write it as postgresql+psycopg://USER:"
                             "PASSWORD@HOST/DATABASE") from None
        if url.drivername in ("postgres", "postgresql"):
            raise ValueError(f"the scheme {url.drivername}:// names no driver dokstamp-sync "
                             "installs: write postgresql+psycopg://...") from None
        try:
            url.get_dialect()
        except NoSuchModuleError:
            raise ValueError(f"the scheme {url.drivername}:// is not one SQLAlchemy knows: "
                             "write postgresql+psycopg://... (or sqlite:///FILE)") from None
        return value


class Settings(StoreSettings):
    """Everything dokstamp-sync reads from its environment (docs/configuration.md)."""

    dokstamp_api_url: str = "https://api.dokstamp.com"
    dokstamp_tenant: str = Field(min_length=1)
    dokstamp_email: str | None = None
    dokstamp_password: SecretStr | None = None
    dokstamp_client_id: str | None = None
    dokstamp_client_secret: SecretStr | None = None
    dokstamp_rate_limit: float = Field(default=10.0, gt=0)

    # Extensions (README "Configuration"): how certificates are issued and HTTP timeouts.
    # "auto" follows the credential scheme (see `_resolve_issue_style`); after validation the
    # field always holds the style in use, "status" or "finish".
    dokstamp_issue_style: Literal["auto", "status", "finish"] = "auto"
    # s without a byte; short, since a create that timed out is waited for twice this long
    dokstamp_timeout: float = Field(default=10.0, gt=0)
    # The largest answer read from DokStamp (docs/bounds.md): past it, a malformed answer.
    dokstamp_max_response_bytes: int = Field(default=RESPONSE_MAX_BYTES, gt=0)
    # The sync engine (README "Configuration"): waits, retries, files.
    dokstamp_sync_dependency_timeout: float = Field(default=86400.0, gt=0)  # s
    dokstamp_sync_retry_budget: float = Field(default=86400.0, gt=0)  # s
    dokstamp_sync_max_deliveries: int = Field(default=5, ge=1)
    # s; renewed every third of it while held, so short: a killed worker's locks free soon
    dokstamp_sync_lock_timeout: float = Field(default=15.0, gt=0)
    # Fault safety (README "Fault safety"): a running event's lease, renewed by a heartbeat
    # every third of it, so a lost worker's events are handed out again within seconds.
    dokstamp_sync_lease: float = Field(default=20.0, gt=0)  # s
    # The fleet's circuit breaker: open after this many consecutive failures (5xx, timeouts,
    # connection errors), then one probe every interval.
    dokstamp_sync_breaker_failures: int = Field(default=5, ge=1)
    dokstamp_sync_breaker_interval: float = Field(default=3.0, gt=0)  # s
    # The longest a server's Retry-After is obeyed (docs/bounds.md): the fleet's pause after a
    # 429, and an event's park, are cut to this; a bogus "wait 30 years" stops no one for long.
    dokstamp_sync_max_pause: float = Field(default=300.0, gt=0)  # s
    dokstamp_sync_file_hosts: str = ""  # comma-separated hosts files may be fetched from
    dokstamp_sync_file_root: str = ""  # folder `path` files must be under
    dokstamp_sync_file_max_bytes: int = Field(default=FILE_MAX_BYTES, gt=0)
    # The most bytes one ingest batch reads from the stream (docs/bounds.md); at least one
    # largest valid entry (checked below), so that no valid entry is ever too large to read.
    dokstamp_sync_ingest_batch_bytes: int = Field(default=INGEST_BATCH_BYTES, gt=0)

    @property
    def file_hosts(self) -> frozenset[str]:
        return frozenset(h.strip().lower() for h in self.dokstamp_sync_file_hosts.split(",")
                         if h.strip())

    @field_validator("dokstamp_email", "dokstamp_password", "dokstamp_client_id",
                     "dokstamp_client_secret", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        # `.env.example` leaves the unused credential pair as `NAME=`: that means "not set".
        return None if isinstance(value, str) and not value.strip() else value

    @model_validator(mode="after")
    def _one_credential_pair(self) -> Settings:
        password_pair = (self.dokstamp_email, self.dokstamp_password)
        client_pair = (self.dokstamp_client_id, self.dokstamp_client_secret)
        for names, pair in ((("DOKSTAMP_EMAIL", "DOKSTAMP_PASSWORD"), password_pair),
                            (("DOKSTAMP_CLIENT_ID", "DOKSTAMP_CLIENT_SECRET"), client_pair)):
            if any(pair) and not all(pair):
                missing = names[1] if pair[0] else names[0]
                raise ValueError(f"{missing} is not set ({' and '.join(names)} go together)")
        if not all(password_pair) and not all(client_pair):
            raise ValueError("no DokStamp credentials: set DOKSTAMP_EMAIL and DOKSTAMP_PASSWORD, "
                             "or DOKSTAMP_CLIENT_ID and DOKSTAMP_CLIENT_SECRET")
        return self

    @model_validator(mode="after")
    def _batch_holds_an_entry(self) -> Settings:
        largest = largest_entry(self.dokstamp_sync_file_max_bytes)
        if self.dokstamp_sync_ingest_batch_bytes < largest:
            raise ValueError(
                f"DOKSTAMP_SYNC_INGEST_BATCH_BYTES must be at least {largest}: the largest "
                "valid stream entry with DOKSTAMP_SYNC_FILE_MAX_BYTES "
                f"{self.dokstamp_sync_file_max_bytes}")
        return self

    @model_validator(mode="after")
    def _resolve_issue_style(self) -> Settings:
        # The two generations of the docs pair a login with an issuing field: client
        # credentials (newer) issue with "finish": true, the password login (older) with
        # "status": "issued". Client credentials win when both pairs are set (as the login does).
        if self.dokstamp_issue_style == "auto":
            client = bool(self.dokstamp_client_id and self.dokstamp_client_secret)
            self.dokstamp_issue_style = "finish" if client else "status"
        return self


class DebugSettings(BaseSettings):
    """Whether the CLI shows tracebacks (``DOKSTAMP_SYNC_DEBUG``); read apart from the other
    settings so that it works when those are unusable."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8",
                                      extra="ignore", case_sensitive=False)

    dokstamp_sync_debug: bool = False


def debug_wanted() -> bool:
    """``DOKSTAMP_SYNC_DEBUG`` is true (a value that is not a boolean counts as false)."""
    try:
        return DebugSettings().dokstamp_sync_debug
    except ValidationError:
        return False


def child_environment(**extra: str) -> dict[str, str]:
    """This process's environment plus ``extra``, for a child process (Flower, the demo's
    worker, Redis); ``DOKSTAMP_*`` variables are left out when ``extra`` names any, so a
    child configured by its parent never mixes in the operator's."""
    own = any(k.startswith("DOKSTAMP_") for k in extra)
    base = {k: v for k, v in os.environ.items() if not (own and k.startswith("DOKSTAMP_"))}
    return base | extra


# Query parameters that carry a secret (psycopg's password/sslpassword, redis-py's password...).
_SECRET_PARAM = re.compile(r"(?i)([?&](?:[^=&#]*(?:pass|secret|token)[^=&#]*)=)[^&#]*")


def redact_url(url: str) -> str:
    """A URL safe to print: the password in ``user:password@`` and the value of every
    ``password``-like query parameter (``?password=``, ``sslpassword=``...) become ``***``."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all: show nothing of it rather than a secret
        return "<unparsable URL>"
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:  # rebuilt only then: urlunsplit drops sqlite:////'s empty host
        url = urlunsplit(parts._replace(netloc=f"{userinfo.partition(':')[0]}:***@{host}"))
    return _SECRET_PARAM.sub(r"\1***", url)


def load_settings(**overrides: object) -> Settings:
    """Read the settings once; raise :class:`ConfigError` with one clear line if unusable."""
    return _load(Settings, overrides)


def load_store_settings(**overrides: object) -> StoreSettings:
    """The settings operator commands need (no DokStamp credentials)."""
    return _load(StoreSettings, overrides)


def _load(cls: type[S], overrides: dict[str, object]) -> S:
    try:
        return cls(**overrides)  # type: ignore[arg-type]  # pydantic fills the rest from env
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        if first["type"] == "missing":
            raise ConfigError(f"configuration error: {field.upper()} is not set") from None
        message = first["msg"].removeprefix("Value error, ")
        where = f"{field.upper()}: " if field else ""
        raise ConfigError(f"configuration error: {where}{message}") from None
