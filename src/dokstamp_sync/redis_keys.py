"""Every Redis name dokstamp-sync uses, in one place (as arq keeps its own in ``constants.py``).

:class:`RedisKeys` builds them from a namespace and reads nothing: wiring hands it
``Settings.dokstamp_sync_namespace``. The namespace prefixes every name: two deployments, or the
demo beside a deployment, can share one Redis database without sharing a consumer group, a
Celery queue, locks, counters or tokens. Empty by default: the names are then those of earlier
versions.

The event stream's and the outcome stream's names are settings (``DOKSTAMP_SYNC_STREAM``,
``DOKSTAMP_SYNC_RESULTS_STREAM``, docs/configuration.md), not namespaced: they are the ERP's
interface.

Nothing here reads the environment or runs at import: every module that touches Redis (the
walk, the token cache, the rate limiter, the breaker, the pipeline, the Celery queue, the
operator tools) is handed a :class:`RedisKeys` or one of its names by its caller, built once per
process by :func:`~.wiring.redis_keys`. Each takes ``RedisKeys()`` (no namespace) by default so
that tests can build it alone.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RedisKeys:
    """The Redis names of one deployment (``namespace``, already stripped)."""

    namespace: str = ""

    @property
    def queue(self) -> str:  # the Celery queue (a Redis list) the tasks travel on
        return f"{self.namespace}dokstamp-sync"

    @property
    def group(self) -> str:  # the stream's consumer group
        return f"{self.namespace}dokstamp-sync"

    @property
    def counters(self) -> str:  # hash of fleet-wide counters (API, retries, outcomes)
        return f"{self.namespace}dokstamp:metrics"

    @property
    def replica_counters(self) -> str:  # + replica name: what one worker replica's processes
        # did (ops.recorder), for its /metrics
        return f"{self.namespace}dokstamp:metrics:replica:"

    @property
    def heartbeat(self) -> str:  # + "task" or "ingest:<consumer>": epoch seconds
        return f"{self.namespace}dokstamp:heartbeat:"

    @property
    def ingest_failure(self) -> str:  # JSON {"at": epoch s, "consumer", "reason"}
        return f"{self.namespace}dokstamp:ingest:failure"

    @property
    def lock(self) -> str:  # + "entity:<entity>:<key>", "nk:<entity>:<sha256>", "listing:..."
        return f"{self.namespace}dokstamp:lock:"

    @property
    def listing(self) -> str:  # + scope (entity[:field=value]): its fresh full listing is
        # in the natural-key table
        return f"{self.namespace}dokstamp:listing:"

    @property
    def listing_untrusted(self) -> str:  # + entity: the last listing could not be read whole
        return f"{self.namespace}dokstamp:listing-untrusted:"

    @property
    def token(self) -> str:  # a key name, not a secret; + a digest of the credentials
        return f"{self.namespace}dokstamp:token:"

    @property
    def rate_limit(self) -> str:  # + tenant: the shared token bucket
        return f"{self.namespace}dokstamp:ratelimit:"

    @property
    def pause(self) -> str:  # + tenant: every process holds its requests (after a 429)
        return f"{self.namespace}dokstamp:pause:"

    @property
    def breaker(self) -> str:  # + tenant: the fleet's circuit breaker
        return f"{self.namespace}dokstamp:breaker:"

    @property
    def inflight(self) -> str:  # + "<entity>:<sha256 of natural key>": a create may still land
        return f"{self.namespace}dokstamp:inflight:"

    @property
    def unresolved(self) -> str:  # + as inflight: a create was sent, its outcome not recorded
        return f"{self.namespace}dokstamp:unresolved:"

    @property
    def guard(self) -> str:  # + entity: the change guard's window, event_id -> arrival (epoch s)
        return f"{self.namespace}dokstamp:guard:"


# The streams' default names (docs/configuration.md); settings may name others.
EVENTS_STREAM = "dokstamp:events"
RESULTS_STREAM = "dokstamp:results"
