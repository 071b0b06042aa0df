"""The worker's own start-up check as a one-shot command: ``python -m dokstamp_sync.ops.preflight``.

docker-compose.yml runs it before the worker (which depends on it), so that a configuration the
worker can never start with stops there, once, with one line, instead of the worker restarting
forever: a ``.env`` copied unchanged from ``.env.example`` (no credentials) exits 2 with
``configuration error: ...``; credentials DokStamp refuses, or a ``DOKSTAMP_TENANT`` that is not
the credentials' tenant, exit 1 with ``refusing to start: ...`` (the checks of
:func:`dokstamp_sync.ops.check.refusal`, the same the worker makes). A DokStamp that cannot be
reached passes (exit 0), as it does for the worker: events wait for it. Never a secret, never a
traceback.
"""

from __future__ import annotations

import sys

from dokstamp_sync.config import ConfigError, load_settings
from dokstamp_sync.dokstamp import client_from_settings
from dokstamp_sync.ops.check import refusal

HINT = "see .env.example and docs/configuration.md"


def main() -> int:
    """0: the worker may start; 2: the configuration is unusable; 1: DokStamp refused it."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"{exc} ({HINT})", file=sys.stderr)
        return 2
    client = client_from_settings(settings)
    try:
        problem = refusal(client, settings)
    finally:
        client.http.close()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    print("ok: the worker may start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
