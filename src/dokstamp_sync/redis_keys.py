"""Every Redis name dokstamp-sync uses, in one place (as arq keeps its own in ``constants.py``).

The event stream's name is a setting (``DOKSTAMP_SYNC_STREAM``, CONTRACT §1); everything else is
fixed here so that no two modules can spell a key apart.
"""

QUEUE = "dokstamp-sync"  # the Celery queue (a Redis list) the tasks travel on
GROUP = "dokstamp-sync"  # the stream's consumer group
COUNTERS = "dokstamp:metrics"  # hash of fleet-wide counters (API responses, retries, outcomes)
HEARTBEAT = "dokstamp:heartbeat:"  # + "task" or "ingest:<consumer>": epoch seconds
# The stream ingester's last failed batch: JSON {"at": epoch s, "consumer", "reason"}.
INGEST_FAILURE = "dokstamp:ingest:failure"
LOCK = "dokstamp:lock:"  # + "entity:<entity>:<key>", "nk:<entity>:<sha256>", "listing:<entity>"
LISTING = "dokstamp:listing:"  # + entity: a fresh full listing is in the natural-key table
TOKEN = "dokstamp:token:"  # noqa: S105  # a key name, not a secret; + a digest of the credentials: the shared, encrypted access token
RATE_LIMIT = "dokstamp:ratelimit:"  # + tenant: the shared token bucket
PAUSE = "dokstamp:pause:"  # + tenant: every process holds its requests (after a 429)
BREAKER = "dokstamp:breaker:"  # + tenant: the fleet's circuit breaker (failures, open_until)
INFLIGHT = "dokstamp:inflight:"  # + "<entity>:<sha256 of natural key>": a failed create may land
