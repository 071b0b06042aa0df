"""The dead-letter console (``dokstamp-sync console``): see docs/console.md."""

from __future__ import annotations

from dokstamp_sync import wiring
from dokstamp_sync.config import StoreSettings
from dokstamp_sync.console.app import Console, build_app
from dokstamp_sync.console.auth import AuthMissing, Logins

__all__ = ["AuthMissing", "console_for", "serve"]


def console_for(settings: StoreSettings) -> Console:
    """The console's state from the settings; :class:`AuthMissing` without a login."""
    logins = Logins(settings.dokstamp_sync_console_auth,
                    settings.dokstamp_sync_console_readonly_auth)
    return Console(logins, wiring.database(settings.database_url),
                   wiring.redis_client(settings.redis_url), settings.dokstamp_sync_stream,
                   wiring.redis_keys(settings))


def serve(console: Console, host: str, port: int) -> None:
    """Serve ``console`` (see :func:`console_for`) until interrupted (uvicorn, one process)."""
    import uvicorn

    uvicorn.run(build_app(console), host=host, port=port, log_level="warning",
                access_log=False)
