"""Log formatting: plain text, or one JSON object per line (``DOKSTAMP_SYNC_LOG_JSON=true``).

Event outcome lines carry ``event_id``, ``entity``, ``key``, ``op`` and ``state`` as fields
(see :func:`dokstamp_sync.sync.engine._log`); nothing logged ever holds a token or password.
"""

from __future__ import annotations

import logging

from pythonjsonlogger.json import JsonFormatter

PLAIN = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def formatter(json_lines: bool) -> logging.Formatter:
    if json_lines:
        return JsonFormatter("%(asctime)s %(levelname)s %(name)s %(processName)s %(message)s",
                             rename_fields={"levelname": "level", "asctime": "time"})
    return logging.Formatter(PLAIN)


def use_json(logger: logging.Logger) -> None:
    """Switch every handler of ``logger`` to JSON lines."""
    for handler in logger.handlers:
        handler.setFormatter(formatter(True))


def setup(json_lines: bool, level: str = "INFO") -> None:
    """Logging for our own commands (the worker's is set up by Celery, see worker.py)."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(json_lines))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
