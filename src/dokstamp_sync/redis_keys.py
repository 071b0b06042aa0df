"""The Redis keys shared by every process (one place, so no two modules spell them apart)."""

COUNTERS = "dokstamp:metrics"  # hash of fleet-wide counters (API responses, retries, outcomes)
HEARTBEAT = "dokstamp:heartbeat:"  # + "task" or "ingest:<consumer>": epoch seconds
