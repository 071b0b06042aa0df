"""Moved to :mod:`dokstamp_sync.dokstamp.ratelimit` (the limiter sits with the client it limits).

This alias remains only because ``sync/context.py`` (owned by the engine) still imports
:class:`RateLimiter` from here; it goes once that import names the new module.
"""

from dokstamp_sync.dokstamp.ratelimit import RateLimiter

__all__ = ["RateLimiter"]
