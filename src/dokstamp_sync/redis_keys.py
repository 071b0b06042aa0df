"""Every Redis name dokstamp-sync uses, in one place (as arq keeps its own in ``constants.py``).

The event stream's and the outcome stream's names are settings (``DOKSTAMP_SYNC_STREAM``,
``DOKSTAMP_SYNC_RESULTS_STREAM``, CONTRACT §1); everything else is fixed here so that no two
modules can spell a key apart.

``DOKSTAMP_SYNC_NAMESPACE`` (environment or ``.env``, read once when this module is imported)
prefixes every name below: two deployments, or the demo beside a deployment, can share one
Redis database without sharing a consumer group, a Celery queue, locks, counters or tokens.
Empty by default: the names are then those of earlier versions.
"""

import os


def _namespace() -> str:
    value = os.environ.get("DOKSTAMP_SYNC_NAMESPACE")
    if value is None:  # as the settings do: the environment first, then a .env file
        from dotenv import dotenv_values

        value = dotenv_values(".env").get("DOKSTAMP_SYNC_NAMESPACE") or ""
    return value.strip()


NAMESPACE = _namespace()
QUEUE = f"{NAMESPACE}dokstamp-sync"  # the Celery queue (a Redis list) the tasks travel on
GROUP = f"{NAMESPACE}dokstamp-sync"  # the stream's consumer group
COUNTERS = f"{NAMESPACE}dokstamp:metrics"  # hash of fleet-wide counters (API, retries, outcomes)
HEARTBEAT = f"{NAMESPACE}dokstamp:heartbeat:"  # + "task" or "ingest:<consumer>": epoch seconds
# The stream ingester's last failed batch: JSON {"at": epoch s, "consumer", "reason"}.
INGEST_FAILURE = f"{NAMESPACE}dokstamp:ingest:failure"
# + "entity:<entity>:<key>", "nk:<entity>:<sha256>", "listing:<entity>", "outbox" (one sweeper)
LOCK = f"{NAMESPACE}dokstamp:lock:"
LISTING = f"{NAMESPACE}dokstamp:listing:"  # + entity: a fresh full listing is in the NK table
# A key name, not a secret; + a digest of the credentials: the shared, encrypted access token.
TOKEN = f"{NAMESPACE}dokstamp:token:"
RATE_LIMIT = f"{NAMESPACE}dokstamp:ratelimit:"  # + tenant: the shared token bucket
PAUSE = f"{NAMESPACE}dokstamp:pause:"  # + tenant: every process holds its requests (after a 429)
# + entity: the last listing could not be read completely; do not list again for a while
LISTING_UNTRUSTED = f"{NAMESPACE}dokstamp:listing-untrusted:"
BREAKER = f"{NAMESPACE}dokstamp:breaker:"  # + tenant: the fleet's circuit breaker
# + "<entity>:<sha256 of natural key>": a failed create may still land
INFLIGHT = f"{NAMESPACE}dokstamp:inflight:"
# + entity: the change guard's window, a sorted set of event_id -> arrival (epoch s)
GUARD = f"{NAMESPACE}dokstamp:guard:"

# The streams' default names (CONTRACT §1); settings may name others. Not namespaced: they are
# the ERP's interface, named in its own configuration.
EVENTS_STREAM = "dokstamp:events"
RESULTS_STREAM = "dokstamp:results"
